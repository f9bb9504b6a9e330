//! The ops policy: each rule's threshold, `for` duration and actions, and each action's settings.
//!
//! A policy is stored as JSON merge patches (RFC 7386) in the KV bucket `MZ_OPS_STATE` (each
//! write is an entry of the bucket's history): `policy.default` over the built-in
//! [`Policy::default`], and `policy.app.{app_id}` over that for one app. [`Policy::effective`]
//! merges them and checks the result; a body that does not check is refused with a stable code
//! ([`PolicyError::code`]) before anything is stored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The key of the default policy in `MZ_OPS_STATE`.
pub const DEFAULT_KEY: &str = "policy.default";

/// The key of an app's overrides in `MZ_OPS_STATE`.
pub fn app_key(app_id: &str) -> String {
    format!("policy.app.{app_id}")
}

/// How bad an incident is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// The safe, reversible actions the agent takes by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Throttle,
    PauseRuns,
    DisablePack,
    Notify,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Throttle => "throttle",
            ActionKind::PauseRuns => "pause_runs",
            ActionKind::DisablePack => "disable_pack",
            ActionKind::Notify => "notify",
        }
    }
}

/// Risky actions: only ever proposed, never executed by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProposalKind {
    SuspendApp,
    RaiseLimits,
    MoveStorage,
    Scale,
}

impl ProposalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalKind::SuspendApp => "suspend_app",
            ProposalKind::RaiseLimits => "raise_limits",
            ProposalKind::MoveStorage => "move_storage",
            ProposalKind::Scale => "scale",
        }
    }
}

/// One rule's settings. What `threshold` and `min_total` mean depends on the rule (see
/// [`crate::rules`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub enabled: bool,
    pub threshold: f64,
    /// The least fleet-wide (or per-app) amount for the rule to look at all (a share of three
    /// runs says little).
    pub min_total: f64,
    /// How long the condition must hold before the incident fires.
    pub for_seconds: f64,
    /// How long the condition must stay clear before the incident resolves.
    pub keep_firing_seconds: f64,
    /// The window the rule measures over.
    pub window_seconds: f64,
    pub severity: Severity,
    /// Safe actions taken when the incident fires.
    pub actions: Vec<ActionKind>,
    /// Risky actions proposed (never executed by the agent).
    pub propose: Vec<ProposalKind>,
}

/// Every rule's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// One app's share of the fleet's active runs (`threshold`: 0–1; `min_total`: fleet runs).
    pub noisy_neighbour: RuleSpec,
    /// Run failures plus tool errors per minute (`threshold`), and more than the window before.
    pub error_spike: RuleSpec,
    /// Tokens per minute above `threshold` times the app's rate over the trailing hour
    /// (`min_total`: tokens per minute worth looking at).
    pub cost_spike: RuleSpec,
    /// One app's share of the fleet's open WebSockets (`threshold`: 0–1; `min_total`: sockets).
    pub socket_share: RuleSpec,
    /// p95 of session start (`session.started` → `run.started`) in ms (`min_total`: samples).
    pub slow_start: RuleSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    pub ttl_seconds: f64,
    /// The app's `max_concurrent_runs` becomes this share of its active runs (at least 1)…
    pub factor: f64,
    /// …or this number when set.
    pub max_concurrent_runs: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseSpec {
    pub ttl_seconds: f64,
    pub retry_after_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisablePackSpec {
    pub ttl_seconds: f64,
}

/// Body of the `notify` webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// `{"text": ...}` (Slack incoming webhooks, Mattermost, …).
    Slack,
    /// Alertmanager's webhook body (`version: "4"`, `status`, `alerts`).
    Alertmanager,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// Where to POST (`http` or `https`); none: notify is recorded but nothing is sent.
    pub webhook_url: Option<String>,
    pub format: NotifyFormat,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpecs {
    pub throttle: ThrottleSpec,
    pub pause_runs: PauseSpec,
    pub disable_pack: DisablePackSpec,
    pub notify: NotifySpec,
    /// Risky actions proposed by an incident: how long they wait for a decision.
    pub approval: ApprovalSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// A proposal not approved or rejected within this time is dropped (`expired`).
    pub ttl_seconds: f64,
}

/// A complete policy (the default, or one app's after its overrides).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub rules: Rules,
    pub actions: ActionSpecs,
}

fn rule(threshold: f64, min_total: f64, for_seconds: f64, window: f64) -> RuleSpec {
    RuleSpec {
        enabled: true,
        threshold,
        min_total,
        for_seconds,
        keep_firing_seconds: 0.0,
        window_seconds: window,
        severity: Severity::Warning,
        actions: vec![ActionKind::Notify],
        propose: Vec::new(),
    }
}

