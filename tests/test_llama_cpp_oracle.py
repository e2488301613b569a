"""The llama.cpp oracle (qconvert.testing.llama_cpp) works: ggml quantizers through ctypes, the HF->GGUF
converter, llama-quantize, and llama-cpp-python inference. Skipped only when llama.cpp was never built
(`bash scripts/build_llama_cpp.sh`); CI builds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qconvert.testing.llama_cpp import OracleUnavailable, locate


@pytest.fixture(scope="module")
def oracle():
    try:
        return locate()
    except OracleUnavailable as e:
        pytest.skip(str(e))


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


def _sentencepiece_tokenizer(model_dir: Path) -> None:
    """Replace model_dir's byte-level BPE tokenizer with a SentencePiece one (tokenizer.model), the kind
    convert_hf_to_gguf.py accepts for llama without a known pre-tokenizer hash."""
    import sentencepiece as spm

    from qconvert.calibration.datasets import load_texts

    text = "\n".join(load_texts("mixed")[:12])
    lines = [line for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(model_dir / "tokenizer"), vocab_size=512,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    (model_dir / "tokenizer.vocab").unlink()
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))


@pytest.fixture(scope="module")
def tiny_llama_gguf(oracle, tmp_path_factory):
    from qconvert.testing.tiny_models import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", layers=2)
    _sentencepiece_tokenizer(model_dir)
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    oracle.convert_hf(model_dir, out, outtype="f32")
    return out


def test_convert_and_run(oracle, tiny_llama_gguf):
    import gguf

    reader = gguf.GGUFReader(tiny_llama_gguf)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == 3 + 2 * 9  # token_embd, output_norm, output (untied) + 9 per layer
    tokens = oracle.tokenize(tiny_llama_gguf, "The quick brown fox jumps over the lazy dog.")
    assert tokens[0] == 1 and len(tokens) > 5 and max(tokens) < 512
    logits = oracle.logits(tiny_llama_gguf, tokens)
    assert logits.shape == (len(tokens), 512)
    assert np.isfinite(logits).all() and logits.std() > 0
    assert np.array_equal(oracle.logits(tiny_llama_gguf, tokens), logits)  # cached model, reset between calls


def test_quantize_file(oracle, tiny_llama_gguf, tmp_path):
    import gguf

    out = tmp_path / "tiny-q8_0.gguf"
    seconds = oracle.quantize_file(tiny_llama_gguf, out, "Q8_0")
    assert seconds > 0 and out.is_file()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
