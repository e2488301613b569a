#!/usr/bin/env bash
# scripts/w4_quality.py on the GPU machine (device) for both real models. They travel as their GGUF files split
# into chunks (the working tree is limited to 64 MiB a call) that earlier calls left in /tmp/chunks (smol.*,
# gem.*); they are joined and dequantized to bf16 HF checkpoints exactly as scripts/fetch_models.py does
# locally. Needs .whl and .peer carried. Runs in the background (setsid); results land in /tmp/w4q.
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
[ -d /tmp/peer-site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peer-site .peer/whl/*.whl || exit 1
cp .peer/peer_python.sh /tmp/peer_python.sh
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/models/downloads /tmp/w4q
convert() {  # GGUF chunks -> bf16 checkpoint
  [ -f /tmp/models/$3/config.json ] && return
  cat /tmp/chunks/$2 > /tmp/models/downloads/$1
  python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import fetch_models
fetch_models.convert(Path('/tmp/models/downloads/$1'), Path('/tmp/models/$3'))" > /dev/null 2>&1 || exit 1
}
convert SmolLM2-135M-Instruct.Q4_1.gguf "smol.*" smollm2-135m
convert gemma-3-270m-q4_k_m.gguf "gem.*" gemma3-270m
setsid nohup python3 scripts/w4_quality.py --models ${MODELS:-smollm2,gemma3} --device cuda --models-dir /tmp/models \
  --work /tmp/w4q --peer-python /tmp/peer_python.sh --peer-dtype bfloat16 > /tmp/w4q/run.log 2>&1 < /dev/null &
