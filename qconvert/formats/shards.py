"""Streaming safetensors output: each tensor goes to disk as it arrives, so memory does not grow
with the model. safetensors puts its header before the data, whose size is known only at the end:
each shard leaves HEADER_ROOM bytes for it (the JSON may be padded with spaces).

File layout (safetensors spec): u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from qconvert.formats.casting import cast_float

DEFAULT_SHARD_BYTES = 2 * 1024**3
HEADER_ROOM = 128 * 1024  # ~1000 tensor entries; a larger header costs one copy of the shard
MAX_PENDING_BYTES = 2 * 1024**3


class _HostBytes:
    """A tensor's bytes on the host. From a GPU the copy into page-locked memory is started here, on a
    stream of its own, and waited for by the writing thread, so the caller goes on computing: a wait per
    tensor was most of the time rank 0 of a distributed run spent beyond the others, and on the caller's
    stream the copies (an 8B layer's 110 MB of int4) held up the kernels queued after them."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self.nbytes = tensor.numel() * tensor.element_size()
        self.ready = None
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            side = _copy_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # after the kernels that made it
            with torch.cuda.stream(side):
                self.host.copy_(tensor, non_blocking=True)
                tensor.record_stream(side)  # its memory is not reused before the copy is done
                self.ready = torch.cuda.Event()
                self.ready.record(side)
        else:
            self.host = tensor.contiguous()

    def array(self):
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.reshape(-1).view(torch.uint8).numpy()
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}  # safetensors dtype name -> torch dtype


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _copy(src, dst, start: int, size: int) -> None:
    """Append src's bytes [start, start + size) to dst inside the kernel where it can (no trip
    through Python buffers)."""
    offset = 0
    try:
        while offset < size:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), size - offset, start + offset)
            if sent == 0:
                break
            offset += sent
    except (AttributeError, OSError):  # no copy_file_range here (platform, filesystem): copy the rest
        pass
    src.seek(start + offset)
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
    """One output file. Each tensor's bytes go to its own offset (os.pwrite) after room reserved for
    the header, so they may arrive from any thread; closing writes the header into that room, padded
    with spaces, or, when it outgrew the room, copies the data behind a header of the right size."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.header: dict[str, dict] = {}
        self.size = 0
        self.awaited: set[str] = set()  # reserved tensors whose bytes have not come yet
        self.final_path: Path | None = None  # set when the shard is full: it closes once nothing is awaited

    def place(self, name: str, dtype: torch.dtype, shape, nbytes: int) -> int:
        """Reserve the bytes of one tensor; returns their file offset."""
        self.header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                             "data_offsets": [self.size, self.size + nbytes]}
        self.size += nbytes
        return HEADER_ROOM + self.size - nbytes

    def write(self, data: "_HostBytes", offset: int) -> None:
        view = memoryview(data.array()).cast("B")
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def close(self, path: Path) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        if len(header) <= HEADER_ROOM - 8:
            os.pwrite(self.fd, struct.pack("<Q", HEADER_ROOM - 8) + header.ljust(HEADER_ROOM - 8), 0)
            os.ftruncate(self.fd, HEADER_ROOM + self.size)  # a shard with no tensors is header only
            os.close(self.fd)
            self.path.rename(path)
            return
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as out, open(self.fd, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            out.flush()
            _copy(data, out, HEADER_ROOM, self.size)
        self.path.unlink()


class ShardWriter:
    """Writes model-XXXXX-of-YYYYY.safetensors (+ index) or a single model.safetensors.

    add() may be called from several threads. It copies the tensor to host memory and hands the
    file write to one background thread, so GPU work goes on while the disk catches up; at most
    MAX_PENDING_BYTES wait in memory. Tensors take file positions in the order they are added, or
    reserved: reserve() places a tensor known only by its header, so its data may come later, from
    any thread, and the files are the same bytes whenever it comes."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._open: _Shard | None = None
        self._done: list[tuple[Path, list[str]]] = []  # closed shards: temporary path, tensor names
        self._names: set[str] = set()
        self.total_bytes = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconvert-shards")
        self._jobs: list[Future] = []
        self._pending = 0
        self._room = threading.Condition()
        self._reserved: dict[str, tuple[_Shard, int]] = {}  # name -> its shard and file offset

    def reserve(self, name: str, dtype: torch.dtype, shape) -> None:
        """Give a tensor its place now; add() of the same name brings its bytes."""
        with self._room:
            shard, offset = self._place(name, dtype, shape, math.prod(shape) * dtype.itemsize)
            shard.awaited.add(name)
            self._reserved[name] = (shard, offset)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = _HostBytes(tensor)
        with self._room:
            while self._pending and self._pending + data.nbytes > MAX_PENDING_BYTES:
                self._room.wait()
            if name not in self._reserved:
                shard, offset = self._place(name, tensor.dtype, tensor.shape, data.nbytes)
                self._submit(data.nbytes, shard.write, data, offset)
                return
            shard, offset = self._reserved[name]
            entry = shard.header[name]
            if entry["dtype"] != _DTYPES[tensor.dtype] or entry["shape"] != list(tensor.shape):
                raise ValueError(f"tensor {name}: reserved as {entry['dtype']} {entry['shape']}, "
                                 f"given {_DTYPES[tensor.dtype]} {list(tensor.shape)}")
            del self._reserved[name]
            shard.awaited.discard(name)
            self._submit(data.nbytes, shard.write, data, offset)
            if not shard.awaited and shard.final_path is not None:
                self._submit(0, shard.close, shard.final_path)

    def _place(self, name: str, dtype: torch.dtype, shape, nbytes: int) -> tuple[_Shard, int]:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        if self._open is not None and self._open.size and self._open.size + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._open is None:
            self._open = _Shard(self.out_dir / f"shard-{len(self._done):05d}.tmp")
        self.total_bytes += nbytes
        return self._open, self._open.place(name, dtype, shape, nbytes)

    def _submit(self, nbytes: int, fn, *args) -> None:
        self._pending += nbytes
        job = self._io.submit(fn, *args)
        job.add_done_callback(lambda _: self._written(nbytes))
        self._jobs.append(job)

    def _written(self, nbytes: int) -> None:
        with self._room:
            self._pending -= nbytes
            self._room.notify_all()

    def _close_shard(self) -> None:
        path = self.out_dir / f"shard-{len(self._done):05d}.safetensors.tmp"
        self._open.final_path = path
        if not self._open.awaited:
            self._submit(0, self._open.close, path)  # after its writes: the thread takes jobs in order
        self._done.append((path, list(self._open.header)))
        self._open = None

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index."""
        with self._room:
            if self._reserved:
                raise ValueError(f"{len(self._reserved)} reserved tensor(s) never written: {', '.join(self._reserved)}")
            if self._open is not None or not self._done:
                if self._open is None:
                    self._open = _Shard(self.out_dir / "shard-00000.tmp")
                self._close_shard()
        self._io.shutdown(wait=True)
        for job in self._jobs:
            job.result()  # a failed write (disk full ...) is raised here
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


class PlainTensors:
    """What every safetensors layout writer does with the tensors it does not quantize (norms, embeddings):
    stores them into `self.shards`, floats cast to `self.dtype` where the layout computes in one (fp16 for
    the AWQ, GPTQ and Marlin kernels) or as they are."""

    dtype: torch.dtype | None = None

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor if self.dtype is None else cast_float(name, tensor, self.dtype))

    def reserve_tensor(self, name: str, dtype: torch.dtype, shape) -> None:
        """Place a tensor by its header before its data is read (see ShardWriter.reserve)."""
        self.shards.reserve(name, self.dtype if self.dtype is not None and dtype.is_floating_point else dtype, shape)
