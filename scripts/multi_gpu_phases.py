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
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phase_timers import SPANS, sync_gpu, timed  # noqa: E402 (this script's folder is on sys.path)

from qconvert import distributed, engine  # noqa: E402
from qconvert.algorithms import awq, gptq  # noqa: E402

OWNER = os.getpid()  # a forked child inherits the exit hook: only this process reports


def _barrier(step: str) -> None:
    """Before a collective: wait for every rank, kept as its own step, so the exchange's span is its own."""
    if distributed.current().active:
        start = time.time()
        distributed._connected()  # the process group, and its start-up collectives first on every rank
        dist.barrier()
        sync_gpu()
        SPANS.append((threading.current_thread().name, f"wait ({step})", start, time.time()))


def _forward_kind(*args, stop_at=None, keep=None, enough=None, **kwargs) -> str:
    kind = "input samples" if enough else "group statistics" if stop_at is not None else "reference" if keep else "advance"
    return f"forward: {kind}"


def instrument() -> None:
    timed(engine, "run_block", _forward_kind, sync=True)
    timed(engine, "read_block", "read block (in the background)")
    timed(distributed, "_connected", "join the process group (wait)")
    for owner, name, label in ((engine, "load_block", "load block"),
                               (engine, "capture_block_inputs", "embed calibration"),
                               (engine._BlockStep, "_apply", "apply results (dequantize, errors, write)"),
                               (engine._BlockStep, "_write_rest", "write the rest"),
                               (engine._BlockStep, "run", "block total"),
                               (gptq, "gptq", "gptq: sweep incl. factorization"),
                               (gptq, "plane_factor", "gptq: factorization"),
                               (awq.AWQ, "_search", "awq: scale search"),
                               (awq, "_clip_rows", "awq: clipping search"),
                               (awq._TokenSample, "take", "awq: clip tokens gathered"),
                               (awq.AWQ, "quantize", "awq: rounding"),
                               (distributed.Ranks, "share", "comm: share")):  # share: rank-specific, no barrier
        timed(owner, name, label, sync=True)
    for method in ("sum_", "max_", "add", "stack_rows"):
        timed(distributed.Ranks, method, f"comm: {method}", sync=True, before=_barrier)


def _report() -> None:
    if os.getpid() != OWNER:
        return
    totals: dict[str, list] = {}
    for _thread, step, start, end in SPANS:
        total = totals.setdefault(step, [0.0, 0])
        total[0] += end - start
        total[1] += 1
    phases = {k: [round(v[0], 3), v[1]] for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])}
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                      "phases": phases}), file=sys.stderr, flush=True)
    if os.environ.get("PHASES_EVENTS"):
        path = Path(os.environ["PHASES_EVENTS"]) / f"rank{os.environ.get('RANK', 0)}.json"
        path.write_text(json.dumps([[step, start, end] for _thread, step, start, end in SPANS]))


if __name__ == "__main__":
    instrument()
    atexit.register(_report)
    sys.argv = ["qconvert", *sys.argv[1:]]
    from qconvert.cli import main

    main()
