#!/usr/bin/env bash
# Bring the local Prefect stack up on this machine: a Prefect server on 127.0.0.1, the process
# work pool, every deployment of deployments/prefect.yaml, a worker, and the crashed-run resumer
# (deployments/resume_crashed.py). Logs and PIDs go to
# runs/prefect/; deployments/stop.sh takes it all down again.
#
# Settings (environment): PREFECT_PORT (4200), MOEGEN_PREFECT_DIR (runs/prefect: logs, pids,
# env.sh), PREFECT_HOME (<that dir>/home: the server's database), VENV (.venv), MOEGEN_RESULTS_URL
# (the results database every flow run records into; default SQLite at <repo>/results/moegen.db).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="${VENV:-$REPO/.venv}"
PREFECT="$VENV/bin/prefect"
PY="$VENV/bin/python"
PORT="${PREFECT_PORT:-4200}"
POOL=moegen-local              # the pool deployments/prefect.yaml names
STATE="${MOEGEN_PREFECT_DIR:-$REPO/runs/prefect}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"

export MOEGEN_REPO="$REPO"
# absolute, so flow runs (which work from $REPO) and later shells (env.sh, anywhere) share one database
export MOEGEN_RESULTS_URL="${MOEGEN_RESULTS_URL:-sqlite:///$REPO/results/moegen.db}"
export PREFECT_HOME="${PREFECT_HOME:-$STATE/home}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

[ -x "$PREFECT" ] || { echo "serve.sh: $PREFECT not found; run 'make install' first" >&2; exit 1; }

healthy() {
    "$PY" - "$PREFECT_API_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
EOF
}

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

# start NAME CMD...: run CMD in its own session (so stop.sh can end it and its children), log and pid in $STATE
start() {
    local name="$1"; shift
    setsid nohup "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
    echo $! >"$STATE/$name.pid"
}

if healthy; then
    echo "server: already up at $PREFECT_API_URL"
else
    echo "server: starting on 127.0.0.1:$PORT (log $STATE/server.log)"
    start server "$PREFECT" server start --host 127.0.0.1 --port "$PORT"
    for _ in $(seq 1 180); do
        healthy && break
        alive server || { echo "serve.sh: the server exited; see $STATE/server.log" >&2; tail -20 "$STATE/server.log" >&2; exit 1; }
        sleep 1
    done
    healthy || { echo "serve.sh: the server did not become healthy in 180 s; see $STATE/server.log" >&2; exit 1; }
    echo "server: healthy"
fi

"$PREFECT" work-pool create "$POOL" --type process --overwrite >/dev/null
echo "work pool: $POOL (process)"

"$PREFECT" --no-prompt deploy --all --prefect-file deployments/prefect.yaml \
    >"$STATE/deploy.log" 2>&1 || { echo "serve.sh: prefect deploy failed; see $STATE/deploy.log" >&2; tail -30 "$STATE/deploy.log" >&2; exit 1; }
"$PREFECT" deployment ls 2>/dev/null | grep -E "eval/|bench/|generate/" || true
# crashed runs of the deployments tagged resume-on-crash are scheduled again (and so resume)
"$PY" deployments/automations.py deployments/automations.yaml \
    || { echo "serve.sh: creating the automations of deployments/automations.yaml failed" >&2; exit 1; }

if alive worker; then
    echo "worker: already running (pid $(cat "$STATE/worker.pid"))"
else
    start worker "$PREFECT" worker start --pool "$POOL" --name "$POOL-$(hostname)"
    echo "worker: started on pool $POOL (log $STATE/worker.log)"
fi

# the automation's fallback: a crashed run whose Crashed event the server lost is scheduled again too
if alive resumer; then
    echo "resumer: already running (pid $(cat "$STATE/resumer.pid"))"
else
    start resumer "$PY" deployments/resume_crashed.py
    echo "resumer: started (log $STATE/resumer.log)"
fi

cat >"$STATE/env.sh" <<EOF
export PREFECT_API_URL=$PREFECT_API_URL
export MOEGEN_RESULTS_URL='$MOEGEN_RESULTS_URL'
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
EOF

cat <<EOF

The moegen Prefect stack is up.
  UI / API:   http://127.0.0.1:$PORT  (API $PREFECT_API_URL)
  Run one:    source $STATE/env.sh && $PREFECT deployment run eval/mixtral --watch
              (parameters: -p limit=4 -p num_fewshot=0; nightly bench: bench/nightly; example: generate/gsm8k)
  Results:    $MOEGEN_RESULTS_URL  (moegen results --last 5, after sourcing env.sh)
  Schedules:  bench/nightly's runs appear as Scheduled within a minute: $PREFECT flow-run ls --state SCHEDULED
  Logs:       $STATE/server.log, $STATE/worker.log
  Stop:       ${MOEGEN_PREFECT_DIR:+MOEGEN_PREFECT_DIR=$STATE }deployments/stop.sh
EOF