impl Default for Policy {
    /// The seeds' rules: a noisy neighbour holds over 40 % of the active runs for 5 minutes.
    fn default() -> Policy {
        Policy {
            rules: Rules {
                noisy_neighbour: RuleSpec {
                    actions: vec![ActionKind::Throttle, ActionKind::Notify],
                    ..rule(0.4, 5.0, 300.0, 0.0)
                },
                error_spike: rule(10.0, 0.0, 120.0, 60.0),
                cost_spike: RuleSpec {
                    propose: vec![ProposalKind::SuspendApp],
                    ..rule(3.0, 1000.0, 300.0, 60.0)
                },
                socket_share: rule(0.5, 20.0, 300.0, 0.0),
                slow_start: rule(5000.0, 5.0, 300.0, 300.0),
            },
            actions: ActionSpecs {
                throttle: ThrottleSpec {
                    ttl_seconds: 600.0,
                    factor: 0.5,
                    max_concurrent_runs: None,
                },
                pause_runs: PauseSpec {
                    ttl_seconds: 300.0,
                    retry_after_seconds: 30,
                },
                disable_pack: DisablePackSpec { ttl_seconds: 600.0 },
                notify: NotifySpec {
                    webhook_url: None,
                    format: NotifyFormat::Slack,
                },
                approval: ApprovalSpec {
                    ttl_seconds: 3600.0,
                },
            },
        }
    }
}

/// Why a policy body is refused. [`PolicyError::code`] is stable.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("the policy must be a JSON object")]
    NotAnObject,
    #[error("invalid policy: {0}")]
    Shape(String),
    #[error("{path}: {reason}")]
    Threshold { path: String, reason: String },
    #[error("{path}: {reason}")]
    Duration { path: String, reason: String },
    #[error("actions.notify.webhook_url: {0}")]
    WebhookUrl(String),
}

impl PolicyError {
    /// The stable code of the refusal (422).
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::NotAnObject | PolicyError::Shape(_) => "invalid_policy",
            PolicyError::Threshold { .. } => "invalid_threshold",
            PolicyError::Duration { .. } => "invalid_duration",
            PolicyError::WebhookUrl(_) => "invalid_webhook_url",
        }
    }
}

/// RFC 7386: `patch` over `target` (`null` removes a member).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The longest TTL or `for` duration accepted (30 days).
const MAX_SECONDS: f64 = 30.0 * 86400.0;

impl Policy {
    /// The built-in default under `default_patch`, then under `app_patch`, checked.
    pub fn effective(
        default_patch: Option<&Value>,
        app_patch: Option<&Value>,
    ) -> Result<Policy, PolicyError> {
        let mut v = serde_json::to_value(Policy::default()).expect("the default policy");
        for p in [default_patch, app_patch].into_iter().flatten() {
            if !p.is_object() {
                return Err(PolicyError::NotAnObject);
            }
            merge_patch(&mut v, p);
        }
        let policy: Policy =
            serde_json::from_value(v).map_err(|e| PolicyError::Shape(e.to_string()))?;
        policy.check()?;
        Ok(policy)
    }

    /// Checks the numbers: shares within 0–1, durations finite and bounded, a webhook URL.
    pub fn check(&self) -> Result<(), PolicyError> {
        let r = &self.rules;
        for (name, spec) in [
            ("noisy_neighbour", &r.noisy_neighbour),
            ("error_spike", &r.error_spike),
            ("cost_spike", &r.cost_spike),
            ("socket_share", &r.socket_share),
            ("slow_start", &r.slow_start),
        ] {
            let path = |f: &str| format!("rules.{name}.{f}");
            let threshold_ok = spec.threshold.is_finite()
                && spec.threshold > 0.0
                && match name {
                    "noisy_neighbour" | "socket_share" => spec.threshold <= 1.0,
                    _ => true,
                };
            if !threshold_ok {
                return Err(PolicyError::Threshold {
                    path: path("threshold"),
                    reason: match name {
                        "noisy_neighbour" | "socket_share" => {
                            "must be a share above 0 and at most 1".into()
                        }
                        _ => "must be a positive number".into(),
                    },
                });
            }
            if !(spec.min_total.is_finite() && spec.min_total >= 0.0) {
                return Err(PolicyError::Threshold {
                    path: path("min_total"),
                    reason: "must be a number of at least 0".into(),
                });
            }
            for (f, v) in [
                ("for_seconds", spec.for_seconds),
                ("keep_firing_seconds", spec.keep_firing_seconds),
                ("window_seconds", spec.window_seconds),
            ] {
                check_seconds(&path(f), v, true)?;
            }
        }
        let a = &self.actions;
        check_seconds(
            "actions.throttle.ttl_seconds",
            a.throttle.ttl_seconds,
            false,
        )?;
        check_seconds(
            "actions.pause_runs.ttl_seconds",
            a.pause_runs.ttl_seconds,
            false,
        )?;
        check_seconds(
            "actions.disable_pack.ttl_seconds",
            a.disable_pack.ttl_seconds,
            false,
        )?;
        check_seconds(
            "actions.approval.ttl_seconds",
            a.approval.ttl_seconds,
            false,
        )?;
        if !(a.throttle.factor.is_finite() && a.throttle.factor > 0.0 && a.throttle.factor < 1.0) {
            return Err(PolicyError::Threshold {
                path: "actions.throttle.factor".into(),
                reason: "must be above 0 and below 1 (a throttle lowers the limit)".into(),
            });
        }
        if a.throttle.max_concurrent_runs == Some(0) {
            return Err(PolicyError::Threshold {
                path: "actions.throttle.max_concurrent_runs".into(),
                reason: "must be at least 1 (pause_runs stops an app's runs)".into(),
            });
        }
        if let Some(url) = &a.notify.webhook_url {
            let ok = reqwest::Url::parse(url)
                .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .unwrap_or(false);
            if !ok {
                return Err(PolicyError::WebhookUrl(
                    "must be an absolute http or https URL".into(),
                ));
            }
        }
        Ok(())
    }

