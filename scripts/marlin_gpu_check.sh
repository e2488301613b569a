#!/usr/bin/env bash
# Marlin kernel check on a GPU machine (no internet needed), from the repository root. Needs the ignored
# folder .marlin/ in the working tree (carry it): .marlin/IST-DASLab-marlin/ (kernel sources, git archive of
# github:IST-DASLab/marlin) and .marlin/gemma3-270m-layer8.safetensors (real layers, optional).
#   bash scripts/marlin_gpu_check.sh            (results and build logs under $OUT, else /tmp/marlin_gpu_check)
# 1. the patched kernel (no L2 cache hint on the weight copies): must build, pass the SASS check and match
#    the dequantized matmul on every case;
# 2. control: the unpatched kernel on the cases that trap with nvcc 13.0-13.3 (grouped, m <= 16), in its own
#    process (an illegal instruction poisons the CUDA context). Its failure is expected, not an error here.
set -u
OUT=${OUT:-/tmp/marlin_gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true
command -v nvcc >/dev/null && nvcc --version | tail -2
python scripts/marlin_gpu_check.py --variant patched --out "$OUT" 2>&1 | tee "$OUT/patched.log"
patched=${PIPESTATUS[0]}
timeout 300 python scripts/marlin_gpu_check.py --variant original --quick --out "$OUT" 2>&1 | tee "$OUT/original.log"
echo "== summary: patched exit $patched (0 = built, SASS ok, every case matched); original (control) exit ${PIPESTATUS[0]}"
grep -h "^RESULT\|^SASS\|^BUILD" "$OUT/patched.log" "$OUT/original.log"
exit "$patched"
