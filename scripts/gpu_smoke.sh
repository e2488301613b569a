#!/usr/bin/env bash
# GPU smoke run (device H100): wheels from .whl (gguf, transformers) then GPU checks; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
set -x
nvidia-smi -L
python3 scripts/gguf_gpu_check.py --rows 2048 --cols 4096 2>&1 | tee $OUT/gpu_check.md
python3 -c "
from qconvert.testing.tiny_models import make_tiny_model
make_tiny_model('/tmp/m', 'llama', 4, tokenizer='sentencepiece', hidden_size=1024, intermediate_size=2816, head_dim=64, num_attention_heads=16, num_key_value_heads=4)
"
python3 -m qconvert rtn /tmp/m -o /tmp/rtn-gpu --device cuda --dataset mixed --samples 16 --seq-len 128 -q --json > $OUT/rtn_gpu.json; echo rtn rc=$?
python3 -m qconvert rtn /tmp/m -o /tmp/rtn-cpu --device cpu -q; cmp /tmp/rtn-gpu/model.safetensors /tmp/rtn-cpu/model.safetensors && echo RTN_GPU_CPU_IDENTICAL
python3 -m qconvert eval /tmp/rtn-gpu --base /tmp/m --device cuda --samples 4 --seq-len 128 --json > $OUT/eval_gpu.json; echo eval rc=$?
time python3 -m qconvert gguf /tmp/m Q4_K_M -o /tmp/g-gpu.gguf --device cuda -q
time python3 -m qconvert gguf /tmp/m Q4_K_M -o /tmp/g-cpu.gguf --device cpu -q
cmp /tmp/g-gpu.gguf /tmp/g-cpu.gguf && echo GGUF_GPU_CPU_IDENTICAL
python3 -m qconvert gguf /tmp/m Q4_K_M -o /tmp/g-im.gguf --device cuda --imatrix --samples 16 --seq-len 128 -q --json > $OUT/gguf_imatrix_gpu.json; echo gguf imatrix rc=$?
