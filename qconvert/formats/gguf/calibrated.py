"""GGUF tensors quantized in the layer-by-layer engine (`qconvert gguf --method gptq`): which checkpoint rows
get which GGUF type, and the bytes the engine hands over, kept until the file is written in llama.cpp's
tensor order.

A GGUF tensor is made of whole checkpoint rows (a whole tensor, a row slice of a fused one, experts stacked,
rows permuted for llama's rope) and a GGUF row is a run of independent blocks, so the bytes of each
checkpoint row carry over to the GGUF tensor unchanged: the same row moves apply to them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from qconvert.algorithms.gguf_gptq import GGUFTensor, RowTypes
from qconvert.formats.gguf.convert import GGUFPlan, TensorSpec
from qconvert.formats.gguf.convert.tensors import _permute

FLOATS = (Q.F32, Q.F16, Q.BF16)


def _row_range(spec: TensorSpec, rows: int) -> tuple[int, int] | None:
    """The checkpoint rows of a GGUF tensor made of whole rows of one tensor (each of its hf_names when
    stacked), or None when its transform does anything else."""
    if not spec.hf_names or not spec.moves_only:
        return None
    slices = [op for op in spec.transform if op[0] == "slice"]
    if not slices:
        return 0, rows
    if len(slices) > 1 or slices[0][1] != 0 or spec.transform[0][0] != "slice":
        return None
    return slices[0][2], slices[0][3]


def row_types(plan: GGUFPlan, types: dict[str, Q], shape: Callable[[str], tuple[int, ...]]) -> dict[str, tuple]:
    """Checkpoint tensor -> the GGUF types of its rows, for every 2-D tensor whose rows all go to GGUF
    tensors of block types."""
    ranges: dict[str, list[RowTypes]] = {}
    for spec in plan.tensors:
        qtype = types[spec.gguf_name]
        if qtype in FLOATS:
            continue
        for name in spec.hf_names:
            span = _row_range(spec, shape(name)[0]) if len(shape(name)) == 2 else None
            if span is not None:
                ranges.setdefault(name, []).append(RowTypes(*span, int(qtype)))
    out = {}
    for name, parts in ranges.items():
        parts.sort(key=lambda r: r.start)
        starts = [0] + [r.stop for r in parts]
        if all(r.start == s for r, s in zip(parts, starts)) and parts[-1].stop == shape(name)[0]:
            out[name] = tuple(parts)
    return out


class CalibratedTensors:
    """The engine's writer for a GGUF output: the GGUF bytes of the quantized linears, and the block's other
    tensors (as the algorithm left them); the tensors outside the blocks are read from the checkpoint."""

    def __init__(self):
        self.encoded: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self.errors: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}  # ||W - Q||^2, ||W||^2
        self.floats: dict[str, torch.Tensor] = {}
        self._outside: set[str] = set()

    def reserve_tensor(self, name: str, dtype, shape) -> None:
        self._outside.add(name)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._outside:
            self.floats[name] = tensor.detach().cpu()

    def add_quantized(self, name: str, qt) -> None:
        if isinstance(qt, GGUFTensor):
            self.encoded[name] = {(r.start, r.stop): raw.cpu() for r, raw in qt.parts}
            self.errors[name] = {(r.start, r.stop): e for (r, _), e in zip(qt.parts, qt.errors)}
        else:
            self.floats[name] = qt.dequantize().detach().cpu()

    def loader(self, read: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        return lambda name: self.floats[name] if name in self.floats else read(name)

    def bytes_for(self, spec: TensorSpec, rows: Callable[[str], int]) -> tuple[np.ndarray, float] | None:
        """The GGUF tensor's bytes from its checkpoint rows' bytes, and their relative squared error; None if
        the engine did not make them."""
        if not spec.hf_names or any(n not in self.encoded for n in spec.hf_names):
            return None
        parts, err, norm = [], 0.0, 0.0
        for name in spec.hf_names:
            span = _row_range(spec, rows(name))
            if span not in self.encoded[name]:
                return None
            parts.append(self.encoded[name][span])
            e, n = self.errors[name][span]
            err, norm = err + e, norm + n
        t = torch.cat(parts)  # experts one after another, as GGUF stores a 3-D tensor
        for op in spec.transform:
            if op[0] == "permute":
                t = _permute(t, op[1])
        return t.contiguous().numpy(), err / max(norm, 1e-30)
