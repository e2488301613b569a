"""K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Without an imatrix ggml uses quantize_row_*_K_ref; with one, quantize_row_*_K_impl. Both share
the shape "search a scale (and min) per sub-block, quantize the sub-block scales against a
super-block fp16 scale, re-quantize the values with the fp16-rounded scales, pack".

Internal layout: x [R, cols] -> xs [n, nsub, R, nsb] (n elements per sub-block, nsub sub-blocks
per super-block, nsb super-blocks per row); per-sub-block values are [nsub, R, nsb] and
per-super-block values [R, nsb]. Each function returns uint8 [R, nsb * block bytes].
"""

from __future__ import annotations

import gguf
import torch

from .common import (
    F32, GROUP_MAX_EPS, bits, div, first_absmax, fp16_round, iselect, nan_to_zero, ne, nearest_int,
    positive_or_zero, put, put_f16, recip, seq_sum, sqrt, wrap_i8, wrap_u8,
)
from .search import make_q3_quants, make_qkx, make_qp_quants, make_qx_quants

QK_K = 256
T = gguf.GGMLQuantizationType


def _split(x: torch.Tensor, n: int) -> torch.Tensor:
    R, cols = x.shape
    return x.reshape(R, cols // QK_K, QK_K // n, n).permute(3, 2, 0, 1).contiguous()


def _qw(imatrix: torch.Tensor, n: int) -> torch.Tensor:
    """imatrix [cols] -> [n, nsub, 1, nsb], matching _split."""
    return imatrix.reshape(-1, QK_K // n, n).permute(2, 1, 0).unsqueeze(2)


def _elements(L: torch.Tensor) -> torch.Tensor:
    """[n, nsub, R, nsb] -> [R, nsb, 256] in row order."""
    n, nsub, R, nsb = L.shape
    return L.permute(2, 3, 1, 0).reshape(R, nsb, nsub * n)


def _subs(t: torch.Tensor) -> torch.Tensor:
    """[nsub, R, nsb] -> [R, nsb, nsub]."""
    return t.permute(1, 2, 0)


def _super_sum_x2(xs: torch.Tensor) -> torch.Tensor:
    """C: `for (j = 0; j < QK_K; ++j) sumx2 += x[j]*x[j];` per super-block -> [R, nsb]."""
    sq = xs * xs
    n, nsub = sq.shape[:2]
    acc = sq[0, 0] + 0.0
    for s in range(nsub):
        for i in range(n):
            if s or i:
                acc.add_(sq[i, s])
    return acc


def _imatrix_weights(xs: torch.Tensor, imatrix: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """qw[l] * sqrtf(sigma2 + x[l]*x[l])."""
    return _qw(imatrix, xs.shape[0]) * sqrt((xs * xs).add_(sigma2))


def _requantize(xs, d, dm, lo, hi, L_prev, with_min: bool):
    """Per sub-block: if d != 0, L = clamp(nearest_int((x + dm)/d)) else keep L_prev.
    d, dm: [nsub, R, nsb] floats (fp16 super-scale * integer sub-scale).

    Every k-quant takes a `rounding` with this signature in its place: the scales stay llama.cpp's, the
    codes are the caller's (GPTQ onto the GGUF grids rounds column by column, passing each error on)."""
    v = div(xs + dm, d) if with_min else div(xs, d)
    L = nearest_int(v).clamp_(lo, hi)
    return iselect(bits(ne(d, 0.0)).unsqueeze(0), L, L_prev)


def _out(R: int, nsb: int, qtype, device) -> torch.Tensor:
    return torch.empty((R, nsb, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=torch.uint8, device=device)


def _pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """q [R, nsb, 256] (0..3) -> 64 bytes: in each half h of 128, byte 32h + l holds
    q[l] | q[l+32] << 2 | q[l+64] << 4 | q[l+96] << 6 (of that half)."""
    R, nsb = q.shape[:2]
    q = q.reshape(R, nsb, 2, 4, 32)
    out = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
    return out.reshape(R, nsb, 64)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales/mins of 8 sub-blocks into 12 bytes (ggml block_q4_K/q5_K scales), C uint8 semantics.
    ls, lm: [R, nsb, 8] int32 holding uint8_t values."""
    b0 = (ls[..., :4] | ((ls[..., 4:] >> 4) << 6)) & 0xFF
    b1 = (lm[..., :4] | ((lm[..., 4:] >> 4) << 6)) & 0xFF
    b2 = ((ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)) & 0xFF
    return torch.cat((b0, b1, b2), -1)


def _unpack_k4_scales(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: q [R, nsb, 12] int32 -> (sc, m) [R, nsb, 8]."""
    lo_d = q[..., 0:4] & 63
    lo_m = q[..., 4:8] & 63
    hi_d = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    hi_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return torch.cat((lo_d, hi_d), -1), torch.cat((lo_m, hi_m), -1)


def _kq_finish(xs, L, dsc, dmn, ls, lm, nmax, rounding=None):
    """Q4_K/Q5_K tail: pack scales, re-quantize with the fp16 scales. Returns (scale bytes, L [R,nsb,256])."""
    sb = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(sb)
    d = fp16_round(dsc).unsqueeze(-1) * sc.to(F32)        # [R, nsb, 8]
    dm = fp16_round(dmn).unsqueeze(-1) * m.to(F32)
    L = (rounding or _requantize)(xs, d.permute(2, 0, 1), dm.permute(2, 0, 1), 0, nmax, L, True)
    return sb, _elements(L)


def _k_scale_codes(v: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """Ref paths of Q4_K/Q5_K: uint8_t l = nearest_int((vmax > 0 ? 63/vmax : 0) * v); MIN(63, l)."""
    inv = torch.where(vmax > 0, div(63.0, vmax), torch.zeros((), dtype=F32, device=v.device))
    return wrap_u8(nearest_int(inv * v)).clamp_(max=63)


# ---- Q4_K / Q5_K ---------------------------------------------------------------------------------

def _q45_k(x, imatrix, nmax, rounding=None):
    xs = _split(x, 32)                                       # [32, 8, R, nsb]
    if imatrix is None:
        sum_x2 = seq_sum(xs * xs)                            # per sub-block
        av_x = sqrt(div(sum_x2, 32.0))
        weights = xs.abs().add_(av_x)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx(xs, weights, nmax, rmin, 0.1, nstep, False)
        max_scale = positive_or_zero(nan_to_zero(scales).amax(0))         # [R, nsb]
        max_min = positive_or_zero(nan_to_zero(mins).amax(0))
        ls = _subs(_k_scale_codes(scales, max_scale))
        lm = _subs(_k_scale_codes(mins, max_min))
        dsc, dmn = div(max_scale, 63.0), div(max_min, 63.0)
    else:
        sigma2 = div(_super_sum_x2(xs) * 2.0, float(QK_K))
        weights = _imatrix_weights(xs, imatrix, sigma2)
        sw = seq_sum(weights)                                # [8, R, nsb]
        scales, mins, L = make_qkx(xs, weights, nmax, -0.9, 0.05, 36, False)
        dsc, Ls = make_qp_quants(scales, 63, sw)
        dmn, Lm = make_qp_quants(mins, 63, sw)
        ls, lm = _subs(Ls), _subs(Lm)
        if nmax == 31:                                       # only quantize_row_q5_K_impl clamps here
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    sb, L = _kq_finish(xs, L, dsc, dmn, ls, lm, nmax, rounding)
    R, nsb = L.shape[:2]
    qtype = T.Q4_K if nmax == 15 else T.Q5_K
    out = _out(R, nsb, qtype, x.device)
    put_f16(out, 0, dsc)
    put_f16(out, 2, dmn)
    put(out, 4, sb)
    q = L.reshape(R, nsb, 4, 2, 32)                          # [.., pair p, half, j]
    if nmax == 15:
        # block layout: ggml block_q4_K {half d, dmin; uint8 scales[12]; uint8 qs[128]}
        put(out, 16, (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(R, nsb, 128))
    else:
        # block layout: ggml block_q5_K {half d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}
        shifts = torch.arange(8, device=x.device, dtype=torch.int32).view(4, 2, 1)
        hb = (q >> 4).bitwise_and_(1).bitwise_left_shift_(shifts)   # bit (2p + half) of qh[j]
        put(out, 16, hb.reshape(R, nsb, 8, 32).sum(2, dtype=torch.int32))
        put(out, 48, ((q[:, :, :, 0] & 0xF) | ((q[:, :, :, 1] & 0xF) << 4)).reshape(R, nsb, 128))
    return out.reshape(R, -1)


def q4_K(x, imatrix=None, rounding=None):
    return _q45_k(x, imatrix, 15, rounding)


def q5_K(x, imatrix=None, rounding=None):
    return _q45_k(x, imatrix, 31, rounding)


# ---- Q2_K ----------------------------------------------------------------------------------------

def q2_K(x, imatrix=None, rounding=None):
    # block layout: ggml block_q2_K {uint8 scales[16]; uint8 qs[64]; half d, dmin}
    xs = _split(x, 16)                                       # [16, 16, R, nsb]
    zero = torch.zeros((), dtype=F32, device=x.device)
    if imatrix is None:
        scales, mins, L = make_qkx(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
        max_scale = positive_or_zero(nan_to_zero(scales).amax(0))
        max_min = positive_or_zero(nan_to_zero(mins).amax(0))
        has_s, has_m = max_scale > 0, max_min > 0
        ls = wrap_u8(nearest_int(div(15.0, max_scale) * scales))
        lm = nearest_int(div(15.0, max_min) * mins)
        byte = torch.where(has_s, ls, 0) | torch.where(has_m, lm << 4, 0)
        byte = byte & 0xFF
        dsc = torch.where(has_s, div(max_scale, 15.0), zero)
        dmn = torch.where(has_m, div(max_min, 15.0), zero)
    else:
        sigma2 = div(_super_sum_x2(xs), float(QK_K))
        weights = _imatrix_weights(xs, imatrix, sigma2)
        sw = seq_sum(weights)                                # [16, R, nsb]
        scales, mins, L = make_qkx(xs, weights, 3, -0.9, 0.05, 36, False)
        dsc, Ls = make_qp_quants(scales, 15, sw)
        dmn, Lm = make_qp_quants(mins, 15, sw)
        byte = (Ls | (Lm << 4)) & 0xFF
    d = fp16_round(dsc) * (byte & 0xF).to(F32)               # [16, R, nsb]
    dm = fp16_round(dmn) * (byte >> 4).to(F32)
    L = _elements((rounding or _requantize)(xs, d, dm, 0, 3, L, True))
    R, nsb = L.shape[:2]
    out = _out(R, nsb, T.Q2_K, x.device)
    put(out, 0, _subs(byte))
    put(out, 16, _pack_2bit(L))
    put_f16(out, 80, dsc)
    put_f16(out, 82, dmn)
    return out.reshape(R, -1)


# ---- Q3_K ----------------------------------------------------------------------------------------

def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """l [R, nsb, 16] (6-bit codes) -> 12 bytes: low nibbles of j and j+8, then 2-bit high parts."""
    low = (l[..., :8] & 0xF) | ((l[..., 8:] & 0xF) << 4)
    hi = (l >> 4).reshape(l.shape[:-1] + (4, 4))             # [.., j/4, j%4]
    high = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return torch.cat((low, high), -1) & 0xFF


def q3_K(x, imatrix=None, rounding=None):
    # block layout: ggml block_q3_K {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d}
    xs = _split(x, 16)                                       # [16, 16, R, nsb]
    zero = torch.zeros((), dtype=F32, device=x.device)
    if imatrix is None:
        scales, L = make_q3_quants(xs, 4)
        amax, max_scale = first_absmax(nan_to_zero(scales))
        max_scale = torch.where(amax > 0, max_scale, zero)
        nz = max_scale != 0
        iscale = div(-32.0, max_scale)
        l = wrap_i8(nearest_int(iscale * scales)).clamp_(-32, 31) + 32
        l = torch.where(nz, l, 0)                            # memset(scales, 0) when max_scale == 0
        dsc = torch.where(nz, recip(iscale), zero)
    else:
        sigma2 = div(_super_sum_x2(xs) * 2.0, float(QK_K))
        weights = _imatrix_weights(xs, imatrix, sigma2)
        sw = seq_sum(weights)
        scales, L = make_qx_quants(xs, 4, weights)
        dsc, l = make_qx_quants(scales, 32, sw)
    sb = _pack_q3_scales(_subs(l))
    sc = (l & 63) - 32                                       # the 6-bit code read back, minus 32
    d = fp16_round(dsc) * sc.to(F32)
    L = _elements((rounding or _requantize)(xs, d, None, -4, 3, L - 4, False) + 4)   # [R, nsb, 256] 0..7
    R, nsb = L.shape[:2]
    shifts = torch.arange(8, device=x.device, dtype=torch.int32).view(8, 1)
    hmask = (L >> 2).bitwise_and_(1).reshape(R, nsb, 8, 32).bitwise_left_shift_(shifts)  # L > 3: bit b of
    out = _out(R, nsb, T.Q3_K, x.device)                                                   # byte m for
    put(out, 0, hmask.sum(2, dtype=torch.int32))                                           # element 32b+m
    put(out, 32, _pack_2bit(L & 3))
    put(out, 96, sb)
    put_f16(out, 108, dsc)
    return out.reshape(R, -1)


# ---- Q6_K ----------------------------------------------------------------------------------------

def q6_K(x, imatrix=None, rounding=None):
    # block layout: ggml block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}
    xs = _split(x, 16)                                       # [16, 16, R, nsb]
    zero = torch.zeros((), dtype=F32, device=x.device)
    w = xs * xs if imatrix is None else _qw(imatrix, 16).expand_as(xs)
    scales, L = make_qx_quants(xs, 32, w)
    amax, max_scale = first_absmax(nan_to_zero(scales))
    is_zero = amax < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    dsc = torch.where(is_zero, zero, recip(iscale))
    sc = wrap_i8(nearest_int(iscale * scales).clamp_(max=127))
    d = fp16_round(dsc) * sc.to(F32)
    L = _elements((rounding or _requantize)(xs, d, None, -32, 31, L - 32, False) + 32)   # 0..63
    R, nsb = L.shape[:2]
    q = L.reshape(R, nsb, 2, 4, 32)                          # [.., half, quarter, l]
    lo = q & 0xF
    ql = torch.cat((lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)), -1)
    hi = q >> 4
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
    out = _out(R, nsb, T.Q6_K, x.device)
    put(out, 0, ql.reshape(R, nsb, 128))
    put(out, 128, qh.reshape(R, nsb, 64))
    put(out, 192, _subs(sc) & 0xFF)
    put_f16(out, 208, dsc)
    out.mul_((~is_zero).to(torch.uint8).unsqueeze(-1))       # an all-zero super-block is all zero bytes
    return out.reshape(R, -1)
