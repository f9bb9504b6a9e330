//! The ops agent (`mozaiks ops`): deterministic rules over the fleet's live state, incidents as
//! CloudEvents on NATS, and only safe, reversible actions.
//!
//! Every replica follows the fleet's state ([`inputs`]) and the policy ([`policy`], in
//! `MZ_OPS_STATE`); one replica at a time — the holder of the `ops` lease in `MZ_LEASES`
//! ([`mozaiks_control::lease::Leader`]) — evaluates the [`rules`] every
//! [`Options::evaluate_every`] and records what it finds ([`journal`]):
//!
//! 1. a condition that held for its `for` duration fires an incident
//!    (`mz.ops.incident.{rule}.{app_id}`, type `mozaiks.ops.incident.firing`);
//! 2. the incident's safe actions are then taken (`mz.ops.action.{kind}.{app_id}`; a throttle,
//!    pause or disabled pack is also put in force in `MZ_OPS_STATE`, which every replica's app
//!    registry follows: [`mozaiks_control::ops_actions`]); risky ones are only proposed;
//! 3. a condition that cleared resolves its incident (`mozaiks.ops.incident.resolved`);
//! 4. an action whose TTL passed is reverted (`mozaiks.ops.action.reverted`, status `expired`).
//!
//! **A takeover duplicates nothing.** A replica that becomes the leader first reads the last
//! incident event of every `(rule, app)` from `MZ_OPS` and adopts the open ones (and takes any of
//! their actions the previous leader did not get to, under the same ids); every append expects
//! its subject's last sequence, so two leaders never both record an incident.

pub mod approvals;
pub mod incident;
pub mod inputs;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod poll;
pub mod rules;
pub mod schema;
pub mod summary;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::lease::{Leader, Leases};
use mozaiks_control::ops_actions::{OPS_BUCKET, OpsAction};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

use crate::incident::{
    Annotations, CloudEvent, Incident, Proposal, Status, TYPE_FIRING, TYPE_RESOLVED,
};
use crate::journal::{Appended, Journal};
use crate::metrics as m;
use crate::policy::{ActionKind, Policy};
use crate::rules::{Finding, FleetView, Rule, Tracker, Transition, fingerprint};

/// The lease the replicas contend for.
pub const LEASE: &str = "ops";

/// Errors of the ops agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Journal(#[from] journal::Error),
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    #[error(transparent)]
    Control(#[from] mozaiks_control::Error),
}

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often the leader evaluates the rules.
    pub evaluate_every: Duration,
    /// Writes each incident's `llm_summary` and `playbook` ([`summary`]); the offline model by
    /// default, `None`: no summary.
    pub model: Option<mozaiks_engine::model::Model>,
    /// Fleets to poll over HTTP too (`--poll`), their values feeding the rules ([`poll`]).
    pub poll: Option<poll::Poll>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            evaluate_every: Duration::from_secs(5),
            model: Some(mozaiks_engine::model::Model::Offline),
            poll: None,
        }
    }
}

/// The policy's stored patches, followed from `MZ_OPS_STATE`. Cheap to clone.
#[derive(Clone, Default)]
pub struct Policies {
    patches: Arc<RwLock<HashMap<String, Value>>>,
}

impl Policies {
    /// Follows the bucket's policy keys in the background.
    pub fn follow(bus: &Bus) -> Policies {
        let p = Policies::default();
        let (bus, me) = (bus.clone(), p.clone());
        tokio::spawn(async move {
            bus.follow_bucket(OPS_BUCKET, None, |e| {
                if !e.key.starts_with("policy.") {
                    return;
                }
                let mut map = me.patches.write().unwrap_or_else(|p| p.into_inner());
                match e.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        if let Ok(v) = serde_json::from_slice(&e.value) {
                            map.insert(e.key.clone(), v);
                        }
                    }
                    _ => {
                        map.remove(&e.key);
                    }
                }
            })
            .await
        });
        p
    }

    /// The policy of `app_id` now: its overrides over the default; a stored patch that no longer
    /// checks is ignored (the built-in default stands in).
    pub fn for_app(&self, app_id: &str) -> Policy {
        let map = self.patches.read().unwrap_or_else(|p| p.into_inner());
        let d = map.get(policy::DEFAULT_KEY);
        let a = map.get(&policy::app_key(app_id));
        Policy::effective(d, a)
            .or_else(|_| Policy::effective(d, None))
            .unwrap_or_default()
    }
}

/// The agent.
pub struct Ops {
    bus: Bus,
    instance: InstanceId,
    opts: Options,
}

