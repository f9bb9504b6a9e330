//! Ops polling endpoints, answered from the live state of every worker: each worker keeps its
//! snapshot (active runs, counters since it started) in the KV bucket `MZ_PERF` (rewritten every
//! 2 s, dropped 10 s after a worker dies); these handlers read every snapshot and aggregate.
//!
//! - `GET /health/active-runs`: the runs in progress, with their step and agent.
//! - `GET /metrics/perf/aggregate`: fleet totals (runs, outcomes, tokens, tool errors, turn time)
//!   and the same by app.
//! - `GET /metrics/perf/chats`: per chat with a run in progress: turns, tokens, elapsed time.
//!
//! Role `admin`: an app's admin sees its own app only; `superadmin` sees every app, or one with
//! `?app_id=`.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::Json;
use axum::extract::State as St;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::State;
use crate::auth::User;
use crate::error::{ApiError, Query};
use crate::metrics as m;

/// `?app_id=` (superadmin only; others always get their own app).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    #[serde(default)]
    pub app_id: Option<String>,
}

/// A worker's snapshot as published by `mozaiks_engine::perf` (tolerant: unknown fields are
/// ignored, missing ones default).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Snapshot {
    worker_id: String,
    active_runs: Vec<Value>,
    apps: BTreeMap<String, Counters>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct Counters {
    runs_started: u64,
    runs_completed: u64,
    runs_failed: u64,
    runs_cancelled: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    tool_errors: u64,
    turns: u64,
    turn_ms_total: f64,
    turn_ms_max: f64,
}

impl Counters {
    /// Adds another worker's counters; a snapshot's numbers are not trusted to be sane, so
    /// sums saturate instead of overflowing.
    fn add(&mut self, o: &Counters) {
        self.runs_started = self.runs_started.saturating_add(o.runs_started);
        self.runs_completed = self.runs_completed.saturating_add(o.runs_completed);
        self.runs_failed = self.runs_failed.saturating_add(o.runs_failed);
        self.runs_cancelled = self.runs_cancelled.saturating_add(o.runs_cancelled);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.tool_errors = self.tool_errors.saturating_add(o.tool_errors);
        self.turns = self.turns.saturating_add(o.turns);
        self.turn_ms_total += o.turn_ms_total;
        self.turn_ms_max = self.turn_ms_max.max(o.turn_ms_max);
    }

    fn to_json(&self, active_runs: usize) -> Value {
        let avg = if self.turns == 0 {
            0.0
        } else {
            self.turn_ms_total / self.turns as f64
        };
        json!({
            "active_runs": active_runs,
            "runs_started": self.runs_started,
            "runs_completed": self.runs_completed,
            "runs_failed": self.runs_failed,
            "runs_cancelled": self.runs_cancelled,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens.saturating_add(self.completion_tokens),
            "tool_errors": self.tool_errors,
            "turns": self.turns,
            "turn_avg_ms": avg,
            "turn_max_ms": self.turn_ms_max,
        })
    }
}

/// The app the caller may see (`None`: every app).
fn scope(user: &User, q: Scope) -> Result<Option<String>, ApiError> {
    if !user.0.is_admin() {
        return Err(ApiError::forbidden(
            "admin_required",
            "ops endpoints need role admin (of the app) or superadmin",
        ));
    }
    match q.app_id {
        Some(app) => {
            user.require_app(&app)?;
            Ok(Some(app))
        }
        None if user.0.is_superadmin() => Ok(None),
        None => Ok(Some(user.0.app_id.clone())),
    }
}

/// Every live worker's snapshot.
async fn snapshots(state: &State) -> Result<Vec<Snapshot>, ApiError> {
    let started = Instant::now();
    let bus = &state.bus;
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PERF"))
        .await
        .map_err(|e| ApiError::unavailable(format!("perf bucket: {e}")))?;
    let mut keys = kv
        .keys()
        .await
        .map_err(|e| ApiError::unavailable(format!("perf bucket: {e}")))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| ApiError::unavailable(format!("perf bucket: {e}")))?;
        let Ok(Some(body)) = kv.get(&key).await else {
            continue; // gone since it was listed
        };
        match parse_snapshot(&body) {
            Ok(s) => out.push(s),
            Err(e) => {
                warn!(key = %key, error = %e, "Ignoring a perf snapshot that does not parse.")
            }
        }
    }
    metrics::histogram!(m::OPS_READ_SECONDS).record(started.elapsed().as_secs_f64());
    debug!(workers = out.len(), "Perf snapshots read.");
    Ok(out)
}

