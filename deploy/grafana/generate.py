#!/usr/bin/env python3
"""Writes the Grafana dashboards of deploy/grafana/dashboards/ (run it after editing a panel:
`python3 deploy/grafana/generate.py`; `--check` fails when the JSON files drift from this file).

Every panel's query names metrics the `mozaiks` binary exports; tests/e2e/dashboards.rs has a
real Prometheus scrape a fleet under load and evaluates each query. `$app_id` is a multi-value
variable (all apps by default); `$__rate_interval` is Grafana's rate window.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
APP = 'app_id=~"$app_id"'


def panel(title, exprs, unit="short", kind="timeseries", legend=None, desc="", w=12, h=8):
    if isinstance(exprs, str):
        exprs = [exprs]
    targets = []
    for i, e in enumerate(exprs):
        if isinstance(e, tuple):
            e, fmt = e
        else:
            fmt = legend or ""
        targets.append({"refId": chr(65 + i), "expr": e, "legendFormat": fmt, "datasource": DS})
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "gridPos": {"w": w, "h": h},
    }


def dashboard(uid, title, desc, panels, app_variable=True):
    y = x = 0
    out = []
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + h
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i + 1
        x += w
        out.append(p)
    variables = [{
        "name": "datasource", "label": "Prometheus", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0,
    }]
    if app_variable:
        variables.append({
            "name": "app_id", "label": "app_id", "type": "query", "datasource": DS,
            "query": {"query": "label_values(mozaiks_runs_started_total, app_id)", "refId": "app_id"},
            "definition": "label_values(mozaiks_runs_started_total, app_id)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        })
    return {
        "uid": uid,
        "title": title,
        "description": desc,
        "tags": ["mozaiks"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": out,
    }


def p95(metric, by="le", match=""):
    sel = "{" + match + "}" if match else ""
    return f"histogram_quantile(0.95, sum by ({by}) (rate({metric}_bucket{sel}[$__rate_interval])))"


FLEET = dashboard(
    "mozaiks-fleet", "Mozaiks / Fleet",
    "The seeds' five operator dashboards, fleet-wide and per app_id (the app_id variable; apps "
    "beyond MOZAIKS_METRICS_TOP_APPS are `other`).",
    [
        panel("Active WebSockets", [(f"sum(mozaiks_active_connections{{{APP}}})", "fleet"),
                                    (f"sum by (instance) (mozaiks_active_connections{{{APP}}})", "{{instance}}")],
              desc="Open WebSockets, fleet-wide and by gateway replica. Alert above 5000."),
        panel("Active WebSockets: top apps",
              f"topk(10, sum by (app_id) (mozaiks_active_connections{{{APP}}}))", legend="{{app_id}}"),
        panel("Concurrent runs", [(f"sum(mozaiks_active_runs{{{APP}}})", "fleet"),
                                  (f"sum by (instance) (mozaiks_active_runs{{{APP}}})", "{{instance}}")],
              desc="Workflow runs executing now, fleet-wide and by worker."),
        panel("Concurrent runs: top apps (share of the fleet)",
              f"topk(10, sum by (app_id) (mozaiks_active_runs{{{APP}}}) / scalar(sum(mozaiks_active_runs) > 0))",
              unit="percentunit", legend="{{app_id}}",
              desc="An app above 40 % of the active runs fires MozaiksNoisyNeighbour."),
        panel("Error rate (failed runs per minute)",
              [(f"sum(rate(mozaiks_workflow_errors_total{{{APP}}}[$__rate_interval])) * 60", "failed / min"),
               (f"sum(rate(mozaiks_runs_ended_total{{outcome=\"failed\",{APP}}}[$__rate_interval]))"
                f" / sum(rate(mozaiks_runs_ended_total{{{APP}}}[$__rate_interval]))", "share failed")],
              desc="mozaiks_workflow_errors_total is the seeds' name. Alert above 10 a minute."),
        panel("Runs ended by outcome: top apps",
              f"topk(10, sum by (app_id, outcome) (rate(mozaiks_runs_ended_total{{{APP}}}[$__rate_interval])))",
              unit="ops", legend="{{app_id}} {{outcome}}"),
        panel("HTTP answers per second by status class",
              "sum by (status) (rate(mozaiks_http_requests_total[$__rate_interval]))", unit="ops",
              legend="{{status}}",
              desc="Every HTTP answer of the gateways (fleet-wide: the metric has no app_id)."),
        panel("HTTP requests per second: top routes",
              "topk(10, sum by (method, route, status) (rate(mozaiks_http_requests_total[$__rate_interval])))",
              unit="ops", legend="{{method}} {{route}} {{status}}",
              desc="By route template (never the concrete path); unmatched: paths no route takes."),
        panel("Session start latency p95", [(p95("mozaiks_session_start_seconds"), "p95"),
                                            (p95("mozaiks_session_start_seconds", "le, instance"), "{{instance}}")],
              unit="s", desc="POST /api/sessions, by gateway."),
        panel("MongoDB latency p95", [(p95("mozaiks_mongodb_latency_seconds"), "p95"),
                                      (p95("mozaiks_mongodb_latency_seconds", "le, op"), "{{op}}")],
              unit="s", desc="Every Mongo call (the seeds' name). Alert above 1 s."),
        panel("LLM latency p95", p95("mozaiks_llm_latency_seconds", "le, model"), unit="s",
              legend="{{model}}", desc="Alert above 10 s."),
        panel("Cost: tokens billed per minute, top apps",
              f"topk(10, sum by (app_id) (rate(mozaiks_billing_tokens_total{{{APP}}}[$__rate_interval]))) * 60",
              legend="{{app_id}}", desc="Tokens on the usage ledger (billing), by app."),
        panel("Cost: tokens used per minute by kind",
              f"sum by (kind) (rate(mozaiks_tokens_total{{{APP}}}[$__rate_interval])) * 60",
              legend="{{kind}}", desc="Prompt and completion tokens the workers' model calls used."),
        panel("Storage: documents per app, top apps",
              f"topk(10, max by (app_id) (sum by (app_id, instance) (mozaiks_storage_documents{{{APP}}})))",
              legend="{{app_id}}",
              desc="Documents of each app in its database (sessions, messages, charges, runs, ledger), measured by projectors every MOZAIKS_METRICS_STORAGE_SECONDS."),
        panel("Storage: bytes per app, top apps",
              f"topk(10, max by (app_id) (sum by (app_id, instance) (mozaiks_storage_bytes{{{APP}}})))",
              unit="bytes", legend="{{app_id}}",
              desc="Bytes of each app's read models: the measure GET /api/usage answers as storage_bytes."),
        panel("Storage: documents by collection",
              f"max by (collection) (sum by (collection, instance) (mozaiks_storage_documents{{{APP}}}))",
              legend="{{collection}}"),
        panel("Storage: events and documents written per minute",
              [("sum(rate(mozaiks_projector_events_total[$__rate_interval])) * 60", "events projected"),
               ("sum by (op) (rate(mozaiks_mongo_write_seconds_count[$__rate_interval])) * 60", "{{op}} writes")],
              desc="How fast the read models grow: events projected into chat_sessions/chat_messages and Mongo writes by operation."),
        panel("Sessions started per minute, top apps",
              f"topk(10, sum by (app_id) (rate(mozaiks_sessions_started_total{{{APP}}}[$__rate_interval]))) * 60",
              legend="{{app_id}}"),
        panel("Up", 'up{job=~"mozaiks.*"}', kind="stat", legend="{{instance}}", w=12),
    ],
)

RUNTIME = dashboard(
    "mozaiks-runtime", "Mozaiks / Runtime",
    "The runtime's own health: the log, the projector, billing, resume and replay, slow consumers.",
    [
        panel("Log append latency p95", [(p95("mozaiks_bus_append_seconds"), "p95"),
                                         (p95("mozaiks_bus_append_seconds", "le, instance"), "{{instance}}")],
              unit="s", desc="A chat's event appended to MZ_EVT (expected-last-subject-sequence)."),
        panel("Log appends and conflicts per second",
              [("sum(rate(mozaiks_bus_appends_total[$__rate_interval]))", "appends")],
              unit="ops"),
        panel("Projector lag", [('max(mozaiks_consumer_pending_messages{consumer="projector"})', "pending"),
                                ('max(mozaiks_consumer_ack_pending_messages{consumer="projector"})', "in flight")],
              desc="Events of MZ_EVT not yet in the read models. Alert above 10000 for 5 minutes."),
        panel("Projector throughput and batch p95",
              [("sum(rate(mozaiks_projector_events_total[$__rate_interval]))", "events/s"),
               (p95("mozaiks_projector_batch_seconds"), "batch p95 (s)")]),
        panel("Billing lag", [('max(mozaiks_consumer_pending_messages{consumer="billing"})', "pending"),
                              ('max(mozaiks_consumer_ack_pending_messages{consumer="billing"})', "in flight")],
              desc="Charges of MZ_USAGE not yet on the ledger. Alert above 5000 for 5 minutes."),
        panel("Billing: charges per second and apply p95",
              [(f"sum(rate(mozaiks_billing_charges_total{{{APP}}}[$__rate_interval]))", "charges/s"),
               (p95("mozaiks_billing_apply_seconds"), "apply p95 (s)")]),
        panel("Workers: pending commands", 'max(mozaiks_consumer_pending_messages{consumer="workers"})',
              legend="pending", desc="What KEDA scales the workers on."),
        panel("Workers: chats owned", "sum by (instance) (mozaiks_worker_active_chats)", legend="{{instance}}"),
        panel("Resumes per minute", f"sum(rate(mozaiks_ws_resumes_total{{{APP}}}[$__rate_interval])) * 60",
              legend="resumes", desc="WebSockets reconnecting with after=<seq>."),
        panel("Replay: latency p95 and events replayed p95",
              [(p95("mozaiks_ws_replay_seconds"), "replay p95 (s)"),
               ("histogram_quantile(0.95, sum by (le) (rate(mozaiks_ws_replayed_events_bucket[$__rate_interval])))"
                " or max(mozaiks_ws_replayed_events{quantile=\"0.95\"})", "events p95")]),
        panel("Slow-consumer closes per minute",
              f"sum(rate(mozaiks_ws_slow_consumer_closes_total{{{APP}}}[$__rate_interval])) * 60 or vector(0)",
              legend="closes", desc="Clients too slow for their live feed, closed (they resume elsewhere)."),
        panel("WebSocket closes by code", "sum by (code) (rate(mozaiks_ws_closed_total[$__rate_interval])) * 60",
              legend="{{code}}"),
        panel("WebSocket frames per second",
              [("sum(rate(mozaiks_ws_frames_out_total[$__rate_interval]))", "out"),
               ("sum(rate(mozaiks_ws_frames_in_total[$__rate_interval]))", "in")], unit="ops"),
        panel("Build", "mozaiks_build_info", kind="table", legend="{{version}} {{commit}}",
              desc="Version and git commit of every process."),
    ],
)

DASHBOARDS = {"mozaiks-fleet.json": FLEET, "mozaiks-runtime.json": RUNTIME}


def main():
    check = "--check" in sys.argv[1:]
    drift = []
    for name, d in DASHBOARDS.items():
        text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
        path = OUT / name
        if check:
            if not path.exists() or path.read_text() != text:
                drift.append(name)
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if drift:
        print(f"dashboards out of date: {', '.join(drift)} (run python3 deploy/grafana/generate.py)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
