#!/usr/bin/env bash
# scripts/gguf_methods.py on the GPU machine (device): SmolLM2-135M to GGUF Q4_K_M by every method, qconvert's and
# Intel AutoRound's, made on the H100 one after another, perplexity by llama.cpp's llama-perplexity (this
# machine's build, run on the device's CPU), with the seconds each command took.
#
# SmolLM2's Q4_1 GGUF (98 MB) is more than one device call carries (64 MiB), so it travels in two halves, and the
# second call must reach the machine while it is still warm from the first:
#   here:   bash scripts/gguf_methods_h100.sh pack      # .chunks/a, .bundle/ (second half, wheels, llama.cpp tools)
#   call 1: bash scripts/gguf_methods_h100.sh receive   # carry .chunks and .whl (transformers, gguf)
#   call 2: bash scripts/gguf_methods_h100.sh run       # carry .bundle: converts, starts the run, waits 500 s
#   call 3: bash scripts/gguf_methods_h100.sh wait      # while the run goes on
# METHODS (default plain,imatrix,gptq,awq,awq-gptq,autoround) chooses the rows. .chunks and .bundle must be
# ignored (.git/info/exclude). The device's CPU gives the bf16 and plain rows this machine's perplexities exactly.
set -o pipefail
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
HALF=50000000
WORK=/tmp/work

pack() {
  local src=${QCONVERT_MODELS:-$HOME/.cache/qconvert/models}/downloads/$GGUF_NAME
  local bin=${QCONVERT_LLAMA_CPP:-$HOME/.cache/qconvert/llama.cpp-0.3.36}/build
  [ -f "$src" ] || { echo "error: $src missing: run scripts/fetch_models.py smollm2" >&2; exit 1; }
  rm -rf .chunks .bundle && mkdir -p .chunks .bundle
  head -c $HALF "$src" >.chunks/a && tail -c +$((HALF + 1)) "$src" >.bundle/b || exit 1
  sha256sum "$src" | cut -d' ' -f1 >.bundle/sha256
  tar -C "$bin" -cJf .bundle/llama.tar.xz bin && cp /lib/x86_64-linux-gnu/libgomp.so.1 .bundle/ || exit 1
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .bundle auto-round==0.15.1 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 || exit 1
  du -sh .chunks .bundle
}

receive() {
  mkdir -p /tmp/m && cp .chunks/a /tmp/m/a || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

run() {
  [ -f /tmp/m/a ] || { echo "error: the first half is not here: the machine went back; call receive again" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .bundle/*.whl || exit 1
  mkdir -p /tmp/models/downloads /tmp/oracle/src /tmp/repo $WORK && rm -f $WORK/done
  cp -r qconvert scripts recipes calibration_sets pyproject.toml /tmp/repo/ || exit 1
  local gguf=/tmp/models/downloads/$GGUF_NAME
  cat /tmp/m/a .bundle/b >$gguf && [ "$(sha256sum $gguf | cut -d' ' -f1)" = "$(cat .bundle/sha256)" ] \
    || { echo "error: $GGUF_NAME assembled wrong" >&2; exit 1; }
  python3 -c "import tarfile; tarfile.open('.bundle/llama.tar.xz').extractall('/tmp/oracle')" || exit 1
  cp .bundle/libgomp.so.1 /tmp/oracle/bin/ && touch /tmp/oracle/src/convert_hf_to_gguf.py
  local here=$PWD
  cd /tmp/repo && export PYTHONPATH=/tmp/site:/tmp/repo PYTHONUNBUFFERED=1
  unset PYTHONDONTWRITEBYTECODE  # the machine sets it: every process would compile transformers' sources again
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); from fetch_models import convert
convert(Path('$gguf'), Path('/tmp/models/smollm2-135m'))" 2>&1 | tail -1
  sha256sum /tmp/models/smollm2-135m/model.safetensors
  nvidia-smi -L
  export QCONVERT_MODELS=/tmp/models LLAMA_CPP_DIR=/tmp/oracle/src LLAMA_CPP_BIN=/tmp/oracle/bin \
    LLAMA_CPP_LIB=/tmp/oracle/bin LD_LIBRARY_PATH=/tmp/oracle/bin:$LD_LIBRARY_PATH
  # in a session of its own, so that it outlives this call
  setsid nohup bash -c "python3 scripts/gguf_methods.py --device cuda --work $WORK --autoround-path /tmp/site \
    --methods ${METHODS:-plain,imatrix,gptq,awq,awq-gptq,autoround} >$WORK/log 2>&1; touch $WORK/done" \
    >/dev/null 2>&1 &
  cd "$here" && wait_for 500
}

wait_for() {
  local end=$((SECONDS + ${1:-540}))
  while [ ! -e $WORK/done ] && [ $SECONDS -lt $end ]; do sleep 5; done
  grep -E "^\||Error|Traceback" $WORK/log | tail -40
  cp $WORK/log $WORK/smollm2-135m/results.json "${OUT:-/tmp}/" 2>/dev/null
  [ -e $WORK/done ] && echo "finished" || echo "still running: call wait again"
}

case "$1" in
  pack) pack ;;
  receive) receive ;;
  run) run ;;
  wait) wait_for 540 ;;
  *) echo "usage: $0 pack|receive|run|wait" >&2; exit 2 ;;
esac
