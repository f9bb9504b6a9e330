//! The rules: pure functions of the fleet's state ([`FleetView`]) and the policy, and the
//! `for` / resolve state machine ([`Tracker`]), in the manner of Prometheus alerting rules: a
//! condition is *pending* until it has held for its `for` duration, then *firing*; a firing
//! condition *resolves* after it stayed clear for `keep_firing_seconds`.
//!
//! | rule | condition, per app |
//! |---|---|
//! | `noisy_neighbour` | its share of the fleet's active runs > `threshold`, with at least `min_total` runs in the fleet |
//! | `error_spike` | run failures + tool errors in the last `window_seconds`, per minute, > `threshold`, and more than in the window before (rising) |
//! | `cost_spike` | tokens per minute over the last `window_seconds` > `threshold` × its rate over the trailing hour, and ≥ `min_total` |
//! | `socket_share` | its share of the fleet's open WebSockets > `threshold`, with at least `min_total` sockets |
//! | `slow_start` | p95 of its session starts (`session.started` → `run.started`) in the last `window_seconds` > `threshold` ms, over at least `min_total` starts |

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// The rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    NoisyNeighbour,
    ErrorSpike,
    CostSpike,
    SocketShare,
    SlowStart,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::NoisyNeighbour,
        Rule::ErrorSpike,
        Rule::CostSpike,
        Rule::SocketShare,
        Rule::SlowStart,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NoisyNeighbour => "noisy_neighbour",
            Rule::ErrorSpike => "error_spike",
            Rule::CostSpike => "cost_spike",
            Rule::SocketShare => "socket_share",
            Rule::SlowStart => "slow_start",
        }
    }

    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// What the rules look at, per app, at one instant (built by [`crate::inputs`]).
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    /// Active runs by app (every live worker's snapshot).
    pub runs: BTreeMap<String, u32>,
    /// Active runs by app and workflow.
    pub runs_by_workflow: BTreeMap<String, BTreeMap<String, u32>>,
    /// Open WebSockets by app (every live gateway's snapshot).
    pub sockets: BTreeMap<String, u32>,
    /// Per app: `(errors in the last window, errors in the window before)`, per rule window.
    pub errors: BTreeMap<String, (f64, f64)>,
    /// Per app: `(tokens in the last window, tokens over the trailing hour before it)`.
    pub tokens: BTreeMap<String, (f64, f64)>,
    /// Per app: session start latencies in ms in the window.
    pub starts_ms: BTreeMap<String, Vec<f64>>,
}

/// A rule's verdict on one app.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub rule: Rule,
    pub app_id: String,
    /// The metric values behind the verdict (reported with the incident).
    pub values: BTreeMap<String, f64>,
}

fn p95(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64) * 0.95).ceil() as usize;
    s[idx.saturating_sub(1).min(s.len() - 1)]
}

/// The conditions that hold now, each app under its own policy (`policy_for`).
pub fn evaluate(view: &FleetView, policy_for: &dyn Fn(&str) -> Policy) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut apps: Vec<&String> = view
        .runs
        .keys()
        .chain(view.sockets.keys())
        .chain(view.errors.keys())
        .chain(view.tokens.keys())
        .chain(view.starts_ms.keys())
        .collect();
    apps.sort();
    apps.dedup();
    let total_runs: f64 = view.runs.values().map(|&n| n as f64).sum();
    let total_sockets: f64 = view.sockets.values().map(|&n| n as f64).sum();
    for app in apps {
        let policy = policy_for(app);
        let mut found = |rule: Rule, values: Vec<(&str, f64)>| {
            out.push(Finding {
                rule,
                app_id: app.clone(),
                values: values
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })
        };
        let r = &policy.rules;
        let runs = view.runs.get(app).copied().unwrap_or(0) as f64;
        if r.noisy_neighbour.enabled && total_runs >= r.noisy_neighbour.min_total.max(1.0) {
            let share = runs / total_runs;
            if share > r.noisy_neighbour.threshold {
                found(
                    Rule::NoisyNeighbour,
                    vec![
                        ("share", share),
                        ("app_active_runs", runs),
                        ("fleet_active_runs", total_runs),
                        ("threshold", r.noisy_neighbour.threshold),
                    ],
                );
            }
        }
        let sockets = view.sockets.get(app).copied().unwrap_or(0) as f64;
        if r.socket_share.enabled && total_sockets >= r.socket_share.min_total.max(1.0) {
            let share = sockets / total_sockets;
            if share > r.socket_share.threshold {
                found(
                    Rule::SocketShare,
                    vec![
                        ("share", share),
                        ("app_sockets", sockets),
                        ("fleet_sockets", total_sockets),
                        ("threshold", r.socket_share.threshold),
                    ],
                );
            }
        }
        if let Some(&(now, before)) = view.errors.get(app)
            && r.error_spike.enabled
        {
            let minutes = (r.error_spike.window_seconds / 60.0).max(1.0 / 60.0);
            let rate = now / minutes;
            if rate > r.error_spike.threshold && now > before && now >= r.error_spike.min_total {
                found(
                    Rule::ErrorSpike,
                    vec![
                        ("errors_per_minute", rate),
                        ("errors_in_window", now),
                        ("errors_in_previous_window", before),
                        ("threshold", r.error_spike.threshold),
                    ],
                );
            }
        }
        if let Some(&(now, hour)) = view.tokens.get(app)
            && r.cost_spike.enabled
        {
            let window_min = (r.cost_spike.window_seconds / 60.0).max(1.0 / 60.0);
            let rate = now / window_min;
            let baseline = hour / 60.0;
            if rate >= r.cost_spike.min_total && rate > r.cost_spike.threshold * baseline {
                found(
                    Rule::CostSpike,
                    vec![
                        ("tokens_per_minute", rate),
                        ("trailing_hour_tokens_per_minute", baseline),
                        ("factor", r.cost_spike.threshold),
                    ],
                );
            }
        }
        if let Some(starts) = view.starts_ms.get(app)
            && r.slow_start.enabled
            && starts.len() as f64 >= r.slow_start.min_total.max(1.0)
        {
            let p = p95(starts);
            if p > r.slow_start.threshold {
                found(
                    Rule::SlowStart,
                    vec![
                        ("start_p95_ms", p),
                        ("samples", starts.len() as f64),
                        ("threshold_ms", r.slow_start.threshold),
                    ],
                );
            }
        }
    }
    out
}