/// Parses one `MZ_PERF` entry (tolerant: see [`Snapshot`]).
pub(crate) fn parse_snapshot(body: &[u8]) -> Result<Snapshot, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Active runs visible to the caller, each with its worker and elapsed time. An entry of
/// `active_runs` that is not an object is skipped.
fn runs(snaps: &[Snapshot], app: Option<&str>) -> Vec<Value> {
    let now = Utc::now();
    let mut runs: Vec<Value> = snaps
        .iter()
        .flat_map(|s| s.active_runs.iter().map(move |r| (s, r)))
        .filter(|(_, r)| r.is_object() && app.is_none_or(|a| r["app_id"] == a))
        .map(|(s, r)| {
            let mut r = r.clone();
            let elapsed = r["started_at"]
                .as_str()
                .and_then(|t| t.parse::<DateTime<Utc>>().ok())
                .map(|t| (now - t).num_milliseconds().max(0))
                .unwrap_or(0);
            r["elapsed_ms"] = json!(elapsed);
            r["worker_id"] = json!(s.worker_id);
            r
        })
        .collect();
    runs.sort_by(|a, b| a["started_at"].as_str().cmp(&b["started_at"].as_str()));
    runs
}

/// The body of `GET /health/active-runs` from the snapshots.
pub(crate) fn active_runs_json(snaps: &[Snapshot], app: Option<&str>) -> Value {
    let runs: Vec<Value> = runs(snaps, app)
        .into_iter()
        .map(|r| {
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
pub(crate) fn aggregate_json(snaps: &[Snapshot], app: Option<&str>) -> Value {
    let mut total = Counters::default();
    let mut by_app: BTreeMap<String, Counters> = BTreeMap::new();
    for s in snaps {
        for (a, c) in &s.apps {
            if app.is_some_and(|x| x != a) {
                continue;
            }
            total.add(c);
            by_app.entry(a.clone()).or_default().add(c);
        }
    }
    let runs = runs(snaps, app);
    let active = |a: &str| runs.iter().filter(|r| r["app_id"] == a).count();
    let mut body = total.to_json(runs.len());
    body["workers"] = json!(snaps.len());
    body["apps"] = by_app
        .iter()
        .map(|(a, c)| (a.clone(), c.to_json(active(a))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    body
}

/// The body of `GET /metrics/perf/chats` from the snapshots.
pub(crate) fn chats_json(snaps: &[Snapshot], app: Option<&str>) -> Value {
    let chats: Vec<Value> = runs(snaps, app)
        .into_iter()
        .map(|mut r| {
            let total = r["prompt_tokens"]
                .as_u64()
                .unwrap_or(0)
                .saturating_add(r["completion_tokens"].as_u64().unwrap_or(0));
            r["total_tokens"] = json!(total);
            r
        })
        .collect();
    json!({ "count": chats.len(), "chats": chats })
}

pub async fn active_runs(
    St(state): St<State>,
    user: User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = scope(&user, q)?;
    let snaps = snapshots(&state).await?;
    Ok(Json(active_runs_json(&snaps, app.as_deref())))
}

pub async fn perf_aggregate(
    St(state): St<State>,
    user: User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = scope(&user, q)?;
    let snaps = snapshots(&state).await?;
    Ok(Json(aggregate_json(&snaps, app.as_deref())))
}

pub async fn perf_chats(
    St(state): St<State>,
    user: User,
    Query(q): Query<Scope>,
) -> Result<Json<Value>, ApiError> {
    let app = scope(&user, q)?;
    let snaps = snapshots(&state).await?;
    Ok(Json(chats_json(&snaps, app.as_deref())))
}
