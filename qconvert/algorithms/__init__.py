"""Quantization algorithms, each a small object the layer-by-layer engine drives.

The engine calls, per decoder block: `observe` (hooks for the block's reference forward pass),
`transform` (rewrite the block before quantizing, e.g. AWQ's scales), then per group of linears
that read one input, `statistics` (an accumulator fed that input) and `quantize`. Each algorithm's
config dataclass is registered with its class here, the one place the engine looks them up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qconvert.quantized import QuantizedTensor

_ALGORITHMS: dict[type, type] = {}


@dataclass
class InputSet:
    """Linears of one sequential group that read the same input tensor (q/k/v, gate/up, one expert's
    gate/up); `parent` is the module path they hang under."""

    group: int
    parent: str
    names: list[str]
    linears: list[nn.Linear]
    files: list[str] = field(default_factory=list)  # the checkpoint names of their weights

    @property
    def key(self) -> tuple[int, str]:
        return self.group, self.parent


class Algorithm:
    """The defaults: no calibration statistics, no block rewrite, every linear quantized alone."""

    sequential = False  # re-collect statistics for each group after quantizing the groups before it
    repeatable = True  # quantize() may run again on the same statistics (once per output layout)
    # among several ranks: quantize() divides its own work (or is cheap enough to repeat on each); otherwise
    # the engine gives each input set to one rank and shares the result
    divides_work = False

    def __init__(self, config, arch):
        self.config = config
        self.arch = arch

    def observe(self, block: nn.Module, sets: list[InputSet]) -> list:
        """Hooks to register for the block's reference pass (removed by the engine afterwards)."""
        return []

    def transform(self, block: nn.Module, sets: list[InputSet]) -> set[str]:
        """Rewrite the block in place before quantization; returns the names of the non-linear
        parameters it changed (they are written from the block instead of the file)."""
        return set()

    def statistics(self, inputs: InputSet):
        """An object with update(x) fed the set's input during a forward pass, or None."""
        return None

    def quantize(self, inputs: InputSet, stats, scale_dtype: torch.dtype) -> list[QuantizedTensor]:
        """The set's linears, quantized from their current weights (one result per linear)."""
        raise NotImplementedError

    def warm_ups(self, device: torch.device) -> list[Callable[[], None]]:
        """Jobs that run the algorithm's GPU kernels once on a tiny input: their first use in a process
        (library handles, compiled kernels) costs up to a second, which the engine hides behind CPU work,
        the jobs side by side (each mostly waits in a library's start-up)."""
        return []


def register(config_type: type):
    def wrap(cls: type) -> type:
        if config_type in _ALGORITHMS:
            raise ValueError(f"{config_type.__name__} registered twice")
        _ALGORITHMS[config_type] = cls
        return cls

    return wrap


def algorithm_for(config, arch) -> Algorithm:
    # importing the modules registers them
    from qconvert.algorithms import awq, fp8, gguf_awq, gguf_gptq, gptq, int8, rtn  # noqa: F401

    try:
        cls = _ALGORITHMS[type(config)]
    except KeyError:
        raise ValueError(f"no algorithm registered for {type(config).__name__}") from None
    return cls(config, arch)
