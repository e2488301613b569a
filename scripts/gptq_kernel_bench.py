"""GPTQ's column loop over one block: the Triton kernel (qconvert/algorithms/gptq_kernel.py) against the
torch loop of gptq(), on CUDA. Sweeps the kernel's rows per program and warps, checks it against the loop,
prints one JSON object.

    python scripts/gptq_kernel_bench.py [--rows 28672 1024] [--b 128] [--bits 4] [--per-column]

Several --rows print one object each: a rank of a data-parallel run sweeps its share of a linear's rows
(Llama-3-8B's down_proj on 4 GPUs: 1024), where fewer rows per program keep more SMs busy.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, not installed
from qconvert.algorithms import gptq_kernel  # noqa: E402


def torch_loop(w, cols, t1, c1, scale, zero, groups, maxq):
    """The inner loop of gptq() in plain torch (gptq.sweep_block without the kernel)."""
    w1, s1, z1 = w[:, cols].float(), scale[:, groups].float(), zero[:, groups]
    t = t1.clone()
    codes = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    err = torch.empty_like(t)
    for i in range(t.shape[1]):
        q = torch.clamp(torch.round(t[:, i] / s1[:, i]) + z1[:, i], 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        e = w1[:, i] - (q - z1[:, i]) * s1[:, i]
        t[:, i + 1:] += e[:, None] * c1[i, i + 1:][None, :]
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
    ap.add_argument("--rows", type=int, nargs="+", default=[28672])
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--per-column", action="store_true", help="a scale and zero per column, not per row")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    for rows in args.rows:
        print(json.dumps(bench(rows, args), indent=1), flush=True)


def bench(rows: int, args) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    b, maxq = args.b, (1 << args.bits) - 1

    w = torch.randn(rows, b, device=dev, generator=g).to(torch.bfloat16)
    cols = torch.randperm(b, device=dev, generator=g)  # act-order: the block's columns come from anywhere
    t = w[:, cols].float() + 0.01 * torch.randn(rows, b, device=dev, generator=g)  # plus earlier errors
    x = torch.randn(8 * b, b, device=dev, generator=g)
    h = x.T @ x / (8 * b) + 0.01 * torch.eye(b, device=dev)
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)  # H = R Rᵀ, R upper (see gptq.plane_factor)
    c1 = r / r.diagonal()[None, :]
    lo, hi = w.float().amin(1).clamp(max=0), w.float().amax(1).clamp(min=0)
    scale = ((hi - lo) / maxq)[:, None].to(torch.bfloat16)
    zero = torch.round(-lo[:, None] / scale.float())
    groups = torch.zeros(b, dtype=torch.long, device=dev)  # one group, as gptq() passes a block
    if args.per_column:
        scale = (scale.float() * (0.75 + 0.5 * torch.rand(rows, b, device=dev, generator=g))).to(torch.bfloat16)
        zero, groups = zero.repeat(1, b), torch.arange(b, device=dev)
    problem = (w, cols, t, c1, scale, zero, groups, maxq)

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "rows": rows, "b": b, "bits": args.bits,
           "per_column": args.per_column}
    ref_codes, ref_err = torch_loop(*problem)
    out["torch_loop_ms"] = timed_ms(lambda: torch_loop(*problem), max(3, args.reps // 4))

    sweep = {}
    for block_r in (4, 8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            if block_r * b < 32 * warps:  # fewer values than threads
                continue
            run = lambda: gptq_kernel.quantize_block(*problem, block_r=block_r, num_warps=warps)
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
    default = f"block_r={gptq_kernel.default_block_r(b, rows)},warps=4"
    best = min(sweep, key=lambda k: sweep[k]["ms"])
    out["default"], out["best"] = default, best
    out["speedup_default"] = round(out["torch_loop_ms"] / sweep[default]["ms"], 1)
    out["speedup_best"] = round(out["torch_loop_ms"] / sweep[best]["ms"], 1)
    return out


if __name__ == "__main__":
    main()
