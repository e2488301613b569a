"""The llama.cpp oracle (qconvert.testing.llama_cpp) works: ggml quantizers through ctypes, the HF->GGUF
converter, llama-quantize, llama-imatrix, llama-perplexity, and llama-cpp-python inference. Skipped when
llama.cpp was never built (`bash scripts/build_llama_cpp.sh`) and LLAMA_CPP_DIR is unset; CI builds it."""

from __future__ import annotations

import numpy as np
import pytest



def _dequantize(raw: bytes, qtype, shape) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(shape[0], -1), qtype)


@pytest.mark.parametrize("qtype, rel_err", [("Q8_0", 0.01), ("Q4_K", 0.12)])
def test_quantize_rows(oracle, qtype, rel_err):
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    rows, cols = 8, 512
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    raw = oracle.quantize_rows(int(t), x)
    assert len(raw) == rows * cols // block * type_size
    y = _dequantize(raw, t, x.shape)
    assert y.shape == x.shape
    err = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert 0 < err < rel_err, err
    # deterministic, and an importance matrix is accepted (and changes K-quant rounding)
    assert oracle.quantize_rows(int(t), x) == raw
    imatrix = np.random.default_rng(1).uniform(0.1, 10, cols).astype(np.float32)
    raw_i = oracle.quantize_rows(int(t), x, imatrix)
    assert len(raw_i) == len(raw)
    if qtype == "Q4_K":
        assert raw_i != raw
    with pytest.raises(ValueError):
        oracle.quantize_rows(int(t), x[:, :100])


@pytest.fixture(scope="module")
def tiny_llama_gguf(oracle, tmp_path_factory):
    from qconvert.testing.tiny_models import make_tiny_model

    # SentencePiece: convert_hf_to_gguf.py rejects the default byte-level BPE (unknown pre-tokenizer hash)
    model_dir = make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", layers=2, tokenizer="sentencepiece")
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    oracle.convert_hf(model_dir, out, outtype="f32")
    return model_dir, out


def test_convert_and_run(oracle, tiny_llama_gguf):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, tiny_llama_gguf = tiny_llama_gguf
    reader = gguf.GGUFReader(tiny_llama_gguf)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == 3 + 2 * 9  # token_embd, output_norm, output (untied) + 9 per layer
    tokens = oracle.tokenize(tiny_llama_gguf, "The quick brown fox jumps over the lazy dog.")
    assert tokens[0] == 1 and len(tokens) > 5 and max(tokens) < 512
    logits = oracle.logits(tiny_llama_gguf, tokens)
    assert logits.shape == (len(tokens), 512)
    assert np.isfinite(logits).all() and logits.std() > 0
    assert np.array_equal(oracle.logits(tiny_llama_gguf, tokens), logits)  # cached model, reset between calls
    # same tokens and (f32) logits as transformers
    assert tokens == AutoTokenizer.from_pretrained(model_dir)("The quick brown fox jumps over the lazy dog.")["input_ids"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([tokens])).logits[0]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-2)


def test_quantize_file(oracle, tiny_llama_gguf, tmp_path):
    """llama-quantize's Q8_0 tensor bytes are exactly ggml_quantize_chunk's (the ctypes path)."""
    import gguf

    _, tiny_llama_gguf = tiny_llama_gguf
    out = tmp_path / "tiny-q8_0.gguf"
    seconds = oracle.quantize_file(tiny_llama_gguf, out, "Q8_0")
    assert seconds > 0 and out.is_file()
    f32 = {t.name: t for t in gguf.GGUFReader(tiny_llama_gguf).tensors}
    q8 = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert q8["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    t = q8["blk.0.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    expected = oracle.quantize_rows(int(t.tensor_type), np.asarray(f32[t.name].data))
    assert bytes(np.asarray(t.data)) == expected


def test_perplexity_imatrix(oracle, tiny_llama_gguf, tmp_path):
    from qconvert.calibration.datasets import load_texts

    _, tiny_llama_gguf = tiny_llama_gguf
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(load_texts("mixed")[:20]))
    ppl = oracle.perplexity(tiny_llama_gguf, text, ctx=128, extra_args=("--chunks", "4"))
    assert 50 < ppl < 5000  # random weights: about the vocabulary size
    imatrix = oracle.imatrix(tiny_llama_gguf, text, tmp_path / "imatrix.gguf", ctx=128, extra_args=("--chunks", "4"))
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    oracle.quantize_file(tiny_llama_gguf, plain, "Q4_K_M")
    oracle.quantize_file(tiny_llama_gguf, weighted, "Q4_K_M", imatrix=imatrix)
    assert plain.read_bytes() != weighted.read_bytes()