/// What the leader knows: the open incidents and every incident subject's last sequence.
#[derive(Default)]
struct Led {
    tracker: Tracker,
    open: HashMap<String, Incident>,
    last_seq: HashMap<String, u64>,
}

impl Ops {
    pub fn new(bus: Bus, instance: InstanceId, opts: Options) -> Ops {
        Ops {
            bus,
            instance,
            opts,
        }
    }

    /// Runs until `shutdown` resolves (then gives the lease up at once).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        metrics::describe();
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let journal = Journal::open(&self.bus, format!("mozaiks/ops/{}", self.instance)).await?;
        let inputs = inputs::Inputs::follow(&self.bus).await?;
        let polled = self.opts.poll.clone().map(poll::Polled::spawn);
        let policies = Policies::follow(&self.bus);
        let leases = Leases::open(&self.bus, self.instance.as_str()).await?;
        let leader = Leader::spawn(leases, LEASE, stopped(stop_rx.clone()));
        let agent = Agent {
            journal,
            policies,
            by: format!("ops:{}", self.instance),
            http: reqwest::Client::new(),
            model: self.opts.model.clone(),
        };
        info!(
            every_ms = self.opts.evaluate_every.as_millis() as u64,
            "Ops agent started."
        );
        let mut led: Option<Led> = None;
        let mut stop = stop_rx.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(self.opts.evaluate_every) => {}
            }
            if !leader.is_leader() {
                if led.take().is_some() {
                    info!("No longer the ops leader.");
                }
                continue;
            }
            let state = match led.as_mut() {
                Some(s) => s,
                None => match agent.take_over().await {
                    Ok(s) => led.insert(s),
                    Err(e) => {
                        warn!(error = %e, "Ops takeover failed; retrying.");
                        continue;
                    }
                },
            };
            if let Err(e) = agent.tick(state, &inputs, polled.as_ref(), &leader).await {
                warn!(error = %e, "Ops evaluation failed; retrying.");
                // Start again from the log: what was recorded is the truth.
                led = None;
            }
        }
        info!("Ops agent stopped.");
        Ok(())
    }
}

struct Agent {
    journal: Journal,
    policies: Policies,
    by: String,
    http: reqwest::Client,
    model: Option<mozaiks_engine::model::Model>,
}

fn pct(v: f64) -> String {
    format!("{:.0} %", v * 100.0)
}

fn describe(f: &Finding, spec_for: f64) -> Annotations {
    // `+ 0.0` turns a -0 (a difference of equal counts) into 0 for the text.
    let v = |k: &str| f.values.get(k).copied().unwrap_or(0.0) + 0.0;
    let app = &f.app_id;
    match f.rule {
        Rule::NoisyNeighbour => Annotations {
            summary: format!(
                "App {app} holds {} of the fleet's active runs",
                pct(v("share"))
            ),
            description: format!(
                "{} of the fleet's {} active runs belong to app {app} (threshold {}), for at least {spec_for} s.",
                v("app_active_runs"),
                v("fleet_active_runs"),
                pct(v("threshold"))
            ),
            ..Default::default()
        },
        Rule::ErrorSpike => Annotations {
            summary: format!(
                "App {app}: {:.1} errors per minute and rising",
                v("errors_per_minute")
            ),
            description: format!(
                "Run failures and tool errors of app {app}: {} in the last window, {} in the one before (threshold {} per minute), for at least {spec_for} s.",
                v("errors_in_window"),
                v("errors_in_previous_window"),
                v("threshold")
            ),
            ..Default::default()
        },
        Rule::CostSpike => Annotations {
            summary: format!(
                "App {app} burns {:.0} tokens per minute",
                v("tokens_per_minute")
            ),
            description: format!(
                "{:.0} tokens per minute against {:.0} over the trailing hour (more than {} times), for at least {spec_for} s.",
                v("tokens_per_minute"),
                v("trailing_hour_tokens_per_minute"),
                v("factor")
            ),
            ..Default::default()
        },
        Rule::SocketShare => Annotations {
            summary: format!("App {app} holds {} of the open WebSockets", pct(v("share"))),
            description: format!(
                "{} of the fleet's {} open WebSockets belong to app {app} (threshold {}), for at least {spec_for} s.",
                v("app_sockets"),
                v("fleet_sockets"),
                pct(v("threshold"))
            ),
            ..Default::default()
        },
        Rule::SlowStart => Annotations {
            summary: format!("App {app}: session start p95 {:.0} ms", v("start_p95_ms")),
            description: format!(
                "p95 of {} session starts (session.started → run.started) is {:.0} ms, above {} ms, for at least {spec_for} s.",
                v("samples"),
                v("start_p95_ms"),
                v("threshold_ms")
            ),
            ..Default::default()
        },
    }
}

