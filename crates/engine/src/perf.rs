//! A worker's live performance snapshot, published to the KV bucket `MZ_PERF` under the key
//! `worker.{instance_id}` every 2 s and soon after a run starts or ends; a stopping worker deletes
//! it, and the bucket's `max_age` (10 s) drops a dead worker's. The snapshot's types, the bucket's
//! name and the liveness rule readers apply are [`mozaiks_bus::fleet`]'s, shared with the gateway
//! (fleet-wide `max_concurrent_runs`, `/health/active-runs` and `/metrics/perf/*`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mozaiks_bus::fleet;
pub use mozaiks_bus::fleet::{ActiveRun, Counters, Ownership, WorkerSnapshot as Snapshot};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// How often a worker rewrites its snapshot.
pub const INTERVAL: Duration = fleet::PUBLISH_EVERY;
/// At most this often, even when runs start and end faster.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// Active runs listed in one snapshot at most (the count is exact).
pub const MAX_LISTED_RUNS: usize = 1000;

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

impl Perf {
    /// The numbers of worker `worker_id` (the process's instance id), from now.
    pub fn new(worker_id: &str) -> Perf {
        Perf {
            worker_id: worker_id.to_string(),
            started_at: Utc::now(),
            state: Arc::default(),
            changed: Arc::default(),
        }
    }

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
        fleet::worker_key(&self.worker_id)
    }

    /// Publishes the snapshot until `stop` fires, then removes it.
    pub async fn publish(self, bus: mozaiks_bus::Bus, stop: Arc<Notify>) {
        let kv = match bus
            .jetstream()
            .get_key_value(bus.subjects().name(fleet::PERF_BUCKET))
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
