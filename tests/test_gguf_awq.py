"""`qconvert gguf --method awq`: AWQ's scales folded into the norms (and v_proj) before llama.cpp's imatrix
quantizers. The file has llama.cpp's layout with the block linears and the folded norms changed, llama.cpp runs
it, and with every scale 1 the first layer is byte for byte llama.cpp's imatrix result (the plumbing: the same
importance, the same quantizers). `--method awq-gptq` (the same scales, then GPTQ's sweep) likewise, and with
every scale 1 its whole file is `--method gptq`'s."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from qconvert.algorithms.gguf_awq import GGUFAWQ
from qconvert.gguf_pipeline import GGUFRequest, run
from qconvert.pipeline import Calibration
from qconvert.testing.tiny_models import make_tiny_model

CALIBRATION = Calibration("mixed", samples=8, seq_len=64)
FLOATS = (Q.F32, Q.F16, Q.BF16)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-awq")
    return make_tiny_model(d / "hf", "llama", 2, tokenizer="sentencepiece", hidden_size=256, intermediate_size=512,
                           head_dim=64, num_attention_heads=4, num_key_value_heads=2)


def _tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_same_layout_as_llama_cpp_folded_norms_and_llama_cpp_runs_it(oracle, tiny_llama, tmp_path, method):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run(GGUFRequest(str(tiny_llama), ref, "Q4_K_M", device="cpu"))
    summary = run(GGUFRequest(str(tiny_llama), ours, "Q4_K_M", calibration=CALIBRATION, device="cpu", method=method))
    a, b = GGUFReader(str(ours)), GGUFReader(str(ref))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in b.tensors]
    assert {k: f.contents() for k, f in a.fields.items()} == {k: f.contents() for k, f in b.fields.items()}
    changed = {t.name for t, r in zip(a.tensors, b.tensors) if not np.array_equal(t.data, r.data)}
    linears = {t.name for t in a.tensors if t.name.startswith("blk.") and t.tensor_type not in FLOATS}
    assert linears <= changed
    # the scales went into the norms before q/k/v and gate/up; the embeddings and the output are llama.cpp's
    assert {f"blk.{i}.{n}_norm.weight" for i in (0, 1) for n in ("attn", "ffn")} <= changed
    assert not changed & {"token_embd.weight", "output.weight", "output_norm.weight"}
    assert summary["method"] == method
    tokens = oracle.tokenize(ours, "The quick brown fox jumps over the lazy dog.")
    logits, reference = oracle.logits(ours, tokens), oracle.logits(ref, tokens)
    assert np.isfinite(logits).all()
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.9


def _with_every_scale_1(model, tmp_path, monkeypatch, method: str, reference: str) -> tuple[dict, dict]:
    """The tensors of `method` with AWQ's search forced to s = 1, and those of the `reference` method."""
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run(GGUFRequest(str(model), ref, "Q4_K_M", calibration=CALIBRATION, device="cpu", method=reference))
    monkeypatch.setattr(GGUFAWQ, "_search", lambda self, g, ranks: torch.ones_like(g.abs_sum))
    run(GGUFRequest(str(model), ours, "Q4_K_M", calibration=CALIBRATION, device="cpu", method=method))
    return _tensors(ours), _tensors(ref)


def test_with_every_scale_1_the_first_layer_is_the_imatrix_result(tiny_llama, tmp_path, monkeypatch):
    a, b = _with_every_scale_1(tiny_llama, tmp_path, monkeypatch, "awq", "imatrix")
    first = [n for n in a if n.startswith("blk.0.")]
    assert any(a[n].tensor_type not in FLOATS for n in first)
    for name in first:  # (later layers see the quantized layers' outputs, the imatrix the float model's)
        assert np.array_equal(a[name].data, b[name].data), name


def test_with_every_scale_1_awq_gptq_is_gptq(tiny_llama, tmp_path, monkeypatch):
    a, b = _with_every_scale_1(tiny_llama, tmp_path, monkeypatch, "awq-gptq", "gptq")
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name].data, b[name].data), name


def test_awq_with_an_imatrix_is_refused(tiny_llama, tmp_path):
    from qconvert.errors import QConvertError

    with pytest.raises(QConvertError, match="--method awq computes its own importance"):
        run(GGUFRequest(str(tiny_llama), tmp_path / "a.gguf", "Q4_K_M", method="awq", imatrix=True))
    assert not list(tmp_path.iterdir())
