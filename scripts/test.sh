#!/usr/bin/env bash
# Runs every test: unit tests of every crate and the end-to-end tests, which start their own
# nats-server and Mongo-wire server on free loopback ports (installed into .tools/ on first use).
# Set NATS_URL / MONGO_URI to run the same tests against other servers (each test still uses a
# fresh namespace and database).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

scripts/servers.sh install
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
cargo test --workspace --doc --quiet
