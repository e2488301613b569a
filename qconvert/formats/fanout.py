"""One quantization pass written in several layouts at once (`--format awq,compressed-tensors`)."""

from __future__ import annotations

import torch


class FanOut:
    """Hands every tensor to each writer; the engine quantizes once per distinct `scale_dtype` among them
    and gives each writer the result in its own (see engine._BlockStep._quantize)."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        for w in self.writers:
            w.add_tensor(name, tensor)

    def reserve_tensor(self, name: str, dtype: torch.dtype, shape) -> None:
        for w in self.writers:
            w.reserve_tensor(name, dtype, shape)


def scale_dtypes(writers: list, default: torch.dtype) -> list[torch.dtype]:
    """The scale dtype each writer stores (its own, or the checkpoint's `default`)."""
    return [getattr(w, "scale_dtype", None) or default for w in writers]
