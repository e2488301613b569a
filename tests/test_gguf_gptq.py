"""`qconvert gguf --method gptq`: GPTQ's error compensation onto the GGUF types. Lower output error than the
imatrix path on the same type; the file has llama.cpp's layout (types, metadata, tensor order) with only the
block contents changed, and llama.cpp runs it."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from qconvert.algorithms.gguf_gptq import importance, sweep
from qconvert.algorithms.gptq import inverse_cholesky
from qconvert.formats.gguf import quants
from qconvert.formats.gguf.quants import legacy, native
from qconvert.gguf_pipeline import GGUFRequest, run
from qconvert.pipeline import Calibration
from qconvert.testing.tiny_models import make_tiny_model

CALIBRATION = Calibration("mixed", samples=8, seq_len=64)


def _layer(cols: int, rows: int = 48, tokens: int = 2048):
    """A weight and inputs with correlated, unevenly scaled channels, like a transformer's."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.rand(cols, generator=g).add(0.2)
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def _output_error(x, w, raw, qtype):
    q = quants.dequantize(raw, qtype, w.shape)
    return float((x @ (w - q).T).pow(2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.Q3_K])
def test_lower_output_error_than_the_imatrix_path(qtype):
    w, x = _layer(512)
    h = 2 / len(x) * x.T @ x
    imatrix = importance(h)
    plain = quants.quantize(w, qtype, imatrix)  # llama.cpp's quantizer with the same importance
    u = inverse_cholesky([h.flip(0, 1).contiguous()], 0.01)
    ours = sweep(w.clone(), u, qtype, imatrix)
    assert ours.shape == plain.shape and ours.dtype == torch.uint8
    gptq_err, imatrix_err = _output_error(x, w, ours, qtype), _output_error(x, w, plain, qtype)
    assert gptq_err < 0.8 * imatrix_err, (gptq_err, imatrix_err)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K])
def test_with_nothing_to_compensate_the_bytes_are_llama_cpps(qtype):
    """With H = I no error is passed on: the column-by-column rounding on llama.cpp's scales must give
    llama.cpp's own bytes (ggml_quantize_chunk's, per the quantizer tests): the k-quants round their codes
    on the stored scales last, too."""
    w, x = _layer(512)
    imatrix = importance(2 / len(x) * x.T @ x)
    assert torch.equal(sweep(w.clone(), torch.eye(512), qtype, imatrix), quants.quantize(w, qtype, imatrix))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1, Q.Q8_0])
@pytest.mark.parametrize("with_imatrix", [True, False], ids=["imatrix", "plain"])
def test_the_32_value_types_keep_llama_cpps_scales_and_round_to_the_nearest_code(qtype, with_imatrix):
    """llama.cpp's 32-value quantizers keep the codes of their scale search, made with a scale before its
    float16 rounding (or, with an imatrix, before the least-squares refit): with H = I the sweep keeps each
    block's stored d (and m) and rounds every value to its nearest code on them, so no value's error is
    above llama.cpp's, and some are below."""
    w, x = _layer(512)
    imatrix = importance(2 / len(x) * x.T @ x) if with_imatrix else None
    ours, theirs = sweep(w.clone(), torch.eye(512), qtype, imatrix), quants.quantize(w, qtype, imatrix)
    size = ours.shape[1] // 16
    ours_b, theirs_b = ours.reshape(-1, 16, size), theirs.reshape(-1, 16, size)
    scale_bytes = 4 if legacy.CODES[qtype].has_min else 2
    assert torch.equal(ours_b[..., :scale_bytes], theirs_b[..., :scale_bytes])
    our_err = (w - quants.dequantize(ours, qtype, w.shape)).abs()
    their_err = (w - quants.dequantize(theirs, qtype, w.shape)).abs()
    assert bool((our_err <= their_err + 1e-7).all())
    assert float(our_err.pow(2).sum()) < float(their_err.pow(2).sum())


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q5_1])
@pytest.mark.parametrize("with_imatrix", [True, False], ids=["imatrix", "plain"])
def test_the_compiled_sweep_gives_the_pytorch_sweeps_bytes(qtype, with_imatrix, monkeypatch):
    """The C sweep (native.c, a row per thread; CUDA's is the same source) against the PyTorch one."""
    w, x = _layer(512, rows=37)  # rows that do not split evenly over threads
    h = 2 / len(x) * x.T @ x
    imatrix = importance(h) if with_imatrix else None
    u = inverse_cholesky([h.flip(0, 1).contiguous()], 0.01)  # column-major, as in the algorithm
    assert native.available(torch.device("cpu"))
    compiled = sweep(w.clone(), u, qtype, imatrix)
    monkeypatch.setitem(native._built, "cpu", None)  # no C library: the PyTorch quantizers and rounding hook
    assert not native.available(torch.device("cpu"))
    assert torch.equal(compiled, sweep(w.clone(), u, qtype, imatrix))


