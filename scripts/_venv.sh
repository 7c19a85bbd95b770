# Sourced by scripts/test.sh and scripts/demo.sh: create ./.venv (or $VENV) and install llmdeploy
# with the extra named in $1 into it. torch is pinned to the CPU build these machines have on disk
# (plain `torch` may pull a multi-GB CUDA build); override with TORCH_SPEC.
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[$1]"
