"""Convert a checkpoint larger than this machine's RAM with `rtn` and with `gguf Q8_0`, and check each output.

Each conversion runs in its own process; its peak resident memory comes from the kernel (wait4). Each output
is then verified as the batch jobs verify (every tensor read back through qconvert's readers) and compared
with the source: every quantized RTN linear dequantized against its bf16 weight, and every GGUF tensor's
first rows dequantized against the source rows. Outputs are deleted afterwards (the checkpoint too with
--delete-checkpoint).

    python scripts/larger_than_ram.py [--model /tmp/big] [--work /tmp]   # makes /tmp/big (30.8 GB) if absent
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent


def timed_run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)}: exit {os.waitstatus_to_exitcode(status)}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def check_rtn(out: Path, model: Path) -> str:
    from qconvert.eval.loader import dequantized_tensors
    from qconvert.model.checkpoint import Checkpoint

    src, worst, count = Checkpoint(model), 0.0, 0
    for name, tensor in dequantized_tensors(Checkpoint(out)):
        if name.endswith("_proj.weight"):
            ref = src.get(name).float()
            err = float((tensor.float() - ref).pow(2).sum() / ref.pow(2).sum())
            worst, count = max(worst, err), count + 1
    assert count, "no quantized linear read back"
    assert worst < 0.02, f"relative error {worst:.3g}"  # int4 g128 RTN of Gaussian weights: about 0.01
    return f"{count} int4 linears read back, worst relative squared error {worst:.4f}"


def check_gguf(out: Path, model: Path, rows: int = 64) -> str:
    import gguf

    from qconvert.formats.gguf.convert import plan
    from qconvert.formats.gguf.convert.tensors import tensor_data
    from qconvert.model.checkpoint import Checkpoint

    src = Checkpoint(model)
    specs = {s.gguf_name: s for s in plan(model).tensors}
    worst, count = 0.0, 0
    for t in gguf.GGUFReader(out).tensors:
        spec = specs[t.name]
        cols = spec.shape[-1]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            got = np.asarray(t.data).reshape(-1, cols)[:rows]
        else:
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            raw = np.asarray(t.data).reshape(-1, cols // block * size)[:rows]
            got = gguf.quants.dequantize(raw, t.tensor_type).reshape(-1, cols)
        ref = tensor_data(spec, src.get).float().reshape(-1, cols)[:rows].numpy()  # q/k rows permuted for RoPE
        err = float(((got - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))
        worst, count = max(worst, err), count + 1
    assert count == len(specs), f"{count} of {len(specs)} tensors compared"
    assert worst < 1e-4, f"relative error {worst:.3g}"  # Q8_0: about 2e-5 on Gaussian weights
    return f"all {count} tensors' first {rows} rows read back, worst relative squared error {worst:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("/tmp/big"))
    ap.add_argument("--work", type=Path, default=Path("/tmp"))
    ap.add_argument("--delete-checkpoint", action="store_true")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(SCRIPTS / "make_big_checkpoint.py"), str(args.model)], check=True)
    from qconvert.batch.jobs import verify

    size = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"checkpoint {size / 1e9:.1f} GB on disk, RAM {ram / 2**30:.1f} GiB, {os.cpu_count()} cores")
    qc = [sys.executable, "-m", "qconvert"]
    jobs = [("rtn", args.work / "big-rtn", check_rtn, ["rtn", str(args.model)]),
            ("gguf Q8_0", args.work / "big-q8_0.gguf", check_gguf, ["gguf", str(args.model), "Q8_0"])]
    for label, out, check, cmd in jobs:
        seconds, peak = timed_run([*qc, *cmd, "-o", str(out), "--device", "cpu", "--overwrite", "-q"])
        written = sum(f.stat().st_size for f in ([out] if out.is_file() else out.glob("*.safetensors")))
        problems = verify(out, str(args.model))
        assert not problems, problems
        print(f"{label}: {seconds:.0f} s, peak RSS {peak:.2f} GiB, wrote {written / 1e9:.1f} GB; verified; "
              f"{check(out, args.model)}", flush=True)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if args.delete_checkpoint:
        shutil.rmtree(args.model)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
