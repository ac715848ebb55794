#!/usr/bin/env bash
# Retrain the shipped anomaly autoencoder from scratch (about 1.5 h on 2 CPU cores: stage 1,
# configs/ae.yaml, 1200 steps; stage 2, configs/ae_stage2.yaml, 600 steps from stage 1's best
# checkpoint with healthy ventricle widening), calibrate it
# on held-out healthy brains, run the benchmark, and install it into volseg/models/ae (then update
# MODEL_CARD.md there with the printed numbers).
#   scripts/train_ae.sh [best|final]     # needs ../shared/data (or VOLSEG_SHARED_DATA)
#
# Data split (fixed before training):
#   train:       nilearn MNI152 2009 brain, Colin27 ch2bet, wholehead/nomask/t1_crop skull-stripped
#                with volseg, 24 synthetic brains (seeds 5000...)
#   validation:  healthy/T1_brain_c1 with one case of each benchmark lesion family (checkpoint
#                selection in each stage: the highest mean validation AUPRC, every 150 steps;
#                stage 2's best is shipped when it beats stage 1's, else stage 1's)
#   calibration: healthy/T1_brain_c1 without lesions + 8 synthetic brains (seeds 9000...)
#   test:        healthy/norm.mgz and wholehead/nomask/chris_t1 (skull-stripped), BRATS, MS patient19
set -euo pipefail
cd "$(dirname "$0")/.."
export VOLSEG_SHARED_DATA="${VOLSEG_SHARED_DATA:-$(pwd)/../shared/data}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/test.sh or scripts/quickstart.sh first to create .venv" >&2; exit 1; }
.venv/bin/volseg strip "$VOLSEG_SHARED_DATA/wholehead/nomask/t1_crop.nii.gz" -o runs/healthy_stripped --tta
rm -rf runs/ae/best runs/ae/final runs/ae/last.pt runs/ae/log.csv runs/ae_stage2
mkdir -p runs/ae runs/ae_stage2
start=$(date +%s)
.venv/bin/volseg -v train ae --config configs/ae.yaml 2>&1 | tee runs/ae/train.out
.venv/bin/volseg -v train ae --config configs/ae_stage2.yaml --init runs/ae/best 2>&1 | tee runs/ae_stage2/train.out
echo "training wall time: $(( $(date +%s) - start )) s"
best() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['validation']['auprc'])" "$1/model.json"; }
RUN=runs/ae_stage2
if "$PY" -c "import sys; sys.exit(float(sys.argv[1]) <= float(sys.argv[2]))" "$(best runs/ae_stage2/best)" "$(best runs/ae/best)"; then
    :
else
    RUN=runs/ae
fi
echo "shipping $RUN/best (validation AUPRC $(best $RUN/best))"
# the map: |x - x̂| median-filtered over 5^3 and the signed residual over 9^3 (multi-scale, the
# larger of the two after calibrate scales the second by the ratio of their healthy thresholds),
# chosen on validation cases (MODEL_CARD.md)
.venv/bin/volseg calibrate "$VOLSEG_SHARED_DATA/healthy/T1_brain_c1.nii.gz" --synth 8 --model "$RUN/best" -o "$RUN/best" \
    --maps 'median_sizes=[5, 9]' --maps 'scale_residuals=[abs, signed]'
cp "$RUN/learning_curve.png" "$RUN/best/"
"$PY" scripts/anomaly_suite.py --model "$RUN/best" -o runs/ae/suite
mkdir -p volseg/models/ae
cp "$RUN/best"/{model.safetensors,model.json,calibration.json,learning_curve.png} volseg/models/ae/
echo "installed into volseg/models/ae; update volseg/models/ae/MODEL_CARD.md with runs/ae/suite/suite.md"
