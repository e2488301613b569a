"""The report's charts, drawn by matplotlib into PNG data URIs (the page needs no network)."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from qconvert.report.data import ErrorGrid, SizeRow  # noqa: E402

MIB = 2**20
MAX_SIZE_ROWS = 14


def _data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def error_heatmap(grid: ErrorGrid, title: str) -> str:
    """Layers down, linear kinds across, log10 of the relative error; blank where a layer has no such linear."""
    values = np.array([[np.nan if v is None else v for v in row] for row in grid.values], dtype=float)
    logged = np.log10(np.where(values > 0, values, np.nan))
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(grid.kinds), 1.6 + 0.24 * len(grid.values)))
    image = ax.imshow(logged, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_xticks(range(len(grid.kinds)), grid.kinds, rotation=40, ha="right")
    step = max(1, math.ceil(len(grid.values) / 32))
    ax.set_yticks(range(0, len(grid.values), step))
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=f"log10 {grid.metric}")
    return _data_uri(fig)


def size_bars(rows: list[SizeRow], title: str) -> str:
    """Bytes per tensor kind, stacked by storage type, labelled with bits per weight."""
    shown = rows[:MAX_SIZE_ROWS]
    types = list(dict.fromkeys(t for r in shown for t in sorted(r.bytes_by_type, key=lambda t: -r.bytes_by_type[t])))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(types), 2)))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.34 * len(shown)))
    left = np.zeros(len(shown))
    for color, storage in zip(colors, types):
        widths = np.array([r.bytes_by_type.get(storage, 0) / MIB for r in shown])
        ax.barh(range(len(shown)), widths, left=left, color=color, label=storage)
        left += widths
    for i, r in enumerate(shown):
        ax.text(left[i], i, f"  {r.bits_per_weight:.2f} bits/weight" if r.weights else "", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), [r.kind for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel("MiB on disk")
    ax.set_xlim(0, max(left.max(), 1e-3) * 1.35)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return _data_uri(fig)


def layer_error_lines(series: dict[str, list[float | None]], metric: str) -> str:
    """Mean error per layer, one line per output."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for label, values in series.items():
        ax.plot(range(len(values)), [np.nan if v is None else v for v in values], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} per layer")
    return _data_uri(fig)
