"""Streaming safetensors output: each tensor goes to disk as it arrives, so memory does not grow
with the model. safetensors puts its header before the data, so a shard's data is appended to a
scratch file and the finished shard is header + that data.

File layout (safetensors spec): u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

DEFAULT_SHARD_BYTES = 2 * 1024**3
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _copy(src, dst, size: int) -> None:
    """Append src's bytes to dst inside the kernel where it can (no trip through Python buffers)."""
    offset = 0
    try:
        while offset < size:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), size - offset, offset)
            if sent == 0:
                break
            offset += sent
    except (AttributeError, OSError):  # no copy_file_range here (platform, filesystem): copy the rest
        pass
    src.seek(offset)
    shutil.copyfileobj(src, dst, 16 * 1024**2)


def split_modules(ckpt, marker: str, suffixes: tuple[str, ...], read_module):
    """Every tensor of a quantized checkpoint, in file order: each module that has a `marker` tensor
    comes back once as (module.weight, read_module(module)), its other `suffixes` skipped."""
    names = ckpt.names()
    quantized = {n.removesuffix(f".{marker}") for n in names if n.endswith(f".{marker}")}
    for name in names:
        module, _, suffix = name.rpartition(".")
        if module in quantized and suffix in suffixes:
            if suffix == marker:
                yield f"{module}.weight", read_module(module)
            continue
        yield name, ckpt.get(name)


class _Shard:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.file = open(scratch, "wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        self.header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + data.nbytes]}
        self.file.write(memoryview(data))
        self.size += data.nbytes

    def close(self, path: Path) -> None:
        self.file.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as out, open(self.scratch, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            out.flush()
            _copy(data, out, self.size)
        self.scratch.unlink()


class ShardWriter:
    """Writes model-XXXXX-of-YYYYY.safetensors (+ index) or a single model.safetensors."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._open: _Shard | None = None
        self._done: list[tuple[Path, list[str]]] = []  # closed shards: temporary path, tensor names
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.size and self._open.size + size > self.max_shard_bytes:
            self._close_shard()
        if self._open is None:
            self._open = _Shard(self.out_dir / f"shard-{len(self._done):05d}.data.tmp")
        self._open.add(name, tensor)
        self.total_bytes += size

    def _close_shard(self) -> None:
        path = self.out_dir / f"shard-{len(self._done):05d}.tmp"
        self._open.close(path)
        self._done.append((path, list(self._open.header)))
        self._open = None

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index."""
        if self._open is not None or not self._done:
            if self._open is None:
                self._open = _Shard(self.out_dir / "shard-00000.data.tmp")
            self._close_shard()
        n = len(self._done)
        if n == 1:
            self._done[0][0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._done):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / file)
            weight_map.update(dict.fromkeys(names, file))
            files.append(file)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files
