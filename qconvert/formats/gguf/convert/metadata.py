"""The `general.*` keys that depend only on the source checkpoint (name, basename, size label, license,
sampling defaults ...), computed with gguf-py's own Metadata heuristics like llama.cpp's converter does.

gguf 0.19 (PyPI) lacks one rule of the gguf-py that ships with llama.cpp 0.3.36: generation_config's
`repetition_penalty` becomes general.sampling.penalty_repeat when `penalty_repeat` is absent; it is
applied here.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from .kv import KVItem

ARCHITECTURE = gguf.Keys.General.ARCHITECTURE


def _generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return {}


def general_kv(model_dir: Path, arch: str, counts: tuple[int, int, int, int], model_name: str | None = None,
               metadata_override: Path | None = None) -> list[KVItem]:
    """general.* keys after general.architecture / general.type, in llama.cpp's order.
    counts: (total, shared, expert, expert_count) parameters of the GGUF tensors; model_name and
    metadata_override: llama.cpp's --model-name and --metadata (a JSON file of general.* keys)."""
    model_dir = Path(model_dir)
    total, shared, expert, expert_count = counts
    meta = gguf.Metadata.load(metadata_override, model_dir, model_name, total)
    gen = _generation_config(model_dir)
    override = gguf.Metadata.load_metadata_override(metadata_override)
    if gen and "penalty_repeat" not in gen and "repetition_penalty" in gen \
            and gguf.Keys.General.SAMPLING_PENALTY_REPEAT not in override:
        meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    recorder = gguf.GGUFWriter(None, arch)  # used only as a KV recorder
    meta.set_gguf_meta_model(recorder)
    return [(k, v.value, v.type) for k, v in recorder.kv_data[0].items() if k != ARCHITECTURE]
