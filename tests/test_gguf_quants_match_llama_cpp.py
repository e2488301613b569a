"""qconvert's GGUF block quantizers against llama.cpp's own (ggml_quantize_chunk via ctypes): byte equality,
for both implementations: the C one (native.c, which CPU and CUDA use) and the PyTorch one (the fallback
without a compiler; the GGUF GPTQ rounding hook builds on it).

Every supported type, without and with an importance matrix, on inputs chosen to hit the corner
cases of ggml-quants.c (ties, signed zeros, all-zero and constant blocks, negative extremes, tiny
and huge magnitudes, sparse rows, zero importance weights).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qconvert.formats.gguf.quants import SUPPORTED, dequantize, native, quantize, row_bytes
from qconvert.testing.gguf_inputs import edge_imatrices, edge_rows

T = gguf.GGMLQuantizationType
BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
COLS = 512
X = edge_rows(COLS)
IMATRICES = edge_imatrices(COLS)


def _ours(x: np.ndarray, qtype, imatrix, compiled: bool = True, threads: int | None = None) -> np.ndarray:
    im = None if imatrix is None else torch.from_numpy(imatrix)
    out = quantize(torch.from_numpy(x), qtype, im, threads, compiled)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (x.shape[0], row_bytes(qtype, x.shape[1]))
    return out.numpy()


def _theirs(oracle, x: np.ndarray, qtype, imatrix) -> np.ndarray:
    return np.frombuffer(oracle.quantize_rows(int(qtype), x, imatrix), dtype=np.uint8).reshape(x.shape[0], -1)


def _assert_same(ours: np.ndarray, ref: np.ndarray, what: str):
    if not np.array_equal(ours, ref):
        rows = sorted(set(np.argwhere(ours != ref)[:, 0].tolist()))
        raise AssertionError(f"{what}: bytes differ from llama.cpp in rows {rows}")


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_match_llama_cpp(oracle, qtype, compiled):
    if compiled:
        assert native.library() is not None, "the C quantizers did not build (a C compiler is needed)"
    for name, imatrix in [("no imatrix", None), *IMATRICES.items()]:
        ours = _ours(X, qtype, imatrix, compiled)
        _assert_same(ours, _theirs(oracle, X, qtype, imatrix), f"{qtype.name} ({name})")
        if imatrix is None:
            # round trip: bytes -> floats of the original shape, close to the input on gaussian rows
            back = dequantize(torch.from_numpy(ours), qtype, X.shape)
            assert back.dtype == torch.float32 and tuple(back.shape) == X.shape
            err = np.abs(back[:4].numpy() - X[:4]).mean() / np.abs(X[:4]).mean()
            assert err < 0.35, (qtype.name, err)


def test_rows_are_independent_of_chunking(oracle):
    # more rows than one CPU chunk holds, so the chunk loop is exercised too
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1030, 256)).astype(np.float32)
    im = rng.random(256).astype(np.float32)
    for qtype, imatrix in [(T.Q4_K, None), (T.Q6_K, im), (T.Q4_0, im)]:
        ref = _theirs(oracle, x, qtype, imatrix)
        _assert_same(_ours(x, qtype, imatrix, compiled=False), ref, qtype.name)
        for threads in (1, 3):  # the C path splits rows into tasks over threads
            _assert_same(_ours(x, qtype, imatrix, threads=threads), ref, f"{qtype.name}, {threads} threads")


# The GPU path (same bytes on CUDA) is checked by scripts/gguf_gpu_check.py on a GPU machine.


# ---- F32 / F16 / BF16 -----------------------------------------------------------------------------

def _edge_floats() -> np.ndarray:
    bits = np.array([
        0x00000000, 0x80000000, 0x3F800000, 0xBF800000,          # +-0, +-1
        0x7F800000, 0xFF800000,                                  # +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FC12345, 0xFFBFFFFF,  # NaNs (quiet, signalling, payloads)
        0x00000001, 0x807FFFFF, 0x00800000,                      # fp32 subnormals, smallest normal
        0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF,          # fp16: 2^-24, 2^-25 (tie to 0), around it
        0x33C00000, 0x387FC000, 0x38800000,                      # 1.5*2^-24 (tie), fp16 subnormal/normal edge
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,          # 65504, just below/at/above the inf threshold
        0x3F801000, 0x3F803000, 0x3F800FFF,                      # fp16 ties to even / below
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,          # bf16 ties to even / around
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,                      # max float; bf16 rounding to inf
        0x0000FFFF, 0x00008000, 0x00018000,                      # bf16 on fp32 subnormals
    ], dtype=np.uint32)
    rng = np.random.default_rng(3)
    rand = rng.integers(0, 2**32, 256 - bits.size, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits, rand]).view(np.float32).reshape(2, 128)


def _f16_reference(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_fp16: IEEE round to nearest even; every NaN -> sign | 0x7E00."""
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    sign = (x.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
    return np.where(np.isnan(x), sign | 0x7E00, h).astype(np.uint16)


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16, computed in 64-bit integers."""
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return np.where(nan, ((u >> 16) | 64) & 0xFFFF, rounded).astype(np.uint16)


def test_f16_bf16_f32_match_ggml_rules():
    x = _edge_floats()
    f16 = quantize(torch.from_numpy(x), T.F16).numpy().view(np.uint16)
    assert np.array_equal(f16, _f16_reference(x))
    bf16 = quantize(torch.from_numpy(x), T.BF16).numpy().view(np.uint16)
    assert np.array_equal(bf16, _bf16_reference(x))
    f32 = quantize(torch.from_numpy(x), T.F32).numpy()
    assert f32.tobytes() == x.tobytes()


def test_f16_bf16_match_llama_cpp(oracle):
    x = _edge_floats()
    for qtype in (T.F16, T.BF16):
        _assert_same(_ours(x, qtype, None), _theirs(oracle, x, qtype, None), qtype.name)


# ---- API errors -------------------------------------------------------------------------------------

def test_bad_arguments_raise_value_error():
    x = torch.zeros(2, 256)
    with pytest.raises(ValueError, match="not supported"):
        quantize(x, T.IQ2_XXS)
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize(torch.zeros(2, 100), T.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize(x, T.Q4_K, torch.ones(128))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(256), T.Q8_0)
    assert set(BLOCK_TYPES) | {T.F32, T.F16, T.BF16} == set(SUPPORTED)


def test_without_a_compiler_the_torch_quantizers_take_over(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_built", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path))
    x = torch.from_numpy(X[:4])
    expected = quantize(x, T.Q4_K, compiled=False)
    with caplog.at_level("WARNING"):
        assert native.library() is None
        assert torch.equal(quantize(x, T.Q4_K), expected)
    assert "GGUF C quantizers unavailable" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache
