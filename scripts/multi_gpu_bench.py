"""Data-parallel GPTQ and AWQ on 1, 2 and 4 GPUs (`--gpus N`), on the w4_gpu_bench model (random weights, the
Llama-3-8B shapes, LAYERS decoder layers, built on the GPU machine) and its 128 x 512 calibration ids.

For each run: qconvert's own seconds (report.json, rank 0: loading, calibration, quantization, writing), the
wall time of the whole command (process starts and NCCL set-up included), rank 0's peak GPU and host memory,
and, against the 1-GPU output, the share of layer 0's packed int4 words that are identical and the mean ratio
of the per-layer output errors. On the GPU machine, with .whl and .peer/tok carried:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 scripts/multi_gpu_bench.py --layers 32 --gpus 1 2 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import w4_gpu_bench as bench  # noqa: E402


def convert(method: str, gpus: int, ids: Path) -> tuple[Path, dict, float]:
    out = Path(f"/tmp/out-{method}-{gpus}")
    cmd = [sys.executable, "-m", "qconvert", method, str(bench.MODEL), "--w-bit", "4", "--group", "128",
           "--dataset", str(ids), "--format", "compressed-tensors", "-o", str(out), "--overwrite", "--json", "-q",
           "--gpus", str(gpus)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stderr[-3000:]}")
    return out, json.loads(res.stdout), wall


def layer0_words(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    words = {}
    for name, file in index.items():
        if ".layers.0." in name and name.endswith("weight_packed"):
            with safe_open(out / file, "pt") as f:
                words[name] = f.get_tensor(name)
    return words


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"])
    args = ap.parse_args()
    # built in a child process: a process forked from one that held the 16 GB model reports that as its
    # own peak RSS (ru_maxrss survives exec), which is how a first run of this script showed 15.9 GiB
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; "
                    f"import w4_gpu_bench as b; b.make_model({args.layers}, Path('.peer/tok'))"], check=True)
    ids = bench.calibration_ids(Path("/tmp/ids.pt"))
    # GPTQ's Triton kernels compiled into triton's cache, untimed, as any earlier GPTQ run on the machine would
    # have left them: otherwise the first run measured (one GPU) would pay for compiling them
    subprocess.run([sys.executable, "-c", "import torch; from qconvert.algorithms.gptq import GPTQ, GPTQConfig; "
                    "[f() for f in GPTQ(GPTQConfig(), None).warm_ups(torch.device('cuda'))]"], check=True)
    for method in args.methods:
        first = None
        for gpus in args.gpus:
            out, summary, wall = convert(method, gpus, ids)
            row = {"method": method, "gpus": gpus, "seconds": summary["seconds"], "wall": round(wall, 1),
                   "peak_gpu_gib": round(summary["peak_memory"]["gpu_bytes"] / 2**30, 2),
                   "peak_rss_gib": round(summary["peak_memory"]["host_rss_bytes"] / 2**30, 2),
                   "per_layer": [round(layer["seconds"], 2) for layer in summary["layers"]]}
            errors = [layer["output_error"] for layer in summary["layers"]]
            if first is None:
                first = (out, summary["seconds"], layer0_words(out), errors)
            else:
                words = layer0_words(out)
                same = sum(int((words[n] == w).sum()) for n, w in first[2].items())
                row.update(speedup=round(first[1] / summary["seconds"], 2),
                           layer0_words_identical=round(same / sum(w.numel() for w in first[2].values()), 4),
                           output_error_ratio=round(sum(e / f for e, f in zip(errors, first[3])) / len(errors), 4))
                shutil.rmtree(out)
            print(json.dumps(row), flush=True)
        shutil.rmtree(first[0])


if __name__ == "__main__":
    main()
