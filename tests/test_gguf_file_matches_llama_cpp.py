"""Whole GGUF files, every type, with and without an importance matrix, are byte-identical to
llama.cpp's converter (to the checkpoint's own bf16) followed by llama-quantize; llama.cpp loads
them and computes the same logits."""

import hashlib

import numpy as np
import pytest

from qconvert.formats.gguf import imatrix as imx
from qconvert.gguf_pipeline import FLOAT_OUTPUTS, TYPES, GGUFRequest, run
from qconvert.pipeline import Calibration
from qconvert.testing.tiny_models import make_tiny_model

QUANTIZED = [t for t in TYPES if t not in FLOAT_OUTPUTS and t != "Q2_K_S"]  # Q2_K_S needs an imatrix
K_FRIENDLY = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama": ("llama", 4, K_FRIENDLY),
    "qwen2": ("qwen2", 2, dict(intermediate_size=384)),  # rows of 128 and 384: the fallback types
    "qwen3": ("qwen3", 2, K_FRIENDLY),
    "gemma3": ("gemma3_text", 3, {**K_FRIENDLY, "tie_word_embeddings": True}),
    "mixtral": ("mixtral", 2, {**K_FRIENDLY, "intermediate_size": 256}),
}
CALIBRATION = Calibration("mixed", samples=4, seq_len=64)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, oracle, tmp_path_factory):
    """(checkpoint dir, llama.cpp's bf16 conversion, our imatrix file) for one tiny model."""
    arch, layers, overrides = MODELS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(d / "hf", arch, layers, tokenizer="sentencepiece", **overrides)
    oracle.convert_hf(hf, d / "bf16.gguf", "bf16")
    im = d / "imatrix.gguf"
    run(GGUFRequest(str(hf), d / "first.gguf", "Q4_K_M", imatrix=True, save_imatrix=im, calibration=CALIBRATION,
                    device="cpu"))
    return hf, d / "bf16.gguf", im


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_every_type_is_byte_identical(oracle, model, with_imatrix, tmp_path):
    hf, bf16, im = model
    mismatched = []
    for type_name in QUANTIZED + (["Q2_K_S"] if with_imatrix else []):
        ref, ours = tmp_path / f"ref-{type_name}.gguf", tmp_path / f"ours-{type_name}.gguf"
        oracle.quantize_file(bf16, ref, type_name, imatrix=im if with_imatrix else None)
        run(GGUFRequest(str(hf), ours, type_name, imatrix_file=im if with_imatrix else None, device="cpu"))
        if _sha(ref) != _sha(ours):
            mismatched.append(type_name)
    assert not mismatched


def test_imatrix_covers_every_matrix(model):
    hf, bf16, im = model
    from gguf import GGUFReader

    matrices = {t.name for t in GGUFReader(str(bf16)).tensors
                if len(t.shape) >= 2 and int(t.shape[1]) > 1 and "ffn_gate_inp" not in t.name}
    entries = imx.read(im).entries
    assert matrices - {"token_embd.weight"} <= set(entries)
    assert all(e.counts.min() >= 0 and np.isfinite(e.sums).all() for e in entries.values())


def test_llama_cpp_runs_our_file_with_the_same_logits(oracle, model, tmp_path):
    hf, bf16, im = model
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    oracle.quantize_file(bf16, ref, "Q4_K_M", imatrix=im)
    run(GGUFRequest(str(hf), ours, "Q4_K_M", imatrix_file=im, device="cpu"))
    tokens = oracle.tokenize(ours, "The quick brown fox jumps over the lazy dog.")
    assert tokens == oracle.tokenize(ref, "The quick brown fox jumps over the lazy dog.")
    a, b = oracle.logits(ours, tokens), oracle.logits(ref, tokens)
    assert np.isfinite(a).all() and np.array_equal(a, b)