/// `{rule}.{app_id}`: one open incident per rule and app.
pub fn fingerprint(rule: Rule, app_id: &str) -> String {
    format!("{}.{app_id}", rule.as_str())
}

/// A condition's state in the [`Tracker`].
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Held since; fires once it held for `for_seconds`.
    Pending { since: DateTime<Utc> },
    /// Firing; `clear_since` is set while the condition does not hold.
    Firing {
        incident_id: String,
        clear_since: Option<DateTime<Utc>>,
    },
}

/// What the agent must do after a [`Tracker::step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Fire(Finding),
    Resolve {
        rule: Rule,
        app_id: String,
        incident_id: String,
    },
}

/// The `for` / resolve state of every `(rule, app)`. Pure: time is given.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    states: HashMap<(Rule, String), State>,
}

impl Tracker {
    /// The state of `(rule, app_id)`.
    pub fn state(&self, rule: Rule, app_id: &str) -> Option<&State> {
        self.states.get(&(rule, app_id.to_string()))
    }

    /// Records an incident firing (published by this agent, or found open on `MZ_OPS` at a
    /// takeover).
    pub fn set_firing(&mut self, rule: Rule, app_id: &str, incident_id: &str) {
        self.states.insert(
            (rule, app_id.to_string()),
            State::Firing {
                incident_id: incident_id.to_string(),
                clear_since: None,
            },
        );
    }

    /// Forgets `(rule, app_id)` (its incident resolved).
    pub fn clear(&mut self, rule: Rule, app_id: &str) {
        self.states.remove(&(rule, app_id.to_string()));
    }

    /// Forgets every pending condition (a new leader counts `for` from its own start).
    pub fn forget_pending(&mut self) {
        self.states.retain(|_, s| matches!(s, State::Firing { .. }));
    }

