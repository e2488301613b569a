#!/usr/bin/env bash
# GPTQ / AWQ on the GPU machine (device): kernel tests, a tiny end-to-end check, then the side-by-side speed run
# against llm-compressor (scripts/w4_gpu_bench.py). Needs .whl (gguf, transformers) and .peer (llm-compressor's
# wheels in .peer/whl, a tokenizer in .peer/tok, ../shared/bench/peer_llmcompressor_gpu.py) carried. LAYERS: 4 or 32.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peer-site .peer/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
if [ "${SKIP_CHECKS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_gptq_kernel.py 2>&1 | tail -3
  python3 -c "
import torch
from qconvert.algorithms.gptq import Hessian, inverse_cholesky
x = torch.randn(4096, 1024, device='cuda', dtype=torch.bfloat16)
h = Hessian(1024, x.device); h.update(x[:1000]); h.update(x[1000:])
ref = 2 / 4096 * x.double().T @ x.double()
print('hessian on cuda: max rel err', float((h.matrix.double() - ref).abs().max() / ref.abs().max()))
ref += 0.01 * torch.diag(ref).mean() * torch.eye(1024, device='cuda', dtype=torch.float64)
want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
got = inverse_cholesky([h.matrix.flip(0, 1).contiguous()], 0.01)
print('inverse cholesky in place on cuda: max rel err', float((got.double() - want).abs().max() / want.abs().max()))
"
  python3 -c "
from qconvert.testing.tiny_models import make_tiny_model
make_tiny_model('/tmp/m', 'llama', 4, tokenizer='sentencepiece', hidden_size=1024, intermediate_size=2816, head_dim=64, num_attention_heads=16, num_key_value_heads=4)
"
  for m in gptq awq; do
    for d in cuda cpu; do
      python3 -m qconvert $m /tmp/m -o /tmp/$m-$d --device $d --samples 32 --seq-len 256 -q --json > $OUT/tiny_$m-$d.json || echo "$m $d FAILED"
      python3 -m qconvert eval /tmp/$m-$d --base /tmp/m --device cuda --samples 8 --seq-len 256 --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('$m $d ppl', d['perplexity'], 'kl', d['kl_divergence'])"
    done
  done
fi
python3 scripts/w4_gpu_bench.py --layers ${LAYERS:-4} --methods ${METHODS:-gptq,awq} ${PEER---peer .peer/peer_llmcompressor_gpu.py} 2>&1 | tee $OUT/bench.jsonl
