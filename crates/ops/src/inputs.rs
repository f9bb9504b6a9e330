//! The fleet's live state as the ops agent reads it from the bus, kept in memory by every replica
//! (so a replica that takes the lead over has warm windows):
//!
//! - active runs by app and workflow: every live worker's `MZ_PERF` snapshot
//!   ([`mozaiks_bus::fleet::Workers`], the fleet's one liveness rule);
//! - open WebSockets by app: every live gateway's `MZ_PRESENCE` snapshot;
//! - from the event log `MZ_EVT`, through one ordered consumer (no durable state) that starts an
//!   hour back: `run.failed` and failed `tool.result` (errors), `usage.charged` (tokens),
//!   `session.started` → `run.started` of a chat (session start latency).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::{Latest, Workers};
use mozaiks_events::{Event, codec};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::policy::Policy;
use crate::rules::FleetView;

/// How far back the windows keep data (the trailing hour of `cost_spike`, and a margin).
const KEEP: i64 = 3600 + 600;

/// A gateway's `MZ_PRESENCE` snapshot, as far as ops reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Presence {
    sockets: BTreeMap<String, u32>,
}

#[derive(Default)]
struct Windows {
    /// Per app: errors per second.
    errors: HashMap<String, BTreeMap<i64, f64>>,
    /// Per app: tokens per second.
    tokens: HashMap<String, BTreeMap<i64, f64>>,
    /// Per app: `(when, start latency in ms)`.
    starts: HashMap<String, Vec<(i64, f64)>>,
    /// Chats whose session started and whose first run has not: `(app, chat)` → when.
    opened: HashMap<(String, String), DateTime<Utc>>,
}

fn add(m: &mut HashMap<String, BTreeMap<i64, f64>>, app: &str, at: i64, v: f64) {
    *m.entry(app.to_string()).or_default().entry(at).or_default() += v;
}

fn sum(m: &BTreeMap<i64, f64>, from: i64, to: i64) -> f64 {
    m.range(from + 1..=to).map(|(_, v)| v).sum()
}

impl Windows {
    fn take(&mut self, env: &mozaiks_events::Envelope) {
        let at = env.ts.timestamp();
        let app = env.app_id.as_str();
        match &env.event {
            Event::RunFailed(_) => add(&mut self.errors, app, at, 1.0),
            Event::ToolResult(r) if r.error.is_some() => add(&mut self.errors, app, at, 1.0),
            Event::UsageCharged(u) => add(
                &mut self.tokens,
                app,
                at,
                (u.prompt_tokens + u.completion_tokens) as f64,
            ),
            Event::SessionStarted(_) => {
                self.opened
                    .insert((env.app_id.clone(), env.chat_id.clone()), env.ts);
            }
            Event::RunStarted(_) => {
                if let Some(t) = self
                    .opened
                    .remove(&(env.app_id.clone(), env.chat_id.clone()))
                {
                    let ms = (env.ts - t).num_milliseconds().max(0) as f64;
                    self.starts
                        .entry(env.app_id.clone())
                        .or_default()
                        .push((at, ms));
                }
            }
            _ => {}
        }
    }

    fn prune(&mut self, now: i64) {
        let cut = now - KEEP;
        for m in [&mut self.errors, &mut self.tokens] {
            m.retain(|_, s| {
                s.retain(|&t, _| t > cut);
                !s.is_empty()
            });
        }
        self.starts.retain(|_, v| {
            v.retain(|(t, _)| *t > cut);
            !v.is_empty()
        });
        let open_cut = Utc::now() - chrono::Duration::minutes(10);
        self.opened.retain(|_, t| *t > open_cut);
    }
}

/// The fleet's state, followed in the background. Cheap to clone.
#[derive(Clone)]
pub struct Inputs {
    workers: Workers,
    gateways: Latest<BTreeMap<String, u32>>,
    windows: Arc<Mutex<Windows>>,
}

