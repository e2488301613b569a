"""Streaming safetensors output: tensors are buffered up to a shard size, then written out."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Writes model-XXXXX-of-YYYYY.safetensors (+ index) or a single model.safetensors."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter.add after finish")
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffered += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._buffer, self.out_dir / f"shard-{index:05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffered = {}, 0

    def finish(self) -> list[str]:
        """Flush, name the shards and write the index; returns the file names."""
        if self._buffer or not self._shards:
            self._flush()
        self._closed = True
        n = len(self._shards)
        if n == 1:
            (self.out_dir / "shard-00000.tmp").rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / file)
            weight_map.update(dict.fromkeys(names, file))
            files.append(file)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files
