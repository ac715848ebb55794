#!/usr/bin/env bash
# Install volseg into .venv and run it on a small synthetic cohort, all under example/:
#   example/rawdata/sub-synthNNN_T1w.nii.gz      three synthetic heads (volseg synth)
#   example/derivatives/volseg/                  what volseg preprocess writes for them
# Run again to redo the preprocessing; the heads are generated only once.
set -euo pipefail
start=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh
volseg_venv

VOLSEG="$PWD/.venv/bin/volseg"
RAW=example/rawdata
OUT=example/derivatives/volseg
N=3

have=0
for i in $(seq 1 "$N"); do
    [ -f "$(printf '%s/sub-synth%03d_T1w.nii.gz' "$RAW" "$i")" ] && have=$((have + 1))
done
if [ "$have" -eq "$N" ]; then
    echo "==> $RAW already holds the $N synthetic heads; not generating them again"
else
    echo "==> volseg synth -o $RAW -n $N --seed 0"
    "$VOLSEG" synth -o "$RAW" -n "$N" --seed 0
fi

shopt -s nullglob
inputs=("$RAW"/*_T1w.nii.gz)
shopt -u nullglob
if [ "${#inputs[@]}" -eq 0 ]; then
    echo "error: no *_T1w.nii.gz in $RAW after 'volseg synth'" >&2
    exit 1
fi

echo "==> volseg preprocess ${inputs[*]} -o $OUT"
"$VOLSEG" preprocess "${inputs[@]}" -o "$OUT"

echo
echo "Inputs in $PWD/$RAW:"
ls -l "$RAW"
echo
echo "Outputs in $PWD/$OUT:"
ls -l "$OUT"
echo
echo "quickstart done in $((SECONDS - start)) s"
