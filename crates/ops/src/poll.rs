//! Polling fleets over HTTP (`mozaiks ops --poll URL`), as the seeds' ops guide does: every
//! [`Poll::every`] each URL's `GET /api/health`, `/health/active-runs` and
//! `/metrics/perf/aggregate` (a superadmin's view: every app) are read, and what they say feeds
//! the rules' inputs next to what the bus says ([`Polled::merge_into`]):
//!
//! - active runs by app and workflow (`noisy_neighbour`, and `disable_pack`'s choice of pack)
//!   from `/health/active-runs`;
//! - errors (`runs_failed` + `tool_errors`) and tokens (`total_tokens`) by app
//!   (`error_spike`, `cost_spike`) from the growth of `/metrics/perf/aggregate`'s counters
//!   between two polls (a counter that went down — a worker restarted — counts from zero).
//!
//! The polled fleet may be the one this agent also follows on the bus (the seeds' setup, where
//! the monitor runs outside the runtime) or another one. So per app a polled value stands in
//! where it is larger than the bus's, and is never added to it: the same fleet seen both ways
//! is not counted twice. Several URLs are different fleets: their values add up. A URL that
//! stops answering drops out after three missed polls (its last values are not kept alive).
//! Open WebSockets and session start latencies are not in these endpoints; they come from the
//! bus only.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::metrics as m;
use crate::policy::Policy;
use crate::rules::FleetView;

/// Gives the bearer token to poll with (called before each round: a minted token is renewed).
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What to poll.
#[derive(Clone)]
pub struct Poll {
    /// Each fleet's base URL (a gateway, or a load balancer in front of them).
    pub urls: Vec<String>,
    pub every: Duration,
    pub token: TokenSource,
}

impl std::fmt::Debug for Poll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poll")
            .field("urls", &self.urls)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// How far back the counter growth is kept (the trailing hour of `cost_spike`, and a margin).
const KEEP: i64 = 3600 + 600;

/// One fleet's polled state.
#[derive(Default)]
struct Target {
    /// When it last answered all three endpoints.
    last_ok: Option<Instant>,
    runs: BTreeMap<String, u32>,
    runs_by_workflow: BTreeMap<String, BTreeMap<String, u32>>,
    /// The last counters by app: `(errors, tokens)`.
    counters: HashMap<String, (f64, f64)>,
    /// Growth per second by app.
    errors: HashMap<String, BTreeMap<i64, f64>>,
    tokens: HashMap<String, BTreeMap<i64, f64>>,
}

fn sum(m: &BTreeMap<i64, f64>, from: i64, to: i64) -> f64 {
    m.range(from + 1..=to).map(|(_, v)| v).sum()
}

impl Target {
    /// Takes one round's answers (`active-runs` and `aggregate` bodies) polled at `at`.
    fn take(&mut self, active: &Value, aggregate: &Value, at: DateTime<Utc>) {
        self.runs.clear();
        self.runs_by_workflow.clear();
        for r in active["runs"].as_array().into_iter().flatten() {
            let (Some(app), Some(wf)) = (r["app_id"].as_str(), r["workflow"].as_str()) else {
                continue;
            };
            *self.runs.entry(app.to_string()).or_default() += 1;
            *self
                .runs_by_workflow
                .entry(app.to_string())
                .or_default()
                .entry(wf.to_string())
                .or_default() += 1;
        }
        let t = at.timestamp();
        let n = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        for (app, c) in aggregate["apps"].as_object().into_iter().flatten() {
            let now = (
                n(c, "runs_failed") + n(c, "tool_errors"),
                n(c, "total_tokens"),
            );
            // The first sight of an app is a baseline, not growth.
            if let Some(before) = self.counters.insert(app.clone(), now) {
                // A counter that went down restarted (a worker's counters count since it
                // started): what it shows now is its growth.
                let grew = |now: f64, before: f64| if now >= before { now - before } else { now };
                let (e, k) = (grew(now.0, before.0), grew(now.1, before.1));
                if e > 0.0 {
                    *self
                        .errors
                        .entry(app.clone())
                        .or_default()
                        .entry(t)
                        .or_default() += e;
                }
                if k > 0.0 {
                    *self
                        .tokens
                        .entry(app.clone())
                        .or_default()
                        .entry(t)
                        .or_default() += k;
                }
            }
        }
        let cut = t - KEEP;
        for m in [&mut self.errors, &mut self.tokens] {
            m.retain(|_, s| {
                s.retain(|&at, _| at > cut);
                !s.is_empty()
            });
        }
        self.last_ok = Some(Instant::now());
    }
}

