#!/usr/bin/env bash
# Install llmdeploy with its test dependencies into ./.venv and run the whole test suite.
# Works on a fresh machine: creates the venv, installs everything (including the
# reference llama.cpp, llama-cpp-python==0.3.36, which compiles in ~6 minutes the
# first time and comes from pip's wheel cache afterwards), then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k q4_k`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh test

# One pytest worker per core (the CI machines have 2).
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
