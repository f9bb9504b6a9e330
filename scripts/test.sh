#!/usr/bin/env bash
# Runs every test: the TypeScript clients (lint, types, unit tests, the embedded chat page's
# freshness), unit tests of every crate and the end-to-end tests, which start their own
# nats-server and Mongo-wire server on free loopback ports (installed into .tools/ on first use),
# and the chat page's browser tests in headless Chromium (Debian's `chromium`, installed by
# scripts/browser.sh) against a fleet of `mozaiks` processes.
# Set NATS_URL / MONGO_URI to run the Rust tests against other servers (each test still uses a
# fresh namespace and database). Arguments go to cargo nextest (or cargo test).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

step() { echo "test.sh: == $* ==" >&2; }

step "servers and browser"
scripts/servers.sh install
scripts/browser.sh install
scripts/prometheus.sh install

step "deploy: alert rules (promtool test rules), compose schema, dashboards, Kubernetes manifests"
scripts/deploy_check.sh

command -v node >/dev/null 2>&1 || { echo "test.sh: node (20.19 or later) and npm are needed for clients/" >&2; exit 1; }
step "clients: npm ci"
(cd clients && npm ci --no-audit --no-fund --loglevel=error)
step "clients: lint (biome)"
(cd clients && npm run --silent lint)
step "clients: typecheck (tsc)"
(cd clients && npm run --silent typecheck)
step "clients: generated types and embedded page are up to date"
(cd clients && npm run --silent gen:check && npm run --silent embed:check)
step "clients: unit tests (vitest)"
(cd clients && npm run --silent test)

step "cargo build --bin mozaiks"
cargo build --bin mozaiks
step "clients: browser tests (headless chromium, two gateways behind a proxy)"
(cd clients && npm run --silent test:browser)

step "cargo tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
step "doc tests"
cargo test --workspace --doc --quiet
