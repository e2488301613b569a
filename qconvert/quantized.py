"""The one hand-off type between algorithms and format writers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer weight codes with their group parameters, in logical (unpacked) layout, on the device that
    computed them (writers pack them there and move the packed words to the CPU).

    codes: uint8 [out, in], unsigned, in [0, 2**bits - 1].
    scale: [out, groups], already rounded to the dtype it is stored in.
    zero:  uint8 [out, groups] unsigned codes, or None for symmetric (the midpoint 2**(bits-1)).
    group_size: input columns per group, -1 for one group per output channel.
    g_idx: int32 [in], the group of each input column when it is not column // group_size.
    Weight = (codes - zero) * scale, per column's group.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self):
        out, cols = self.codes.shape
        groups = self.num_groups
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        if tuple(self.scale.shape) != (out, groups):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != {(out, groups)}")
        if self.zero is not None and tuple(self.zero.shape) != (out, groups):
            raise ValueError(f"zero shape {tuple(self.zero.shape)} != {(out, groups)}")
        if self.g_idx is not None and tuple(self.g_idx.shape) != (cols,):
            raise ValueError(f"g_idx shape {tuple(self.g_idx.shape)} != {(cols,)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, rows: slice) -> "QuantizedTensor":
        return QuantizedTensor(self.codes[rows], self.scale[rows], None if self.zero is None else self.zero[rows],
                               self.bits, self.group_size, self.g_idx)

    @staticmethod
    def stack_rows(parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        """Row blocks of one tensor (same columns, groups and g_idx), top to bottom."""
        first = parts[0]
        zero = None if first.zero is None else torch.cat([p.zero for p in parts])
        return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero,
                               first.bits, first.group_size, first.g_idx)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def num_groups(self) -> int:
        cols = self.codes.shape[1]
        if self.group_size == -1:
            return 1
        return -(-cols // self.group_size)

    def column_groups(self) -> torch.Tensor:
        """The group index of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols = self.codes.shape[1]
        if self.group_size == -1:
            return torch.zeros(cols, dtype=torch.long)
        return torch.arange(cols) // self.group_size

    def zeros(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero
        return torch.full_like(self.scale, 1 << (self.bits - 1), dtype=torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """(codes - zero) * scale in the scale's dtype, as the engines compute it."""
        g = self.column_groups().to(self.codes.device)
        zero = self.zeros().to(torch.float32)[:, g]
        scale = self.scale.to(torch.float32)[:, g]
        # (q - z) * s is exact in float32; one rounding to the storage dtype, as in the kernels
        return ((self.codes.to(torch.float32) - zero) * scale).to(self.scale.dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class FP8Tensor:
    """float8 e4m3 weights: weight = fp8 · scale, with scale per output channel ([out, 1]), per tensor
    ([1]) or per block of `block` = (rows, cols) ([ceil(out / rows), ceil(in / cols)]).
    input_scale: the calibrated per-tensor activation scale ([1]) of a static scheme, else None."""

    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None = None
    input_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight must be float8_e4m3fn, got {self.weight.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every weight element, [out, in]."""
        return expand_scale(self.scale, self.block, self.shape)

    def dequantize(self) -> torch.Tensor:
        """fp8 · scale, in the scale's dtype (as compressed-tensors computes it)."""
        return (self.weight.to(torch.float32) * self.expanded_scale().to(torch.float32)).to(self.scale.dtype)


def expand_scale(scale: torch.Tensor, block: tuple[int, int] | None, shape: tuple[int, int]) -> torch.Tensor:
    """Per-element scales [out, in] from per-channel / per-tensor ([out, 1] or [1]) or per-block ones."""
    out, cols = shape
    if block is None:
        return scale.reshape(-1, 1).expand(out, cols)
    r, c = block
    return scale.repeat_interleave(r, 0)[:out].repeat_interleave(c, 1)[:, :cols]
