#!/usr/bin/env bash
# Base vs RTN w4 on the real evaluation models, scored on the held-out set (never calibrated on).
# Prints one markdown row per model; run scripts/fetch_models.py first.
#   bash scripts/rtn_quality.sh [MODELS_DIR] [WORK_DIR]
set -euo pipefail
models=${1:-${QCONVERT_MODELS:-$HOME/.cache/qconvert/models}}
work=${2:-/tmp/qconvert-rtn-quality}
mkdir -p "$work"
echo "| model | group | base ppl | RTN w4 ppl | KL vs base | top-1 agreement | size (MiB) base → RTN |"
echo "|---|---|---|---|---|---|---|"
for spec in smollm2-135m:64 gemma3-270m:128; do
  name=${spec%%:*}; group=${spec##*:}
  out="$work/$name-rtn-w4g$group"
  qconvert rtn "$models/$name" --w-bit 4 --group "$group" -o "$out" --overwrite --quiet >/dev/null
  qconvert eval "$out" --base "$models/$name" --dataset heldout --samples 40 --seq-len 512 --device cpu --json > "$work/$name.json"
  python - "$work/$name.json" "$models/$name" "$out" "$name" "$group" <<'PY'
import json, sys, pathlib
r = json.load(open(sys.argv[1]))
size = lambda d: sum(p.stat().st_size for p in pathlib.Path(d).glob("*.safetensors")) / 2**20
print(f"| {sys.argv[4]} | {sys.argv[5]} | {r['base_perplexity']:.3f} | {r['perplexity']:.3f} | "
      f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.3f} | {size(sys.argv[2]):.0f} → {size(sys.argv[3]):.0f} |")
PY
done
