#!/usr/bin/env bash
# Installs Prometheus for the tests of deploy/: Debian's `prometheus` package gives
# /usr/bin/prometheus (the dashboard test scrapes a live fleet with it) and /usr/bin/promtool
# (`promtool check rules` / `promtool test rules` on deploy/prometheus/).
#
#   scripts/prometheus.sh install   apt-get install prometheus, unless promtool and prometheus exist
#   scripts/prometheus.sh path      print the directory of both binaries (PROMETHEUS_BIN_DIR wins)
#   scripts/prometheus.sh test      check the configuration and unit-test the alert rules
#
# PROMETHEUS_BIN_DIR, when set, names another directory holding `prometheus` and `promtool`
# and nothing is installed. Installing needs root (as on CI) or sudo. The package's own service
# is not started (policy-rc.d refuses it; the tests run their own Prometheus).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${PROMETHEUS_BIN_DIR:-/usr/bin}"

log() { echo "prometheus.sh: $*" >&2; }

cmd_install() {
    if [[ -x "$DIR/promtool" && -x "$DIR/prometheus" ]]; then return 0; fi
    if [[ -n "${PROMETHEUS_BIN_DIR:-}" ]]; then
        log "error: PROMETHEUS_BIN_DIR=$PROMETHEUS_BIN_DIR does not hold executable prometheus and promtool"
        exit 1
    fi
    command -v apt-get >/dev/null 2>&1 || {
        log "error: promtool is missing and apt-get is not available; install Prometheus and set PROMETHEUS_BIN_DIR"
        exit 1
    }
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { log "error: installing prometheus needs root or sudo"; exit 1; }
        sudo="sudo"
    fi
    log "installing Debian's prometheus with apt-get (once; about 100 MB)"
    # The package would start its service in a container with an init; nothing should run.
    local policy=/usr/sbin/policy-rc.d created=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null
        $sudo chmod +x $policy
        created=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    if [[ -n $created ]]; then $sudo rm -f $policy; fi
    [[ -x "$DIR/promtool" ]] || { log "error: apt-get succeeded but $DIR/promtool is missing"; exit 1; }
    log "installed $("$DIR/prometheus" --version 2>&1 | head -1)"
}

cmd_test() {
    cmd_install
    local p="$REPO/deploy/prometheus"
    "$DIR/promtool" check rules "$p"/rules/*.yml
    "$DIR/promtool" check config --syntax-only "$p/prometheus.yml" "$p/prometheus-prod.yml"
    "$DIR/promtool" test rules "$p"/tests/*.yml
}

case "${1:-}" in
    install) cmd_install ;;
    path) echo "$DIR" ;;
    test) cmd_test ;;
    *)
        echo "usage: $0 {install|path|test}" >&2
        exit 2
        ;;
esac
