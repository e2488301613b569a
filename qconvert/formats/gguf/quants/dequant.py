"""GGUF block bytes back to float32 in PyTorch, on the device the bytes are on.

Each function takes uint8 [rows, blocks * block bytes] and returns float32 [rows, blocks * block values],
with ggml's dequantize_row_* arithmetic (float32, one rounding per C operation, the same order), so the
values equal gguf-py's and ggml's. The calibrated GGUF path dequantizes every block column it rounds,
on the GPU: through NumPy on the host that was most of its time.
"""

from __future__ import annotations

import gguf
import torch

T = gguf.GGMLQuantizationType


def _blocks(raw: torch.Tensor, size: int) -> torch.Tensor:
    return raw.reshape(raw.shape[0], -1, size)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields [..., 2] -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _u32(b: torch.Tensor) -> torch.Tensor:
    """Little-endian uint32 fields [..., 4] -> int64 [..., 1]."""
    b = b.long()
    return b[..., 0:1] | b[..., 1:2] << 8 | b[..., 2:3] << 16 | b[..., 3:4] << 24


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [..., 16] -> [..., 32]: low nibbles are elements 0-15, high nibbles 16-31 (the 32-value types)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _fifth_bit(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 qh (uint32 [..., 1]) -> bit j of element j as 0 or 16, [..., 32]."""
    j = torch.arange(32, device=qh.device)
    return ((qh >> j) & 1) << 4


def q8_0(raw):  # block layout: ggml block_q8_0 {half d; int8 qs[32]}
    b = _blocks(raw, 34)
    return (_f16(b[..., :2]) * b[..., 2:].view(torch.int8).float()).flatten(1)


def q4_0(raw):  # block_q4_0 {half d; uint8 qs[16]}
    b = _blocks(raw, 18)
    return ((_nibbles(b[..., 2:]).float() - 8) * _f16(b[..., :2])).flatten(1)


def q4_1(raw):  # block_q4_1 {half d, m; uint8 qs[16]}
    b = _blocks(raw, 20)
    return (_nibbles(b[..., 4:]).float() * _f16(b[..., :2]) + _f16(b[..., 2:4])).flatten(1)


def q5_0(raw):  # block_q5_0 {half d; uint8 qh[4]; uint8 qs[16]}
    b = _blocks(raw, 22)
    q = (_nibbles(b[..., 6:]).long() | _fifth_bit(_u32(b[..., 2:6]))) - 16
    return (q.float() * _f16(b[..., :2])).flatten(1)


def q5_1(raw):  # block_q5_1 {half d, m; uint8 qh[4]; uint8 qs[16]}
    b = _blocks(raw, 24)
    q = _nibbles(b[..., 8:]).long() | _fifth_bit(_u32(b[..., 4:8]))
    return (q.float() * _f16(b[..., :2]) + _f16(b[..., 2:4])).flatten(1)


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and mins (ggml get_scale_min_k4)."""
    s = s.long()
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | (lo >> 6) << 4], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | (mid >> 6) << 4], dim=-1)
    return sc.float(), mn.float()


def _k_values(q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor):
    """q [..., 8, 32] codes of eight 32-value sub-blocks -> d*sc*q - dmin*m, [rows, values]."""
    return ((d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)).flatten(1)


def _interleaved_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [..., 128] -> [..., 8, 32]: each 32 bytes hold sub-block 2i in low nibbles, 2i+1 in high ones."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=-2).flatten(-3, -2)


def q4_k(raw):  # block_q4_K {half d, dmin; uint8 scales[12]; uint8 qs[128]}
    b = _blocks(raw, 144)
    sc, mn = _k4_scales_mins(b[..., 4:16])
    return _k_values(_interleaved_nibbles(b[..., 16:]), _f16(b[..., :2]), _f16(b[..., 2:4]), sc, mn)


def q5_k(raw):  # block_q5_K {half d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}
    b = _blocks(raw, 176)
    sc, mn = _k4_scales_mins(b[..., 4:16])
    sub = torch.arange(8, device=raw.device).reshape(8, 1)
    high = ((b[..., 16:48].unsqueeze(-2) >> sub) & 1) << 4  # bit i of qh[l]: element l of sub-block i
    return _k_values(_interleaved_nibbles(b[..., 48:]) | high, _f16(b[..., :2]), _f16(b[..., 2:4]), sc, mn)


def q6_k(raw):  # block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}
    b = _blocks(raw, 210)
    ql = b[..., :128].reshape(*b.shape[:-1], 2, 2, 32)  # [half, bytes 0-31 / 32-63, l]
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=raw.device).reshape(4, 1)
    high = (qh >> shifts) & 3  # [half, 4 quarters, l]: quarter k takes qh bits 2k, 2k+1
    low = torch.cat([ql & 0xF, ql >> 4], dim=-2)  # quarters 0, 1 from low nibbles, 2, 3 from high
    q = (low.long() | high.long() << 4) - 32  # [half, quarter, 32]
    sc = b[..., 192:208].view(torch.int8).float().reshape(*b.shape[:-1], 2, 4, 2, 1)
    d = _f16(b[..., 208:210]).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)
    return ((d * sc) * q.reshape(*q.shape[:-1], 2, 16).float()).flatten(1)


def q2_k(raw):  # block_q2_K {uint8 scales[16]; uint8 qs[64]; half d, dmin}
    b = _blocks(raw, 84)
    qs = b[..., 16:80].reshape(*b.shape[:-1], 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=raw.device).reshape(4, 1)
    q = ((qs >> shifts) & 3).reshape(*b.shape[:-1], 16, 16)  # [half, shift, 32] -> sixteen 16-value groups
    s = b[..., :16].long()
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
    return ((d * (s & 0xF).float()).unsqueeze(-1) * q.float() - (dmin * (s >> 4).float()).unsqueeze(-1)).flatten(1)


def _k3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes -> sixteen 6-bit scales minus 32: scale i has the nibble of byte i % 8
    (low for i < 8) and two high bits from byte 8 + i % 4."""
    s = s.long()
    i = torch.arange(16, device=s.device)
    low = (s[..., i % 8] >> (4 * (i // 8))) & 0xF
    high = (s[..., 8 + i % 4] >> (2 * (i // 4))) & 3
    return (low | high << 4).float() - 32


def q3_k(raw):  # block_q3_K {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d}
    b = _blocks(raw, 110)
    qs = b[..., 32:96].reshape(*b.shape[:-1], 2, 1, 32)
    shifts = torch.arange(0, 8, 2, device=raw.device).reshape(4, 1)
    low = (qs >> shifts) & 3  # [half, shift, 32]
    bit = torch.arange(8, device=raw.device).reshape(2, 4, 1)  # hmask bit 4*half + shift
    high = (b[..., :32].unsqueeze(-2).unsqueeze(-2) >> bit) & 1
    q = (low.long() - 4 * (1 - high.long())).reshape(*b.shape[:-1], 16, 16)
    dl = _f16(b[..., 108:110]) * _k3_scales(b[..., 96:108])
    return (dl.unsqueeze(-1) * q.float()).flatten(1)


def _floats(dtype):
    return lambda raw: raw.contiguous().view(dtype).float()


DEQUANTIZERS = {
    T.F32: _floats(torch.float32), T.F16: _floats(torch.float16), T.BF16: _floats(torch.bfloat16),
    T.Q8_0: q8_0, T.Q4_0: q4_0, T.Q4_1: q4_1, T.Q5_0: q5_0, T.Q5_1: q5_1,
    T.Q2_K: q2_k, T.Q3_K: q3_k, T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k,
}
