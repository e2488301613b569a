"""Round-to-nearest: min-max group parameters, no calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.algorithms import Algorithm, register
from qconvert.errors import QConvertError
from qconvert.quantized import QuantizedTensor

GROUP_SIZES = (-1, 32, 64, 128)
BITS = (4, 8)


@dataclass(frozen=True)
class RTNConfig:
    """bits: 4 or 8; group_size: input columns per scale (-1: one scale per output channel);
    symmetric: zero point fixed at the code midpoint (otherwise min-max with a zero point)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    version: int = 1

    def __post_init__(self):
        check_bits_and_group(self.bits, self.group_size, BITS)

    calibrated = False  # needs calibration data (RTN only measures errors on it when given)


def check_bits_and_group(bits: int, group_size: int, allowed_bits: tuple[int, ...]) -> None:
    """The --w-bit / --group checks every algorithm's config makes."""
    if bits not in allowed_bits:
        raise QConvertError(f"--w-bit {bits} is not supported (choose from {', '.join(map(str, allowed_bits))})")
    if group_size not in GROUP_SIZES:
        raise QConvertError(f"--group {group_size} is not supported (choose from {', '.join(map(str, GROUP_SIZES))})")


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, group_size] (one group per row for group_size -1)."""
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    return w.reshape(out, cols // g, g)


def minmax_params(
    wg: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype, zero_floor: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to its storage dtype) and unsigned zero point per group of wg [out, groups, g].
    zero_floor: the smallest zero point the format can store (GPTQ v1 stores zero - 1)."""
    qmax = (1 << bits) - 1
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    if symmetric:
        mid = 1 << (bits - 1)
        # the smallest scale that represents both extremes: -mid..mid-1 around the midpoint
        scale = torch.maximum(hi / (mid - 1), -lo / mid)
        zero = None
    else:
        scale = (hi - lo) / qmax
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny).to(scale_dtype)
    if not symmetric:
        zero = torch.round(-lo / scale.float()).clamp(0, qmax)
        if zero_floor:  # a group with no negative weight: map [0, hi] onto codes zero_floor..qmax instead
            low = zero < zero_floor
            scale = torch.where(low, (hi / (qmax - zero_floor)).clamp(min=torch.finfo(torch.float16).tiny)
                                .to(scale_dtype), scale)
            zero = torch.where(low, float(zero_floor), zero)
        zero = zero.to(torch.uint8)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Codes for w [out, in] given per-group scale/zero: round(w / s) + z, clamped."""
    wg = grouped(w.float(), group_size)
    z = (1 << (bits - 1)) if zero is None else zero.float()[..., None]
    q = torch.round(wg / scale.float()[..., None]) + z
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(w.shape)


def fake_quantize_groups(wg: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """wg [..., g] rounded through min-max quantization per last-dim group (float32 scales), in float32."""
    wg = wg.float()
    scale, zero = minmax_params(wg, bits, symmetric, torch.float32)
    z = float(1 << (bits - 1)) if zero is None else zero.float()[..., None]
    q = torch.clamp(torch.round(wg / scale[..., None]) + z, 0, (1 << bits) - 1)
    return (q - z) * scale[..., None]


def rtn(w: torch.Tensor, config: RTNConfig, *, scale_dtype: torch.dtype, chunk: int = 1 << 24) -> QuantizedTensor:
    """Min-max round-to-nearest of w [out, in], `chunk` values at a time (rows are independent; whole, a
    28672-row linear's float32 temporaries would be gigabytes)."""
    if config.group_size != -1 and w.shape[1] % config.group_size:
        raise QConvertError(f"group size {config.group_size} does not divide input size {w.shape[1]}")
    step = max(1, chunk // w.shape[1])
    parts = []
    for r in range(0, w.shape[0], step):
        rows = w[r:r + step]
        scale, zero = minmax_params(grouped(rows.float(), config.group_size), config.bits, config.symmetric,
                                    scale_dtype)
        codes = quantize_with(rows, scale, zero, config.bits, config.group_size)
        parts.append(QuantizedTensor(codes, scale, zero, config.bits, config.group_size))
    return parts[0] if len(parts) == 1 else QuantizedTensor.stack_rows(parts)


@register(RTNConfig)
class RTN(Algorithm):
    def quantize(self, inputs, stats, scale_dtype):
        return [rtn(lin.weight, self.config, scale_dtype=scale_dtype) for lin in inputs.linears]
