"""Run a function in several gloo processes on the CPU, as torchrun would start them."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn, args) -> None:
    import torch

    from qconvert import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    try:
        fn(distributed.current(), *args)
    finally:
        distributed.stop()


def run_ranks(world: int, fn, *args) -> None:
    """fn(ranks, *args) in `world` processes joined by gloo; an exception in any of them fails the call.
    fn and args must be importable / picklable (spawned processes)."""
    mp.spawn(_rank_main, args=(world, _free_port(), fn, args), nprocs=world, join=True)
