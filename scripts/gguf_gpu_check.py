"""GGUF quantizers on a CUDA GPU: byte-identical to the CPU (itself byte-identical to llama.cpp,
tests/test_gguf_quants_match_llama_cpp.py), and the throughput of each, side by side on one machine.

    python scripts/gguf_gpu_check.py [--rows 4096] [--cols 4096] [--threads N]

Identity: the CUDA build of native.c and the PyTorch quantizers on CUDA against the C quantizers on the
CPU, on a random matrix and on the corner-case rows of the llama.cpp test. Throughput: the CUDA build
against the C quantizers on every core of this machine (and on one).
"""

from __future__ import annotations

import argparse
import time

import gguf
import torch

from qconvert.formats.gguf.quants import native, quantize
from qconvert.testing.gguf_inputs import edge_imatrices, edge_rows

T = gguf.GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def timed(fn) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=native.default_threads())
    args = ap.parse_args()
    assert native.library() is not None and native.cuda_library() is not None, "C or CUDA quantizers did not build"
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=gen) * torch.exp(torch.randn(args.cols, generator=gen))
    imatrix = torch.rand(args.cols, generator=gen) * 10
    wg, ig = w.cuda(), imatrix.cuda()
    edges = torch.from_numpy(edge_rows(512))
    edge_ims = [None] + [torch.from_numpy(v) for v in edge_imatrices(512).values()]
    quantize(wg[:256], T.Q4_K, ig)  # warm-up: CUDA context, kernels
    print(f"{torch.cuda.get_device_name()}; {args.rows}x{args.cols} float32; CPU: {args.threads} threads")
    print("| type | imatrix | identical (CUDA C, CUDA torch, corner cases) | CPU 1 thread s | CPU s | GPU s | "
          "GPU/CPU throughput |")
    print("|---|---|---|---|---|---|---|")
    failed = []
    for qtype in TYPES:
        for im in (None, imatrix):
            if qtype == T.Q8_0 and im is not None:
                continue  # ggml's Q8_0 ignores the imatrix
            img = None if im is None else ig
            _, t_one = timed(lambda: quantize(w, qtype, im, threads=1))
            cpu, t_cpu = timed(lambda: quantize(w, qtype, im, threads=args.threads))
            gpu, t_gpu = timed(lambda: quantize(wg, qtype, img))
            same = [torch.equal(cpu, gpu.cpu()), torch.equal(cpu, quantize(wg, qtype, img, compiled=False).cpu()),
                    all(torch.equal(quantize(edges, qtype, e), quantize(edges.cuda(), qtype, e if e is None else e.cuda()).cpu())
                        for e in (edge_ims if qtype != T.Q8_0 else [None]))]
            name = f"{qtype.name}{' +imatrix' if im is not None else ''}"
            failed += [f"{name} ({what})" for what, ok in zip(("CUDA C", "CUDA torch", "corner cases"), same) if not ok]
            print(f"| {qtype.name} | {'yes' if im is not None else 'no'} | {', '.join('yes' if s else 'NO' for s in same)} | "
                  f"{t_one:.3f} | {t_cpu:.3f} | {t_gpu:.4f} | {t_cpu / t_gpu:.1f}x |", flush=True)
    if failed:
        raise SystemExit(f"GPU bytes differ from the CPU's for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