impl Agent {
    /// Becomes the leader: adopts the open incidents from `MZ_OPS` and takes any of their actions
    /// the previous leader did not record.
    async fn take_over(&self) -> Result<Led, Error> {
        let mut led = Led::default();
        for (seq, ev) in self.journal.incident_heads().await? {
            let inc = ev.data;
            led.last_seq.insert(inc.fingerprint.clone(), seq);
            if inc.status == Status::Firing
                && let Some(rule) = Rule::parse(&inc.rule)
            {
                led.tracker.set_firing(rule, &inc.app_id, &inc.incident_id);
                led.open.insert(inc.fingerprint.clone(), inc);
            }
        }
        for inc in led.open.values() {
            self.propose(inc, &self.policies.for_app(&inc.app_id))
                .await?;
        }
        if !led.open.is_empty() {
            let recorded: HashSet<String> = self
                .journal
                .actions(None)
                .await?
                .into_iter()
                .map(|a| a.action.action_id)
                .collect();
            let now = Utc::now();
            for inc in led.open.values() {
                for a in &inc.actions {
                    if !recorded.contains(&a.action_id) && a.in_force(now) && a.kind != "notify" {
                        info!(app_id = %a.app_id, kind = %a.kind, action_id = %a.action_id, "Taking an action the previous ops leader did not record.");
                        self.journal.apply(a).await?;
                        ::metrics::counter!(m::ACTIONS, "kind" => a.kind.clone(), "event" => "adopted").increment(1);
                    }
                }
            }
        }
        info!(
            open_incidents = led.open.len(),
            "Ops leader: open incidents adopted from MZ_OPS."
        );
        ::metrics::counter!(m::TAKEOVERS).increment(1);
        ::metrics::gauge!(m::OPEN_INCIDENTS).set(led.open.len() as f64);
        Ok(led)
    }

    async fn tick(
        &self,
        led: &mut Led,
        inputs: &inputs::Inputs,
        polled: Option<&poll::Polled>,
        leader: &Leader,
    ) -> Result<(), Error> {
        let now = Utc::now();
        let pf = |app: &str| self.policies.for_app(app);
        let mut view = inputs.view(now, &pf);
        if let Some(p) = polled {
            p.merge_into(&mut view, now, &pf);
        }
        let findings = rules::evaluate(&view, &pf);
        ::metrics::counter!(m::EVALUATIONS).increment(1);
        for t in led.tracker.step(&findings, now, &pf) {
            // Every effect is checked against the lease first (a leader that lost it stops).
            if !leader.is_leader() {
                return Ok(());
            }
            match t {
                Transition::Fire(f) => self.fire(led, &f, &view, now).await?,
                Transition::Resolve { rule, app_id, .. } => {
                    self.resolve(led, rule, &app_id, now).await?
                }
            }
        }
        if leader.is_leader() {
            self.expire(now).await?;
            let n = self.journal.expire_approvals(&self.by).await?;
            if n > 0 {
                info!(
                    approvals = n,
                    "Proposals not decided within their TTL dropped."
                );
                ::metrics::counter!(m::APPROVALS, "kind" => "any", "event" => "expired")
                    .increment(n as u64);
            }
        }
        ::metrics::gauge!(m::OPEN_INCIDENTS).set(led.open.len() as f64);
        Ok(())
    }

