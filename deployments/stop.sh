#!/usr/bin/env bash
# Take down what deployments/serve.sh started: the resumer, the worker (and the flow runs it spawned),
# then the server. Each was started in its own session, so its process group is ended by its recorded PID.
set -uo pipefail
cd "$(dirname "$0")/.."
STATE="${MOEGEN_PREFECT_DIR:-$(pwd)/runs/prefect}"

stop() {
    local name="$1" pidfile="$STATE/$1.pid"
    [ -f "$pidfile" ] || { echo "$name: not running (no $pidfile)"; return; }
    local pid; pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
        echo "$name: stopped (pid $pid)"
    else
        echo "$name: was not running"
    fi
    rm -f "$pidfile"
}

stop resumer
stop worker
stop server
