"""AWQ onto the GGUF grids: AWQ's activation-aware scales, searched with the GGUF type's own block quantizer
as the rounding, folded into the ops before the linears (norms, v_proj); then each linear is quantized by
llama.cpp's quantizer for its type with the importance matrix of the folded block's inputs. The output is
an ordinary GGUF file: only the values of the folded norms and of the linears' blocks differ.

With inputs x ÷ s and weights W·diag(s), the importance of column j (llama.cpp's mean x_j²) becomes
mean x_j² ÷ s_j², which is what the search weights each candidate's rounding with.

`--method awq-gptq` composes the two: AWQ's scales are searched and folded as above, then GPTQ's sweep
(gguf_gptq) quantizes the folded block with the Hessians of its own inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qconvert.algorithms import InputSet, register
from qconvert.algorithms.awq import AWQ, AWQConfig, _Group
from qconvert.algorithms.gguf_gptq import GGUFTensor, RowTypes, Unchanged, quantize_set, warm_ups
from qconvert.algorithms.gptq import hessian_of
from qconvert.formats.gguf import quants
from qconvert.formats.gguf.imatrix import SquaredSums


@dataclass(frozen=True, eq=False)
class GGUFAWQConfig(AWQConfig):
    """types: checkpoint tensor name -> the GGUF types of its rows (as GGUFGPTQConfig). The weight mean of the
    "duo" scale is taken over 32-column blocks, the GGUF types' (sub-)block width; no clipping: llama.cpp's
    quantizers search each block's range themselves."""

    types: dict[str, tuple[RowTypes, ...]] = field(default_factory=dict)
    group_size: int = 32
    clip: bool = False


def _encode(w: torch.Tensor, row_types: tuple[RowTypes, ...], importance: torch.Tensor | None) -> list:
    """w's rows in their GGUF types by llama.cpp's quantizers: the parts of a GGUFTensor."""
    return [(r, quants.quantize(w[r.start:r.stop].float(), r.qtype, importance)) for r in row_types]


@register(GGUFAWQConfig)
class GGUFAWQ(AWQ):
    tries_no_scale = True  # so the search never does worse on its tokens than llama.cpp's imatrix rounding

    def observe(self, block, sets):
        self.row_types = {id(lin): self.config.types.get(f) for s in sets for lin, f in zip(s.linears, s.files)}
        handles = super().observe(block, sets)
        for g in self.groups:  # the search's importance
            g.square_sum = 0.0
        return handles

    def _fake_quantize(self, linear: nn.Linear, w: torch.Tensor, s: torch.Tensor, g: _Group) -> torch.Tensor:
        row_types = self.row_types.get(id(linear))
        if not row_types:
            return w
        importance = g.square_sum / max(g.tokens, 1) / s.square()
        return GGUFTensor(_encode(w, row_types, importance), w.shape[1]).dequantize()

    def statistics(self, inputs: InputSet) -> SquaredSums:
        weight = inputs.linears[0].weight
        return SquaredSums(weight.shape[1], weight.device)

    def quantize(self, inputs, stats, scale_dtype):
        importance = None if stats is None else stats.mean()
        results = []
        for lin, name in zip(inputs.linears, inputs.files):
            w, row_types = lin.weight.detach(), self.config.types.get(name)
            if not row_types:
                results.append(Unchanged(w))
                continue
            results.append(GGUFTensor.of(w, _encode(w, row_types, importance)))
        return results


@dataclass(frozen=True, eq=False)
class GGUFAWQGPTQConfig(GGUFAWQConfig):
    """AWQ's scales (as GGUFAWQConfig), then GPTQ's sweep with GGUFGPTQConfig's damp and order."""

    damp: float = 0.01
    true_sequential: bool = True


@register(GGUFAWQGPTQConfig)
class GGUFAWQGPTQ(GGUFAWQ):
    repeatable = False  # quantize() takes its Hessian
    divides_work = False  # each input set's sweep runs on one rank

    def __init__(self, config: GGUFAWQGPTQConfig, arch):
        super().__init__(config, arch)
        self.sequential = config.true_sequential

    def warm_ups(self, device):
        return warm_ups(device, self.config.damp)

    def statistics(self, inputs: InputSet):
        return hessian_of(inputs)

    def quantize(self, inputs, stats, scale_dtype):
        return quantize_set(inputs, stats, self.config.types, self.config.damp)
