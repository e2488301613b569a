"""Casting floats to the dtype a format's kernels compute in (fp16 for the AWQ and GPTQ layouts).

bf16 reaches about 3e38, fp16 only 65504 and has no normal numbers below 6.1e-5, so the cast is checked:
a value that becomes Inf, or a non-zero scale that becomes 0, is refused rather than written.
"""

from __future__ import annotations

import torch


def cast_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` if it is floating point (integer tensors pass unchanged); raises on overflow."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name}: values beyond the range of {dtype} (largest |x| = {t.abs().max().item():.4g})")
    return out


def cast_scale(name: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scale in `dtype`; a non-zero scale that would round to 0 is refused as well."""
    out = cast_float(name, scale, dtype)
    if ((out == 0) & (scale != 0)).any():
        raise ValueError(f"{name}: scales below the smallest {dtype} value (min {scale.abs().min().item():.4g})")
    return out
