"""Shared helpers for the ggml quantizers: float32 arithmetic that rounds like ggml's scalar C code.

Conventions used across the package:

* Everything is float32 and element-wise; one torch op = one rounded C operation. No fused
  multiply-add (ggml-quants.c is built for baseline x86-64), no re-association: sums that C
  accumulates left to right are accumulated here with an explicit loop over the in-block index
  (`seq_sum`), vectorised across blocks.
* Tensors handed to the scale searches put the in-block element index first: x[n, *blocks].
* Division always goes through `div` so that a Python-scalar operand becomes a device tensor
  (on CUDA, `t / python_float` is computed as t * (1/float), which rounds differently).
"""

from __future__ import annotations

import numpy as np
import torch

F32 = torch.float32

# ggml's nearest_int adds 1.5 * 2**23 and reads the low mantissa bits: round-half-even for
# |v| <= 4194303, wrap-around garbage beyond (reproduced bit-for-bit by `nearest_int`).
_MAGIC = 12582912.0
ROUND_SAFE = 4194303.0


def f32(v) -> float:
    """The float32 value of v (as a Python float), like a C float literal/expression result."""
    return float(np.float32(v))


GROUP_MAX_EPS = f32(1e-15)  # ggml-quants.c: GROUP_MAX_EPS 1e-15f


def scalar(v, like: torch.Tensor) -> torch.Tensor:
    """0-dim float32 tensor on like's device."""
    return torch.tensor(f32(v), dtype=F32, device=like.device)


def div(a, b) -> torch.Tensor:
    """IEEE float32 a / b, element-wise (true division on every device)."""
    if not torch.is_tensor(a):
        a = scalar(a, b)
    if not torch.is_tensor(b):
        b = scalar(b, a)
    return torch.div(a, b)


def recip(b: torch.Tensor) -> torch.Tensor:
    """1.0f / b, correctly rounded."""
    return div(1.0, b)


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrtf (torch's CPU sqrt may be 1 ulp off: it is not IEEE-exact).

    Start from the float64 root rounded to float32 (at most 1 ulp away), then step to the
    neighbour whose rounding interval holds the exact root: the interval ends (25-bit midpoints)
    square exactly in float64, so the comparisons are exact."""
    vd = v.to(torch.float64)
    r = torch.sqrt(vd).to(F32)
    rd = r.to(torch.float64)
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    dn = torch.nextafter(r, torch.zeros_like(r))
    mid_up = (rd + up.to(torch.float64)).mul_(0.5)
    mid_dn = (rd + dn.to(torch.float64)).mul_(0.5)
    r = select(bits(lt(mid_up.mul_(mid_up), vd)), up, r)
    return select(bits(gt(mid_dn.mul_(mid_dn), vd)), dn, r)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int(float) -> int32, bit-exact also outside its asserted range.

    A NaN gives 0 as on x86, where NaNs made by invalid operations are the default NaN (the sum
    keeps its zero payload); CUDA's canonical NaN would give 4194303 instead."""
    r = (v + _MAGIC).view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)
    if v.device.type != "cpu":
        r = torch.where(torch.isnan(v), 0, r)
    return r


def to_int32_x86(v: torch.Tensor) -> torch.Tensor:
    """C float -> int (and -> int8_t/uint8_t via its low bits) as compiled for x86 (cvttss2si):
    truncation toward zero, and INT_MIN for NaN and out-of-range values (CUDA would saturate)."""
    if v.device.type != "cpu":
        limit = torch.tensor(2147483648.0, dtype=F32, device=v.device)
        v = torch.where(v.abs() < limit, v, -limit)
    return v.to(torch.int32)


_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def roundf_(v: torch.Tensor) -> torch.Tensor:
    """In place: v + copysign(0.49999997f, v); truncating that (float->int conversion) gives C's
    roundf(v) (halves away from zero) for |v| < 2^22: the sum rounds up to the next integer exactly
    when |frac(v)| >= 0.5."""
    return v.add_(torch.copysign(torch.tensor(_BELOW_HALF, dtype=F32, device=v.device), v))


def wrap_u8(i: torch.Tensor) -> torch.Tensor:
    """int -> uint8_t conversion (keeps the low 8 bits), on int32 tensors."""
    return i.bitwise_and(0xFF)