    /// The settings of `rule`.
    pub fn rule(&self, rule: crate::rules::Rule) -> &RuleSpec {
        use crate::rules::Rule;
        let r = &self.rules;
        match rule {
            Rule::NoisyNeighbour => &r.noisy_neighbour,
            Rule::ErrorSpike => &r.error_spike,
            Rule::CostSpike => &r.cost_spike,
            Rule::SocketShare => &r.socket_share,
            Rule::SlowStart => &r.slow_start,
        }
    }
}

fn check_seconds(path: &str, v: f64, zero_ok: bool) -> Result<(), PolicyError> {
    let ok = v.is_finite() && v <= MAX_SECONDS && if zero_ok { v >= 0.0 } else { v > 0.0 };
    if ok {
        Ok(())
    } else {
        Err(PolicyError::Duration {
            path: path.into(),
            reason: format!(
                "must be a number of seconds {} and at most 30 days",
                if zero_ok { "of at least 0" } else { "above 0" }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_default_is_the_seeds_rule_and_checks() {
        let p = Policy::effective(None, None).unwrap();
        assert_eq!(p.rules.noisy_neighbour.threshold, 0.4);
        assert_eq!(p.rules.noisy_neighbour.for_seconds, 300.0);
        assert!(
            p.rules
                .noisy_neighbour
                .actions
                .contains(&ActionKind::Throttle)
        );
        assert_eq!(p.rules.cost_spike.propose, vec![ProposalKind::SuspendApp]);
    }

    #[test]
    fn overrides_merge_over_the_default_then_the_app() {
        let d = json!({"rules": {"noisy_neighbour": {"for_seconds": 2}}});
        let a = json!({"rules": {"noisy_neighbour": {"threshold": 0.6}}, "actions": {"throttle": {"max_concurrent_runs": 3}}});
        let p = Policy::effective(Some(&d), Some(&a)).unwrap();
        assert_eq!(p.rules.noisy_neighbour.for_seconds, 2.0);
        assert_eq!(p.rules.noisy_neighbour.threshold, 0.6);
        assert_eq!(p.actions.throttle.max_concurrent_runs, Some(3));
        // Null removes an override: back to the built-in value.
        let a = json!({"actions": {"throttle": {"max_concurrent_runs": null}}});
        let p = Policy::effective(Some(&d), Some(&a)).unwrap();
        assert_eq!(p.actions.throttle.max_concurrent_runs, None);
    }

    #[test]
    fn bad_bodies_are_refused_with_stable_codes() {
        let code = |v: Value| Policy::effective(Some(&v), None).unwrap_err().code();
        assert_eq!(code(json!([1, 2])), "invalid_policy");
        assert_eq!(code(json!({"rules": {"nosy": {}}})), "invalid_policy");
        assert_eq!(
            code(json!({"rules": {"noisy_neighbour": {"threshold": "high"}}})),
            "invalid_policy"
        );
        assert_eq!(
            code(json!({"rules": {"noisy_neighbour": {"actions": ["reboot"]}}})),
            "invalid_policy"
        );
        assert_eq!(
            code(json!({"rules": {"noisy_neighbour": {"threshold": 1.5}}})),
            "invalid_threshold"
        );
        assert_eq!(
            code(json!({"rules": {"error_spike": {"threshold": -1}}})),
            "invalid_threshold"
        );
        assert_eq!(
            code(json!({"rules": {"slow_start": {"for_seconds": -5}}})),
            "invalid_duration"
        );
        assert_eq!(
            code(json!({"actions": {"throttle": {"ttl_seconds": 0}}})),
            "invalid_duration"
        );
        assert_eq!(
            code(json!({"actions": {"throttle": {"factor": 2}}})),
            "invalid_threshold"
        );
        assert_eq!(
            code(json!({"actions": {"notify": {"webhook_url": "ftp://x"}}})),
            "invalid_webhook_url"
        );
    }
}
