"""One job: convert a model with a recipe, read the output back and verify it, score it against the base,
check the recipe's gates."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qconvert import distributed
from qconvert.batch.recipes import Recipe
from qconvert.errors import QConvertError
from qconvert.pipeline import Calibration


@dataclass(frozen=True)
class JobOptions:
    device: str = "auto"
    eval_dataset: str = "heldout"
    eval_samples: int = 40
    eval_seq_len: int = 512
    imatrix_cache: Path | None = None  # where imatrices are kept for the other GGUF recipes of a model
    evaluate: bool = True


def needs_calibration(recipe: Recipe) -> bool:
    if recipe.method == "gguf":
        return recipe.params.get("imatrix", False) or recipe.params.get("method", "plain") != "plain"
    return recipe.config().calibrated or recipe.kv_cache is not None


def convert(recipe: Recipe, model: str, out: Path, options: JobOptions, overwrite: bool, command: str,
            on_layer=lambda r: None) -> dict:
    calibration = (recipe.calibration or Calibration("mixed")) if needs_calibration(recipe) else recipe.calibration
    if recipe.method == "gguf":
        return _convert_gguf(recipe, model, out, calibration, options, overwrite, command, on_layer)
    from qconvert.pipeline import FORMATS, Request, run

    first, *more = recipe.format or FORMATS[recipe.method][:1]
    request = Request(model, out, recipe.method, recipe.config(), calibration, options.device, overwrite, command,
                      format=first, more_formats=tuple(more), kv_cache=recipe.kv_cache)
    return run(request, on_layer)


def layout_folders(recipe: Recipe, out: Path) -> list[Path]:
    """Where each layout of a job's output is: OUT itself, or OUT/<format> when there are several."""
    return [out / f for f in recipe.format] if len(recipe.format) > 1 else [out]


def _convert_gguf(recipe, model, out, calibration, options, overwrite, command, on_layer) -> dict:
    from qconvert.gguf_pipeline import GGUFRequest, run

    method = recipe.params.get("method", "plain")
    imatrix = recipe.params.get("imatrix", False) or method == "imatrix"
    base = GGUFRequest(model, out, recipe.params["type"], imatrix, calibration=calibration or Calibration("mixed"),
                       device=options.device, overwrite=overwrite, command=command,
                       method="plain" if method == "imatrix" else method)
    if not (imatrix and options.imatrix_cache) or distributed.launched():
        # (ranks waiting on the cache's lock would leave the one computing it without partners)
        return run(base, on_layer)
    # one imatrix per model and calibration, computed by the first recipe that needs it (the others wait on
    # the lock, then read it)
    options.imatrix_cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([str(Path(model).resolve()), asdict(base.calibration)]).encode()).hexdigest()[:16]
    cached = options.imatrix_cache / f"{key}.imatrix.gguf"
    with open(options.imatrix_cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cached.is_file():
            partial = cached.with_suffix(".partial")
            summary = run(replace(base, save_imatrix=partial), on_layer)
            partial.rename(cached)
            summary["imatrix_shared"] = "computed"
            return summary
    summary = run(replace(base, imatrix=False, imatrix_file=cached), on_layer)
    summary["imatrix_shared"] = "reused"
    return summary


def verify(out: Path, model: str) -> list[str]:
    """What is wrong with the written output, read back through qconvert's readers (empty: nothing); a
    folder of layouts (OUT/<format>/config.json) is checked layout by layout."""
    if out.is_dir() and not (out / "config.json").exists():
        layouts = sorted(p for p in out.iterdir() if (p / "config.json").is_file())
        if layouts:
            return [problem for layout in layouts for problem in verify(layout, model)]
    try:
        return _verify_gguf(out) if out.is_file() else _verify_checkpoint(out, model)
    except QConvertError as exc:
        return [str(exc)]
    except Exception as exc:  # noqa: BLE001  (an unreadable output is a finding, not a crash)
        return [f"{out}: cannot be read back ({type(exc).__name__}: {exc})"]


def _verify_checkpoint(out: Path, model: str) -> list[str]:
    import torch

    from qconvert.eval.loader import dequantized_tensors
    from qconvert.model.checkpoint import Checkpoint, resolve_model

    ckpt = Checkpoint(out)
    if "quantization_config" not in ckpt.config_dict:
        return [f"{out}/config.json has no quantization_config"]
    base = Checkpoint(resolve_model(model))
    problems, compared = [], 0
    for name, tensor in dequantized_tensors(ckpt):
        if not torch.isfinite(tensor).all():
            problems.append(f"{name}: not finite")
        if name in base:
            compared += 1
            if tuple(tensor.shape) != tuple(base.shape(name)):
                problems.append(f"{name}: shape {tuple(tensor.shape)}, base {tuple(base.shape(name))}")
    if compared == 0:
        problems.append(f"{out}: no tensor matches the base model's names")
    return problems


def _verify_gguf(out: Path) -> list[str]:
    import gguf

    from qconvert.report.data import load

    stored = {t.name: t for t in gguf.GGUFReader(out).tensors}
    expected = load(out)["tensors"]
    problems = [f"{n}: missing from the file" for n in expected if n not in stored]
    problems += [f"{n}: type {stored[n].tensor_type.name}, report says {r['type']}"
                 for n, r in expected.items() if n in stored and stored[n].tensor_type.name != r["type"]]
    return problems


def run_job(recipe: Recipe, model: str, out: Path, options: JobOptions, overwrite: bool = False, command: str = "",
            on_layer=lambda r: None) -> dict | None:
    """Convert, verify, evaluate and gate; the result as a dict (status ok, gate-failed or failed), or None
    in a process of a distributed run that does not write (it only helped convert)."""
    start = time.perf_counter()
    result = {"model": model, "recipe": recipe.name, "output": str(out), "status": "failed"}
    try:
        summary = convert(recipe, model, out, options, overwrite, command, on_layer)
        if summary is None:
            return None
        result.update(conversion_seconds=summary["seconds"], source_bytes=summary["source_bytes"],
                      output_bytes=summary["output_bytes"], peak_memory=summary.get("peak_memory"),
                      imatrix_shared=summary.get("imatrix_shared"))
        result.update(finish_job(recipe, model, out, options))
    except QConvertError as exc:
        result["error"] = str(exc)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def finish_job(recipe: Recipe, model: str, out: Path, options: JobOptions) -> dict:
    """Verification, evaluation, gates and the report page of a written output (scored on its first layout)."""
    problems = verify(out, model)
    out = layout_folders(recipe, out)[0]
    if problems:
        return {"status": "failed", "error": f"verification: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), "verified": False}
    done = {"verified": True, "status": "ok"}
    if not (options.evaluate or recipe.gates.any):
        return done
    from qconvert.eval.run import score
    from qconvert.report.build import build
    from qconvert.report.data import record_evaluation

    evaluation = score(str(out), model, options.eval_dataset, options.eval_samples, options.eval_seq_len,
                       options.device)
    record_evaluation(out, evaluation)
    verdicts = recipe.gates.check(evaluation)
    done.update(perplexity=evaluation["perplexity"], base_perplexity=evaluation["base_perplexity"],
                kl_divergence=evaluation["kl_divergence"], top1_agreement=evaluation["top1_agreement"],
                gates=verdicts, status="ok" if all(v["passed"] for v in verdicts) else "gate-failed")
    if not all(math.isfinite(v["value"]) for v in verdicts):
        done["status"] = "gate-failed"
    page, _ = build(out, [], model, None, options.eval_dataset, options.eval_samples, options.eval_seq_len,
                    options.device)
    done["report"] = str(page)
    return done
