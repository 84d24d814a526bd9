#!/usr/bin/env bash
# The adapter, real-layout and recipe tests again with torchvision installed: the families' full
# processors (video processors included) load from the same folders. This machine's CPU torch
# has no torchvision wheel, so a second venv takes torch 2.14.1 + torchvision 0.29.1 (CUDA builds,
# run on the CPU here). Where they cannot be installed the check says so and is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${SLQ_TV_VENV:-.venv-torchvision}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
pip=("$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check)
if ! [ -x "$VENV/bin/python" ] && ! "$PY" -m venv "$VENV"; then
  echo "torchvision check: SKIPPED (no venv)"; exit 0
fi
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  if ! "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" >/dev/null 2>&1; then
    echo "torchvision check: SKIPPED (torch 2.14.1 + torchvision 0.29.1 could not be installed here)"; exit 0
  fi
fi
"$VENV/bin/python" -c "import slq, peft, pytest" 2>/dev/null || "${pip[@]}" -e ".[test]" peft >/dev/null 2>&1 || {
  echo "torchvision check: FAILED to install the project into $VENV"; exit 1; }
"$VENV/bin/python" -c "import torch, torchvision, transformers; print(f'torchvision check: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}')"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_real_layout.py tests/test_core.py tests/test_recipe.py
