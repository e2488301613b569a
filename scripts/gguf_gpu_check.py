"""GGUF quantizers on a CUDA GPU: byte-identical to the CPU path (itself byte-identical to llama.cpp,
tests/test_gguf_quants_match_llama_cpp.py) and the throughput of each, side by side on one machine.

    python scripts/gguf_gpu_check.py [--rows 4096] [--cols 4096]

The CPU side is qconvert's own CPU path (which runs its elementwise kernels on one thread).
"""

from __future__ import annotations

import argparse
import time

import gguf
import torch

from qconvert.formats.gguf.quants import quantize

T = gguf.GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def timed(fn, device: str) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=gen) * torch.exp(torch.randn(args.cols, generator=gen))
    imatrix = torch.rand(args.cols, generator=gen) * 10
    wg, ig = w.cuda(), imatrix.cuda()
    quantize(wg[:256], T.Q4_K, ig)  # warm-up: CUDA context and kernels
    print(f"{torch.cuda.get_device_name()}; {args.rows}x{args.cols} float32")
    print("| type | imatrix | identical CPU/GPU | CPU s | GPU s | GPU/CPU throughput |")
    print("|---|---|---|---|---|---|")
    failed = []
    for qtype in TYPES:
        for im_cpu, im_gpu in ((None, None), (imatrix, ig)):
            if qtype == T.Q8_0 and im_cpu is not None:
                continue  # ggml's Q8_0 ignores the imatrix
            cpu, t_cpu = timed(lambda: quantize(w, qtype, im_cpu), "cpu")
            gpu, t_gpu = timed(lambda: quantize(wg, qtype, im_gpu), "cuda")
            same = torch.equal(cpu, gpu.cpu())
            if not same:
                failed.append(f"{qtype.name}{' +imatrix' if im_cpu is not None else ''}")
            print(f"| {qtype.name} | {'yes' if im_cpu is not None else 'no'} | {'yes' if same else 'NO'} | "
                  f"{t_cpu:.2f} | {t_gpu:.3f} | {t_cpu / t_gpu:.1f}x |", flush=True)
    if failed:
        raise SystemExit(f"GPU bytes differ from CPU for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
