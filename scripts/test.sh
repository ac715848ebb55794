#!/usr/bin/env bash
# Run the test suite in .venv (created and filled on first use). Extra arguments go to pytest:
#   scripts/test.sh                 # everything
#   scripts/test.sh -x -k geometry  # stop at the first failure, only geometry tests
# Real-scan tests read VOLSEG_SHARED_DATA (default ../shared/data) and skip without it.
set -euo pipefail
start=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh
volseg_venv test

echo "==> python -m pytest -q $*"
status=0
"$VENV_PY" -m pytest -q "$@" || status=$?
echo "==> scripts/test.sh: pytest exit code $status, $((SECONDS - start)) s elapsed"
exit "$status"
