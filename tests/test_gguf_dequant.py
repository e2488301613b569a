"""The PyTorch GGUF dequantizers give gguf-py's (ggml's) float32 values bit for bit, for every block type
qconvert writes, on bytes from the quantizers and on random bytes (every code and scale bit pattern)."""

import gguf
import numpy as np
import pytest
import torch

from qconvert.formats.gguf import quants
from qconvert.formats.gguf.quants import dequant

T = gguf.GGMLQuantizationType


def _reference(raw: torch.Tensor, qtype: T) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw.numpy(), qtype), dtype=np.float32))


# byte offsets of the float16 fields in each block (ggml-common.h)
_HALVES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q2_K: (80, 82),
           T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _random_bytes(qtype: T, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random block bytes with finite float16 fields (a NaN compares unequal to itself)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, cols // block, size), dtype=torch.uint8, generator=g)
    for at in _HALVES[qtype]:
        raw[..., at + 1] &= 0x7B  # exponent below 31
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [t for t in dequant.DEQUANTIZERS if t not in (T.F32, T.F16, T.BF16)],
                         ids=lambda t: t.name)
def test_dequantizers_equal_gguf_py(qtype):
    g = torch.Generator().manual_seed(int(qtype))
    w = torch.randn(8, 512, generator=g) * torch.logspace(-3, 1, 8).unsqueeze(1)
    quantized = quants.quantize(w, qtype)
    for raw in (quantized, _random_bytes(qtype, 8, 512, int(qtype))):
        got = quants.dequantize(raw, qtype, (8, 512))
        want = _reference(raw, qtype)
        assert got.dtype == torch.float32 and got.shape == (8, 512)
        assert torch.equal(got, want), f"{qtype.name}: {int((got != want).sum())} values differ"


def test_dequantize_keeps_the_device_and_reads_bytes():
    raw = quants.quantize(torch.randn(4, 256), T.Q4_K)
    assert torch.equal(quants.dequantize(bytes(raw.numpy().tobytes()), T.Q4_K, (4, 256)),
                       quants.dequantize(raw, T.Q4_K, (4, 256)))
    assert quants.dequantize(raw.to("meta"), T.Q4_K, (4, 256)).device.type == "meta"
