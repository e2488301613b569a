"""GPTQ's column loop over one block: the Triton kernel (qconvert/algorithms/gptq_kernel.py) against the
torch loop of gptq(), on CUDA. Sweeps the kernel's rows per program and warps, checks it against the loop,
prints one JSON object.

    python scripts/gptq_kernel_bench.py [--rows 28672] [--b 128] [--bits 4] [--per-column]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, not installed
from qconvert.algorithms import gptq_kernel  # noqa: E402


def torch_loop(w1, h1, scale, zero, maxq):
    """The inner loop of gptq() (scale and zero already per column)."""
    W1 = w1.clone()
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    err = torch.empty_like(W1)
    for i in range(W1.shape[1]):
        s, z = scale[:, i], zero[:, i]
        col = W1[:, i]
        q = torch.clamp(torch.round(col / s) + z, 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        e = (col - (q - z) * s) / h1[i, i]
        W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
        err[:, i] = e
    return codes, err


def timed_ms(fn, reps):
    """Median milliseconds of fn() over reps runs, after warm-up (compiles the kernel)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=28672)
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--per-column", action="store_true", help="a scale and zero per column, not per row")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, b, maxq = args.rows, args.b, (1 << args.bits) - 1

    w = torch.randn(rows, b, device=dev, generator=g)
    x = torch.randn(8 * b, b, device=dev, generator=g)
    h = x.T @ x / (8 * b) + 0.01 * torch.eye(b, device=dev)
    h1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    if args.per_column:
        scale = (scale[:, None] * (0.75 + 0.5 * torch.rand(rows, b, device=dev, generator=g))).contiguous()
        zero = zero[:, None].repeat(1, b)
    else:  # as gptq() passes one group's parameters: stride 0 along the columns
        scale, zero = scale[:, None].expand(rows, b), zero[:, None].expand(rows, b)

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows, "b": b, "bits": args.bits,
           "per_column": args.per_column}
    ref_codes, ref_err = torch_loop(w, h1, scale, zero, maxq)
    out["torch_loop_ms"] = timed_ms(lambda: torch_loop(w, h1, scale, zero, maxq), max(3, args.reps // 4))

    sweep = {}
    for block_r in (16, 32, 64):
        for warps in (2, 4, 8):
            run = lambda: gptq_kernel.quantize_block(w, h1, scale, zero, maxq, block_r=block_r, num_warps=warps)
            codes, err = run()
            # a value within rounding noise of a .5 boundary may round the other way (the GPU fuses
            # multiply-adds that torch runs as two kernels); its row then takes another path from there
            same = (codes == ref_codes).all(1)
            sweep[f"block_r={block_r},warps={warps}"] = {
                "ms": round(timed_ms(run, args.reps), 4),
                "code_mismatch_frac": (codes != ref_codes).float().mean().item(),
                "rows_with_code_diff": int((~same).sum()),
                "err_max_rel_diff_other_rows": ((err - ref_err)[same].abs().max() / ref_err.abs().max()).item()}
    out["kernel"] = sweep
    default = f"block_r={gptq_kernel.default_block_r(b)},warps=4"
    best = min(sweep, key=lambda k: sweep[k]["ms"])
    out["default"], out["best"] = default, best
    out["speedup_default"] = round(out["torch_loop_ms"] / sweep[default]["ms"], 1)
    out["speedup_best"] = round(out["torch_loop_ms"] / sweep[best]["ms"], 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
