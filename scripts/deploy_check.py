#!/usr/bin/env python3
"""Offline checks of deploy/ and compose/ (run by scripts/deploy_check.sh with .tools/venv):

- compose/*.yml against the Compose specification's JSON Schema, pinned in
  compose/schema/compose-spec.json (compose-spec/compose-spec, schema/compose-spec.json), after
  YAML anchors and merge keys are resolved; every healthcheck uses an endpoint the binary serves;
- deploy/grafana/dashboards/*.json are what deploy/grafana/generate.py writes;
- deploy/k8s: every manifest of the base and of each overlay, as kustomize renders it (given as
  files on the command line by the shell script), against Kubernetes' schemas
  (kubernetes-validate, strict), plus the rules of issue 14 that a schema cannot check.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
errors = []


def fail(msg):
    errors.append(msg)
    print(f"deploy_check: FAIL {msg}", file=sys.stderr)


def check_compose():
    schema = json.loads((REPO / "compose/schema/compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    files = sorted((REPO / "compose").glob("docker-compose*.yml"))
    if not files:
        fail("no compose files")
    for f in files:
        doc = yaml.safe_load(f.read_text())
        problems = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        for e in problems:
            fail(f"{f.relative_to(REPO)}: {'/'.join(map(str, e.path))}: {e.message}")
        for name, svc in (doc.get("services") or {}).items():
            hc = svc.get("healthcheck")
            if not hc:
                if name != "mongo-init":
                    fail(f"{f.relative_to(REPO)}: service {name} has no healthcheck")
                continue
            test = " ".join(hc["test"]) if isinstance(hc["test"], list) else hc["test"]
            if "mozaiks" in test and "/health/ready" not in test:
                fail(f"{f.relative_to(REPO)}: {name}'s healthcheck does not probe /health/ready")
            build = svc.get("build")
            if build and (f.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() != REPO / "Dockerfile":
                fail(f"{f.relative_to(REPO)}: {name} is not built from the top-level Dockerfile")
            for v in svc.get("volumes", []):
                src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
                if src.startswith("."):
                    if not (f.parent / src).exists():
                        fail(f"{f.relative_to(REPO)}: {name} mounts {src}, which does not exist")
        if not any("monitoring" in (s.get("profiles") or []) for s in doc["services"].values()):
            fail(f"{f.relative_to(REPO)}: no `monitoring` profile")
        print(f"deploy_check: ok {f.relative_to(REPO)} ({len(doc['services'])} services)")


def check_dockerfile():
    """The image's Dockerfile: multi-stage, pinned bases, a non-root numeric user, the binary as
    entrypoint, the git commit passed to the build. (Building it needs a Docker daemon.)"""
    lines = [l.strip() for l in (REPO / "Dockerfile").read_text().splitlines()]
    # Base images given as build arguments are checked by their defaults (ARG NAME=default).
    defaults = dict(
        l.split(None, 1)[1].split("=", 1) for l in lines if l.upper().startswith("ARG ") and "=" in l
    )
    froms = [l.split()[1] for l in lines if l.upper().startswith("FROM ")]
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), f) for f in froms]
    if len(froms) < 2:
        fail("Dockerfile: not a multi-stage build")
    for image in froms:
        if ":" not in image or image.endswith(":latest"):
            fail(f"Dockerfile: base image {image} is not pinned to a tag")
    users = [l.split()[1] for l in lines if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root") or not users[-1].split(":")[0].isdigit():
        fail("Dockerfile: the final stage does not run as a numeric non-root user")
    if not any(l.startswith("ENTRYPOINT") and "mozaiks" in l for l in lines):
        fail("Dockerfile: the entrypoint is not the mozaiks binary")
    if not any(l.startswith("ARG MOZAIKS_GIT_COMMIT") for l in lines):
        fail("Dockerfile: no MOZAIKS_GIT_COMMIT build argument (mozaiks --version, mozaiks_build_info)")
    ignored = [l for l in (REPO / ".dockerignore").read_text().split() if not l.startswith("#")]
    for need in ("target", ".git"):
        if need not in ignored:
            fail(f".dockerignore: {need} is sent to the build")
    # What the runtime stage copies out of the build context (/src) must exist in the repository
    # and must not be kept out of the context by .dockerignore.
    workdir = next((l.split()[1] for l in lines if l.upper().startswith("WORKDIR ")), "/")
    for l in lines:
        if not l.upper().startswith("COPY --FROM=BUILD "):
            continue
        src = [w for w in l.split()[1:] if not w.startswith("--")][0]
        if not src.startswith(workdir.rstrip("/") + "/"):
            continue  # made in the build stage (the binary, /var/lib/mozaiks)
        rel = src[len(workdir.rstrip("/")) + 1 :]
        if not (REPO / rel).exists():
            fail(f"Dockerfile: copies {src}, but {rel} is not in the repository")
        if rel.split("/")[0] in ignored:
            fail(f"Dockerfile: copies {src}, but .dockerignore keeps {rel} out of the context")
    cmd = next((l for l in reversed(lines) if l.upper().startswith("CMD ")), "")
    roles = ("all", "gateway", "worker", "projector", "billing", "ops")
    if not any(f'"{r}"' in cmd for r in roles):
        fail(f"Dockerfile: the default command ({cmd or 'none'}) is not a role")
    print("deploy_check: ok Dockerfile")


def check_dashboards():
    r = subprocess.run([sys.executable, str(REPO / "deploy/grafana/generate.py"), "--check"])
    if r.returncode != 0:
        fail("deploy/grafana/dashboards drift from generate.py")
    else:
        print("deploy_check: ok deploy/grafana/dashboards")


def check_k8s(rendered, rules=True):
    from kubernetes_validate import validate, ValidationError

    for path in rendered:
        text = (REPO / path).read_text() if not Path(path).is_absolute() else Path(path).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        kinds = {}
        for d in docs:
            kinds.setdefault(d["kind"], []).append(d)
            if d["kind"] in ("ScaledObject",):
                # A CRD (KEDA): checked by shape below, not by Kubernetes' schemas.
                continue
            try:
                validate(d, "1.37.0", strict=True)
            except ValidationError as e:
                fail(f"{path}: {d['kind']}/{d['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # an unknown kind or version
                fail(f"{path}: {d['kind']}/{d['metadata'].get('name')}: {e}")
        if rules:
            check_k8s_rules(path, kinds)
        print(f"deploy_check: ok {path} ({len(docs)} resources)")


def check_k8s_rules(path, kinds):
    deployments = kinds.get("Deployment", [])
    roles = {d["metadata"]["labels"].get("app.kubernetes.io/component") for d in deployments}
    for role in ("gateway", "worker", "projector", "billing", "ops"):
        if role not in roles:
            fail(f"{path}: no Deployment for role {role}")
    for d in deployments:
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        pod_sc = spec.get("securityContext", {})
        if not pod_sc.get("runAsNonRoot"):
            fail(f"{path}: {name} does not set runAsNonRoot")
        for c in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                p = c.get(probe, {}).get("httpGet", {}).get("path")
                want = "/health/live" if probe == "livenessProbe" else "/health/ready"
                if p != want:
                    fail(f"{path}: {name} {probe} is {p}, not {want}")
            if not c.get("resources", {}).get("requests") or not c["resources"].get("limits"):
                fail(f"{path}: {name} has no resource requests and limits")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or not sc.get("readOnlyRootFilesystem"):
                fail(f"{path}: {name} may escalate privileges or write its root filesystem")
            for e in c.get("env", []):
                if e["name"] in ("JWT_SECRET", "OPENAI_API_KEY", "MOZAIKS_METRICS_TOKEN", "MONGO_URI") and "secretKeyRef" not in e.get("valueFrom", {}):
                    fail(f"{path}: {name} sets {e['name']} without a secretKeyRef")
    for s in kinds.get("Service", []):
        if s["metadata"]["name"].endswith("gateway") and s["spec"].get("sessionAffinity", "None") != "None":
            fail(f"{path}: the gateway Service has session affinity")
    for need in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Ingress", "ScaledObject"):
        if need not in kinds:
            fail(f"{path}: no {need}")
    for so in kinds.get("ScaledObject", []):
        triggers = so["spec"].get("triggers", [])
        if not any(t.get("type") == "nats-jetstream" and t["metadata"].get("consumer") for t in triggers):
            fail(f"{path}: ScaledObject {so['metadata']['name']} does not scale on a JetStream consumer")
    for hpa in kinds.get("HorizontalPodAutoscaler", []):
        metrics = hpa["spec"].get("metrics", [])
        types = {m["type"] for m in metrics}
        if not {"Resource", "Pods"} <= types:
            fail(f"{path}: HPA {hpa['metadata']['name']} does not scale on CPU and on connections per pod")


def check_values():
    """Helm values and the Kubernetes scrape configuration: they parse, and say what they must."""
    nats = yaml.safe_load((REPO / "deploy/k8s/nats/values.yaml").read_text())
    c = nats["config"]
    if not (c["cluster"]["enabled"] and c["cluster"]["replicas"] == 3 and c["jetstream"]["enabled"]):
        fail("deploy/k8s/nats/values.yaml: not a three-node JetStream cluster")
    adapter = yaml.safe_load((REPO / "deploy/k8s/monitoring/prometheus-adapter-values.yaml").read_text())
    if not any("mozaiks_active_connections" in r["seriesQuery"] for r in adapter["rules"]["custom"]):
        fail("prometheus-adapter-values.yaml: no rule for mozaiks_active_connections")
    scrape = yaml.safe_load((REPO / "deploy/k8s/monitoring/prometheus-scrape.yml").read_text())
    job = scrape["scrape_configs"][0]
    if "credentials_file" not in job.get("authorization", {}):
        fail("prometheus-scrape.yml: the scrape does not send the metrics token")
    print("deploy_check: ok deploy/k8s/nats, deploy/k8s/monitoring")


def main():
    args = sys.argv[1:]
    check_compose()
    check_dockerfile()
    check_dashboards()
    check_values()
    if args:
        check_k8s(args)
        # Manifests outside the kustomizations: by their schemas only.
        check_k8s([str(p.relative_to(REPO)) for p in sorted((REPO / "deploy/k8s").glob("overlays/*/*.example.yaml"))], rules=False)
    if errors:
        print(f"deploy_check: {len(errors)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print("deploy_check: all checks passed")


if __name__ == "__main__":
    main()
