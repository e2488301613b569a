"""A batch manifest: models x recipes, where outputs go, how outputs are scored.

    output_dir: out                  # relative to the manifest's folder
    models:                          # paths (relative to the manifest) or hub ids; or {path, name}
      - ./tiny-llama
      - {path: ./tiny-qwen, name: qwen}
    recipes: [w4a16-rtn, ./my-recipe.yaml]   # bundled names or files (relative to the manifest)
    eval: {dataset: heldout, samples: 40, seq_len: 512}
    push_to_hub: "my-org/{model}-{recipe}"   # optional: upload each verified output that passed its gates
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from qconvert.batch.recipes import Recipe, load, resolve
from qconvert.errors import QConvertError

KEYS = ("output_dir", "models", "recipes", "eval", "push_to_hub", "device", "gpus")
EVAL_KEYS = ("dataset", "samples", "seq_len")


@dataclass(frozen=True)
class Job:
    model: str
    model_name: str
    recipe: Recipe
    recipe_file: Path
    output: Path
    push_to_hub: str | None = None

    @property
    def id(self) -> str:
        return f"{self.model_name}/{self.recipe.name}"


@dataclass(frozen=True)
class Manifest:
    path: Path
    output_dir: Path
    jobs: list[Job]
    eval: dict
    device: str = "auto"
    gpus: int = 1  # processes per job (data-parallel calibration, one per GPU)


def _model_entry(entry, base: Path, where: str) -> tuple[str, str]:
    if isinstance(entry, dict):
        unknown = set(entry) - {"path", "name"}
        if unknown or "path" not in entry:
            raise QConvertError(f"{where}: a model entry is a path or {{path, name}}, got {entry!r}")
        path, name = str(entry["path"]), entry.get("name")
    elif isinstance(entry, str):
        path, name = entry, None
    else:
        raise QConvertError(f"{where}: a model entry is a path or {{path, name}}, got {entry!r}")
    local = (base / path).expanduser()
    model = str(local.resolve()) if path.startswith((".", "/", "~")) or local.exists() else path
    return model, name or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).name or path)


def load_manifest(file: Path) -> Manifest:
    where = str(file)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise QConvertError(f"{file}: no such manifest") from None
    except yaml.YAMLError as exc:
        raise QConvertError(f"{file}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise QConvertError(f"{where}: a manifest is a mapping with keys {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            raise QConvertError(f"{where}: unknown key '{key}' (allowed: {', '.join(KEYS)})")
    base = file.resolve().parent
    models, recipes = data.get("models"), data.get("recipes")
    if not isinstance(models, list) or not models:
        raise QConvertError(f"{where}: 'models' must list at least one model")
    if not isinstance(recipes, list) or not recipes:
        raise QConvertError(f"{where}: 'recipes' must list at least one recipe")
    evaluation = data.get("eval") or {}
    if not isinstance(evaluation, dict) or set(evaluation) - set(EVAL_KEYS):
        raise QConvertError(f"{where}: eval takes {', '.join(EVAL_KEYS)}")
    out_dir = (base / str(data.get("output_dir", "qconvert-out"))).resolve()
    loaded = []
    for spec in recipes:
        local = base / str(spec)
        path = resolve(str(local) if local.is_file() else str(spec))
        loaded.append((load(path), path))
    names = [r.name for r, _ in loaded]
    if len(set(names)) != len(names):
        raise QConvertError(f"{where}: two recipes share a name ({', '.join(names)})")
    push = data.get("push_to_hub")
    jobs = []
    for entry in models:
        model, name = _model_entry(entry, base, where)
        for recipe, path in loaded:
            out = out_dir / name / (f"{recipe.name}.gguf" if recipe.output_is_file else recipe.name)
            jobs.append(Job(model, name, recipe, path, out,
                            push.format(model=name, recipe=recipe.name) if push else None))
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise QConvertError(f"{where}: two models share a name; give them distinct `name`s")
    gpus = data.get("gpus", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise QConvertError(f"{where}: gpus must be a whole number of at least 1, not {gpus!r}")
    return Manifest(file.resolve(), out_dir, jobs, evaluation, str(data.get("device", "auto")), gpus)
