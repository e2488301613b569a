"""Legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Without an imatrix ggml uses quantize_row_*_ref (one pass, no search); with one,
quantize_row_*_impl (weights qw * sqrt(sigma2 + x^2), sigma2 = mean x^2 over the whole row, then
make_qx_quants for the symmetric types and make_qkx3_quants for the ones with a min). Q8_0 ignores
the imatrix.

Each function maps x [R, cols] float32 (+ imatrix [cols]) to uint8 [R, cols/32 * block bytes].
"""

from __future__ import annotations

from typing import NamedTuple

import gguf
import torch

from .common import (
    bit_field, bits, div, first_absmax, first_max, first_min, ne, put, put_f16, recip, roundf_, select,
    seq_sum, sqrt, to_int32_x86, int32_bytes,
)
from .dequant import _f16
from .search import make_qkx, make_qx_quants

QK = 32
T = gguf.GGMLQuantizationType


def _blocks(x: torch.Tensor) -> torch.Tensor:
    R, cols = x.shape
    return x.reshape(R, cols // QK, QK)


def _out(x: torch.Tensor, qtype) -> torch.Tensor:
    R, cols = x.shape
    return torch.empty((R, cols // QK, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=torch.uint8, device=x.device)


def _flat(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(out.shape[0], -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C: `const float id = d ? 1.0f/d : 0.0f;`"""
    return select(bits(ne(d, 0.0)), recip(d), 0.0)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q[..., 32] ints -> qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4 (16 bytes)."""
    return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """qh (uint32 little-endian): bit j = bit 4 of q[j]."""
    return int32_bytes(bit_field(q, 4))


# ---- reference (no imatrix) paths ----------------------------------------------------------------

def q8_0(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    # block layout: ggml block_q8_0 {half d; int8 qs[32]}
    xb, out = _blocks(x), _out(x, T.Q8_0)
    d = div(xb.abs().amax(-1), 127.0)
    v = roundf_(xb * _inverse(d).unsqueeze(-1))
    put(out, 2, to_int32_x86(v).bitwise_and_(0xFF))      # the conversion truncates: roundf
    put_f16(out, 0, d)
    return _flat(out)


def _symmetric_ref(x, qtype, nmax):
    # block layouts: ggml block_q4_0 {half d; uint8 qs[16]}, block_q5_0 {half d; uint8 qh[4]; uint8 qs[16]}
    xb, out = _blocks(x), _out(x, qtype)
    d = div(first_absmax(xb, -1)[1], float(-nmax))
    # MIN(2*nmax - 1, (int8_t)(x*id + nmax + 0.5f)): the conversion truncates toward zero
    # (an out-of-range value gives INT_MIN, whose low bits are those of (int8_t) 0)
    q = to_int32_x86((xb * _inverse(d).unsqueeze(-1)).add_(nmax + 0.5)).clamp_(max=2 * nmax - 1)
    put_f16(out, 0, d)
    if nmax == 16:
        put(out, 2, _high_bits(q))
    put(out, out.shape[-1] - 16, _nibbles(q))
    return _flat(out)


def _affine_ref(x, qtype, nmax):
    # block layouts: ggml block_q4_1 {half d, m; uint8 qs[16]}, block_q5_1 {half d, m; uint8 qh[4]; uint8 qs[16]}
    xb, out = _blocks(x), _out(x, qtype)
    mn = first_min(xb, -1)
    d = div(first_max(xb, -1) - mn, float(nmax))
    q = to_int32_x86((xb - mn.unsqueeze(-1)).mul_(_inverse(d).unsqueeze(-1)).add_(0.5))
    if nmax == 15:
        q.clamp_(max=15)                                 # MIN(15, (int8_t)(v + 0.5f))
    # (Q5_1 stores (uint8_t)(v + 0.5f) unclamped: only the low bits are used below)
    put_f16(out, 0, d)
    put_f16(out, 2, mn)
    if nmax == 31:
        put(out, 4, _high_bits(q))
    put(out, out.shape[-1] - 16, _nibbles(q))
    return _flat(out)


# ---- imatrix paths -------------------------------------------------------------------------------

def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """(sum over the row of x^2) / cols, per row [R]."""
    sq_t = (x * x).t().contiguous()                    # [cols, R], summed in column order
    return div(seq_sum(sq_t), float(x.shape[1]))


def _weighted(x: torch.Tensor, imatrix: torch.Tensor, sigma2: torch.Tensor | None = None):
    """x as [32, R, nb] plus the weights qw * sqrt(sigma2 + x^2). sigma2: row_sigma2 of the whole row x is
    part of (a caller quantizing a row block by block passes it)."""
    R, cols = x.shape
    sigma2 = row_sigma2(x) if sigma2 is None else sigma2
    xt = _blocks(x).permute(2, 0, 1).contiguous()      # [32, R, nb]
    qw = imatrix.reshape(cols // QK, QK).t().unsqueeze(1)   # [32, 1, nb]
    weight = qw * sqrt((xt * xt).add_(sigma2.view(1, R, 1)))
    return xt, weight


def _symmetric_imatrix(x, imatrix, qtype, nmax, sigma2=None):
    xt, weight = _weighted(x, imatrix, sigma2)
    d, L = make_qx_quants(xt, nmax, weight)
    q = L.permute(1, 2, 0)                             # [R, nb, 32]
    out = _out(x, qtype)
    put_f16(out, 0, d)
    if nmax == 16:
        put(out, 2, _high_bits(q))
    put(out, out.shape[-1] - 16, _nibbles(q))
    return _flat(out)


def _affine_imatrix(x, imatrix, qtype, nmax, sigma2=None):
    xt, weight = _weighted(x, imatrix, sigma2)
    d, the_min, L = make_qkx(xt, weight, nmax, -0.9, 0.05, 36, False)
    q = L.permute(1, 2, 0)
    out = _out(x, qtype)
    put_f16(out, 0, d)
    put_f16(out, 2, -the_min)
    if nmax == 31:
        put(out, 4, _high_bits(q))
    put(out, out.shape[-1] - 16, _nibbles(q))
    return _flat(out)


def q4_0(x, imatrix=None, sigma2=None):
    return _symmetric_ref(x, T.Q4_0, 8) if imatrix is None else _symmetric_imatrix(x, imatrix, T.Q4_0, 8, sigma2)


def q5_0(x, imatrix=None, sigma2=None):
    return _symmetric_ref(x, T.Q5_0, 16) if imatrix is None else _symmetric_imatrix(x, imatrix, T.Q5_0, 16, sigma2)


def q4_1(x, imatrix=None, sigma2=None):
    return _affine_ref(x, T.Q4_1, 15) if imatrix is None else _affine_imatrix(x, imatrix, T.Q4_1, 15, sigma2)


def q5_1(x, imatrix=None, sigma2=None):
    return _affine_ref(x, T.Q5_1, 31) if imatrix is None else _affine_imatrix(x, imatrix, T.Q5_1, 31, sigma2)


# ---- codes on fixed scales (GPTQ's column-by-column rounding inside a block) ---------------------

class Codes(NamedTuple):
    """A 32-value type's codes: value = d * (code - offset) (+ m, has_min), the code stored in [lo, hi], the
    low 4 bits from byte `at` of the block (the 5th bits in the 4 bytes before it; Q8_0: one int8 each)."""

    lo: int
    hi: int
    offset: int
    has_min: bool
    at: int


CODES = {
    T.Q4_0: Codes(0, 15, 8, False, 2),
    T.Q5_0: Codes(0, 31, 16, False, 6),
    T.Q4_1: Codes(0, 15, 0, True, 4),
    T.Q5_1: Codes(0, 31, 0, True, 8),
    T.Q8_0: Codes(-128, 127, 0, False, 2),
}


def block_scales(raw: torch.Tensor, qtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d and m (None for the symmetric types) [R] of one block column raw [R, block bytes]."""
    d = _f16(raw[:, 0:2])[:, 0]
    return d, _f16(raw[:, 2:4])[:, 0] if CODES[T(qtype)].has_min else None


def with_codes(raw: torch.Tensor, qtype, codes: torch.Tensor) -> torch.Tensor:
    """A copy of one block column raw [R, block bytes] with its stored codes [R, 32] (int32, within CODES'
    range) replaced; d and m stay."""
    qtype, out = T(qtype), raw.clone()
    at = CODES[qtype].at
    if qtype == T.Q8_0:
        put(out, at, codes.to(torch.int8).view(torch.uint8))
        return out
    if qtype in (T.Q5_0, T.Q5_1):
        put(out, at - 4, _high_bits(codes))
    put(out, at, _nibbles(codes).to(torch.uint8))
    return out
