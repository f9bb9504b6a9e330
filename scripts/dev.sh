#!/usr/bin/env bash
# Runs the whole system on this machine: installs the local servers if missing, starts
# nats-server (JetStream) and the Mongo-wire server on loopback, builds `mozaiks`, and runs
# every role in one process (`mozaiks all`) on http://127.0.0.1:8000.
#
# NATS_URL / MONGO_URI, when set, point at existing servers instead.
# JWT_SECRET, when set, is used; otherwise development mode (MOZAIKS_DEV=1) with a built-in secret.
# MOZAIKS_CORS_ORIGINS: browser origins every app may call from (default: the example app's,
# http://127.0.0.1:3000 and http://localhost:3000; see examples/chat-app).
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
export MOZAIKS_CORS_ORIGINS="${MOZAIKS_CORS_ORIGINS-http://127.0.0.1:3000,http://localhost:3000}"

echo "dev.sh: building mozaiks (the first build takes a few minutes; cargo shows its progress)..." >&2
cargo build --bin mozaiks
BIN="$REPO/target/debug/mozaiks"
TOKEN="$("$BIN" token --sub dev-user --roles user,admin)"
BASE="http://$MOZAIKS_LISTEN"
if [[ -n "${JWT_SECRET:-}" ]]; then
    TOKEN_CMD="JWT_SECRET=... $BIN token --sub alice --roles user"
else
    TOKEN_CMD="MOZAIKS_DEV=1 $BIN token --sub alice --roles user"
fi

cat <<MSG

  Mozaiks is starting on $BASE  (NATS $NATS_URL, Mongo $MONGO_URI)

  Open the chat page (a user token for app "default", user dev-user, roles user+admin, 1 hour):
    $BASE/chat#token=$TOKEN

  In another terminal:
    export TOKEN=$TOKEN
    # another user's token:  $TOKEN_CMD

  Start a session (answers {chat_id, ws_url, runtime_token, expires_at, ...}):
    curl -s -X POST $BASE/api/sessions -H "Authorization: Bearer \$TOKEN" \\
         -H 'content-type: application/json' \\
         -d '{"app_id":"default","workflow_name":"hello","message":"Hi!"}'

  Then stream its events as AG-UI events over SSE (replays everything, then live; Ctrl-C to stop):
    curl -N "$BASE/api/agui/default/<chat_id>?token=<runtime_token>"
  or as WebSocket frames, and send a message (Node 20.10+):
    node --experimental-websocket -e 'const w=new WebSocket(process.argv[1]);w.onmessage=e=>console.log(e.data);w.onopen=()=>w.send(JSON.stringify({type:"user.message",text:"hello again",client_msg_id:"m1"}))' "<ws_url>?token=<runtime_token>&after=0"

  Read models:  curl -s $BASE/api/sessions/<chat_id>/messages -H "Authorization: Bearer \$TOKEN"
  Usage:        curl -s $BASE/api/usage/default -H "Authorization: Bearer \$TOKEN"
  Health:       curl -s $BASE/health/ready      Metrics: curl -s $BASE/metrics

  Stop: Ctrl-C here stops mozaiks; \`scripts/servers.sh down\` stops NATS and the Mongo-wire server
  (their data stays in .data/ until you delete it).

MSG
exec "$BIN" all
