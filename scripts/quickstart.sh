#!/usr/bin/env bash
# Install volseg into .venv and run the whole pipeline on the embedded example cohort:
#   example/rawdata/                 a small BIDS dataset of synthetic heads (volseg.cohort.example:
#                                    sub-01 with sessions 1 and 2, sub-02 with lesions), made on
#                                    the spot; nothing is downloaded
#   example/derivatives/volseg/      what `volseg run` writes for them: BIDS derivatives,
#                                    volseg_summary.tsv, volseg_failures.tsv, report.html
# Run again: the heads are generated once and finished scans are skipped (resume).
set -euo pipefail
start=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh
volseg_venv

VOLSEG="$PWD/.venv/bin/volseg"
RAW=example/rawdata
OUT=example/derivatives/volseg

echo "==> writing the example cohort to $RAW (kept if already there)"
"$VENV_PY" -c 'import sys; from volseg.cohort.example import example_cohort; example_cohort(sys.argv[1])' "$RAW"

echo "==> volseg run $RAW -o $OUT"
"$VOLSEG" run "$RAW" -o "$OUT"

echo
echo "Outputs in $PWD/$OUT:"
find "$OUT" -path "$OUT/.volseg" -prune -o -type f -print | sort
echo
column -t -s $'\t' "$OUT/volseg_summary.tsv" 2>/dev/null || cat "$OUT/volseg_summary.tsv"
echo
echo "QC report: file://$PWD/$OUT/report.html"
echo "Check and rate the scans in a 3D viewer: .venv/bin/volseg review $OUT   (then open the URL it prints)"
echo "quickstart done in $((SECONDS - start)) s"
