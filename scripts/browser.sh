#!/usr/bin/env bash
# Installs the headless browser the ChatUI browser tests drive: Debian's `chromium` package at
# /usr/bin/chromium (Playwright drives it through playwright-core; no browser is downloaded).
#
#   scripts/browser.sh install   apt-get install chromium, unless /usr/bin/chromium exists
#   scripts/browser.sh path      print the browser's path (CHROMIUM_PATH wins)
#
# CHROMIUM_PATH, when set, names another Chromium-family binary and nothing is installed.
# Installing needs root (as on CI) or sudo.
set -euo pipefail

BIN="${CHROMIUM_PATH:-/usr/bin/chromium}"

log() { echo "browser.sh: $*" >&2; }

cmd_install() {
    if [[ -x "$BIN" ]]; then return 0; fi
    if [[ -n "${CHROMIUM_PATH:-}" ]]; then
        log "error: CHROMIUM_PATH=$CHROMIUM_PATH is not an executable"
        exit 1
    fi
    command -v apt-get >/dev/null 2>&1 || {
        log "error: /usr/bin/chromium is missing and apt-get is not available; install Chromium and set CHROMIUM_PATH"
        exit 1
    }
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || { log "error: installing chromium needs root or sudo"; exit 1; }
        sudo="sudo"
    fi
    log "installing Debian's chromium with apt-get (once; about 100 MB)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    [[ -x "$BIN" ]] || { log "error: apt-get succeeded but $BIN is missing"; exit 1; }
    log "installed $("$BIN" --version 2>/dev/null || echo "$BIN")"
}

case "${1:-}" in
    install) cmd_install ;;
    path) echo "$BIN" ;;
    *)
        echo "usage: $0 {install|path}" >&2
        exit 2
        ;;
esac
