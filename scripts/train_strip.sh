#!/usr/bin/env bash
# Retrain the shipped skull-stripping model from scratch (about 1 h on 2 CPU cores), evaluate it
# on the held-out scans,
# and install it into volseg/models/strip (then update MODEL_CARD.md with the printed numbers).
#   scripts/train_strip.sh            # needs ../shared/data (or VOLSEG_SHARED_DATA)
set -euo pipefail
cd "$(dirname "$0")/.."
export VOLSEG_SHARED_DATA="${VOLSEG_SHARED_DATA:-$(pwd)/../shared/data}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/test.sh or scripts/quickstart.sh first to create .venv" >&2; exit 1; }
rm -rf runs/strip
mkdir -p runs/strip
start=$(date +%s)
.venv/bin/volseg -v train strip --config configs/strip.yaml 2>&1 | tee runs/strip/train.out
echo "training wall time: $(( $(date +%s) - start )) s"
# the shipped model is the end of the schedule (runs/strip/final); runs/strip/best is the epoch
# with the best mean validation Dice on the grid (see MODEL_CARD.md for why final is shipped)
"$PY" scripts/eval_strip.py --model runs/strip/final --json runs/strip/eval.json
mkdir -p volseg/models/strip
cp runs/strip/final/model.safetensors runs/strip/final/model.json volseg/models/strip/
echo "installed into volseg/models/strip; update volseg/models/strip/MODEL_CARD.md"
