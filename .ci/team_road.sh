#!/usr/bin/env bash
# The team's road on a real clone, against a throwaway S3 (moto on 127.0.0.1):
#
#   bash .ci/team_road.sh PROJECT_DIR
#
# PROJECT_DIR: a clone of the project where `bash run.sh pipeline` has run (its records, dvc.lock
# and metrics/, as committed: a run that changed them must be committed first, or a teammate's
# clone would ask for other data). Steps, each timed with its exit code:
#   push      `dvc push` from PROJECT_DIR to its `team` remote, pointed at moto (AWS_ENDPOINT_URL)
#   clone     `git clone PROJECT_DIR` into a temporary folder (a teammate's fresh clone)
#   pull      `dvc pull` there
#   status    `dvc status` there (must say "Data and pipelines are up to date")
#   repro     `dvc repro` there (must run no stage)
#   checkout  `dvc checkout` there
# A step fails on a non-zero exit, on a DVC warning, or on what it must say. Exit 0 when all pass.
# Nothing in PROJECT_DIR changes but its DVC state (.dvc/tmp); moto and the clone are removed.
# Python: $SLQ_VENV (default PROJECT_DIR/.venv) with dvc[s3] and moto[server] (`bash run.sh setup`).
set -uo pipefail

if [ $# -ne 1 ] || [ ! -d "$1" ]; then
  echo "usage: bash .ci/team_road.sh PROJECT_DIR   (a clone where 'bash run.sh pipeline' has run)" >&2
  exit 2
fi
PROJECT=$(cd "$1" && pwd)
VENV=${SLQ_VENV:-$PROJECT/.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "import dvc_s3, moto.server" 2>/dev/null; then
  echo "team_road: $PY lacks dvc_s3 or moto[server]: run 'bash run.sh setup' in $PROJECT, or set SLQ_VENV" >&2
  exit 2
fi
if [ ! -f "$PROJECT/dvc.lock" ] || ! git -C "$PROJECT" rev-parse --verify -q HEAD >/dev/null; then
  echo "team_road: $PROJECT is not a clone with a pipeline run (no dvc.lock or no git commit)" >&2
  exit 2
fi
changed=$(git -C "$PROJECT" status --porcelain -- dvc.lock '*.dvc' metrics reports/validate.json)
if [ -n "$changed" ]; then
  echo "team_road: the run changed committed records; commit them first (git add ... && git commit):" >&2
  echo "$changed" >&2
  exit 2
fi
url=$(cd "$PROJECT" && "$PY" -m dvc remote list | awk '$1 == "team" {print $2}')
case "$url" in
  s3://*) bucket=${url#s3://}; bucket=${bucket%%/*} ;;
  *) echo "team_road: the 'team' remote is '$url', not an S3 URL (a --local override?)" >&2; exit 2 ;;
esac

export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GX_ANALYTICS_ENABLED=false \
  MLFLOW_DISABLE_TELEMETRY=true AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
  AWS_DEFAULT_REGION=us-east-1
work=$(mktemp -d)
moto_pid=
cleanup() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null && wait "$moto_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# moto's S3 server on 127.0.0.1, a free port, with the remote's bucket; it runs until killed
"$PY" - "$work/endpoint" "$bucket" <<'EOF' >"$work/moto.log" 2>&1 &
import os, signal, socket, sys

import boto3
from moto.server import ThreadedMotoServer

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
endpoint = f"http://127.0.0.1:{port}"
boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=sys.argv[2])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(endpoint)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
signal.pause()
EOF
moto_pid=$!
for _ in $(seq 100); do
  [ -s "$work/endpoint" ] && break
  kill -0 "$moto_pid" 2>/dev/null || break
  sleep 0.2
done
if [ ! -s "$work/endpoint" ]; then
  echo "team_road: moto did not start:" >&2
  cat "$work/moto.log" >&2
  exit 1
fi
export AWS_ENDPOINT_URL=$(cat "$work/endpoint")
echo "== team road: $PROJECT -> moto S3 $AWS_ENDPOINT_URL (bucket $bucket) -> $work/clone =="

failed=0
results=()
# step NAME DIR MUST_SAY MUST_NOT_SAY CMD...: run, time, check, record
step() {
  local name=$1 dir=$2 must=$3 mustnot=$4
  shift 4
  local start end rc out verdict=ok
  start=$(date +%s.%N)
  out=$(cd "$dir" && "$@" 2>&1)
  rc=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
  echo "-- $name: $* (in $dir)"
  [ -n "$out" ] && printf '%s\n' "$out" | tail -n 15 | sed 's/^/   /'
  if [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit $rc)"
  elif grep -q "WARNING" <<<"$out"; then
    verdict="FAILED (a DVC warning)"
  elif [ -n "$must" ] && ! grep -qF "$must" <<<"$out"; then
    verdict="FAILED (does not say '$must')"
  elif [ -n "$mustnot" ] && grep -qF "$mustnot" <<<"$out"; then
    verdict="FAILED (says '$mustnot')"
  fi
  [ "$verdict" = ok ] || failed=1
  results+=("$(printf '%-9s exit %-3s %8s s   %s' "$name" "$rc" "$secs" "$verdict")")
}

DVC=("$PY" -m dvc)
step push "$PROJECT" "" "" "${DVC[@]}" push
step clone "$work" "" "" git clone -q "$PROJECT" "$work/clone"
if [ -d "$work/clone" ]; then
  step pull "$work/clone" "" "" "${DVC[@]}" pull
  step status "$work/clone" "Data and pipelines are up to date" "" "${DVC[@]}" status
  step repro "$work/clone" "" "Running stage" "${DVC[@]}" repro
  step checkout "$work/clone" "" "" "${DVC[@]}" checkout
fi

echo "== team road: each step's exit code and duration (wall clock) =="
printf '%s\n' "${results[@]}"
if [ "$failed" -ne 0 ]; then
  echo "team road: FAILED"
  exit 1
fi
echo "team road: every step exits 0, no warning; the clone is up to date and reruns nothing"
