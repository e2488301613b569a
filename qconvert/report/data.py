"""Reading report.json (and a few safetensors headers) into the tables the page shows."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from qconvert.errors import QConvertError
from qconvert.output import write_json_atomically

_EXPERT = re.compile(r"\.experts\.\d+\.")
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def report_file(output: Path) -> Path:
    """Where a conversion left its report.json: inside an output folder, beside a GGUF file."""
    return output / "report.json" if output.is_dir() else output.parent / f"{output.name}.report.json"


def load(output: Path) -> dict:
    path = report_file(output)
    if not path.is_file():
        layouts = sorted(p.parent.name for p in output.glob("*/report.json")) if output.is_dir() else []
        if layouts:
            raise QConvertError(f"{output} holds one output per layout: pass one of "
                                f"{', '.join(str(output / name) for name in layouts)}")
        raise QConvertError(f"{output}: no {path.name} found (every qconvert conversion writes one)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QConvertError(f"{path}: not valid JSON ({exc})") from None
    if not str(report.get("tool", "")).startswith("qconvert"):
        raise QConvertError(f"{path}: not a qconvert report")
    return report


def _same_evaluation(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("base", "dataset", "samples", "seq_len"))


def record_evaluation(output: str | Path, result: dict) -> bool:
    """Keep an evaluation in the output's report.json (replacing one of the same base and text); False
    when `output` is not a qconvert output (an input checkpoint is never written to)."""
    path = report_file(Path(output))
    try:
        report = load(Path(output))
    except QConvertError:
        return False
    kept = [e for e in report.get("evaluations", []) if not _same_evaluation(e, result)]
    report["evaluations"] = [*kept, result]
    write_json_atomically(path, report)
    return True


def find_evaluation(report: dict, base: str | None, dataset: str, samples: int, seq_len: int) -> dict | None:
    """The stored evaluation against `base` on that text; without a base, the latest one against any base."""
    stored = [e for e in report.get("evaluations", []) if e.get("base")]
    if base is None:
        return stored[-1] if stored else None
    wanted = {"base": base, "dataset": dataset, "samples": samples, "seq_len": seq_len}
    return next((e for e in stored if _same_evaluation(e, wanted)), None)


def tensor_kind(name: str) -> str:
    """GGUF tensor name -> its kind: blk.3.attn_v.weight -> attn_v, output_norm.weight -> output_norm."""
    m = _GGUF_BLOCK.match(name)
    return m.group(2) if m else name.removesuffix(".weight")


@dataclass
class ErrorGrid:
    """Per layer (rows) and linear kind (columns): a relative error, None where a layer has no such linear."""

    metric: str  # "output error" or "weight error"
    kinds: list[str]
    values: list[list[float | None]] = field(default_factory=list)


def _kind(linear: str) -> str:
    """self_attn.q_proj -> q_proj; mlp.experts.7.down_proj -> experts.down_proj (experts averaged)."""
    if _EXPERT.search(f".{linear}."):
        return "experts." + linear.rpartition(".")[2]
    return linear.rpartition(".")[2]


def error_grid(report: dict) -> ErrorGrid:
    """Output error on calibration activations where the run was calibrated, weight error otherwise."""
    if "tensors" in report:  # GGUF: blk.N.kind.weight
        cells: dict[tuple[int, str], list[float]] = defaultdict(list)
        for name, t in report["tensors"].items():
            m = _GGUF_BLOCK.match(name)
            if m and t.get("weight_error") is not None and len(t["shape"]) >= 2:
                cells[(int(m.group(1)), m.group(2))].append(t["weight_error"])
        metric = "weight error"
    else:
        layers = report.get("layers", [])
        calibrated = any(lr.get("output_error") is not None for layer in layers for lr in layer["linears"].values())
        metric = "output error" if calibrated else "weight error"
        key = "output_error" if calibrated else "weight_error"
        cells = defaultdict(list)
        for layer in layers:
            for name, lr in layer["linears"].items():
                if lr.get(key) is not None:
                    cells[(layer["index"], _kind(name))].append(lr[key])
    kinds = list(dict.fromkeys(k for _, k in sorted(cells, key=lambda c: c[0])))
    count = 1 + max((i for i, _ in cells), default=-1)
    values = [[(sum(v) / len(v)) if (v := cells.get((i, k))) else None for k in kinds] for i in range(count)]
    return ErrorGrid(metric, kinds, values)


@dataclass
class SizeRow:
    kind: str  # tensor kind: q_proj, embed_tokens, attn_v, ...
    bytes_by_type: dict[str, int]  # storage type (int4 g128, Q6_K, bfloat16 ...) -> bytes
    weights: int  # logical parameters

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(self.bytes_by_type.values()) / max(self.weights, 1)


def size_rows(report: dict, output: Path) -> list[SizeRow]:
    """Bytes on disk per tensor kind, split by how each tensor is stored (largest kinds first)."""
    rows: dict[str, SizeRow] = {}
    if "tensors" in report:
        for name, t in report["tensors"].items():
            kind = tensor_kind(name)
            row = rows.setdefault(kind, SizeRow(kind, defaultdict(int), 0))
            row.bytes_by_type[t["type"]] += t["bytes"]
            row.weights += math.prod(t["shape"])
    else:
        rows = _safetensors_rows(output)
    return sorted(rows.values(), key=lambda r: -sum(r.bytes_by_type.values()))


_CODES = ("weight_packed", "qweight", "B")  # the tensor holding a packed module's codes


def _safetensors_rows(output: Path) -> dict[str, SizeRow]:
    from qconvert.inspect import quantized_modules
    from qconvert.model.checkpoint import Checkpoint

    ckpt = Checkpoint(output)
    quantized, _ = quantized_modules(ckpt)
    rows: dict[str, SizeRow] = {}
    for name in ckpt.names():
        module, _, suffix = name.rpartition(".")
        numel = math.prod(int(d) for d in ckpt.shape(name))
        if module in quantized:  # packed codes, scales, zeros: the module's logical weights counted once
            storage, weights = quantized[module][0], quantized[module][1] if suffix in _CODES else 0
        else:
            storage, weights = ckpt.dtype(name).lower(), numel if suffix in ("weight", "bias") else 0
        kind = _kind(module) if module else name
        row = rows.setdefault(kind, SizeRow(kind, defaultdict(int), 0))
        row.bytes_by_type[storage] += numel * ckpt.torch_dtype(name).itemsize
        row.weights += weights
    return rows
