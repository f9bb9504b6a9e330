//! The fleet's live state: who each process is, and what the workers are doing.
//!
//! - [`InstanceId`]: one id per process (`{host}-{pid}-{tag}`), made once by the binary and
//!   handed to every role: a worker's `MZ_PERF` key and chat leases, a gateway's `MZ_PRESENCE`
//!   key, the holder of a fleet-wide lease (`retention`, a storage move).
//! - [`WorkerSnapshot`]: what a worker publishes to the memory bucket `MZ_PERF` under
//!   [`worker_key`] every [`PUBLISH_EVERY`] and at each run start and end. It is written by
//!   `mozaiks_engine::perf` and read, through these same types, by the gateway (fleet-wide
//!   `max_concurrent_runs` and the ops endpoints `/health/active-runs`, `/metrics/perf/*`).
//! - [`Latest`]: the latest value of every key of a followed bucket, and **the one liveness rule**:
//!   a value not rewritten within [`LIVE_FOR`] (three publish periods) belongs to a dead process
//!   and no longer counts. [`Workers`] follows `MZ_PERF` with it.
//!
//! Readers are tolerant (missing fields take their defaults, an `active_runs` entry that is not a
//! run is skipped, counters add with saturation): a snapshot is data from another process, of
//! another version perhaps, and never panics its reader.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{Bus, Error};

/// The workers' bucket (base name, namespaced by the bus).
pub const PERF_BUCKET: &str = "MZ_PERF";
/// How often a process rewrites its snapshot (workers in `MZ_PERF`, gateways in `MZ_PRESENCE`).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// A snapshot not rewritten for this long (three publish periods) is a dead process's: it no
/// longer counts, for limits or for the ops endpoints. The buckets' `max_age` only cleans up.
pub const LIVE_FOR: Duration = Duration::from_secs(6);
/// A key not rewritten for this long is forgotten (its process is long gone).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// This process in the fleet: `{host}-{pid}-{tag}` (`tag`: 8 random hex digits). Made once per
/// process and shared by every role in it. Only `[A-Za-z0-9_-]`, so it is a valid KV key and
/// subject token. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceId(Arc<str>);

impl InstanceId {
    /// A new id for a process on `host` (the `HOSTNAME`; other characters than letters, digits,
    /// `_` and `-` become `-`; empty: `host`).
    pub fn new(host: &str) -> InstanceId {
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let host = if host.is_empty() { "host" } else { &host };
        let tag = Uuid::new_v4().simple().to_string();
        InstanceId(format!("{host}-{}-{}", std::process::id(), &tag[..8]).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for InstanceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The `MZ_PERF` key of worker `id`.
pub fn worker_key(id: &str) -> String {
    format!("worker.{id}")
}

/// A run a worker is driving or holds in memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
#[serde(default)]
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

impl Counters {
    /// Adds another worker's counters. A snapshot's numbers are not trusted to be sane, so sums
    /// saturate instead of overflowing.
    pub fn add(&mut self, o: &Counters) {
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
}

/// How a worker shared chats with the others since it started (see `mozaiks_engine::worker`'s
/// `lease` and `forward`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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

/// What a worker publishes to `MZ_PERF`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSnapshot {
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Exact, while `active_runs` lists at most `mozaiks_engine::perf::MAX_LISTED_RUNS`.
    pub active_run_count: usize,
    #[serde(deserialize_with = "runs_leniently")]
    pub active_runs: Vec<ActiveRun>,
    /// By app_id.
    pub apps: BTreeMap<String, Counters>,
    pub ownership: Ownership,
}

impl WorkerSnapshot {
    /// Parses an `MZ_PERF` value (tolerantly; see the module docs).
    pub fn parse(body: &[u8]) -> Result<WorkerSnapshot, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The listed runs per app.
    pub fn runs_by_app(&self) -> HashMap<String, u32> {
        let mut runs: HashMap<String, u32> = HashMap::new();
        for r in &self.active_runs {
            let n = runs.entry(r.app_id.clone()).or_default();
            *n = n.saturating_add(1);
        }
        runs
    }
}

/// The entries of `active_runs` that are runs; any other (not an object, or an object whose
/// fields have the wrong types) is skipped.
fn runs_leniently<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ActiveRun>, D::Error> {
    let items = Vec::<serde_json::Value>::deserialize(d)?;
    Ok(items
        .into_iter()
        .filter(serde_json::Value::is_object)
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

struct Seen<T> {
    at: Instant,
    revision: u64,
    value: Arc<T>,
}

/// The latest value of every key of a followed bucket, each with when this process saw it
/// written; a value counts only while it is live ([`LIVE_FOR`]). A repeat of the revision already
/// held (a watch opened again after a reconnect delivers the bucket's history) does not make an
/// old value look fresh. Cheap to clone.
pub struct Latest<T> {
    seen: Arc<Mutex<HashMap<String, Seen<T>>>>,
}

impl<T> Clone for Latest<T> {
    fn clone(&self) -> Self {
        Latest {
            seen: self.seen.clone(),
        }
    }
}

impl<T> Default for Latest<T> {
    fn default() -> Self {
        Latest {
            seen: Arc::default(),
        }
    }
}

impl<T> Latest<T> {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen<T>>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one entry of the bucket: `Some` a value written at `revision`, `None` the key is
    /// gone (deleted, purged, or a value that does not parse). Returns whether the key was held.
    pub fn observe(&self, key: &str, revision: u64, value: Option<T>) -> bool {
        self.observe_at(key, revision, value, Instant::now())
    }

    fn observe_at(&self, key: &str, revision: u64, value: Option<T>, now: Instant) -> bool {
        let mut seen = self.seen();
        seen.retain(|_, s| now.saturating_duration_since(s.at) < FORGET_AFTER);
        let Some(value) = value else {
            return seen.remove(key).is_some();
        };
        let at = match seen.get(key) {
            Some(s) if s.revision == revision => s.at,
            _ => now,
        };
        let value = Arc::new(value);
        seen.insert(
            key.to_string(),
            Seen {
                at,
                revision,
                value,
            },
        )
        .is_some()
    }

    /// Calls `f` with every live value, by key.
    pub fn with_live<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = (&str, &T)>) -> R) -> R {
        self.with_live_at(Instant::now(), f)
    }

    fn with_live_at<R>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut dyn Iterator<Item = (&str, &T)>) -> R,
    ) -> R {
        let seen = self.seen();
        let mut live = seen
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.at) < LIVE_FOR)
            .map(|(k, s)| (k.as_str(), &*s.value));
        f(&mut live)
    }

    /// Every live value, ordered by key.
    pub fn live(&self) -> Vec<Arc<T>> {
        self.live_at(Instant::now())
    }

    fn live_at(&self, now: Instant) -> Vec<Arc<T>> {
        let seen = self.seen();
        let mut live: Vec<(&String, Arc<T>)> = seen
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.at) < LIVE_FOR)
            .map(|(k, s)| (k, s.value.clone()))
            .collect();
        live.sort_by(|a, b| a.0.cmp(b.0));
        live.into_iter().map(|(_, v)| v).collect()
    }
}

