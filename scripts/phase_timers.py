"""Timers wrapped around a conversion's functions, for the timeline scripts (gguf_phase_timeline.py,
multi_gpu_phases.py): every call of a wrapped function is kept as a span (thread, step, start, end) on the
host's wall clock, which lines up across the processes of a distributed run."""

from __future__ import annotations

import functools
import threading
import time

import torch

SPANS: list[tuple[str, str, float, float]] = []


def sync_gpu() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(owner, name: str, label=None, sync: bool = False, before=None) -> None:
    """Replace owner.name by a wrapper that keeps each call's span. label: the step's name (default: name), or a
    function of the call's arguments; sync: the GPU synchronised before and after, so the span is the call's own
    work (which serialises a little); before: called with the step's name just before the span starts (a
    barrier, say, that keeps its own span)."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        step = label(*args, **kwargs) if callable(label) else label or name
        if sync:
            sync_gpu()
        if before is not None:
            before(step)
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                sync_gpu()
            SPANS.append((threading.current_thread().name, step, start, time.time()))

    setattr(owner, name, wrapper)
