#!/usr/bin/env bash
# The two commands of the README:
#   bash run.sh pipeline   set up, then run the whole pipeline on the built-in default (dvc repro)
#   bash run.sh test       set up, then run the test suite
# Setup is idempotent: a virtualenv at $SLQ_VENV (default .venv) with the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SLQ_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
  GX_ANALYTICS_ENABLED=false PREFECT_SERVER_ANALYTICS_ENABLED=false \
  MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK=true TOKENIZERS_PARALLELISM=false

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  # torch first, pinned to the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
  "$VENV/bin/python" -c "import slq, dvc, dvc_s3, prefect, mlflow, great_expectations, lancedb, ray, lance_ray, moto, gguf, pytest, importlinter, sentence_transformers, openai, schemathesis, mteb, skimage, hypothesis" \
    2>/dev/null || "${pip[@]}" -e ".[pipeline,scale,test]"
}

case "${1:-}" in
  setup)
    setup
    ;;
  pipeline)
    setup
    . "$VENV/bin/activate"
    slq data generate          # the synthetic world (byte-identical to what data.dvc pins)
    start=$SECONDS
    dvc repro                  # validate -> pretrain -> train -> embed -> index -> evaluate -> methods -> compare -> register
    echo "dvc repro took $(( SECONDS - start )) s"
    dvc metrics show
    ;;
  test)
    setup
    . "$VENV/bin/activate"
    shift
    python -m pytest -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: bash run.sh pipeline | test [pytest args] | setup" >&2
    exit 2
    ;;
esac
