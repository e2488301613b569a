"""qconvert's C block quantizers against llama.cpp's (ggml_quantize_chunk through ctypes), one thread
each, per type, on the same float32 matrix: seconds (best of --repeat) and byte identity.

    bash scripts/build_llama_cpp.sh && . ~/.cache/qconvert/llama.cpp-0.3.36/env.sh
    python scripts/gguf_quant_speed.py [--rows 1024] [--cols 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import gguf
import torch

from qconvert.formats.gguf.quants import quantize
from qconvert.testing.llama_cpp import locate

T = gguf.GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def best_of(repeat: int, fn) -> tuple[object, float]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    oracle = locate()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=gen) * 0.05
    imatrix = torch.rand(args.cols, generator=gen) + 0.01
    print(f"{args.rows}x{args.cols} float32, 1 thread each")
    print("| type | imatrix | identical | qconvert s | llama.cpp s | qconvert throughput / llama.cpp's |")
    print("|---|---|---|---|---|---|")
    total_ours = total_theirs = 0.0
    for qtype in TYPES:
        for im in (None, imatrix):
            ours, t_ours = best_of(args.repeat, lambda: quantize(w, qtype, im, threads=1))
            theirs, t_theirs = best_of(args.repeat, lambda: oracle.quantize_rows(
                int(qtype), w.numpy(), None if im is None else im.numpy()))
            same = ours.numpy().tobytes() == theirs
            total_ours += t_ours
            total_theirs += t_theirs
            print(f"| {qtype.name} | {'yes' if im is not None else 'no'} | {'yes' if same else 'NO'} | "
                  f"{t_ours:.3f} | {t_theirs:.3f} | {t_theirs / t_ours:.2f}x |", flush=True)
    print(f"| all | | | {total_ours:.2f} | {total_theirs:.2f} | {total_theirs / total_ours:.2f}x |")


if __name__ == "__main__":
    main()