/// The polled fleets' state. Cheap to clone.
#[derive(Clone, Default)]
pub struct Polled {
    targets: Arc<Mutex<BTreeMap<String, Target>>>,
    /// Polls missed before a fleet's values drop out.
    stale_after: Duration,
}

impl Polled {
    /// Polls in the background for as long as the process runs.
    pub fn spawn(poll: Poll) -> Polled {
        let polled = Polled {
            targets: Arc::default(),
            stale_after: poll.every * 3,
        };
        let me = polled.clone();
        tokio::spawn(async move { me.run(poll).await });
        polled
    }

    async fn run(self, poll: Poll) {
        let http = reqwest::Client::builder()
            .timeout(poll.every.max(Duration::from_secs(1)))
            .build()
            .unwrap_or_default();
        info!(urls = ?poll.urls, every_ms = poll.every.as_millis() as u64, "Ops polls fleets over HTTP.");
        let mut tick = tokio::time::interval(poll.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let token = (poll.token)();
            for url in &poll.urls {
                self.poll_one(&http, url, token.as_deref()).await;
            }
        }
    }

    async fn poll_one(&self, http: &reqwest::Client, url: &str, token: Option<&str>) {
        let base = url.trim_end_matches('/');
        let get = |path: &'static str| {
            let req = http.get(format!("{base}{path}"));
            let req = match token {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            async move {
                let r = req.send().await.map_err(|e| e.to_string())?;
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status.is_success() {
                    Ok(body)
                } else {
                    Err(format!("{path}: HTTP {status}: {body}"))
                }
            }
        };
        let at = Utc::now();
        let answers = async {
            get("/api/health").await?;
            Ok::<_, String>((
                get("/health/active-runs").await?,
                get("/metrics/perf/aggregate").await?,
            ))
        }
        .await;
        match answers {
            Ok((active, aggregate)) => {
                ::metrics::counter!(m::POLLS, "outcome" => "ok").increment(1);
                debug!(url, runs = %active["count"], "Fleet polled.");
                self.targets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(url.to_string())
                    .or_default()
                    .take(&active, &aggregate, at);
            }
            Err(e) => {
                ::metrics::counter!(m::POLLS, "outcome" => "failed").increment(1);
                warn!(url, error = %e, "Polling a fleet failed.");
            }
        }
    }

    /// Puts the polled values into `view` (see the module docs), each app's windows by its own
    /// policy.
    pub fn merge_into(
        &self,
        view: &mut FleetView,
        now: DateTime<Utc>,
        policy_for: &dyn Fn(&str) -> Policy,
    ) {
        let targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let live: Vec<&Target> = targets
            .values()
            .filter(|t| t.last_ok.is_some_and(|at| at.elapsed() <= self.stale_after))
            .collect();
        merge(view, &live, now.timestamp(), policy_for);
    }
}

