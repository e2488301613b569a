"""`qconvert batch`: every job of a manifest in its own process (a crash or a bad model stops one job,
never the batch), results kept per job so `--resume` skips what is done and verified, and the reports
CI systems read: JSON, JUnit XML and an HTML index of the jobs' report pages."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qconvert.batch.jobs import verify
from qconvert.batch.manifest import Job, Manifest
from qconvert.errors import QConvertError
from qconvert.output import write_json_atomically

STATE = ".qconvert-batch"
DONE = ("ok", "gate-failed")  # finished jobs; "failed" ones are always run again


def _state_dir(manifest: Manifest) -> Path:
    return manifest.output_dir / STATE


def _result_file(manifest: Manifest, job: Job) -> Path:
    return _state_dir(manifest) / f"{job.model_name}--{job.recipe.name}.json"


def _resumable(manifest: Manifest, job: Job) -> dict | None:
    """The stored result of a finished job whose output still verifies."""
    file = _result_file(manifest, job)
    if not file.is_file() or not job.output.exists():
        return None
    stored = json.loads(file.read_text())
    if stored.get("status") not in DONE or verify(job.output, job.model):
        return None
    return {**stored, "resumed": True}


def _clear_partials(out: Path) -> None:
    """Staging folders an interrupted run left beside the output (never the output itself)."""
    for stale in out.parent.glob(f".{out.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _command(manifest: Manifest, job: Job) -> list[str]:
    ev = manifest.eval
    return [sys.executable, "-m", "qconvert", "run", str(job.recipe_file), job.model, "-o", str(job.output),
            "--json", "-q", "--overwrite", "--device", manifest.device,
            "--imatrix-cache", str(_state_dir(manifest) / "imatrix"),
            "--eval-dataset", str(ev.get("dataset", "heldout")), "--eval-samples", str(ev.get("samples", 40)),
            "--eval-seq-len", str(ev.get("seq_len", 512)), "--gpus", str(manifest.gpus)]


def run_one(manifest: Manifest, job: Job, resume: bool, env: dict | None = None) -> dict:
    """One job in its own process; env: variables for it (the GPUs it may use)."""
    if resume and (done := _resumable(manifest, job)) is not None:
        return done
    _clear_partials(job.output)
    proc = subprocess.run(_command(manifest, job), capture_output=True, text=True, env={**os.environ, **(env or {})})
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        result = {"model": job.model, "recipe": job.recipe.name, "output": str(job.output), "status": "failed",
                  "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    if result["status"] == "ok" and job.push_to_hub:
        result["pushed_to"] = push(job.output, job.push_to_hub)
    write_json_atomically(_result_file(manifest, job), result)
    return result


def push(output: Path, repo: str) -> str:
    """Upload a verified output (its folder with the model card, or the GGUF file with its report)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    if output.is_dir():
        api.upload_folder(repo_id=repo, folder_path=str(output))
    else:
        for f in (output, output.parent / f"{output.name}.report.json"):
            api.upload_file(path_or_fileobj=str(f), path_in_repo=f.name, repo_id=repo)
    return repo


def gpu_slots(manifest: Manifest, jobs: int) -> list[dict]:
    """The environment of each of `jobs` concurrent job slots: on GPUs, each slot its own `gpus` devices
    (CUDA_VISIBLE_DEVICES) where there are enough; single-GPU jobs share when there are not."""
    if jobs == 1 or manifest.device == "cpu":
        return [{}] * jobs
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d for d in listed.split(",") if d.strip()] if listed is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(visible) < jobs * manifest.gpus:
        if manifest.gpus == 1 or not visible:  # (no GPU: each job's own command says what is wrong)
            return [{}] * jobs
        raise QConvertError(f"--jobs {jobs} x gpus {manifest.gpus}: {len(visible)} GPU(s) visible; jobs running "
                            "at once get GPUs of their own (fewer --jobs, or device: cpu)")
    n = manifest.gpus
    return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[i * n:(i + 1) * n])} for i in range(jobs)]


def run_batch(manifest: Manifest, jobs: int = 1, resume: bool = False, on_result=lambda job, r: None) -> list[dict]:
    _state_dir(manifest).mkdir(parents=True, exist_ok=True)
    free: queue.Queue = queue.Queue()
    for env in gpu_slots(manifest, jobs):
        free.put(env)

    def one(job: Job) -> dict:
        env = free.get()
        try:
            result = {"id": job.id, **run_one(manifest, job, resume, env)}
        finally:
            free.put(env)
        on_result(job, result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, manifest.jobs))


def failed(results: list[dict]) -> bool:
    return any(r["status"] != "ok" for r in results)


def write_junit(results: list[dict], file: Path) -> None:
    """One testcase per job: a gate breach is a failure, a job that did not finish an error."""
    suite = ET.Element("testsuite", name="qconvert batch", tests=str(len(results)),
                       failures=str(sum(r["status"] == "gate-failed" for r in results)),
                       errors=str(sum(r["status"] == "failed" for r in results)),
                       time=f"{sum(r.get('seconds', 0) for r in results):.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=r["id"].split("/")[0], name=r["recipe"],
                             time=f"{r.get('seconds', 0):.3f}")
        if r["status"] == "gate-failed":
            broken = [g for g in r.get("gates", []) if not g["passed"]]
            ET.SubElement(case, "failure", message="; ".join(
                f"{g['gate']}: {g['value']:.4g} > {g['limit']:g}" for g in broken) or "quality gate failed")
        elif r["status"] == "failed":
            ET.SubElement(case, "error", message=r.get("error", "failed"))
        out = ET.SubElement(case, "system-out")
        out.text = json.dumps({k: v for k, v in r.items() if k != "gates"}, indent=1)
    file.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(file, encoding="utf-8", xml_declaration=True)


def write_index(results: list[dict], manifest: Manifest) -> Path:
    from qconvert.report.page import index_page

    page = manifest.output_dir / "index.html"
    page.write_text(index_page(results, manifest.output_dir))
    return page
