#!/usr/bin/env bash
# Runs the fault-injection suite (tests/faults): the kill matrix (workers, gateways, projector
# and billing killed and restarted, a gateway drained, the Mongo-wire server stalled,
# nats-server restarted, under load from clients that reconnect across gateways) and the
# three-node NATS cluster that loses a node. It starts its own servers and processes.
#
#   scripts/faults.sh                  the bounded run (as in CI, a few minutes)
#   scripts/faults.sh long             MOZAIKS_FAULTS=long: more load, longer phases, 3 rounds
#   MOZAIKS_FAULTS_PHASES=worker,nats scripts/faults.sh    only these phases of the matrix
#                                      (worker, gateway, drain, projector, billing, mongo, nats)
#
# Extra arguments after the mode go to the test runner (e.g. a test name filter).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ "${1:-}" == "long" ]]; then
    export MOZAIKS_FAULTS=long
    shift
fi
scripts/servers.sh install
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --test faults --no-capture "$@"
else
    cargo test --test faults -- --nocapture --test-threads=1 "$@"
fi
