"""AWQ onto the GGUF grids: AWQ's activation-aware scales, searched with the GGUF type's own block quantizer
as the rounding, folded into the ops before the linears (norms, v_proj); then each linear is quantized by
llama.cpp's quantizer for its type with the importance matrix of the folded block's inputs. The output is
an ordinary GGUF file: only the values of the folded norms and of the linears' blocks differ.

With inputs x ÷ s and weights W·diag(s), the importance of column j (llama.cpp's mean x_j²) becomes
mean x_j² ÷ s_j², which is what the search weights each candidate's rounding with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qconvert.algorithms import InputSet, register
from qconvert.algorithms.awq import AWQ, AWQConfig, _Group
from qconvert.algorithms.gguf_gptq import GGUFTensor, RowTypes, Unchanged, squared_error
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


def _round_trip(w: torch.Tensor, row_types: tuple[RowTypes, ...], importance: torch.Tensor) -> torch.Tensor:
    """w's values after the GGUF types of its rows quantize them (float32)."""
    out = torch.empty_like(w, dtype=torch.float32)
    for r in row_types:
        raw = quants.quantize(w[r.start:r.stop].float(), r.qtype, importance)
        out[r.start:r.stop] = quants.dequantize(raw, r.qtype, (r.stop - r.start, w.shape[1]))
    return out


@register(GGUFAWQConfig)
class GGUFAWQ(AWQ):
    tries_no_scale = True  # so the search never does worse on its tokens than llama.cpp's imatrix rounding

    def observe(self, block, sets):
        self.row_types = {id(lin): self.config.types.get(f) for s in sets for lin, f in zip(s.linears, s.files)}
        return super().observe(block, sets)

    def _fake_quantize(self, linear: nn.Linear, w: torch.Tensor, s: torch.Tensor, g: _Group) -> torch.Tensor:
        row_types = self.row_types.get(id(linear))
        if not row_types:
            return w
        return _round_trip(w, row_types, g.square_sum / max(g.tokens, 1) / s.square())

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
            parts = [(r, quants.quantize(w[r.start:r.stop].float(), r.qtype, importance)) for r in row_types]
            results.append(GGUFTensor(parts, w.shape[1], [squared_error(w, r, raw, w.shape[1]) for r, raw in parts]))
        return results