/// A worker as [`Workers`] keeps it: its snapshot and its listed runs per app.
pub struct Worker {
    pub snapshot: Arc<WorkerSnapshot>,
    runs_by_app: HashMap<String, u32>,
}

/// Every worker's latest `MZ_PERF` snapshot, followed in memory (no request per read). Cheap to
/// clone.
#[derive(Clone, Default)]
pub struct Workers {
    latest: Latest<Worker>,
}

impl Workers {
    /// Opens `MZ_PERF` with its history and follows it for as long as the process runs, across
    /// reconnects and a recreated bucket ([`Bus::follow_bucket`]). Fails if the bucket cannot be
    /// watched now.
    pub async fn follow(bus: &Bus) -> Result<Workers, Error> {
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(PERF_BUCKET))
            .await
            .map_err(|e| Error::kv(format!("bucket {PERF_BUCKET}"), e))?;
        let watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| Error::kv(format!("bucket {PERF_BUCKET}"), e))?;
        let workers = Workers::default();
        let (bus, w) = (bus.clone(), workers.clone());
        tokio::spawn(async move {
            bus.follow_bucket(PERF_BUCKET, Some(watch), |e| w.observe(&e))
                .await
        });
        Ok(workers)
    }

    /// Takes one entry of `MZ_PERF`.
    pub fn observe(&self, e: &kv::Entry) {
        let value = match e.operation {
            kv::Operation::Put => match WorkerSnapshot::parse(&e.value) {
                Ok(s) => Some(s),
                Err(error) => {
                    if self.latest.observe(&e.key, e.revision, None) {
                        warn!(key = %e.key, %error, "A worker's perf snapshot does not parse; it no longer counts.");
                    } else {
                        debug!(key = %e.key, %error, "Ignoring a perf snapshot that does not parse.");
                    }
                    return;
                }
            },
            _ => None,
        };
        self.observe_snapshot(&e.key, e.revision, value);
    }

    /// Takes one snapshot (`None`: the key is gone).
    pub fn observe_snapshot(&self, key: &str, revision: u64, snapshot: Option<WorkerSnapshot>) {
        let worker = snapshot.map(|s| Worker {
            runs_by_app: s.runs_by_app(),
            snapshot: Arc::new(s),
        });
        self.latest.observe(key, revision, worker);
    }

    /// Every live worker's snapshot, ordered by key.
    pub fn live(&self) -> Vec<Arc<WorkerSnapshot>> {
        self.latest
            .live()
            .into_iter()
            .map(|w| w.snapshot.clone())
            .collect()
    }

    /// Live workers.
    pub fn count(&self) -> u32 {
        self.latest.with_live(|it| it.count() as u32)
    }

    /// The app's runs in progress on every live worker.
    pub fn active_runs(&self, app_id: &str) -> u32 {
        self.latest.with_live(|it| {
            it.filter_map(|(_, w)| w.runs_by_app.get(app_id))
                .fold(0u32, |a, n| a.saturating_add(*n))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_is_a_key_and_a_subject_token_with_the_pid() {
        let id = InstanceId::new("pod.example.com:7 x");
        let s = id.as_str();
        assert!(
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{s}"
        );
        let parts: Vec<&str> = s.rsplitn(3, '-').collect();
        assert_eq!(parts[0].len(), 8, "{s}");
        assert_eq!(parts[1], std::process::id().to_string());
        assert_eq!(parts[2], "pod-example-com-7-x");
        assert_ne!(id, InstanceId::new("pod.example.com:7 x"));
        assert!(InstanceId::new("").as_str().starts_with("host-"));
    }

    #[test]
    fn a_snapshot_round_trips_and_a_hostile_one_is_tolerated() {
        let run = ActiveRun {
            app_id: "acme".into(),
            chat_id: "c1".into(),
            workflow: "hello".into(),
            run_id: Uuid::now_v7(),
            started_at: Utc::now(),
            step: 2,
            agent: "writer".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            turns: 1,
        };
        let snap = WorkerSnapshot {
            worker_id: "w1".into(),
            started_at: Utc::now(),
            updated_at: Utc::now(),
            active_run_count: 1,
            active_runs: vec![run.clone()],
            apps: [("acme".to_string(), Counters::default())].into(),
            ownership: Ownership::default(),
        };
        let body = serde_json::to_vec(&snap).unwrap();
        assert_eq!(WorkerSnapshot::parse(&body).unwrap(), snap);

        // Non-runs in active_runs are skipped; missing fields default.
        let odd = br#"{"worker_id":"w2","active_runs":[1,"x",null,[],{"app_id":"acme","step":"x"},{"app_id":"acme"}]}"#;
        let s = WorkerSnapshot::parse(odd).unwrap();
        assert_eq!(s.active_runs.len(), 1);
        assert_eq!(s.active_runs[0].app_id, "acme");
        assert_eq!(s.runs_by_app()["acme"], 1);
        assert!(s.apps.is_empty());
        // Not JSON, a string, or active_runs not a list: not a snapshot.
        assert!(WorkerSnapshot::parse(b"not json").is_err());
        assert!(WorkerSnapshot::parse(br#""w1""#).is_err());
        assert!(WorkerSnapshot::parse(br#"{"active_runs":null}"#).is_err());
    }

    #[test]
    fn counters_add_with_saturation() {
        let big = Counters {
            runs_started: u64::MAX,
            turns: 1,
            turn_ms_max: 5.0,
            ..Default::default()
        };
        let mut total = Counters::default();
        total.add(&big);
        total.add(&big);
        assert_eq!((total.runs_started, total.turns), (u64::MAX, 2));
        assert_eq!(total.turn_ms_max, 5.0);
    }

    #[test]
    fn a_value_counts_while_it_is_live_and_a_repeat_does_not_refresh_it() {
        let l: Latest<u32> = Latest::default();
        let t0 = Instant::now();
        l.observe_at("a", 1, Some(10), t0);
        l.observe_at("b", 2, Some(20), t0);
        assert_eq!(
            l.live_at(t0).iter().map(|v| **v).collect::<Vec<_>>(),
            vec![10, 20]
        );
        // `b` is rewritten later; `a` is only delivered again (same revision, a reopened watch).
        let t1 = t0 + LIVE_FOR - Duration::from_millis(1);
        l.observe_at("a", 1, Some(10), t1);
        l.observe_at("b", 3, Some(21), t1);
        let t2 = t0 + LIVE_FOR;
        assert_eq!(
            l.live_at(t2).iter().map(|v| **v).collect::<Vec<_>>(),
            vec![21]
        );
        assert_eq!(l.with_live_at(t2, |it| it.count()), 1);
        // A delete drops the key at once.
        assert!(l.observe_at("b", 4, None, t2));
        assert!(l.live_at(t2).is_empty());
        assert!(!l.observe_at("never", 5, None, t2));
        // Long-dead keys are forgotten.
        l.observe_at("c", 6, Some(30), t2 + FORGET_AFTER);
        assert_eq!(l.seen().len(), 1);
    }

    #[test]
    fn workers_count_the_runs_of_live_snapshots_by_app() {
        let w = Workers::default();
        let snap = |apps: &[&str]| WorkerSnapshot {
            active_runs: apps
                .iter()
                .map(|a| ActiveRun {
                    app_id: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        w.observe_snapshot("worker.a", 1, Some(snap(&["acme", "acme", "other"])));
        w.observe_snapshot("worker.b", 2, Some(snap(&["acme"])));
        assert_eq!(
            (w.count(), w.active_runs("acme"), w.active_runs("other")),
            (2, 3, 1)
        );
        assert_eq!(w.active_runs("none"), 0);
        w.observe_snapshot("worker.a", 3, None);
        assert_eq!((w.count(), w.active_runs("acme")), (1, 1));
        assert_eq!(w.live().len(), 1);
    }
}