    /// Advances every condition with the findings of `now`. A firing incident stays in the
    /// tracker until the caller records its resolution ([`Tracker::clear`]) or its firing
    /// ([`Tracker::set_firing`]).
    pub fn step(
        &mut self,
        findings: &[Finding],
        now: DateTime<Utc>,
        policy_for: &dyn Fn(&str) -> Policy,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let holding: HashMap<(Rule, String), &Finding> = findings
            .iter()
            .map(|f| ((f.rule, f.app_id.clone()), f))
            .collect();
        let secs = |d: chrono::TimeDelta| d.num_milliseconds() as f64 / 1000.0;
        for (key, f) in &holding {
            let spec = policy_for(&key.1).rule(key.0).clone();
            match self.states.get_mut(key) {
                None => {
                    if spec.for_seconds <= 0.0 {
                        out.push(Transition::Fire((*f).clone()));
                    }
                    self.states
                        .insert(key.clone(), State::Pending { since: now });
                }
                Some(State::Pending { since }) => {
                    if secs(now - *since) >= spec.for_seconds {
                        out.push(Transition::Fire((*f).clone()));
                    }
                }
                Some(State::Firing { clear_since, .. }) => *clear_since = None,
            }
        }
        let mut gone = Vec::new();
        for (key, state) in self.states.iter_mut() {
            if holding.contains_key(key) {
                continue;
            }
            match state {
                State::Pending { .. } => gone.push(key.clone()),
                State::Firing {
                    incident_id,
                    clear_since,
                } => {
                    let since = *clear_since.get_or_insert(now);
                    let keep = policy_for(&key.1).rule(key.0).keep_firing_seconds;
                    if secs(now - since) >= keep {
                        out.push(Transition::Resolve {
                            rule: key.0,
                            app_id: key.1.clone(),
                            incident_id: incident_id.clone(),
                        });
                    }
                }
            }
        }
        for k in gone {
            self.states.remove(&k);
        }
        out.sort_by_key(|t| match t {
            Transition::Fire(f) => (f.rule, f.app_id.clone()),
            Transition::Resolve { rule, app_id, .. } => (*rule, app_id.clone()),
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(patch: serde_json::Value) -> Policy {
        Policy::effective(Some(&patch), None).unwrap()
    }

    fn view_runs(x: u32, y: u32) -> FleetView {
        FleetView {
            runs: [("x".to_string(), x), ("y".to_string(), y)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn noisy_neighbour_is_one_apps_share_of_active_runs() {
        let p = Policy::default();
        let f = evaluate(&view_runs(6, 4), &|_| p.clone());
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].rule, f[0].app_id.as_str()),
            (Rule::NoisyNeighbour, "x")
        );
        assert_eq!(f[0].values["share"], 0.6);
        // Below the fleet minimum: nothing.
        assert!(evaluate(&view_runs(3, 1), &|_| p.clone()).is_empty());
        // An app's override applies to that app only.
        let f = evaluate(&view_runs(6, 4), &|app| {
            if app == "x" {
                policy(json!({"rules": {"noisy_neighbour": {"threshold": 0.7}}}))
            } else {
                p.clone()
            }
        });
        assert!(f.is_empty());
    }

    #[test]
    fn the_other_rules_hold_on_their_metrics() {
        let p = policy(
            json!({"rules": {"socket_share": {"min_total": 2}, "slow_start": {"min_total": 2, "threshold": 100}}}),
        );
        let view = FleetView {
            sockets: [("x".to_string(), 9), ("y".to_string(), 1)].into(),
            errors: [
                ("x".to_string(), (30.0, 2.0)),
                ("y".to_string(), (30.0, 40.0)),
            ]
            .into(),
            tokens: [
                ("x".to_string(), (5000.0, 6000.0)),
                ("y".to_string(), (5000.0, 600000.0)),
            ]
            .into(),
            starts_ms: [("y".to_string(), vec![50.0, 60.0, 500.0])].into(),
            ..Default::default()
        };
        let mut got: Vec<(Rule, String)> = evaluate(&view, &|_| p.clone())
            .into_iter()
            .map(|f| (f.rule, f.app_id))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (Rule::ErrorSpike, "x".to_string()),
                (Rule::CostSpike, "x".to_string()),
                (Rule::SocketShare, "x".to_string()),
                (Rule::SlowStart, "y".to_string()),
            ]
        );
    }

    #[test]
    fn a_condition_fires_after_its_for_duration_and_resolves_after_it_clears() {
        let p = policy(
            json!({"rules": {"noisy_neighbour": {"for_seconds": 10, "keep_firing_seconds": 5}}}),
        );
        let pf = |_: &str| p.clone();
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let f = evaluate(&view_runs(6, 4), &pf);
        let mut tr = Tracker::default();
        assert!(tr.step(&f, at(0), &pf).is_empty());
        assert!(tr.step(&f, at(9), &pf).is_empty());
        let fired = tr.step(&f, at(10), &pf);
        assert!(matches!(&fired[..], [Transition::Fire(x)] if x.app_id == "x"));
        tr.set_firing(Rule::NoisyNeighbour, "x", "i1");
        assert!(tr.step(&f, at(11), &pf).is_empty());
        // Clears: resolves only after keep_firing_seconds; a blip back resets it.
        assert!(tr.step(&[], at(12), &pf).is_empty());
        assert!(tr.step(&f, at(13), &pf).is_empty());
        assert!(tr.step(&[], at(14), &pf).is_empty());
        let resolved = tr.step(&[], at(19), &pf);
        assert_eq!(
            resolved,
            vec![Transition::Resolve {
                rule: Rule::NoisyNeighbour,
                app_id: "x".into(),
                incident_id: "i1".into()
            }]
        );
        // A condition that stops holding while pending starts over.
        tr.clear(Rule::NoisyNeighbour, "x");
        assert!(tr.step(&f, at(20), &pf).is_empty());
        assert!(tr.step(&[], at(25), &pf).is_empty());
        assert!(tr.step(&f, at(29), &pf).is_empty());
        assert!(tr.step(&f, at(38), &pf).is_empty());
        assert_eq!(tr.step(&f, at(39), &pf).len(), 1);
    }
}
