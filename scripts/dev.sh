#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11:
#   bash scripts/dev.sh bench [args]   -> the benchmark suite (quick by default)
#   bash scripts/dev.sh test  [args]   -> the test suite
# It creates .venv on first use and installs ddiff with its extras there.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DDIFF_VENV:-.venv}"
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
    # Without a GPU the CPU wheel is enough (and far smaller than the CUDA build).
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$py" -m pip install -q torch
    else
        "$py" -m pip install -q torch==2.13.0
    fi
fi

stamp="$venv/.ddiff-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$py" -m pip install -q -e ".[test,bench]"
    touch "$stamp"
fi

cmd="${1:-test}"
shift || true
case "$cmd" in
    # The triton interpreter is single-threaded: spread the tests over the cores.
    test)  exec "$py" -m pytest -q -n "${DDIFF_TEST_WORKERS:-auto}" "$@" ;;
    bench) exec "$py" -m benchmarks "$@" ;;
    *) echo "usage: bash scripts/dev.sh {test|bench} [args]" >&2; exit 2 ;;
esac