impl Inputs {
    /// Starts following `MZ_PERF`, `MZ_PRESENCE` and `MZ_EVT`.
    pub async fn follow(bus: &Bus) -> Result<Inputs, mozaiks_bus::Error> {
        let workers = Workers::follow(bus).await?;
        let inputs = Inputs {
            workers,
            gateways: Latest::default(),
            windows: Arc::default(),
        };
        let (b, g) = (bus.clone(), inputs.gateways.clone());
        tokio::spawn(async move {
            b.follow_bucket("MZ_PRESENCE", None, |e| {
                let v = match e.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        serde_json::from_slice::<Presence>(&e.value)
                            .ok()
                            .map(|p| p.sockets)
                    }
                    _ => None,
                };
                g.observe(&e.key, e.revision, v);
            })
            .await
        });
        let (b, w) = (bus.clone(), inputs.windows.clone());
        tokio::spawn(async move { tail_events(b, w).await });
        Ok(inputs)
    }

    /// What the rules look at now, each app's windows by its own policy.
    pub fn view(&self, now: DateTime<Utc>, policy_for: &dyn Fn(&str) -> Policy) -> FleetView {
        let mut v = FleetView::default();
        for s in self.workers.live() {
            for r in &s.active_runs {
                *v.runs.entry(r.app_id.clone()).or_default() += 1;
                *v.runs_by_workflow
                    .entry(r.app_id.clone())
                    .or_default()
                    .entry(r.workflow.clone())
                    .or_default() += 1;
            }
        }
        self.gateways.with_live(|it| {
            for (_, sockets) in it {
                for (app, n) in sockets {
                    *v.sockets.entry(app.clone()).or_default() += n;
                }
            }
        });
        let t = now.timestamp();
        let mut w = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        w.prune(t);
        for (app, s) in &w.errors {
            let win = policy_for(app).rules.error_spike.window_seconds.max(1.0) as i64;
            v.errors.insert(
                app.clone(),
                (sum(s, t - win, t), sum(s, t - 2 * win, t - win)),
            );
        }
        for (app, s) in &w.tokens {
            let win = policy_for(app).rules.cost_spike.window_seconds.max(1.0) as i64;
            v.tokens.insert(
                app.clone(),
                (sum(s, t - win, t), sum(s, t - win - 3600, t - win)),
            );
        }
        for (app, s) in &w.starts {
            let win = policy_for(app).rules.slow_start.window_seconds.max(1.0) as i64;
            let recent: Vec<f64> = s
                .iter()
                .filter(|(at, _)| *at > t - win)
                .map(|(_, ms)| *ms)
                .collect();
            if !recent.is_empty() {
                v.starts_ms.insert(app.clone(), recent);
            }
        }
        v
    }
}

/// Follows the event types the rules need, from an hour back, for as long as the process runs
/// (an ordered consumer, recreated from where it stopped after an error).
async fn tail_events(bus: Bus, windows: Arc<Mutex<Windows>>) {
    let s = bus.subjects();
    let filters: Vec<String> = [
        "run.failed",
        "tool.result",
        "usage.charged",
        "session.started",
        "run.started",
    ]
    .iter()
    .map(|t| s.event("*", "*", t))
    .collect();
    let mut next_seq: Option<u64> = None;
    loop {
        let policy = match next_seq {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            None => {
                let from = time::OffsetDateTime::now_utc() - time::Duration::seconds(KEEP - 600);
                consumer::DeliverPolicy::ByStartTime { start_time: from }
            }
        };
        let stream = match bus.stream("MZ_EVT").await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "Ops cannot read MZ_EVT yet; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subjects: filters.clone(),
                deliver_policy: policy,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "Ops cannot follow MZ_EVT; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                warn!(error = %e, "Ops cannot follow MZ_EVT; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(m) = messages.next().await {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "Ops event tail interrupted; resuming.");
                    break;
                }
            };
            if let Ok(info) = m.info() {
                next_seq = Some(info.stream_sequence + 1);
            }
            match codec::decode_event(&m.payload) {
                Ok(env) => windows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take(&env),
                Err(e) => debug!(error = %e, "Ops skips an event that does not decode."),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