def wrap_i8(i: torch.Tensor) -> torch.Tensor:
    """int -> int8_t conversion (two's complement wrap), on int32 tensors."""
    return (i + 128).bitwise_and_(0xFF).sub_(128)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)) for finite v (IEEE round to nearest even)."""
    return v.to(torch.float16).to(F32)


def put_f16(out: torch.Tensor, offset: int, v: torch.Tensor) -> None:
    """Store v [...] as ggml_fp16_t at byte `offset` of each block of out [..., block bytes]."""
    out[..., offset:offset + 2].view(torch.float16).copy_(v.unsqueeze(-1))


def put(out: torch.Tensor, offset: int, v: torch.Tensor) -> None:
    """Store the byte values v [..., k] (any integer dtype, already 0..255) at `offset`."""
    out[..., offset:offset + v.shape[-1]].copy_(v)


def _index_add_sum(t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    # CPU index_add_ adds the source slices into the target one after the other, in index order,
    # with the ordinary (exact) add kernel: the C loop in a single call. (CUDA's uses atomics.)
    n = t.shape[0]
    idx = _ZEROS.get(n)
    if idx is None:
        idx = _ZEROS[n] = torch.zeros(n, dtype=torch.int64)
    return acc.unsqueeze(0).index_add_(0, idx, t)[0]


_ZEROS: dict = {}


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """C `float s = 0; for (i = 0; i < n; ++i) s += t[i];` over dim 0."""
    if t.device.type == "cpu":
        return _index_add_sum(t, torch.zeros(t.shape[1:], dtype=t.dtype))
    ts = t.unbind(0)
    acc = ts[0] + 0.0  # 0.0f + t[0] (turns -0.0 into +0.0, like C)
    for ti in ts[1:]:
        acc.add_(ti)
    return acc


def seq_sum_from_first(t: torch.Tensor) -> torch.Tensor:
    """C `float s = t[0]; for (i = 1; i < n; ++i) s += t[i];` over dim 0."""
    if t.device.type == "cpu":
        return _index_add_sum(t[1:], t[0].clone())
    ts = t.unbind(0)
    acc = ts[0].clone()
    for ti in ts[1:]:
        acc.add_(ti)
    return acc


def seq_sum_dim1(t: torch.Tensor) -> torch.Tensor:
    """seq_sum over dim 1 of t[k, n, ...] (k independent sums at once)."""
    return seq_sum(t.transpose(0, 1))


# ---- masks and selection ------------------------------------------------------------------------
# Comparisons produce float32 0.0/1.0 masks (AND = product, OR = maximum) and selection works on the
# bit patterns: torch's bool-producing comparisons and torch.where are several times slower on CPU.

def _cmp(op, a, b) -> torch.Tensor:
    ref = a if torch.is_tensor(a) else b
    shape = torch.broadcast_shapes(a.shape if torch.is_tensor(a) else (), b.shape if torch.is_tensor(b) else ())
    out = torch.empty(shape, dtype=F32, device=ref.device)
    return op(a, b, out=out)


def lt(a, b): return _cmp(torch.lt, a, b)
def le(a, b): return _cmp(torch.le, a, b)
def gt(a, b): return _cmp(torch.gt, a, b)
def eq(a, b): return _cmp(torch.eq, a, b)
def ne(a, b): return _cmp(torch.ne, a, b)


def bits(m: torch.Tensor) -> torch.Tensor:
    """float 0/1 mask -> int32 0 / -1 (all bits set)."""
    return m.to(torch.int32).neg_()


def select(m: torch.Tensor, a, b) -> torch.Tensor:
    """m ? a : b for float32 a, b (tensors or 0.0) with an int32 0/-1 mask m; bit-exact (keeps -0.0, NaN)."""
    ai = a.view(torch.int32) if torch.is_tensor(a) else None
    bi = b.view(torch.int32) if torch.is_tensor(b) else None
    if bi is None:                       # b == +0.0
        return torch.bitwise_and(ai, m).view(F32)
    if ai is None:                       # a == +0.0
        return torch.bitwise_and(bi, torch.bitwise_not(m)).view(F32)
    r = torch.bitwise_xor(ai, bi)
    return r.bitwise_and_(m).bitwise_xor_(bi).view(F32)


def iselect(m: torch.Tensor, a: torch.Tensor, b) -> torch.Tensor:
    """m ? a : b for int32 tensors (b may be 0)."""
    if not torch.is_tensor(b):
        return torch.bitwise_and(a, m)
    return torch.bitwise_xor(a, b).bitwise_and_(m).bitwise_xor_(b)


# ---- C-order extrema ----------------------------------------------------------------------------

def first_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) of C's scan `float amax = 0, max = 0; if (fabsf(x[i]) > amax) {amax = fabsf(x[i]);
    max = x[i];}` over dim: the first x of largest magnitude, +0.0 when all are zero."""
    hi = x.amax(dim)
    lo = x.amin(dim)
    nlo = -lo
    amax = torch.maximum(hi, nlo)
    tie = eq(hi, nlo).mul_(gt(hi, 0.0))
    if bool(tie.any()):                  # +a and -a both present: the first one wins
        idx = x.abs().argmax(dim, keepdim=True)
        signed = x.gather(dim, idx).squeeze(dim)
    else:
        signed = select(bits(gt(hi, nlo)), hi, lo)
    return amax, select(bits(gt(amax, 0.0)), signed, 0.0)


def _first_extreme(x: torch.Tensor, dim: int, largest: bool) -> torch.Tensor:
    v = x.amax(dim) if largest else x.amin(dim)
    if bool((v == 0).any()):             # the sign of a zero extreme is that of its first occurrence
        idx = (x.argmax if largest else x.argmin)(dim, keepdim=True)
        return x.gather(dim, idx).squeeze(dim)
    return v


def first_min(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """C's `if (x[i] < min) min = x[i];` scan (first occurrence: the sign of a zero minimum is C's)."""
    return _first_extreme(x, dim, False)


def first_max(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return _first_extreme(x, dim, True)


def nan_to_zero(v: torch.Tensor) -> torch.Tensor:
    """NaN -> 0.0, infinities kept: for C scans `if (v > best) best = v;` started at 0, which never
    pick a NaN (sub-block scales become NaN when squares overflow)."""
    return torch.nan_to_num(v, nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def positive_or_zero(v: torch.Tensor) -> torch.Tensor:
    """v where v > 0 else +0.0 (C: a running max started at 0 with strict `>` updates)."""
    return select(bits(gt(v, 0.0)), v, 0.0)


def bit_field(q: torch.Tensor, bit: int) -> torch.Tensor:
    """uint32 (little-endian) per row of q[..., 32] (int32) whose bit j is bit `bit` of q[j], as int32."""
    shifts = torch.arange(32, dtype=torch.int32, device=q.device)
    b = (q >> bit).bitwise_and_(1).bitwise_left_shift_(shifts)
    return b.sum(-1, dtype=torch.int32)


def int32_bytes(v: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> its 4 little-endian bytes [..., 4]."""
    return v.contiguous().unsqueeze(-1).view(torch.uint8)