    fn plan(
        &self,
        f: &Finding,
        incident_id: &str,
        view: &FleetView,
        policy: &Policy,
        now: DateTime<Utc>,
    ) -> Vec<OpsAction> {
        let spec = policy.rule(f.rule);
        let a = &policy.actions;
        let ttl = |s: f64| Some(now + chrono::Duration::milliseconds((s * 1000.0) as i64));
        let mut out = Vec::new();
        let mut kinds = spec.actions.clone();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let mut action = OpsAction {
                action_id: incident::action_id(incident_id, kind.as_str()),
                kind: kind.as_str().to_string(),
                app_id: f.app_id.clone(),
                incident_id: Some(incident_id.to_string()),
                by: self.by.clone(),
                reason: format!("{} incident {incident_id}", f.rule.as_str()),
                created_at: now,
                expires_at: None,
                max_concurrent_runs: None,
                retry_after_seconds: None,
                workflow: None,
            };
            match kind {
                ActionKind::Throttle => {
                    let runs = view.runs.get(&f.app_id).copied().unwrap_or(0) as f64;
                    let n = a
                        .throttle
                        .max_concurrent_runs
                        .unwrap_or_else(|| ((runs * a.throttle.factor).floor() as u32).max(1));
                    action.max_concurrent_runs = Some(n);
                    action.expires_at = ttl(a.throttle.ttl_seconds);
                }
                ActionKind::PauseRuns => {
                    action.retry_after_seconds = Some(a.pause_runs.retry_after_seconds);
                    action.expires_at = ttl(a.pause_runs.ttl_seconds);
                }
                ActionKind::DisablePack => {
                    // The app's workflow with the most runs in progress.
                    let Some((wf, _)) = view
                        .runs_by_workflow
                        .get(&f.app_id)
                        .and_then(|m| m.iter().max_by_key(|(_, n)| **n))
                    else {
                        continue;
                    };
                    action.workflow = Some(wf.clone());
                    action.expires_at = ttl(a.disable_pack.ttl_seconds);
                }
                ActionKind::Notify => {}
            }
            out.push(action);
        }
        out
    }

    async fn fire(
        &self,
        led: &mut Led,
        f: &Finding,
        view: &FleetView,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        let fp = fingerprint(f.rule, &f.app_id);
        let policy = self.policies.for_app(&f.app_id);
        let spec = policy.rule(f.rule).clone();
        let incident_id = Uuid::now_v7().to_string();
        let actions = self.plan(f, &incident_id, view, &policy, now);
        let mut inc = Incident {
            incident_id: incident_id.clone(),
            rule: f.rule.as_str().to_string(),
            status: Status::Firing,
            severity: spec.severity,
            app_id: f.app_id.clone(),
            labels: [
                ("rule".to_string(), f.rule.as_str().to_string()),
                ("app_id".to_string(), f.app_id.clone()),
                (
                    "severity".to_string(),
                    serde_json::to_value(spec.severity)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                ),
            ]
            .into(),
            annotations: describe(f, spec.for_seconds),
            starts_at: now,
            ends_at: None,
            fingerprint: fp.clone(),
            values: f.values.clone(),
            actions: actions.clone(),
            proposed: spec
                .propose
                .iter()
                .map(|k| Proposal {
                    kind: *k,
                    app_id: f.app_id.clone(),
                    reason: format!("{} incident {incident_id}", f.rule.as_str()),
                })
                .collect(),
        };
        // The model's summary, before the incident is recorded (it never changes the actions).
        if let Some(model) = &self.model
            && let Some(s) = summary::summarize(model, &inc).await
        {
            inc.annotations.llm_summary = Some(s.summary);
            inc.annotations.playbook = (!s.playbook.is_empty()).then_some(s.playbook);
        }
        let ev = CloudEvent::new(self.journal.source(), TYPE_FIRING, &f.app_id, inc.clone());
        let expected = led.last_seq.get(&fp).copied().unwrap_or(0);
        match self.journal.append_incident(&ev, expected).await? {
            Appended::At(seq) => {
                info!(app_id = %f.app_id, rule = f.rule.as_str(), incident_id = %incident_id, "Incident firing.");
                ::metrics::counter!(m::INCIDENTS, "rule" => f.rule.as_str(), "status" => "firing")
                    .increment(1);
                led.last_seq.insert(fp.clone(), seq);
                led.tracker.set_firing(f.rule, &f.app_id, &incident_id);
                led.open.insert(fp, inc.clone());
                for a in &actions {
                    self.take(a, &inc, &policy).await?;
                }
                self.propose(&inc, &policy).await?;
            }
            Appended::Conflict => self.adopt(led, f.rule, &f.app_id).await?,
        }
        Ok(())
    }

    /// Requests an approval for each risky action `inc` proposes (idempotent: a takeover that
    /// proposes again records nothing new).
    async fn propose(&self, inc: &Incident, policy: &Policy) -> Result<(), Error> {
        let ttl =
            chrono::Duration::milliseconds((policy.actions.approval.ttl_seconds * 1000.0) as i64);
        for p in &inc.proposed {
            let a = approvals::Approval {
                approval_id: approvals::approval_id(&inc.incident_id, p.kind),
                kind: p.kind,
                app_id: p.app_id.clone(),
                incident_id: Some(inc.incident_id.clone()),
                rule: Some(inc.rule.clone()),
                reason: p.reason.clone(),
                requested_by: self.by.clone(),
                created_at: inc.starts_at,
                expires_at: inc.starts_at + ttl,
                status: approvals::ApprovalStatus::Pending,
                decided_by: None,
                decided_at: None,
                comment: None,
                executed: false,
                outcome: None,
            };
            if self.journal.request_approval(&a).await? {
                info!(app_id = %a.app_id, kind = a.kind.as_str(), approval_id = %a.approval_id, "Risky action proposed; it waits for a superadmin's approval.");
                ::metrics::counter!(m::APPROVALS, "kind" => a.kind.as_str(), "event" => "requested")
                    .increment(1);
            }
        }
        Ok(())
    }

    /// Takes one planned action of `inc`.
    async fn take(&self, a: &OpsAction, inc: &Incident, policy: &Policy) -> Result<(), Error> {
        if a.kind == "notify" {
            self.notify(inc, policy).await;
        }
        match self.journal.apply(a).await? {
            Some(cur) if cur.action_id != a.action_id => {
                info!(app_id = %a.app_id, kind = %a.kind, in_force = %cur.action_id, "An action of this kind is already in force for the app.");
            }
            _ => {
                info!(app_id = %a.app_id, kind = %a.kind, action_id = %a.action_id, "Ops action taken.");
                ::metrics::counter!(m::ACTIONS, "kind" => a.kind.clone(), "event" => "applied")
                    .increment(1);
            }
        }
        Ok(())
    }

    async fn notify(&self, inc: &Incident, policy: &Policy) {
        let Some(url) = &policy.actions.notify.webhook_url else {
            return;
        };
        let body = notify::body(inc, policy.actions.notify.format, self.journal.source());
        let outcome = match notify::send(&self.http, url, &body).await {
            Ok(()) => "sent",
            Err(e) => {
                warn!(app_id = %inc.app_id, error = %e, "Ops webhook notification failed.");
                "failed"
            }
        };
        ::metrics::counter!(m::NOTIFICATIONS, "outcome" => outcome).increment(1);
    }

    /// Another writer appended to the incident's subject: take what the log says.
    async fn adopt(&self, led: &mut Led, rule: Rule, app_id: &str) -> Result<(), Error> {
        let fp = fingerprint(rule, app_id);
        if let Some((seq, ev)) = self.journal.last_incident(rule.as_str(), app_id).await? {
            led.last_seq.insert(fp.clone(), seq);
            if ev.data.status == Status::Firing {
                led.tracker.set_firing(rule, app_id, &ev.data.incident_id);
                led.open.insert(fp, ev.data);
            } else {
                led.tracker.clear(rule, app_id);
                led.open.remove(&fp);
            }
        }
        warn!(
            app_id,
            rule = rule.as_str(),
            "Another ops replica recorded this incident first; adopted it."
        );
        Ok(())
    }

    async fn resolve(
        &self,
        led: &mut Led,
        rule: Rule,
        app_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), Error> {
        let fp = fingerprint(rule, app_id);
        let Some(mut inc) = led.open.get(&fp).cloned() else {
            led.tracker.clear(rule, app_id);
            return Ok(());
        };
        inc.status = Status::Resolved;
        inc.ends_at = Some(now);
        let ev = CloudEvent::new(self.journal.source(), TYPE_RESOLVED, app_id, inc.clone());
        let expected = led.last_seq.get(&fp).copied().unwrap_or(0);
        match self.journal.append_incident(&ev, expected).await? {
            Appended::At(seq) => {
                info!(app_id, rule = rule.as_str(), incident_id = %inc.incident_id, "Incident resolved.");
                ::metrics::counter!(m::INCIDENTS, "rule" => rule.as_str(), "status" => "resolved")
                    .increment(1);
                led.last_seq.insert(fp.clone(), seq);
                led.tracker.clear(rule, app_id);
                led.open.remove(&fp);
                if inc.actions.iter().any(|a| a.kind == "notify") {
                    self.notify(&inc, &self.policies.for_app(app_id)).await;
                }
            }
            Appended::Conflict => self.adopt(led, rule, app_id).await?,
        }
        Ok(())
    }

    /// Reverts the actions whose TTL passed (their effect already ended on every replica).
    async fn expire(&self, now: DateTime<Utc>) -> Result<(), Error> {
        for a in self.journal.in_force().await? {
            if !a.in_force(now) {
                self.journal.revert(&a, "expired", &self.by).await?;
                info!(app_id = %a.app_id, kind = %a.kind, action_id = %a.action_id, "Ops action expired and reverted.");
                ::metrics::counter!(m::ACTIONS, "kind" => a.kind.clone(), "event" => "expired")
                    .increment(1);
            }
        }
        Ok(())
    }
}