def test_the_first_super_block_keeps_llama_cpps_scales():
    """Its scales come from llama.cpp's search on weights no error has reached yet; only its codes move."""
    w, x = _layer(512)
    h = 2 / len(x) * x.T @ x
    u = inverse_cholesky([h.flip(0, 1).contiguous()], 0.01)
    ours = sweep(w.clone(), u, Q.Q4_K, importance(h))
    first = quants.quantize(w[:, :256], Q.Q4_K, importance(h)[:256])
    assert torch.equal(ours[:, :16], first[:, :16])  # block_q4_K: d, dmin, scales[12]
    assert not torch.equal(ours[:, 16:144], first[:, 16:])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-gptq")
    return make_tiny_model(d / "hf", "llama", 2, tokenizer="sentencepiece", hidden_size=256, intermediate_size=512,
                           head_dim=64, num_attention_heads=4, num_key_value_heads=2)


def test_same_file_layout_as_llama_cpp_and_llama_cpp_runs_it(oracle, tiny_llama, tmp_path):
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    run(GGUFRequest(str(tiny_llama), ref, "Q4_K_M", device="cpu"))  # byte-identical to llama.cpp's (other tests)
    summary = run(GGUFRequest(str(tiny_llama), ours, "Q4_K_M", calibration=CALIBRATION, device="cpu",
                              method="gptq"))
    a, b = GGUFReader(str(ours)), GGUFReader(str(ref))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in b.tensors]
    assert {k: f.contents() for k, f in a.fields.items()} == {k: f.contents() for k, f in b.fields.items()}
    changed = {t.name for t, r in zip(a.tensors, b.tensors) if not np.array_equal(t.data, r.data)}
    # every block linear got its own codes; the norms and the embeddings are llama.cpp's
    assert {n for n in changed} == {t.name for t in a.tensors if t.name.startswith("blk.") and
                                    t.tensor_type not in (Q.F32, Q.F16, Q.BF16)}
    assert summary["method"] == "gptq"
    tokens = oracle.tokenize(ours, "The quick brown fox jumps over the lazy dog.")
    logits = oracle.logits(ours, tokens)
    reference = oracle.logits(ref, tokens)
    assert np.isfinite(logits).all()
    assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.9


def test_q_rows_follow_llama_cpp_rope_permutation(tiny_llama, tmp_path):
    """The engine quantizes the checkpoint's rows; the GGUF tensor holds them in llama.cpp's rope order."""
    from safetensors.torch import load_file

    from qconvert.formats.gguf.convert.tensors import _permute

    out = tmp_path / "ours.gguf"
    run(GGUFRequest(str(tiny_llama), out, "Q8_0", calibration=CALIBRATION, device="cpu", method="gptq"))
    t = next(t for t in GGUFReader(str(out)).tensors if t.name == "blk.0.attn_q.weight")
    q = quants.dequantize(np.asarray(t.data), Q.Q8_0, (256, 256)).ravel()
    w = load_file(tiny_llama / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    assert torch.corrcoef(torch.stack([_permute(w, 4).ravel(), q]))[0, 1] > 0.99
    assert torch.corrcoef(torch.stack([w.ravel(), q]))[0, 1] < 0.5


def test_the_tensors_outside_the_blocks_quantized_beside_the_engine_give_the_same_file(tiny_llama, tmp_path,
                                                                                     monkeypatch):
    """On a GPU the embeddings and the output are quantized while the engine runs; here on the CPU."""
    from qconvert import gguf_pipeline
    from qconvert.formats.gguf import quantized_file

    after, beside = tmp_path / "after.gguf", tmp_path / "beside.gguf"
    run(GGUFRequest(str(tiny_llama), after, "Q4_K_M", calibration=CALIBRATION, device="cpu", method="gptq"))
    monkeypatch.setattr(gguf_pipeline, "BESIDE_ENGINE", ("cpu",))
    ahead = []
    encode_tensors = quantized_file.encode_tensors
    monkeypatch.setattr(quantized_file, "encode_tensors",
                        lambda specs, *a: ahead.extend(s.gguf_name for s in specs) or encode_tensors(specs, *a))
    summary = run(GGUFRequest(str(tiny_llama), beside, "Q4_K_M", calibration=CALIBRATION, device="cpu",
                              method="gptq"))
    assert sorted(ahead) == ["output.weight", "token_embd.weight"]
    assert beside.read_bytes() == after.read_bytes()
    assert summary["tensors"]["token_embd.weight"]["weight_error"] > 0


def test_bad_method_combinations_are_refused(tiny_llama, tmp_path):
    from qconvert.errors import QConvertError

    with pytest.raises(QConvertError, match="unknown --method"):
        run(GGUFRequest(str(tiny_llama), tmp_path / "a.gguf", "Q4_K_M", method="awq2"))
    with pytest.raises(QConvertError, match="only applies to quantized types"):
        run(GGUFRequest(str(tiny_llama), tmp_path / "a.gguf", "F16", method="gptq"))
    with pytest.raises(QConvertError, match="drop --imatrix"):
        run(GGUFRequest(str(tiny_llama), tmp_path / "a.gguf", "Q4_K_M", method="gptq", imatrix=True))
    assert not list(tmp_path.iterdir())
