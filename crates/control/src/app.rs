//! The current view of an app, as stored in the KV bucket `MZ_APPS` and served by the API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Whether an app may be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppStatus {
    #[default]
    Active,
    Suspended,
    Deleted,
}

/// Per-app overrides of the tier's limits. `None` means the tier's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_children: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_websockets: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included_credits: Option<u64>,
    /// WebSockets one user of the app may hold open on one gateway replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_websockets_per_user: Option<u32>,
    /// Client frames per second one WebSocket may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames_per_second: Option<u32>,
    /// Browser origins allowed to open WebSockets (`https://app.example.com`); `None` allows any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// What happens when the period's credits are spent (with `MONETIZATION_ENABLED=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage: Option<Overage>,
    /// Credits an app may spend past its balance with `overage: allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage_limit: Option<u64>,
    /// Credits one user of the app may spend a day (UTC); `None`: no per-user budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_daily_credits: Option<u64>,
}

/// What happens when an app's credits for the period are spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overage {
    /// New sessions, runs and model calls are refused (`credits_exhausted`).
    #[default]
    Block,
    /// Spending goes on up to `overage_limit` credits past the balance, reported as `overage`.
    Allow,
}

/// The most credits a limit may name (included, overage, per-user budgets).
pub const MAX_CREDITS: u64 = 1_000_000_000_000_000;

impl Limits {
    /// The field names a client may send (anything else in a PATCH is refused).
    pub const FIELDS: &'static [&'static str] = &[
        "max_concurrent_runs",
        "max_parallel_children",
        "max_websockets",
        "requests_per_minute",
        "retention_days",
        "included_credits",
        "max_websockets_per_user",
        "max_frames_per_second",
        "allowed_origins",
        "overage",
        "overage_limit",
        "user_daily_credits",
    ];

    /// Checks the overrides: counts that must be positive are, and nothing is absurdly large.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_concurrent_runs", self.max_concurrent_runs),
            ("max_websockets", self.max_websockets),
            ("requests_per_minute", self.requests_per_minute),
            ("retention_days", self.retention_days),
            ("max_websockets_per_user", self.max_websockets_per_user),
            ("max_frames_per_second", self.max_frames_per_second),
        ];
        for (name, v) in positive {
            match v {
                Some(0) => return Err(format!("{name} must be at least 1")),
                Some(v) if v > 10_000_000 => {
                    return Err(format!("{name} must be at most 10000000"));
                }
                _ => {}
            }
        }
        for (name, v) in [
            ("included_credits", self.included_credits),
            ("overage_limit", self.overage_limit),
            ("user_daily_credits", self.user_daily_credits),
        ] {
            if v.is_some_and(|v| v > MAX_CREDITS) {
                return Err(format!("{name} must be at most {MAX_CREDITS}"));
            }
        }
        if self.user_daily_credits == Some(0) {
            return Err("user_daily_credits must be at least 1 (omit it for no budget)".into());
        }
        if self.max_parallel_children.is_some_and(|v| v > 1024) {
            return Err("max_parallel_children must be at most 1024".into());
        }
        if let Some(origins) = &self.allowed_origins
            && (origins.len() > 100
                || origins
                    .iter()
                    .any(|o| o.is_empty() || o.len() > 256 || o.contains(char::is_whitespace)))
        {
            return Err(
                "allowed_origins must be at most 100 origins like https://app.example.com".into(),
            );
        }
        Ok(())
    }
}

/// Limits in force for an app: its tier's defaults under its own overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectiveLimits {
    pub max_concurrent_runs: u32,
    pub max_parallel_children: u32,
    pub max_websockets: u32,
    pub requests_per_minute: u32,
    pub retention_days: u32,
    pub included_credits: u64,
    /// `block` (the default) or `allow` spending past the balance, up to `overage_limit`.
    #[serde(default)]
    pub overage: Overage,
    #[serde(default)]
    pub overage_limit: u64,
    /// Credits one user may spend a day (UTC); `None`: no per-user budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_daily_credits: Option<u64>,
}

impl EffectiveLimits {
    /// These limits with `over`'s values where it has them.
    pub fn overlay(&self, over: &Limits) -> EffectiveLimits {
        EffectiveLimits {
            max_concurrent_runs: over.max_concurrent_runs.unwrap_or(self.max_concurrent_runs),
            max_parallel_children: over
                .max_parallel_children
                .unwrap_or(self.max_parallel_children),
            max_websockets: over.max_websockets.unwrap_or(self.max_websockets),
            requests_per_minute: over.requests_per_minute.unwrap_or(self.requests_per_minute),
            retention_days: over.retention_days.unwrap_or(self.retention_days),
            included_credits: over.included_credits.unwrap_or(self.included_credits),
            overage: over.overage.unwrap_or(self.overage),
            overage_limit: over.overage_limit.unwrap_or(self.overage_limit),
            user_daily_credits: over.user_daily_credits.or(self.user_daily_credits),
        }
    }
}

/// An app's own database: `db_name` on the shared MongoDB deployment, or on its own deployment
/// at `mongo_uri`. The view is readable by every replica and shown to admins, so a `mongo_uri`
/// never carries credentials (authenticate with a certificate named in the URI's options, or by
/// network policy); [`AppStorage::validate`] refuses user info.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppStorage {
    pub db_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mongo_uri: Option<String>,
}

impl AppStorage {
    /// Longest database name MongoDB accepts.
    pub const MAX_DB_NAME: usize = 63;

