//! Ops polling endpoints, answered from the live state of every worker: each worker keeps its
//! snapshot (active runs, counters since it started) in the KV bucket `MZ_PERF` (rewritten every
//! 2 s), which this replica follows in memory ([`crate::presence`], the types and the liveness rule
//! of [`mozaiks_bus::fleet`]: a worker drops out 6 s after its last snapshot). A request reads that
//! memory and aggregates; it sends nothing to NATS.
//!
//! - `GET /health/active-runs`: the runs in progress, with their step and agent.
//! - `GET /metrics/perf/aggregate`: fleet totals (runs, outcomes, tokens, tool errors, turn time)
//!   and the same by app.
//! - `GET /metrics/perf/chats`: per chat with a run in progress: turns, tokens, elapsed time.
//!
//! Role `admin`: an app's admin sees its own app only; `superadmin` sees every app, or one with
//! `?app_id=`.
//!
//! The bodies are built by pure functions of the snapshots, which tolerate any snapshot another
//! process published (see [`mozaiks_bus::fleet`]; counters add with saturation).

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State as St;
use chrono::Utc;
use mozaiks_bus::fleet::{ActiveRun, Counters, WorkerSnapshot};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::debug;

use crate::State;
use crate::authz::{User, ops_scope};
use crate::error::{ApiError, Query};
use crate::metrics as m;

/// `?app_id=` (superadmin only; others always get their own app).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// Only this app (superadmin); an app's admin always sees only its own app.
    #[serde(default)]
    pub app_id: Option<String>,
}

fn counters_json(c: &Counters, active_runs: usize) -> Value {
    let avg = if c.turns == 0 {
        0.0
    } else {
        c.turn_ms_total / c.turns as f64
    };
    json!({
        "active_runs": active_runs,
        "runs_started": c.runs_started,
        "runs_completed": c.runs_completed,
        "runs_failed": c.runs_failed,
        "runs_cancelled": c.runs_cancelled,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens.saturating_add(c.completion_tokens),
        "tool_errors": c.tool_errors,
        "turns": c.turns,
        "turn_avg_ms": avg,
        "turn_max_ms": c.turn_ms_max,
    })
}

/// Every live worker's snapshot, from this replica's memory.
fn snapshots(state: &State) -> Vec<Arc<WorkerSnapshot>> {
    let started = Instant::now();
    let out = state.presence.workers();
    metrics::histogram!(m::OPS_READ_SECONDS).record(started.elapsed().as_secs_f64());
    debug!(workers = out.len(), "Perf snapshots read.");
    out
}

/// Parses one `MZ_PERF` entry as the fleet view does (tolerant: see [`mozaiks_bus::fleet`]).
pub(crate) fn parse_snapshot(body: &[u8]) -> Result<WorkerSnapshot, serde_json::Error> {
    WorkerSnapshot::parse(body)
}

/// Active runs visible to the caller, ordered by start, each with its worker.
fn runs<'a, S: Borrow<WorkerSnapshot>>(
    snaps: &'a [S],
    app: Option<&str>,
) -> Vec<(&'a WorkerSnapshot, &'a ActiveRun)> {
    let mut runs: Vec<(&WorkerSnapshot, &ActiveRun)> = snaps
        .iter()
        .map(Borrow::borrow)
        .flat_map(|s| s.active_runs.iter().map(move |r| (s, r)))
        .filter(|(_, r)| app.is_none_or(|a| r.app_id == a))
        .collect();
    runs.sort_by_key(|(_, r)| r.started_at);
    runs
}

/// A run as the ops endpoints show it: its fields, its worker and its elapsed time.
fn run_json(s: &WorkerSnapshot, r: &ActiveRun, now: chrono::DateTime<Utc>) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or_else(|_| json!({}));
    v["elapsed_ms"] = json!((now - r.started_at).num_milliseconds().max(0));
    v["worker_id"] = json!(s.worker_id);
    v
}

/// The body of `GET /health/active-runs` from the snapshots.
pub(crate) fn active_runs_json<S: Borrow<WorkerSnapshot>>(snaps: &[S], app: Option<&str>) -> Value {
    let now = Utc::now();
    let runs: Vec<Value> = runs(snaps, app)
        .into_iter()
        .map(|(s, r)| {
            let r = run_json(s, r, now);
            json!({
                "app_id": r["app_id"], "chat_id": r["chat_id"], "workflow": r["workflow"],
                "run_id": r["run_id"], "started_at": r["started_at"], "elapsed_ms": r["elapsed_ms"],
                "step": r["step"], "agent": r["agent"], "worker_id": r["worker_id"],
            })
        })
        .collect();
    json!({ "workers": snaps.len(), "count": runs.len(), "runs": runs })
}

