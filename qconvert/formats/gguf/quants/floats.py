"""F32 / F16 / BF16 "quantization" exactly as ggml_quantize_chunk does it.

F16: ggml_compute_fp32_to_fp16 is IEEE round-to-nearest-even (overflow to inf, subnormals kept);
every NaN becomes sign | 0x7E00. BF16: ggml_compute_fp32_to_bf16, i.e. round-to-nearest-even on
the top 16 bits, NaN -> (bits >> 16) | 64 (forced quiet, payload kept).
"""

from __future__ import annotations

import torch


def _rows(bits16: torch.Tensor, rows: int) -> torch.Tensor:
    return bits16.view(torch.uint8).reshape(rows, -1)


def f32(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def f16(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    bits = x.to(torch.float16).view(torch.int16)
    nan = torch.isnan(x)
    if bool(nan.any()):                      # torch/CUDA may keep NaN payloads; ggml does not
        quiet = torch.where(torch.signbit(x), -512, 0x7E00).to(torch.int16)      # 0xFE00 / 0x7E00
        bits = torch.where(nan, quiet, bits)
    return _rows(bits, x.shape[0])


def bf16(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    i = x.contiguous().view(torch.int32)
    # (u + 0x7FFF + ((u >> 16) & 1)) >> 16 on uint32; int32 wraps the same way and >> 16 keeps the
    # low 16 bits right (the top ones are dropped by the int16 view)
    rounded = (i >> 16).bitwise_and_(1).add_(0x7FFF).add_(i).bitwise_right_shift_(16)
    nan = torch.isnan(x)
    if bool(nan.any()):
        rounded = torch.where(nan, (i >> 16) | 64, rounded)
    return _rows(rounded.to(torch.int16), x.shape[0])
