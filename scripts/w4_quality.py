"""Quality side by side on real models: W4A16 (qconvert RTN / GPTQ / AWQ vs llm-compressor 0.14, the peer)
and W8A8 (qconvert fp8 in its three schemes, with an FP8 KV cache, int8 with and without SmoothQuant).

    python scripts/w4_quality.py [--models smollm2,gemma3] [--runs base,rtn-sym,...] [--work DIR]
                                 [--peer-python /work/venvs/llmc/bin/python] [--timeout 3600]

Every run sees the same calibration tokens (qconvert's `--dataset mixed --samples 128 --seq-len 512 --seed 0`,
saved to WORK/ids-MODEL.pt and fed to the peer) and is scored by qconvert's own evaluation code on the same
40 x 512 held-out windows (--windows) against the bf16 base. Conversions and scores are cached in WORK (an output dir with
config.json is not rebuilt; a score in WORK/results.json is not recomputed), so a rerun only does what is
missing; a qconvert command that does not exist yet is marked "not available" and retried next time.
The peer venv: see scripts/peer_llmcompressor.py. Logs of each conversion: WORK/logs/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS_DIR = Path("~/.cache/qconvert/models").expanduser()
# name: (directory, group size, evaluation dtype). SmolLM2's hidden 576 is no multiple of 128. Gemma-3 NaNs in
# float16 only; float32 is exact and, on a CPU without native bf16 (AVX2), 2.3x faster than bfloat16.
MODELS = {"smollm2": ("smollm2-135m", 64, torch.float32), "gemma3": ("gemma3-270m", 128, torch.float32)}
RUNS = ["base", "rtn-sym", "rtn-asym", "peer-gptq", "peer-awq", "gptq", "gptq-actorder", "gptq-actorder-static", "awq"]
# W8A8 runs (--runs base,fp8-dynamic,...); calibrated ones read the first 32 of the saved windows
W8A8_RUNS = ["fp8-dynamic", "fp8-static", "fp8-block", "int8", "int8-sq", "fp8-dynamic-kv"]
PEER = Path(__file__).with_name("peer_llmcompressor.py")


def command(run: str, model: Path, group: int, out: Path, ids: Path, peer: list[str]) -> list[str]:
    q = [sys.executable, "-m", "qconvert"]
    w4 = ["--w-bit", "4", "--group", str(group), "-o", str(out), "--overwrite"]  # no config.json: a leftover
    cal = ["--dataset", "mixed", "--samples", "128", "--seq-len", "512", "--seed", "0"]  # the defaults, spelled out
    ct = ["--format", "compressed-tensors"]  # what qconvert.eval reads back
    w8 = ["-o", str(out), "--overwrite"]
    cal8 = ["--dataset", str(ids), "--samples", "32"]
    return {
        "fp8-dynamic": [*q, "fp8", str(model), *w8],
        "fp8-static": [*q, "fp8", str(model), *w8, "--scheme", "static", *cal8],
        "fp8-block": [*q, "fp8", str(model), *w8, "--scheme", "block"],
        "fp8-dynamic-kv": [*q, "fp8", str(model), *w8, "--kv-cache", "fp8", *cal8],
        "int8": [*q, "int8", str(model), *w8],
        "int8-sq": [*q, "int8", str(model), *w8, "--smoothquant", "0.5", *cal8],
        "rtn-sym": [*q, "rtn", str(model), *w4, "--sym"],
        "rtn-asym": [*q, "rtn", str(model), *w4, "--asym"],
        # qconvert gptq's default (act-order, static groups, damp 0.01) is llm-compressor's GPTQModifier default
        "gptq": [*q, "gptq", str(model), *w4, *ct, *cal, "--no-act-order"],
        "gptq-actorder": [*q, "gptq", str(model), *w4, *ct, *cal, "--act-order", "--static-groups"],
        "gptq-actorder-static": [*q, "gptq", str(model), *w4, *ct, *cal, "--act-order", "--static-groups"],
        "awq": [*q, "awq", str(model), *w4, *ct, *cal],
        "peer-gptq": [peer[0], str(PEER), str(model), "gptq", str(out), "--ids", str(ids), "--group", str(group),
                      "--dtype", peer[1]],
        "peer-awq": [peer[0], str(PEER), str(model), "awq", str(out), "--ids", str(ids), "--group", str(group),
                     "--dtype", peer[1]],
    }[run]


def convert(cmd: list[str], out: Path, log: Path, timeout: int) -> dict:
    """Run one conversion (unless its output exists); {status, seconds[, peer]}."""
    if (out / "config.json").is_file():
        return {"status": "ok", **_peer_line(log)}
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout} s", "seconds": round(time.perf_counter() - start, 1)}
    seconds = round(time.perf_counter() - start, 1)
    if rc != 0:
        status = ("not available" if "No such command" in log.read_text() else
                  f"stopped (signal {-rc})" if rc < 0 else f"failed (rc {rc}, see {log})")
        return {"status": status, "seconds": seconds}
    return {"status": "ok", "seconds": seconds, **_peer_line(log)}


def _peer_line(log: Path) -> dict:
    """The peer's own last line {method, group, dtype, seconds (oneshot alone), maxrss_mb}, if the log ends in one."""
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    return {"peer": json.loads(lines[-1])} if lines and lines[-1].startswith("{") else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--work", type=Path, default=Path("~/.cache/qconvert/w4_quality").expanduser())
    p.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    p.add_argument("--peer-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="what the peer calibrates in (qconvert computes in float32 on a CPU; bf16 is 1.7x slower here)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per conversion")
    p.add_argument("--device", default="cpu", help="where the evaluation runs (conversions pick the GPU themselves)")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--windows", type=int, default=40, help="held-out windows of 512 tokens (scores are kept per WORK, "
                   "so use one WORK per window count)")
    a = p.parse_args()

    from qconvert.calibration.datasets import load_texts
    from qconvert.calibration.tokens import evaluation_windows
    from qconvert.eval.loader import load_model
    from qconvert.eval.metrics import evaluate
    from qconvert.pipeline import Calibration, calibration_tokens

    if a.device == "cpu":
        torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    results_path = a.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    cpu = torch.device(a.device)
    for name in a.models.split(","):
        dirname, group, dtype = MODELS[name]
        model_dir = a.models_dir / dirname
        ids = a.work / f"ids-{name}.pt"
        if not ids.exists():
            torch.save(calibration_tokens(model_dir, Calibration("mixed", 128, 512, 0)), ids)
        rows = results.setdefault(name, {})
        base = windows = None
        for run in a.runs.split(","):
            row = rows.get(run, {})
            if run != "base":
                out = a.work / (f"{name}-{run}" if run in W8A8_RUNS else f"{name}-{run}-w4g{group}")
                if run.startswith("peer"):
                    out = out.with_name(f"{out.name}-{a.peer_dtype}")
                    if row.get("peer_dtype") != a.peer_dtype:
                        row = {"peer_dtype": a.peer_dtype}
                cmd = command(run, model_dir, group, out, ids, [a.peer_python, a.peer_dtype])
                row.update(convert(cmd, out, a.work / "logs" / f"{name}-{run}.log", a.timeout))
                row["command"] = " ".join(cmd)
            if (run == "base" or row["status"] == "ok") and "perplexity" not in row:
                if base is None:
                    base, tokenizer = load_model(str(model_dir), dtype, cpu)
                    windows = evaluation_windows(load_texts("heldout", tokenizer), tokenizer, a.windows, 512)
                start = time.perf_counter()
                if run == "base":
                    score = evaluate(base, windows)
                else:
                    model = load_model(str(out), dtype, cpu)[0]
                    score = evaluate(model, windows, base)
                    del model
                row.update(vars(score), eval_seconds=round(time.perf_counter() - start, 1), eval_dtype=str(dtype))
            rows[run] = row
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name} {run}: {json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)
        print_table(name, group, rows)


