//! A worker's live performance snapshot, published to the KV bucket `MZ_PERF` under the key
//! `worker.{worker_id}` every 2 s and soon after a run starts or ends. The bucket's `max_age`
//! (10 s) drops a dead worker's snapshot; the gateway aggregates every live one for
//! `/health/active-runs` and `/metrics/perf/*`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, warn};
use uuid::Uuid;

/// How often a worker rewrites its snapshot.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// At most this often, even when runs start and end faster.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// Active runs listed in one snapshot at most (the count is exact).
pub const MAX_LISTED_RUNS: usize = 1000;

/// A run this worker is driving or holds in memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveRun {
    pub app_id: String,
    pub chat_id: String,
    pub workflow: String,
    pub run_id: Uuid,
    pub started_at: DateTime<Utc>,
    /// The current turn (0 before the first) and its agent.
    pub step: u32,
    pub agent: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Turns completed so far.
    pub turns: u32,
}

/// Counters of one app on one worker, since the worker started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub runs_started: u64,
    pub runs_completed: u64,
    pub runs_failed: u64,
    pub runs_cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tool_errors: u64,
    pub turns: u64,
    /// Sum and maximum of turn durations (`step.started` → `step.completed`), model time
    /// included.
    pub turn_ms_total: f64,
    pub turn_ms_max: f64,
}

/// How this worker shared chats with the others since it started (see `worker::lease` and
/// `worker::forward`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ownership {
    /// Chat leases claimed (the chat was free).
    pub leases_acquired: u64,
    /// Chat leases claimed after the owner stopped renewing (a dead worker's chats).
    pub leases_taken_over: u64,
    /// Chat leases lost (not renewed in time).
    pub leases_lost: u64,
    /// Commands this worker pulled for a chat another worker owned, and forwarded to it.
    pub forwarded: u64,
    /// Commands other workers forwarded to this one.
    pub forwards_received: u64,
    /// Appends refused because another writer appended to the chat first.
    pub conflicts: u64,
}

/// What a worker publishes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub active_run_count: usize,
    pub active_runs: Vec<ActiveRun>,
    /// By app_id.
    pub apps: BTreeMap<String, Counters>,
    #[serde(default)]
    pub ownership: Ownership,
}

#[derive(Default)]
struct State {
    runs: HashMap<(String, String), ActiveRun>,
    apps: BTreeMap<String, Counters>,
    ownership: Ownership,
}

/// The worker's live numbers. Cheap to clone.
#[derive(Clone)]
pub struct Perf {
    worker_id: String,
    started_at: DateTime<Utc>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Default for Perf {
    fn default() -> Self {
        Perf {
            worker_id: Uuid::now_v7().simple().to_string(),
            started_at: Utc::now(),
            state: Arc::default(),
            changed: Arc::default(),
        }
    }
}

impl Perf {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn run_started(&self, run: ActiveRun, counted: bool) {
        self.with(|s| {
            if counted {
                s.apps.entry(run.app_id.clone()).or_default().runs_started += 1;
            }
            s.runs
                .insert((run.app_id.clone(), run.chat_id.clone()), run);
        });
        self.changed.notify_one();
    }

    pub fn step_started(&self, app_id: &str, chat_id: &str, step: u32, agent: &str) {
        self.with(|s| {
            if let Some(r) = s.runs.get_mut(&(app_id.to_string(), chat_id.to_string())) {
                r.step = step;
                r.agent = agent.to_string();
            }
        });
    }

    pub fn turn_completed(&self, app_id: &str, chat_id: &str, took: Option<Duration>) {
        self.with(|s| {
            if let Some(r) = s.runs.get_mut(&(app_id.to_string(), chat_id.to_string())) {
                r.turns += 1;
            }
            let c = s.apps.entry(app_id.to_string()).or_default();
            c.turns += 1;
            if let Some(t) = took {
                let ms = t.as_secs_f64() * 1000.0;
                c.turn_ms_total += ms;
                c.turn_ms_max = c.turn_ms_max.max(ms);
            }
        });
    }

    pub fn charged(&self, app_id: &str, chat_id: &str, prompt: u64, completion: u64) {
        self.with(|s| {
            if let Some(r) = s.runs.get_mut(&(app_id.to_string(), chat_id.to_string())) {
                r.prompt_tokens += prompt;
                r.completion_tokens += completion;
            }
            let c = s.apps.entry(app_id.to_string()).or_default();
            c.prompt_tokens += prompt;
            c.completion_tokens += completion;
        });
    }

    pub fn tool_error(&self, app_id: &str) {
        self.with(|s| s.apps.entry(app_id.to_string()).or_default().tool_errors += 1);
    }

    /// A run ended (`outcome`: completed, failed, cancelled).
    pub fn run_ended(&self, app_id: &str, chat_id: &str, outcome: &str) {
        self.with(|s| {
            s.runs.remove(&(app_id.to_string(), chat_id.to_string()));
            let c = s.apps.entry(app_id.to_string()).or_default();
            match outcome {
                "completed" => c.runs_completed += 1,
                "failed" => c.runs_failed += 1,
                _ => c.runs_cancelled += 1,
            }
        });
        self.changed.notify_one();
    }

    /// The chat left this worker's memory (its run, if any, is no longer held here).
    pub fn forget(&self, app_id: &str, chat_id: &str) {
        let removed = self.with(|s| {
            s.runs
                .remove(&(app_id.to_string(), chat_id.to_string()))
                .is_some()
        });
        if removed {
            self.changed.notify_one();
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.with(|s| {
            let mut runs: Vec<ActiveRun> = s.runs.values().cloned().collect();
            runs.sort_by_key(|r| r.started_at);
            runs.truncate(MAX_LISTED_RUNS);
            Snapshot {
                worker_id: self.worker_id.clone(),
                started_at: self.started_at,
                updated_at: Utc::now(),
                active_run_count: s.runs.len(),
                active_runs: runs,
                apps: s.apps.clone(),
                ownership: s.ownership.clone(),
            }
        })
    }

    /// Counts an ownership event.
    pub fn ownership(&self, f: impl FnOnce(&mut Ownership)) {
        self.with(|s| f(&mut s.ownership));
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The bucket key of this worker.
    pub fn key(&self) -> String {
        format!("worker.{}", self.worker_id)
    }

    /// Publishes the snapshot until `stop` fires, then removes it.
    pub async fn publish(self, bus: mozaiks_bus::Bus, stop: Arc<Notify>) {
        let kv = match bus
            .jetstream()
            .get_key_value(bus.subjects().name("MZ_PERF"))
            .await
        {
            Ok(kv) => kv,
            Err(e) => {
                warn!(error = %e, "No MZ_PERF bucket; this worker's live numbers are not published.");
                return;
            }
        };
        let key = self.key();
        let mut last = Instant::now() - INTERVAL;
        loop {
            let wait = MIN_INTERVAL.saturating_sub(last.elapsed());
            tokio::time::sleep(wait).await;
            let body = match serde_json::to_vec(&self.snapshot()) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Cannot encode the perf snapshot.");
                    return;
                }
            };
            if let Err(e) = kv.put(&key, body.into()).await {
                debug!(error = %e, "Cannot publish the perf snapshot; retrying.");
            }
            last = Instant::now();
            tokio::select! {
                _ = stop.notified() => break,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
        let _ = kv.delete(&key).await;
    }
}