/// The body of `GET /metrics/perf/aggregate` from the snapshots.
pub(crate) fn aggregate_json<S: Borrow<WorkerSnapshot>>(snaps: &[S], app: Option<&str>) -> Value {
    let mut total = Counters::default();
    let mut by_app: BTreeMap<String, Counters> = BTreeMap::new();
    for s in snaps.iter().map(Borrow::borrow) {
        for (a, c) in &s.apps {
            if app.is_some_and(|x| x != a) {
                continue;
            }
            total.add(c);
            by_app.entry(a.clone()).or_default().add(c);
        }
    }
    let runs = runs(snaps, app);
    let active = |a: &str| runs.iter().filter(|(_, r)| r.app_id == a).count();
    let mut body = counters_json(&total, runs.len());
    body["workers"] = json!(snaps.len());
    body["apps"] = by_app
        .iter()
        .map(|(a, c)| (a.clone(), counters_json(c, active(a))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    body
}

/// The body of `GET /metrics/perf/chats` from the snapshots.
pub(crate) fn chats_json<S: Borrow<WorkerSnapshot>>(snaps: &[S], app: Option<&str>) -> Value {
    let now = Utc::now();
    let chats: Vec<Value> = runs(snaps, app)
        .into_iter()
        .map(|(s, r)| {
            let mut v = run_json(s, r, now);
            v["total_tokens"] = json!(r.prompt_tokens.saturating_add(r.completion_tokens));
            v
        })
        .collect();
    json!({ "count": chats.len(), "chats": chats })
}

pub async fn active_runs(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = ops_scope(&user, q.app_id)?;
    let snaps = snapshots(&state);
    Ok(Json(active_runs_json(&snaps, app.as_deref())))
}

pub async fn perf_aggregate(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = ops_scope(&user, q.app_id)?;
    let snaps = snapshots(&state);
    Ok(Json(aggregate_json(&snaps, app.as_deref())))
}

pub async fn perf_chats(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = ops_scope(&user, q.app_id)?;
    let snaps = snapshots(&state);
    Ok(Json(chats_json(&snaps, app.as_deref())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mozaiks_bus::fleet::Ownership;

    fn snapshot(worker: &str, runs: &[(&str, &str, &str)]) -> Vec<u8> {
        let snap = WorkerSnapshot {
            worker_id: worker.into(),
            started_at: Utc::now(),
            updated_at: Utc::now(),
            active_run_count: runs.len(),
            active_runs: runs
                .iter()
                .map(|(app, chat, started)| ActiveRun {
                    app_id: app.to_string(),
                    chat_id: chat.to_string(),
                    workflow: "hello".into(),
                    run_id: uuid::Uuid::now_v7(),
                    started_at: started.parse().unwrap(),
                    step: 2,
                    agent: "writer".into(),
                    prompt_tokens: 5,
                    completion_tokens: 7,
                    turns: 1,
                })
                .collect(),
            apps: [(
                "acme".to_string(),
                Counters {
                    runs_started: 3,
                    turns: 4,
                    turn_ms_total: 10.0,
                    turn_ms_max: 6.0,
                    ..Default::default()
                },
            )]
            .into(),
            ownership: Ownership::default(),
        };
        serde_json::to_vec(&snap).unwrap()
    }

    /// The bodies are a contract: their fields, in their order (`serde_json` keeps insertion
    /// order in this workspace).
    #[test]
    fn the_bodies_keep_their_shape() {
        let a = snapshot(
            "w1",
            &[
                ("acme", "c2", "2025-01-01T00:00:02Z"),
                ("other", "c3", "2025-01-01T00:00:03Z"),
            ],
        );
        let b = snapshot("w2", &[("acme", "c1", "2025-01-01T00:00:01Z")]);
        let snaps: Vec<WorkerSnapshot> =
            [a, b].iter().map(|e| parse_snapshot(e).unwrap()).collect();

        let body = active_runs_json(&snaps, Some("acme"));
        assert_eq!(
            (body["workers"].as_u64(), body["count"].as_u64()),
            (Some(2), Some(2))
        );
        let runs = body["runs"].as_array().unwrap();
        // Oldest first, across workers.
        assert_eq!(runs[0]["chat_id"], "c1");
        assert_eq!(runs[0]["worker_id"], "w2");
        assert_eq!(runs[0]["started_at"], "2025-01-01T00:00:01Z");
        let keys: Vec<&str> = runs[0]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "app_id",
                "chat_id",
                "workflow",
                "run_id",
                "started_at",
                "elapsed_ms",
                "step",
                "agent",
                "worker_id"
            ]
        );
        assert!(runs[0]["elapsed_ms"].as_i64().unwrap() > 0);

        let body = chats_json(&snaps, None);
        assert_eq!(body["count"], 3);
        let c = &body["chats"][0];
        // The run's fields as the worker wrote them, then what the endpoint adds.
        let keys: Vec<&str> = c.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "app_id",
                "chat_id",
                "workflow",
                "run_id",
                "started_at",
                "step",
                "agent",
                "prompt_tokens",
                "completion_tokens",
                "turns",
                "elapsed_ms",
                "worker_id",
                "total_tokens"
            ]
        );
        assert_eq!(
            (c["total_tokens"].as_u64(), c["turns"].as_u64()),
            (Some(12), Some(1))
        );

        let body = aggregate_json(&snaps, None);
        assert_eq!(
            (
                body["workers"].as_u64(),
                body["active_runs"].as_u64(),
                body["runs_started"].as_u64(),
                body["turn_avg_ms"].as_f64(),
                body["turn_max_ms"].as_f64(),
            ),
            (Some(2), Some(3), Some(6), Some(2.5), Some(6.0))
        );
        assert_eq!(body["apps"]["acme"]["active_runs"], 2);
        assert_eq!(body["apps"]["acme"]["runs_started"], 6);
        let scoped = aggregate_json(&snaps, Some("other"));
        assert_eq!(scoped["runs_started"], 0);
        assert!(scoped["apps"].as_object().unwrap().is_empty());
    }
}
