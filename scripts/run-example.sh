#!/usr/bin/env bash
# `make run`: start the control plane on its embedded defaults (SQLite + a local Ray head under
# $HUTCH_DATA_DIR), submit the digits example with the CLI, show its progress and result, and
# stop the service (which stops its Ray head) however this script ends.
set -euo pipefail

BIN=${BIN:-.venv/bin}
PORT=${HUTCH_PORT:-8000}
SPEC=${1:-examples/digits-adahessian.yaml}
export HUTCH_DATA_DIR=${HUTCH_DATA_DIR:-$HOME/.hutch}
export HUTCH_URL=http://127.0.0.1:$PORT
mkdir -p "$HUTCH_DATA_DIR"
LOG=$HUTCH_DATA_DIR/serve.log

echo "starting the control plane on $HUTCH_URL (log: $LOG)"
"$BIN/hutch" serve --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
stop() {
  echo "stopping the control plane"
  kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
}
trap stop EXIT

"$BIN/python" - "$SERVER" <<'PY'
import os, sys, time
import httpx

url, server, deadline = os.environ["HUTCH_URL"], int(sys.argv[1]), time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(server, 0)
    except ProcessLookupError:
        sys.exit(f"the control plane exited; see {os.environ['HUTCH_DATA_DIR']}/serve.log")
    try:
        if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit("the control plane did not become ready in 180 s")
PY

"$BIN/hutch" submit "$SPEC" --wait