def print_table(name: str, group: int, rows: dict) -> None:
    base_ppl = rows.get("base", {}).get("perplexity")
    dtype = next((r["eval_dtype"] for r in rows.values() if "eval_dtype" in r), "?")
    print(f"\n### {name} (W4 with group {group}, W8A8; evaluated in {dtype.removeprefix('torch.')}, "
          f"40 x 512 held-out tokens)\n")
    print("| run | perplexity | Δppl % | KL vs base | top-1 agreement | seconds |")
    print("|---|---|---|---|---|---|")
    label = {r: f"{r} ({rows[r]['peer_dtype']})" if "peer_dtype" in rows[r] else r for r in rows}
    for run in [r for r in RUNS + W8A8_RUNS if r in rows]:
        row = rows[run]
        if "perplexity" not in row:
            print(f"| {label[run]} | {row.get('status', '-')} | | | | {row.get('seconds', '')} |")
            continue
        ppl = row["perplexity"]
        delta = f"{100 * (ppl / base_ppl - 1):+.2f}" if base_ppl else ""
        kl = f"{row['kl_divergence']:.4f}" if row.get("kl_divergence") is not None else "0"
        top1 = f"{row['top1_agreement']:.4f}" if row.get("top1_agreement") is not None else "1"
        print(f"| {label[run]} | {ppl:.3f} | {delta} | {kl} | {top1} | {row.get('seconds', '')} |")
    print(flush=True)


if __name__ == "__main__":
    main()
