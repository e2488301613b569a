"""Text sources: bundled sets, local .txt/.jsonl/.parquet files, and `hf:NAME[:CONFIG][:SPLIT]`."""

from __future__ import annotations

import json
from pathlib import Path

from qconvert.errors import QConvertError

DEFAULT_CALIBRATION = "mixed"
DEFAULT_EVALUATION = "heldout"


def bundled_dir() -> Path:
    pkg = Path(__file__).resolve().parents[1]
    for candidate in (pkg / "calibration_sets", pkg.parent / "calibration_sets"):
        if candidate.is_dir():
            return candidate
    raise QConvertError("the bundled calibration_sets folder is missing from this installation")


def bundled_names() -> list[str]:
    return sorted(p.stem for p in bundled_dir().glob("*.jsonl"))


def load_texts(spec: str, tokenizer=None) -> list[str]:
    """The documents of a dataset spec, in order."""
    if spec.startswith("hf:"):
        return _hub_texts(spec[3:], tokenizer)
    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec and "." not in spec:
        path = bundled_dir() / f"{spec}.jsonl"
        if not path.is_file():
            raise QConvertError(f"unknown dataset '{spec}' (bundled sets: {', '.join(bundled_names())}; or a .txt/.jsonl/.parquet path, or hf:NAME)")
    if not path.is_file():
        raise QConvertError(f"{spec}: no such dataset file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    elif suffix == ".jsonl":
        texts = [_row_text(json.loads(line), path, i + 1, tokenizer) for i, line in enumerate(_lines(path))]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        texts = [_row_text(r, path, i + 1, tokenizer) for i, r in enumerate(rows)]
    else:
        raise QConvertError(f"{spec}: unsupported dataset file type '{suffix}' (use .txt, .jsonl or .parquet)")
    texts = [t for t in texts if t]
    if not texts:
        raise QConvertError(f"{spec}: the dataset holds no text")
    return texts


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _row_text(row: dict, source, line: int, tokenizer) -> str:
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise QConvertError(f"{source}:{line}: chat 'messages' need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    raise QConvertError(f"{source}:{line}: a row needs a 'text' string or a 'messages' list")


def _hub_texts(spec: str, tokenizer) -> list[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise QConvertError(f"hf:{spec}: cannot load the dataset ({type(exc).__name__}: {exc})") from None
    return [t for i, row in enumerate(ds) if (t := _row_text(row, f"hf:{spec}", i + 1, tokenizer))]
