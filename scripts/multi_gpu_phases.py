"""Where a data-parallel conversion's time goes, rank by rank: qconvert's command with synchronising timers
around the engine's phases (forward passes, statistics exchanges, factorizations, sweeps, searches, writing).

Each timer synchronises the GPU before and after its phase, so a phase's figure is its own work; a collective
is preceded by a timed barrier, so the time spent waiting for the slowest rank ("wait") is apart from the
exchange itself. Run it in place of `-m qconvert`, through torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 4 scripts/multi_gpu_phases.py \\
        gptq /tmp/m8 --w-bit 4 --group 128 --dataset /tmp/ids.pt -o /tmp/out --overwrite -q

Each rank prints one JSON line to stderr at exit: {"rank", "world", "phases": {name: [seconds, calls]}}; with
PHASES_EVENTS=DIR it also writes DIR/rankN.json, every timed call as [phase, start, end] (host clock).
Without torchrun it times one process.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qconvert import distributed, engine  # noqa: E402
from qconvert.algorithms import awq, gptq  # noqa: E402

PHASES: dict[str, list] = defaultdict(lambda: [0.0, 0])
EVENTS: list[tuple[str, float, float]] = []  # (phase, start, end) on the host's wall clock, for a timeline
OWNER = os.getpid()  # a forked child inherits the exit hook: only this process reports


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _add(label: str, start: float, end: float) -> None:
    PHASES[label][0] += end - start
    PHASES[label][1] += 1
    EVENTS.append((label, start, end))


def _timed(owner, attr: str, label, collective: bool = False, sync: bool = True) -> None:
    """Replace owner.attr by a timed wrapper; label: a name, or a function of the call's arguments."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        name = label(*args, **kwargs) if callable(label) else label
        if sync:
            _sync()
        start = time.time()
        if collective and distributed.current().active:
            distributed._connected()  # the process group, and its start-up collectives first on every rank
            dist.barrier()
            _sync()
            _add(f"wait ({name})", start, time.time())
            start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                _sync()
            _add(name, start, time.time())

    setattr(owner, attr, wrapper)


def _forward_kind(*args, stop_at=None, keep=None, **kwargs) -> str:
    return "forward: " + ("group statistics" if stop_at is not None else "reference" if keep else "advance")


def instrument() -> None:
    _timed(engine, "run_block", _forward_kind)
    _timed(engine, "load_block", "load block")
    _timed(engine, "read_block", "read block (in the background)", sync=False)
    _timed(distributed, "_connected", "join the process group (wait)", sync=False)
    _timed(engine, "capture_block_inputs", "embed calibration")
    _timed(engine._BlockStep, "_apply", "apply results (dequantize, errors, write)")
    _timed(engine._BlockStep, "_write_rest", "write the rest")
    _timed(engine._BlockStep, "run", "block total")
    _timed(gptq, "gptq", "gptq: sweep incl. factorization")
    _timed(gptq, "plane_factor", "gptq: factorization")
    _timed(awq.AWQ, "_search", "awq: scale search")
    _timed(awq, "_clip_rows", "awq: clipping search")
    _timed(awq._TokenSample, "take", "awq: clip tokens gathered")
    _timed(awq.AWQ, "quantize", "awq: rounding")
    for method in ("sum_", "max_", "add", "stack_rows"):
        _timed(distributed.Ranks, method, f"comm: {method}", collective=True)
    _timed(distributed.Ranks, "share", "comm: share")  # rank-specific calls inside gather: no barrier


def _report() -> None:
    if os.getpid() != OWNER:
        return
    phases = {k: [round(v[0], 3), v[1]] for k, v in sorted(PHASES.items(), key=lambda kv: -kv[1][0])}
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                      "phases": phases}), file=sys.stderr, flush=True)
    if os.environ.get("PHASES_EVENTS"):
        path = Path(os.environ["PHASES_EVENTS"]) / f"rank{os.environ.get('RANK', 0)}.json"
        path.write_text(json.dumps(EVENTS))


if __name__ == "__main__":
    instrument()
    atexit.register(_report)
    sys.argv = ["qconvert", *sys.argv[1:]]
    from qconvert.cli import main

    main()