    /// Checks the database name and URI.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.db_name;
        if n.is_empty() || n.len() > Self::MAX_DB_NAME {
            return Err(format!(
                "db_name must be 1 to {} characters",
                Self::MAX_DB_NAME
            ));
        }
        if !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("db_name may contain only letters, digits, '_' and '-'".into());
        }
        if let Some(uri) = &self.mongo_uri {
            let rest = uri
                .strip_prefix("mongodb://")
                .or_else(|| uri.strip_prefix("mongodb+srv://"))
                .ok_or("mongo_uri must start with mongodb:// or mongodb+srv://")?;
            let hosts = rest.split(['/', '?']).next().unwrap_or("");
            if hosts.is_empty() || uri.len() > 1024 || uri.chars().any(|c| c.is_whitespace()) {
                return Err("mongo_uri must name at least one host".into());
            }
            if hosts.contains('@') {
                return Err(
                    "mongo_uri must not carry credentials: app views are readable by every replica"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// A tenant's app: the current view, folded from its events on `MZ_CTL` and stored in `MZ_APPS`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub app_id: String,
    pub name: String,
    pub tier: String,
    #[serde(default)]
    pub status: AppStatus,
    /// Allowed workflow packs; `None` allows every pack the fleet ships.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    /// Overrides of the tier's limits.
    #[serde(default)]
    pub limits: Limits,
    /// Context variables every chat of the app starts with.
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Base of the WebSocket URL of a dedicated (or self-hosted) runtime, e.g.
    /// `wss://acme.runtime.example.com`; `None` for the shared fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_url: Option<String>,
    /// Where the app's read models live; `None` for the shared database (see
    /// [`AppStorage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<AppStorage>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The `MZ_CTL` stream sequence of the last event folded into this view (0: a view written
    /// before the control log existed). Views only move forward: a writer never replaces a view
    /// with one of a lower version.
    #[serde(default)]
    pub version: u64,
}

impl App {
    pub fn is_active(&self) -> bool {
        self.status == AppStatus::Active
    }

    pub fn is_deleted(&self) -> bool {
        self.status == AppStatus::Deleted
    }

    /// Whether the app may run `workflow`.
    pub fn allows_workflow(&self, workflow: &str) -> bool {
        match &self.workflows {
            None => true,
            Some(list) => list.iter().any(|w| w == workflow),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_tier_defaults() {
        let tier = EffectiveLimits {
            max_concurrent_runs: 10,
            max_parallel_children: 4,
            max_websockets: 200,
            requests_per_minute: 600,
            retention_days: 30,
            included_credits: 1000,
            overage: Overage::Block,
            overage_limit: 0,
            user_daily_credits: None,
        };
        let over = Limits {
            requests_per_minute: Some(5),
            included_credits: Some(0),
            overage: Some(Overage::Allow),
            overage_limit: Some(50),
            user_daily_credits: Some(10),
            ..Default::default()
        };
        let eff = tier.overlay(&over);
        assert_eq!(eff.requests_per_minute, 5);
        assert_eq!(eff.included_credits, 0);
        assert_eq!(eff.max_websockets, 200);
        assert_eq!(
            (eff.overage, eff.overage_limit, eff.user_daily_credits),
            (Overage::Allow, 50, Some(10))
        );
    }

    #[test]
    fn limits_are_validated() {
        let zero = Limits {
            requests_per_minute: Some(0),
            ..Default::default()
        };
        assert!(zero.validate().unwrap_err().contains("requests_per_minute"));
        let huge = Limits {
            max_parallel_children: Some(5000),
            ..Default::default()
        };
        assert!(huge.validate().is_err());
        assert!(Limits::default().validate().is_ok());
        let absurd = Limits {
            overage_limit: Some(MAX_CREDITS + 1),
            ..Default::default()
        };
        assert!(absurd.validate().unwrap_err().contains("overage_limit"));
        let no_budget = Limits {
            user_daily_credits: Some(0),
            ..Default::default()
        };
        assert!(
            no_budget
                .validate()
                .unwrap_err()
                .contains("user_daily_credits")
        );
    }

    #[test]
    fn old_views_without_new_fields_still_parse() {
        let v = serde_json::json!({
            "app_id": "a", "name": "A", "tier": "starter",
            "limits": {"max_websockets": 3},
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z"
        });
        let app: App = serde_json::from_value(v).unwrap();
        assert_eq!(app.version, 0);
        assert_eq!(app.limits.max_websockets, Some(3));
        assert!(app.runtime_url.is_none());
        assert!(app.storage.is_none());
        assert!(app.allows_workflow("anything"));
    }

    #[test]
    fn storage_is_validated() {
        let ok = |db: &str, uri: Option<&str>| {
            AppStorage {
                db_name: db.into(),
                mongo_uri: uri.map(String::from),
            }
            .validate()
        };
        assert!(ok("mozaiks_acme", None).is_ok());
        assert!(ok("acme", Some("mongodb://db1:27017,db2/?replicaSet=rs0")).is_ok());
        assert!(ok("", None).unwrap_err().contains("db_name"));
        assert!(ok("a.b", None).unwrap_err().contains("db_name"));
        assert!(ok(&"x".repeat(64), None).unwrap_err().contains("db_name"));
        assert!(
            ok("a", Some("http://x"))
                .unwrap_err()
                .contains("mongodb://")
        );
        assert!(ok("a", Some("mongodb://")).unwrap_err().contains("host"));
        assert!(
            ok("a", Some("mongodb://u:p@db1/"))
                .unwrap_err()
                .contains("credentials")
        );
    }
}
