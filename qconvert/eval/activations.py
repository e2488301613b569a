"""The activation half of W8A8 checkpoints, simulated: each quantized linear's input is rounded the way
the engine's kernel rounds it before the matrix product (int8 or FP8, per token, per token group or per
tensor with the stored static scale), so evaluation scores weights and activations together."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qconvert.quantized import FP8_MAX

INT8_MAX = 127.0


def fake_quantizer(args: dict, input_scale: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x rounded as compressed-tensors `input_activations` args describe (8-bit int or float)."""
    if args.get("num_bits") != 8 or args.get("type") not in ("int", "float"):
        raise ValueError(f"input activations {args} are not simulated (8-bit int or float only)")
    is_int = args["type"] == "int"
    top = INT8_MAX if is_int else FP8_MAX
    strategy = args["strategy"]

    def quantize(x: torch.Tensor) -> torch.Tensor:
        shape, xf = x.shape, x.float()
        if strategy == "group":
            xf = xf.reshape(*shape[:-1], -1, args["group_size"])
        if strategy == "tensor":
            scale = input_scale.float().reshape(())
        else:
            scale = (xf.abs().amax(dim=-1, keepdim=True) / top).clamp(min=1e-12)
        y = (xf / scale).clamp(-top, top)
        y = y.round() if is_int else y.to(torch.float8_e4m3fn).float()
        return (y * scale).reshape(shape).to(x.dtype)

    return quantize


def add_activation_hooks(model: nn.Module, quantizers: dict[str, Callable]) -> None:
    """Round the input of each named linear with its quantizer on every forward call."""
    for name, quantize in quantizers.items():
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, q=quantize: (q(args[0]), *args[1:]))
