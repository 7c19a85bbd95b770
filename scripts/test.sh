#!/usr/bin/env bash
# Install llmdeploy with its test dependencies into ./.venv and run the whole test suite.
# Works on a fresh machine: creates the venv, installs everything (including the
# reference llama.cpp, llama-cpp-python==0.3.36, which compiles in ~6 minutes the
# first time and comes from pip's wheel cache afterwards), then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k q4_k`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# torch is pinned to the CPU build that these machines have on disk; override with TORCH_SPEC.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"

# Two pytest workers by default (the CI machines have 2 cores).
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
