"""Data-parallel calibration over torch.distributed (launched by torchrun, or by `--gpus N`).

Every rank runs its share of the calibration samples (every world-th one, so the first samples that a
search uses are spread over all ranks) through the current block; the statistics the algorithms
collect are summed (or maxed) over the ranks before anything is chosen from them, so every rank makes
the same choice; the quantization of a block's linears is divided among the ranks and the results
shared; rank 0 alone writes. NCCL between GPUs, gloo between CPU processes; torchrun's rendezvous
makes the same code run on one host or across hosts.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qconvert.errors import QConvertError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def samples(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows: every world-th one."""
        return tokens[self.rank::self.world]

    def row_share(self, rows: int) -> slice:
        """This rank's contiguous share of `rows` (the first ranks take one more when they do not divide)."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that does each job: largest first, each to the least-loaded rank (the same answer on
        every rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            owner[i] = min(range(self.world), key=lambda r: load[r])
            load[owner[i]] += costs[i]
        return owner

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.active:
            _connected()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            _connected()
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def add(self, values: list[float]) -> list[float]:
        """Numbers (token counts, error sums) summed over the ranks, in one message."""
        if not self.active or not values:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=_comm_device())).tolist()

    def share(self, obj, src: int):
        """`obj` as rank `src` has it, on every rank: any picklable structure, its tensors sent as tensors
        (through NCCL on the GPU, not through pickle) and placed on the receiver's matching device."""
        if not self.active:
            return obj
        tensors: list[torch.Tensor] = []
        header = [None]
        if self.rank == src:
            buf = io.BytesIO()
            _TensorPickler(buf, tensors).dump(obj)
            header = [(buf.getvalue(), [(tuple(t.shape), t.dtype, t.device.type) for t in tensors])]
        comm = _comm_device()
        dist.broadcast_object_list(header, src=src, device=comm)
        data, specs = header[0]
        # every tensor in one message (one broadcast per tensor was most of the time an exchange took), each
        # at an offset that view(dtype) accepts
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in specs]
        flat = torch.empty(sum(_padded(n) for n in sizes), dtype=torch.uint8, device=comm)
        parts = [p[:n] for p, n in zip(flat.split([_padded(n) for n in sizes]), sizes)]
        if self.rank == src:
            for part, t in zip(parts, tensors):
                part.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        if specs:
            dist.broadcast(flat, src=src)
        if self.rank == src:
            return obj
        received = [part.view(dtype).reshape(shape).to(comm if kind == comm.type else torch.device(kind))
                    for part, (shape, dtype, kind) in zip(parts, specs)]
        return _TensorUnpickler(io.BytesIO(data), received).load()

    def gather(self, part):
        """Every rank's `part`, in rank order, on every rank."""
        return [self.share(part if r == self.rank else None, r) for r in range(self.world)]

    def stack_rows(self, part: torch.Tensor, rows: int) -> torch.Tensor:
        """The whole of a tensor of `rows` rows whose row_share each rank holds: one all-gather of equal,
        padded blocks (no pickling, no wait on the host)."""
        if not self.active:
            return part
        _connected()
        block = -(-rows // self.world)
        padded = part.new_empty((block, *part.shape[1:]))
        padded[:part.shape[0]] = part
        blocks = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(blocks, padded)
        shares = [Ranks(r, self.world).row_share(rows) for r in range(self.world)]
        return torch.cat([b[:s.stop - s.start] for b, s in zip(blocks, shares)])


class _TensorPickler(pickle.Pickler):
    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors
        self.index: dict[int, int] = {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self.index:  # a tensor met again (the rotary tables of every call) is sent once
                self.index[id(obj)] = len(self.tensors)
                self.tensors.append(obj)
            return self.index[id(obj)]
        return None


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


ALIGN = 16  # each tensor's bytes start at a multiple of this in a shared message (view(dtype) needs it)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _comm_device() -> torch.device:
    _connected()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_current = Ranks()
_joining: "_Join | None" = None


class _Join(threading.Thread):
    """init_process_group and a first collective of each kind the engine uses, in a thread: NCCL makes its
    communicator and connections then (the first collective kept every rank waiting 0.85 s on 4 H200s),
    while the process reads its calibration data, its checkpoint and its first block."""

    def __init__(self, device: torch.device):
        super().__init__(name="join-process-group", daemon=True)
        self.device, self.error = device, None
        self.start()

    def run(self) -> None:
        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)  # the current GPU belongs to a thread
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
            if cuda:
                self._first_collectives()
        except BaseException as e:  # noqa: BLE001 (raised again in the thread that needs the group)
            self.error = e

    def _first_collectives(self) -> None:
        world = dist.get_world_size()
        for dtype in (torch.float32, torch.float64):
            dist.all_reduce(torch.zeros(world, dtype=dtype, device=self.device))
        dist.all_reduce(torch.zeros(world, device=self.device), op=dist.ReduceOp.MAX)
        for dtype in (torch.uint8, torch.float16, torch.bfloat16, torch.float32):
            t = torch.zeros(world, dtype=dtype, device=self.device)
            dist.all_gather(list(t.split(1)), t[:1].clone())
            dist.broadcast(t, src=0)
        dist.broadcast_object_list([None], src=0, device=self.device)
        torch.cuda.synchronize(self.device)


def _connected() -> None:
    """Wait for the process group before any collective: collectives must reach NCCL in the same order on
    every rank, so none may start while _Join's are under way."""
    global _joining
    if _joining is not None:
        _joining.join()
        error, _joining = _joining.error, None
        if error is not None:
            raise QConvertError(f"joining the other processes failed: {error}") from error


def current() -> Ranks:
    return _current


def launched() -> bool:
    """Started by torchrun (or by --gpus) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> Ranks:
    """Join the process group torchrun describes: NCCL for CUDA, gloo for the CPU; each rank on its local
    GPU. A single process stays alone. The rank comes from torchrun's environment at once; the group is
    joined in the background (see _Join), and the first collective waits for it."""
    global _current, _joining
    if not launched():
        return _current
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise QConvertError(f"rank {local}: only {torch.cuda.device_count()} CUDA device(s) on this host")
        torch.cuda.set_device(local)
    _current = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local)
    if not dist.is_initialized():
        _joining = _Join(torch.device("cuda", local) if device.type == "cuda" else torch.device("cpu"))
    return _current


def local_device(device: torch.device) -> torch.device:
    """`cuda` means this rank's own GPU."""
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def stop() -> None:
    """Leave the process group. A failed join is not raised here: stop() runs while another error may be on
    its way out, and a collective has already raised the join's own."""
    global _current, _joining
    if _joining is not None:
        _joining.join()
        _joining = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = Ranks()
