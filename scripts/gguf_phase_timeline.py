"""Where `qconvert gguf MODEL Q4_K_M --method M` spends its time on CUDA: a timeline of its phases per thread.

Wraps the pipeline's, writer's and engine's steps with timers (the GPU ones synchronised before and after, which
serialises them a little), runs the conversion twice in one process and prints, for each run, the steps over 40 ms
in start order and the summed time of every step. The first run carries the process's first-use costs.

    python scripts/gguf_phase_timeline.py MODEL CALIBRATION [--method gptq] [--type Q4_K_M] [--device cuda]
e.g. on the GPU machine, after scripts/gguf_methods_gpu.sh built /tmp/m8 and /tmp/ids.pt:
    python scripts/gguf_phase_timeline.py /tmp/m8 /tmp/ids.pt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phase_timers import SPANS, timed  # noqa: E402

import qconvert.algorithms.gguf_gptq as gguf_gptq  # noqa: E402
import qconvert.engine as engine  # noqa: E402
import qconvert.formats.gguf.quantized_file as quantized_file  # noqa: E402
import qconvert.gguf_pipeline as pipeline  # noqa: E402
from qconvert.pipeline import Calibration  # noqa: E402

HIDDEN = ("sweep", "tensor.of", "inverse", "step.", "quantize_set", "w.write_tensor", "qf._")  # summed only


def instrument() -> None:
    for name in ("plan", "_write_calibrated", "calibration_tokens"):
        timed(pipeline, name)
    for name in ("write_header_to_file", "write_kv_data_to_file", "write_ti_data_to_file", "write_tensor_data"):
        timed(gguf.GGUFWriter, name, "w." + name)
    for name in ("write", "open_file", "encode_tensors", "_fetch", "_write_tensor"):
        timed(quantized_file, name, "qf." + name)
    for name in ("convert", "capture_block_inputs", "read_block", "load_block", "_write_outside_blocks"):
        timed(engine, name)
    for name in ("run", "_reference_pass", "_group_statistics", "_quantize", "_advance"):
        timed(engine._BlockStep, name, "step." + name)
    for name in ("quantize_set", "sweep", "inverse_cholesky"):
        timed(gguf_gptq, name, sync=True)
    timed(gguf_gptq.GGUFTensor, "of", "tensor.of", sync=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calibration", help="--dataset of the conversion (e.g. a saved token-id file)")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(2):
            SPANS.clear()
            origin = time.time()
            summary = pipeline.run(pipeline.GGUFRequest(args.model, Path(tmp) / f"run{run}.gguf", args.type,
                                                        calibration=Calibration(args.calibration), device=args.device,
                                                        method=args.method))
            print(f"run {run}: {summary['seconds']:.2f} s in the process, {time.time() - origin:.2f} s")
            totals: dict[str, float] = {}
            for thread, step, start, end in sorted(SPANS, key=lambda s: s[2]):
                totals[step] = totals.get(step, 0.0) + end - start
                if end - start > 0.04 and not step.startswith(HIDDEN):
                    print(f"  {thread[-12:]:>12} {start - origin:6.2f} {end - origin:6.2f} {end - start:6.2f} {step}")
            print("  summed:", {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])})


if __name__ == "__main__":
    main()