/// The pure part of [`Polled::merge_into`].
fn merge(view: &mut FleetView, targets: &[&Target], t: i64, policy_for: &dyn Fn(&str) -> Policy) {
    let mut runs: BTreeMap<String, u32> = BTreeMap::new();
    let mut by_wf: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut errors: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut tokens: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for tg in targets {
        for (app, n) in &tg.runs {
            *runs.entry(app.clone()).or_default() += n;
        }
        for (app, wfs) in &tg.runs_by_workflow {
            for (wf, n) in wfs {
                *by_wf
                    .entry(app.clone())
                    .or_default()
                    .entry(wf.clone())
                    .or_default() += n;
            }
        }
        for (app, s) in &tg.errors {
            let win = policy_for(app).rules.error_spike.window_seconds.max(1.0) as i64;
            let e = errors.entry(app.clone()).or_default();
            e.0 += sum(s, t - win, t);
            e.1 += sum(s, t - 2 * win, t - win);
        }
        for (app, s) in &tg.tokens {
            let win = policy_for(app).rules.cost_spike.window_seconds.max(1.0) as i64;
            let e = tokens.entry(app.clone()).or_default();
            e.0 += sum(s, t - win, t);
            e.1 += sum(s, t - win - 3600, t - win);
        }
    }
    for (app, n) in runs {
        let cur = view.runs.entry(app.clone()).or_default();
        if n > *cur {
            *cur = n;
            // The workflows go with the larger count.
            if let Some(wfs) = by_wf.remove(&app) {
                view.runs_by_workflow.insert(app, wfs);
            }
        }
    }
    for (into, from) in [(&mut view.errors, errors), (&mut view.tokens, tokens)] {
        for (app, (a, b)) in from {
            let cur = into.entry(app).or_default();
            if a > cur.0 {
                *cur = (a, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn active(runs: &[(&str, &str)]) -> Value {
        json!({"count": runs.len(), "runs": runs.iter().map(|(a, w)| json!({"app_id": a, "workflow": w})).collect::<Vec<_>>()})
    }

    fn aggregate(apps: &[(&str, u64, u64, u64)]) -> Value {
        let apps: serde_json::Map<String, Value> = apps
            .iter()
            .map(|(a, failed, tool_errors, tokens)| {
                (
                    a.to_string(),
                    json!({"runs_failed": failed, "tool_errors": tool_errors, "total_tokens": tokens}),
                )
            })
            .collect();
        json!({"apps": apps})
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn polled_runs_and_counter_growth_feed_the_view() {
        let mut t = Target::default();
        t.take(&active(&[]), &aggregate(&[("x", 1, 0, 100)]), at(0));
        t.take(
            &active(&[("x", "hold"), ("x", "hold"), ("x", "hello"), ("y", "hello")]),
            &aggregate(&[("x", 4, 2, 600), ("y", 0, 0, 10)]),
            at(5),
        );
        let mut v = FleetView::default();
        merge(&mut v, &[&t], at(6).timestamp(), &|_| Policy::default());
        assert_eq!(v.runs["x"], 3);
        assert_eq!(v.runs["y"], 1);
        assert_eq!(v.runs_by_workflow["x"]["hold"], 2);
        // Growth only: x's first counters were a baseline; y was first seen at 5 s.
        assert_eq!(v.errors["x"].0, 5.0);
        assert_eq!(v.tokens["x"].0, 500.0);
        assert!(!v.errors.contains_key("y"));
    }

    #[test]
    fn a_counter_that_went_down_counts_from_zero() {
        let mut t = Target::default();
        t.take(&active(&[]), &aggregate(&[("x", 10, 0, 0)]), at(0));
        t.take(&active(&[]), &aggregate(&[("x", 3, 0, 0)]), at(5));
        let mut v = FleetView::default();
        merge(&mut v, &[&t], at(6).timestamp(), &|_| Policy::default());
        assert_eq!(v.errors["x"].0, 3.0);
    }

    #[test]
    fn the_same_fleet_seen_on_the_bus_is_not_counted_twice() {
        let mut t = Target::default();
        t.take(
            &active(&[("x", "hold"), ("x", "hold")]),
            &aggregate(&[]),
            at(0),
        );
        let mut v = FleetView::default();
        v.runs.insert("x".into(), 2);
        v.runs.insert("y".into(), 1);
        merge(&mut v, &[&t], at(1).timestamp(), &|_| Policy::default());
        assert_eq!(v.runs["x"], 2);
        assert_eq!(v.runs["y"], 1);
        // Two fleets add up, and the larger count wins over the bus's.
        let mut u = Target::default();
        u.take(&active(&[("x", "hello")]), &aggregate(&[]), at(0));
        merge(&mut v, &[&t, &u], at(1).timestamp(), &|_| Policy::default());
        assert_eq!(v.runs["x"], 3);
        assert_eq!(v.runs_by_workflow["x"]["hello"], 1);
    }
}
