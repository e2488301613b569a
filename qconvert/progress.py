"""Terminal output: a progress bar over layers with a line per layer, on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from qconvert.engine import LayerReport

stderr = Console(stderr=True)


def _columns():
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


@contextlib.contextmanager
def tensor_progress(total: int, label: str, quiet: bool) -> Iterator:
    """Yields an on_tensor(name, qtype) callback advancing a bar over the tensors written."""
    if quiet:
        yield lambda name, qtype: None
        return
    with Progress(*_columns(), console=stderr, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda name, qtype: progress.advance(task)


@contextlib.contextmanager
def layer_progress(total: int, label: str, quiet: bool) -> Iterator:
    """Yields the engine's on_layer callback."""
    if quiet:
        yield lambda report: None
        return
    with Progress(*_columns(), console=stderr, transient=True) as progress:
        task = progress.add_task(label, total=total)

        def on_layer(report: LayerReport) -> None:
            line = f"layer {report.index + 1:>3}/{total}"
            if report.linears:
                line += f"  weight err {report.weight_error:.3e}"
            if report.output_error is not None:
                line += f"  output err {report.output_error:.3e}"
            line += f"  {report.seconds:.2f} s"
            if report.uncalibrated:
                line += f"  [yellow]{len(report.uncalibrated)} linear(s) without calibration tokens (RTN)[/]"
            progress.console.print(line)
            progress.advance(task)

        yield on_layer
