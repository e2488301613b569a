"""GGUF Q4_K_M (or another k-quant mixture) by calibration method, side by side on one model: llama.cpp's
plain and imatrix results, qconvert's `--method gptq`, and Intel AutoRound's GGUF export. Perplexity through
llama.cpp itself on the held-out text (which calibration never sees), size, and the time each took.
qconvert's own methods: `gguf --method gptq`, `--method awq` and `--method awq-gptq`. On the GPU machine:
scripts/gguf_methods_h100.sh.

Every calibrated method reads the same 128 x 512-token calibration windows of the bundled `mixed` set
(AutoRound gets them as a local .jsonl, one window per line; it tokenizes each back to 512 tokens).

    python scripts/fetch_models.py && bash scripts/build_llama_cpp.sh && . ~/.cache/qconvert/llama.cpp-0.3.36/env.sh
    python scripts/gguf_methods.py [--model smollm2-135m] [--type Q4_K_M] [--methods plain,imatrix,gptq,awq,awq-gptq,autoround]
        [--autoround-path DIR]   # a folder holding auto_round 0.15.1 (pip install --target DIR auto-round==0.15.1)

Each output is kept in --work and reused by a later run; delete it to measure again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qconvert.calibration.datasets import load_texts
from qconvert.gguf_pipeline import METHODS
from qconvert.testing.llama_cpp import locate

MODELS_DIR = Path(os.environ.get("QCONVERT_MODELS", Path.home() / ".cache/qconvert/models"))


def calibration_jsonl(model: Path, path: Path, samples: int, seq_len: int) -> Path:
    """qconvert's calibration windows, decoded back to text for AutoRound."""
    from transformers import AutoTokenizer

    from qconvert.pipeline import Calibration, calibration_tokens

    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = calibration_tokens(model, Calibration("mixed", samples, seq_len))
    path.write_text("".join(json.dumps({"text": tokenizer.decode(w)}) + "\n" for w in windows.tolist()))
    return path


def produce(method: str, model: Path, type_name: str, out: Path, work: Path, args) -> float | None:
    """Make out with `method`; returns the seconds it took (None when out was already there)."""
    if out.exists():
        return None
    qc = [sys.executable, "-m", "qconvert", "gguf", str(model)]
    if method == "bf16":
        cmd = qc + ["BF16", "-o", str(out), "-q"]
    elif method in METHODS:
        cmd = qc + [type_name, "--method", method, "-o", str(out), "-q", "--device", args.device]
    elif method == "autoround":
        data = calibration_jsonl(model, work / "calibration.jsonl", 128, 512)
        folder = work / "autoround"
        cmd = [sys.executable, "-m", "auto_round", "--model", str(model), "--format", f"gguf:{type_name.lower()}",
               "--enable_alg_ext", "--dataset", str(data), "--nsamples", "128", "--seqlen", "512",
               "--output_dir", str(folder), "--device", args.device if args.device != "auto" else "cpu"]
    else:
        raise SystemExit(f"unknown method {method}")
    env = {**os.environ}
    if method == "autoround":
        env["PYTHONPATH"] = f"{args.autoround_path}:{env.get('PYTHONPATH', '')}"
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    if method == "autoround":
        made = sorted((work / "autoround").rglob("*.gguf"), key=lambda p: p.stat().st_size)
        if not made:
            raise SystemExit("AutoRound wrote no .gguf file")
        made[-1].rename(out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--methods", default="plain,imatrix,gptq,awq,awq-gptq,autoround")
    ap.add_argument("--autoround-path", default="/tmp/ar/site")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunks", type=int, default=40, help="held-out chunks of 512 tokens for llama-perplexity")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qconvert/gguf-methods")
    args = ap.parse_args()
    oracle = locate()
    model = MODELS_DIR / args.model
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    text = work / "heldout.txt"
    text.write_text("\n\n".join(load_texts("heldout")))
    done = work / "results.json"  # per output: seconds to make it, perplexity
    results = json.loads(done.read_text()) if done.exists() else {}
    rows = []
    print("| method | MiB | llama.cpp perplexity | vs BF16 | seconds |\n|---|---|---|---|---|")
    for method in ["bf16", *args.methods.split(",")]:
        out = work / f"{method}-{args.type if method != 'bf16' else 'BF16'}.gguf"
        seconds = produce(method, model, args.type, out, work, args)
        entry = results.setdefault(out.name, {})
        if seconds is not None:
            entry.update(seconds=round(seconds, 1), ppl=None)
        if entry.get("ppl") is None:
            entry["ppl"] = oracle.perplexity(out, text, ctx=512, extra_args=("--chunks", str(args.chunks)))
        # merged into what is on disk now: another run of this script may have finished other methods meanwhile
        results = {**(json.loads(done.read_text()) if done.exists() else {}), out.name: entry}
        done.write_text(json.dumps(results, indent=1))
        rows.append((method, out.stat().st_size / 2**20, entry["ppl"], entry.get("seconds")))
        base = rows[0][2]
        m, size, p, t = rows[-1]
        print(f"| {m} | {size:.1f} | {p:.4f} | {100 * (p / base - 1):+.2f} % | {t if t is not None else '-'} |",
              flush=True)


if __name__ == "__main__":
    main()
