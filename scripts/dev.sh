#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11:
#   bash scripts/dev.sh bench [args]   -> the benchmark suite (quick by default)
#   bash scripts/dev.sh test  [args]   -> the test suite
# It creates .venv on first use and installs ddiff with its extras there, pinned to the tested set
# of versions in scripts/constraints.txt. DDIFF_CONSTRAINTS= (empty) resolves the newest releases
# instead; DDIFF_CONSTRAINTS=FILE uses another set. DDIFF_VENV picks another environment folder.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DDIFF_VENV:-.venv}"
python_bin="${PYTHON:-python3}"
constraints="${DDIFF_CONSTRAINTS-scripts/constraints.txt}"
pin=()
[ -n "$constraints" ] && pin=(-c "$constraints")
say() { echo "[dev.sh] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating the environment $venv ($("$python_bin" --version 2>&1))"
    "$python_bin" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    # Without a GPU the CPU wheel is enough (and far smaller than the CUDA build); the tested set
    # pins the version either way.
    if command -v nvidia-smi >/dev/null 2>&1; then
        say "installing torch (CUDA build; a few GB, several minutes)"
        "$py" -m pip install -q "${pin[@]}" torch
    else
        say "installing torch 2.13.0 (CPU build)"
        "$py" -m pip install -q "${pin[@]}" torch==2.13.0
    fi
fi

stamp="$venv/.ddiff-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ -n "$constraints" ] && [ "$constraints" -nt "$stamp" ]; } \
        || [ "$(cat "$stamp")" != "${constraints:-newest}" ]; then
    say "installing ddiff and its test and benchmark extras (${constraints:-newest releases})"
    "$py" -m pip install -q "${pin[@]}" -e ".[test,bench]"
    echo "${constraints:-newest}" > "$stamp"
fi

cmd="${1:-test}"
shift || true
case "$cmd" in
    # The triton interpreter is single-threaded: spread the tests over the cores.
    test)  say "running the tests"; exec "$py" -m pytest -q -n "${DDIFF_TEST_WORKERS:-auto}" "$@" ;;
    bench) say "running the benchmarks"; exec "$py" -m benchmarks "$@" ;;
    *) echo "usage: bash scripts/dev.sh {test|bench} [args]" >&2; exit 2 ;;
esac
