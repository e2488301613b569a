#!/usr/bin/env bash
# The README's report screenshot: SmolLM2-135M (python scripts/fetch_models.py) converted with RTN, GPTQ and
# AWQ (w4, group 64, compressed-tensors; 32 x 512 calibration tokens of the bundled `mixed` set, RTN given
# the same set so its report has output errors too), scored against the base on 20 x 512 held-out tokens,
# rendered by `qconvert report` and photographed by headless Chromium into docs/report-smollm2.png.
set -euo pipefail
MODEL=${MODEL:-$HOME/.cache/qconvert/models/smollm2-135m}
WORK=${WORK:-$HOME/.cache/qconvert/report_example}
mkdir -p "$WORK" docs
CAL=(--dataset mixed --samples 32 --seq-len 512 --group 64 --format compressed-tensors --overwrite -q)
qconvert rtn "$MODEL" -o "$WORK/smollm2-rtn" "${CAL[@]}"
qconvert gptq "$MODEL" -o "$WORK/smollm2-gptq" "${CAL[@]}"
qconvert awq "$MODEL" -o "$WORK/smollm2-awq" "${CAL[@]}"
qconvert report "$WORK/smollm2-gptq" --compare "$WORK/smollm2-awq" --compare "$WORK/smollm2-rtn" \
    --base "$MODEL" --samples 20 --html "$WORK/report.html"
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --force-device-scale-factor=1 --window-size=1200,2300 --screenshot=docs/report-smollm2.png \
    "file://$WORK/report.html" 2>/dev/null
echo "wrote docs/report-smollm2.png"
