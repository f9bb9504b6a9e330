#!/usr/bin/env bash
# Runs the whole system on this machine: installs the local servers if missing, starts
# nats-server (JetStream) and the Mongo-wire server on loopback, builds `mozaiks`, and runs
# every role in one process (`mozaiks all`) on http://127.0.0.1:8000.
#
# NATS_URL / MONGO_URI, when set, point at existing servers instead.
# JWT_SECRET, when set, is used; otherwise development mode (MOZAIKS_DEV=1) with a built-in secret.
# Stop with Ctrl-C; the servers keep running (stop them with `scripts/servers.sh down`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

eval "$(scripts/servers.sh up)"
export NATS_URL MONGO_URI
if [[ -z "${JWT_SECRET:-}" ]]; then
    export MOZAIKS_DEV=1
fi
export MOZAIKS_LISTEN="${MOZAIKS_LISTEN:-127.0.0.1:8000}"
export MOZAIKS_WORKFLOWS_DIR="${MOZAIKS_WORKFLOWS_DIR:-$REPO/workflows}"

echo "dev.sh: building mozaiks (the first build takes a few minutes)..." >&2
cargo build --quiet --bin mozaiks
BIN="$REPO/target/debug/mozaiks"
TOKEN="$("$BIN" token --sub dev-user --roles user,admin)"
BASE="http://$MOZAIKS_LISTEN"

cat <<MSG

  Mozaiks is starting on $BASE  (NATS $NATS_URL, Mongo $MONGO_URI)

  A user token for app "default" (user dev-user, roles user+admin, 1 hour):
    export TOKEN=$TOKEN

  Start a session (answers {chat_id, ws_url, runtime_token, expires_at, ...}):
    curl -s -X POST $BASE/api/sessions -H "Authorization: Bearer \$TOKEN" \\
         -H 'content-type: application/json' \\
         -d '{"app_id":"default","workflow_name":"hello","message":"Hi!"}'

  Then stream its events (replays everything after seq N, then live):
    <ws_url>?token=<runtime_token>&after=0
    e.g. websocat "ws://$MOZAIKS_LISTEN/ws/hello/default/<chat_id>/dev-user?token=<runtime_token>&after=0"
    and send:  {"type":"user.message","text":"hello again","client_msg_id":"m1"}

  Read models:  curl -s $BASE/api/sessions/<chat_id>/messages -H "Authorization: Bearer \$TOKEN"
  Usage:        curl -s $BASE/api/usage/default -H "Authorization: Bearer \$TOKEN"
  Health:       curl -s $BASE/health/ready      Metrics: curl -s $BASE/metrics

MSG
exec "$BIN" all
