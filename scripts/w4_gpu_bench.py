"""Speed and memory of qconvert GPTQ / AWQ (w4, g128) against llm-compressor 0.14 on one GPU, same input.

The input is the random-weight bf16 model with the Llama-3-8B layer shapes and LAYERS decoder layers that
../shared/bench/peer_llmcompressor_gpu.py builds (same config, seed and tokenizer, at /tmp/m8), calibrated
on the same 128 x 512 random token ids. Run on the GPU machine from the repository root:

    python scripts/w4_gpu_bench.py --layers 4 --methods gptq,awq --peer .peer/peer_llmcompressor_gpu.py

qconvert's time is its whole conversion (checkpoint reading, calibration, quantization, writing the output);
llm-compressor's is its oneshot() call alone (model loading and saving excluded), as that script measures it.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODEL = Path("/tmp/m8")


def make_model(layers: int, tokenizer_dir: Path) -> None:
    """The peer script's model, built the same way (it skips building when config.json exists)."""
    if (MODEL / "config.json").exists():
        return
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(MODEL)
    del model
    torch.cuda.empty_cache()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, MODEL)


def calibration_ids(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randint(0, 49152, (128, 512), generator=g), path)
    return path


def run_ours(method: str, ids: Path, fmt: str) -> dict:
    out = Path(f"/tmp/out-{method}")
    cmd = [sys.executable, "-m", "qconvert", method, str(MODEL), "--w-bit", "4", "--group", "128",
           "--dataset", str(ids), "--format", fmt, "-o", str(out), "--overwrite", "--json", "-q"]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        return {"tool": "qconvert", "method": method, "error": res.stderr[-2000:]}
    summary = json.loads(res.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": "qconvert", "method": method, "format": fmt, "layers": len(summary["layers"]),
            "seconds": summary["seconds"], "process_seconds": round(wall, 1),
            "peak_gpu_gib": round(summary["peak_memory"]["gpu_bytes"] / 2**30, 2),
            "peak_rss_gib": round(summary["peak_memory"]["host_rss_bytes"] / 2**30, 2),
            "per_layer_seconds": [round(layer["seconds"], 2) for layer in summary["layers"]]}


def run_peer(script: Path, method: str, layers: int, env: dict) -> dict:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                         env={**os.environ, **env, "LAYERS": str(layers)})
    wall = time.perf_counter() - start
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode or not lines:
        return {"tool": "llm-compressor", "method": method, "error": res.stderr[-2000:]}
    # the whole process: imports, model loading, oneshot (the script saves nothing)
    return {"tool": "llm-compressor", **json.loads(lines[-1]), "process_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--format", default="compressed-tensors")
    parser.add_argument("--peer", type=Path, help="peer_llmcompressor_gpu.py (omit to run qconvert alone)")
    parser.add_argument("--peer-pythonpath", default="/tmp/peer-site")
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(".peer/tok"))
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        make_model(args.layers, args.tokenizer_dir)
        return
    # in a child process: a forked child starts with its parent's resident size, which getrusage then
    # reports as the child's peak (a 16 GB model built here would show as qconvert's peak host memory)
    subprocess.run([sys.executable, __file__, "--build-only", "--layers", str(args.layers),
                    "--tokenizer-dir", str(args.tokenizer_dir)], check=True)
    ids = calibration_ids(Path("/tmp/ids.pt"))
    for method in args.methods.split(","):
        print(json.dumps(run_ours(method, ids, args.format)), flush=True)
        if args.peer:
            env = {"TOKENIZER_DIR": str(args.tokenizer_dir.resolve()), "PYTHONPATH": args.peer_pythonpath}
            print(json.dumps(run_peer(args.peer, method, args.layers, env)), flush=True)


if __name__ == "__main__":
    main()
