# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/quickstart.sh (sourced, not run).
#
#   volseg_venv [EXTRA]   create .venv in the current folder (the repository root) if it is
#                         missing, install torch first if the venv cannot import it, then
#                         `pip install -e .[EXTRA]`. Sets VENV_PY to the venv's python.
#
# Environment:
#   VOLSEG_PYTHON      interpreter that creates the venv (default: python3; needs >= 3.10)
#   VOLSEG_TORCH_SPEC  what to give pip for torch (default: torch==2.13.0, a CPU build). Split on
#                      spaces, so pip options can ride along, e.g.
#                      "torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
#   VOLSEG_REINSTALL   set to 1 to run `pip install -e` even when pyproject.toml is unchanged

volseg_venv() {
    local extra="${1:-}"
    local py="${VOLSEG_PYTHON:-python3}"

    if [ ! -e .venv/bin/python ]; then
        if ! command -v "$py" >/dev/null 2>&1; then
            echo "error: '$py' not found; install Python >= 3.10 (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
            return 1
        fi
        if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
            echo "error: volseg needs Python >= 3.10; '$py' is $("$py" -V 2>&1). Set VOLSEG_PYTHON to a newer one." >&2
            return 1
        fi
        echo "==> creating .venv with $("$py" -V 2>&1)"
        if ! "$py" -m venv .venv; then
            rm -rf .venv
            echo "error: '$py -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2
            return 1
        fi
    fi
    VENV_PY="$PWD/.venv/bin/python"
    if ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
        echo "error: $VENV_PY does not run (was its Python removed or moved?); delete .venv and retry" >&2
        return 1
    fi

    # torch first: a pinned build, so that resolving torch>=2.1,<3 below finds it installed
    # and does not fetch the newest (multi-GB CUDA) wheel.
    if ! "$VENV_PY" -c 'import torch' >/dev/null 2>&1; then
        local -a torch_args
        read -r -a torch_args <<<"${VOLSEG_TORCH_SPEC:-torch==2.13.0}"
        echo "==> installing ${torch_args[*]}"
        "$VENV_PY" -m pip install "${torch_args[@]}"
    fi

    # The editable install only needs redoing when pyproject.toml (dependencies, entry points)
    # or the requested extra changes; a stamp in the venv records what was installed.
    local stamp=".venv/.volseg-install-${extra:-base}"
    local want
    want="$(cksum < pyproject.toml)"
    if [ "${VOLSEG_REINSTALL:-0}" = 1 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
        || [ ! -x .venv/bin/volseg ]; then
        echo "==> installing volseg (pip install -e .${extra:+[$extra]})"
        "$VENV_PY" -m pip install -e ".${extra:+[$extra]}"
        printf '%s\n' "$want" >"$stamp"
    else
        echo "==> .venv is up to date (set VOLSEG_REINSTALL=1 to reinstall)"
    fi
}
