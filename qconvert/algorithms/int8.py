"""INT8 W8A8: int8 weights per output channel (round-to-nearest or GPTQ) for kernels that also quantize
the activations, dynamically per token, to int8.

SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models"): per-token int8 activations suffer from the few input channels whose values
are far larger than the rest. Per input channel j, s_j = max|x_j|^α / max|W_j|^(1-α) (W: every linear
reading that input, max over their rows) moves that range into the weights: x ÷ s is folded into the
op before (a norm, or the rows of v_proj / up_proj), W · s into the linears; the float model is
unchanged. The groups are AWQ's (model/architectures.py ScaleGroup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert import distributed
from qconvert.algorithms import Algorithm, algorithm_for, register
from qconvert.algorithms.awq import fold_scale, resolve_groups
from qconvert.algorithms.gptq import GPTQConfig
from qconvert.algorithms.rtn import RTNConfig
from qconvert.errors import QConvertError


@dataclass(frozen=True)
class INT8Config:
    smoothquant: float | None = None  # α; None: no smoothing
    gptq: bool = False
    damp: float = 0.01
    bits: int = 8
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self):
        if self.smoothquant is not None and not 0 <= self.smoothquant <= 1:
            raise QConvertError(f"--smoothquant {self.smoothquant}: α must be between 0 and 1")

    @property
    def calibrated(self) -> bool:
        """Needs calibration data: SmoothQuant's activation ranges, or GPTQ's Hessians."""
        return self.smoothquant is not None or self.gptq

    @property
    def rounding(self):
        """The weight quantizer: per-channel symmetric int8 (act-order GPTQ needs no g_idx per channel)."""
        if self.gptq:
            return GPTQConfig(bits=8, group_size=-1, symmetric=True, damp=self.damp)
        return RTNConfig(bits=8, group_size=-1, symmetric=True)


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """max|x|^α / max|W|^(1-α) per input channel; 1 where either side is all zero."""
    x_max, w_max = x_max.float(), w_max.float()
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


@register(INT8Config)
class INT8(Algorithm):
    def __init__(self, config: INT8Config, arch):
        super().__init__(config, arch)
        if config.smoothquant is not None and not arch.scale_groups:
            raise QConvertError(f"SmoothQuant: no scale groups are known for architecture '{arch.name}'")
        self.weights = algorithm_for(config.rounding, arch)
        self.sequential = self.weights.sequential
        self.repeatable = self.weights.repeatable
        self.divides_work = self.weights.divides_work
        self.groups = []

    def observe(self, block, sets):
        handles = self.weights.observe(block, sets)
        self.groups = []
        if self.config.smoothquant is not None:
            self.groups = resolve_groups(block, self.arch.scale_groups, sets)
            for g in self.groups:
                record = lambda _m, args, kwargs, g=g: g.record(args, kwargs, 0)  # noqa: E731
                handles.append(g.inspect.register_forward_pre_hook(record, with_kwargs=True))
        return handles

    @torch.no_grad()
    def transform(self, block, sets):
        changed = self.weights.transform(block, sets)
        for g in self.groups:
            g.reduce(distributed.current())
            if g.tokens:
                w_max = torch.cat([lin.weight.detach().abs().amax(0, keepdim=True) for lin in g.linears]).amax(0)
                changed |= fold_scale(block, g, smoothing_scale(g.abs_max, w_max, self.config.smoothquant),
                                      self.arch.norm_offset)
        self.groups = []
        return changed

    def statistics(self, inputs):
        return self.weights.statistics(inputs)

    def quantize(self, inputs, stats, scale_dtype):
        return self.weights.quantize(inputs, stats, scale_dtype)

    def warm_ups(self, device):
        return self.weights.warm_ups(device)
