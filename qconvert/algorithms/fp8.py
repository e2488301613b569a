"""FP8 (e4m3) weights by round-to-nearest, with one of three activation schemes (as vLLM runs them):

- dynamic: weights per output channel, activations scaled per token at run time (no calibration);
- static:  weights per tensor, activations per tensor with a scale calibrated on the dataset
           (the largest |x| each linear saw, / 448);
- block:   weights per 128 x 128 block, activations per token and group of 128 at run time
           (the DeepSeek-V3 recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.algorithms import Algorithm, InputSet, register
from qconvert.errors import QConvertError
from qconvert.quantized import FP8_MAX, FP8Tensor, expand_scale

SCHEMES = ("dynamic", "static", "block")
BLOCK = (128, 128)


@dataclass(frozen=True)
class FP8Config:
    scheme: str = "dynamic"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QConvertError(f"--scheme {self.scheme}: choose one of {', '.join(SCHEMES)}")

    @property
    def calibrated(self) -> bool:
        return self.scheme == "static"


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 rounded to the storage dtype; an all-zero slice gets scale 1 (its codes are 0 anyway)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(dtype)


def to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale, clamped to ±448 (a scale rounded down to its dtype may push the largest past it),
    rounded to nearest even by the cast."""
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(w: torch.Tensor, scheme: str, scale_dtype: torch.dtype) -> FP8Tensor:
    """w [out, in] in the weight layout of `scheme`."""
    if scheme == "block":
        r, c = BLOCK
        out, cols = w.shape
        padded = torch.nn.functional.pad(w.float().abs(), (0, -cols % c, 0, -out % r))
        amax = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c).amax(dim=(1, 3))
        scale = fp8_scale(amax, scale_dtype)
        return FP8Tensor(to_fp8(w, expand_scale(scale, BLOCK, w.shape)), scale, BLOCK)
    amax = w.float().abs().amax(dim=1, keepdim=True) if scheme == "dynamic" else w.float().abs().amax().reshape(1)
    scale = fp8_scale(amax, scale_dtype)
    return FP8Tensor(to_fp8(w, scale), scale)


def check_block_shapes(ckpt, arch) -> None:
    """The block scheme's activations are scaled per group of 128 input columns and vLLM takes the weight
    blocks whole: refuse, before anything is written, a linear whose sizes are not multiples of 128."""
    misfits = [(name.removesuffix(".weight"), shape) for name, shape in arch.quantized_weights(ckpt)
               if shape[0] % BLOCK[0] or shape[1] % BLOCK[1]]
    if misfits:
        name, (rows, cols) = misfits[0]
        others = f" ({len(misfits) - 1} other linears neither)" if len(misfits) > 1 else ""
        raise QConvertError(f"{name}: [{rows} x {cols}] is not made of whole {BLOCK[0]}x{BLOCK[1]} blocks{others}; "
                            "use --scheme dynamic or static")


class AbsMax:
    """The largest |x| over every token a linear reads."""

    def __init__(self, device):
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor) -> None:
        torch.maximum(self.value, x.detach().abs().amax().float(), out=self.value)

    def reduce(self, ranks) -> None:
        ranks.max_(self.value)


@register(FP8Config)
class FP8(Algorithm):
    def statistics(self, inputs: InputSet):
        return AbsMax(inputs.linears[0].weight.device) if self.config.calibrated else None

    def quantize(self, inputs, stats, scale_dtype):
        results = []
        for lin in inputs.linears:
            qt = quantize_fp8(lin.weight, self.config.scheme, scale_dtype)
            if self.config.calibrated:
                # a linear no token reached keeps scale 1: it would see nothing to scale at run time either
                input_scale = fp8_scale(stats.value.reshape(1), scale_dtype) if stats is not None else torch.ones(1, dtype=scale_dtype)
                qt = FP8Tensor(qt.weight, qt.scale, qt.block, input_scale.to(qt.weight.device))
            results.append(qt)
        return results
