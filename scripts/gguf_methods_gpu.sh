#!/usr/bin/env bash
# GGUF by calibration method on the GPU machine (device), from the repository root; needs .whl and .peer/tok
# carried. 1. the CUDA GPTQ sweep (native_cuda.cu) gives the PyTorch sweep's bytes on CUDA, every k-quant and
# legacy type; 2. wall times of `qconvert gguf Q4_K_M --method gptq|awq-gptq|imatrix|plain` on the 4-layer random model
# with the Llama-3-8B shapes and the 128 x 512 ids of scripts/w4_gpu_bench.py, next to int4 `qconvert gptq`.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE  # the machine sets it: every process would compile transformers' sources again
nvidia-smi -L
python3 - <<'PY' || exit 1
import torch
from gguf import GGMLQuantizationType as Q
from qconvert.algorithms.gguf_gptq import importance, sweep
from qconvert.algorithms.gptq import inverse_cholesky
from qconvert.formats.gguf.quants import native
g = torch.Generator().manual_seed(0)
x = (torch.randn(4096, 1024, generator=g) @ (torch.randn(1024, 1024, generator=g) / 32 + torch.eye(1024))).cuda()
w = (torch.randn(300, 1024, generator=g) * 0.05).cuda()
h = 2 / len(x) * x.T @ x
u = inverse_cholesky([h.flip(0, 1).contiguous()], 0.01)
failed = []
for qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0):
    for im in (importance(h), None):
        compiled = sweep(w.clone(), u, qtype, im)
        saved, native._built["cuda"] = native._built["cuda"], None
        same = torch.equal(compiled, sweep(w.clone(), u, qtype, im))
        native._built["cuda"] = saved
        print(f"GPTQ sweep on CUDA, {qtype.name} {'imatrix' if im is not None else 'plain'}: "
              f"{'same bytes as PyTorch' if same else 'DIFFERENT'}")
        failed += [] if same else [qtype.name]
raise SystemExit(f"differ: {failed}" if failed else 0)
PY
python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'scripts')
from w4_gpu_bench import make_model, calibration_ids
make_model(4, Path('.peer/tok')); calibration_ids(Path('/tmp/ids.pt'))"
TIMEFORMAT='%R s'
for run in 1 2; do
  rm -rf /tmp/out-gptq; echo "int4 gptq (run $run):"; time python3 -m qconvert gptq /tmp/m8 --w-bit 4 --group 128 --dataset /tmp/ids.pt -o /tmp/out-gptq -q --json | python3 -c "import json,sys; print('  in-process', json.load(sys.stdin)['seconds'], 's')"
done
for m in gptq awq-gptq imatrix plain; do
  rm -f /tmp/g-$m.gguf; echo "gguf Q4_K_M --method $m:"; time python3 -m qconvert gguf /tmp/m8 Q4_K_M --method $m --dataset /tmp/ids.pt -o /tmp/g-$m.gguf -q --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('  in-process', d['seconds'], 's; quantize', d['quantize_seconds'], 's')"
done
