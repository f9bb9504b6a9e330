//! Plan tiers from `config/tiers.yaml` (embedded at build time, or `MOZAIKS_TIERS_FILE`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::app::{App, EffectiveLimits, Limits};

/// The tiers file shipped with the binary.
pub const EMBEDDED: &str = include_str!("../../../config/tiers.yaml");

/// The configuration's environment variable naming another tiers file (read by the binary).
pub const TIERS_FILE_ENV: &str = "MOZAIKS_TIERS_FILE";

/// Where an app's sessions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimePlacement {
    /// The shared fleet.
    Shared,
    /// The app's own runtime at its `runtime_url`.
    Dedicated,
    /// A runtime the customer runs (export / self-host), also at the app's `runtime_url`.
    External,
}

/// Where an app's read models live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabasePlacement {
    Shared,
    Dedicated,
}

/// One plan tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(default)]
    pub description: String,
    pub runtime: RuntimePlacement,
    pub database: DatabasePlacement,
    pub limits: EffectiveLimits,
}

impl Tier {
    /// Whether apps of this tier may have their own `runtime_url`.
    pub fn has_own_runtime(&self) -> bool {
        self.runtime != RuntimePlacement::Shared
    }

    /// Whether apps of this tier have a database of their own (given at creation; only they may
    /// be moved to another database than the shared one).
    pub fn has_own_database(&self) -> bool {
        self.database == DatabasePlacement::Dedicated
    }
}

/// Every tier, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    /// The tier of an app whose tier is no longer defined.
    pub default_tier: String,
    /// Overrides given to the app created at first start.
    #[serde(default)]
    pub default_app_limits: Limits,
    pub tiers: BTreeMap<String, Tier>,
}

impl Tiers {
    /// `file` (the configuration's `MOZAIKS_TIERS_FILE`) if given, else the embedded file.
    pub fn load(file: Option<&Path>) -> Result<Tiers, Error> {
        match file {
            Some(path) if !path.as_os_str().is_empty() => Tiers::from_file(path),
            _ => Tiers::embedded(),
        }
    }

    /// The embedded `config/tiers.yaml`.
    pub fn embedded() -> Result<Tiers, Error> {
        Tiers::parse("config/tiers.yaml (embedded)", EMBEDDED)
    }

    pub fn from_file(path: &Path) -> Result<Tiers, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Tiers {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Tiers::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates a tiers file; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Tiers, Error> {
        let bad = |reason: String| Error::Tiers {
            file: file.to_string(),
            reason,
        };
        let tiers: Tiers = serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        if tiers.tiers.is_empty() {
            return Err(bad("no tiers defined".into()));
        }
        for name in tiers.tiers.keys() {
            mozaiks_events::ids::check_token("tier", name).map_err(|e| bad(e.to_string()))?;
        }
        if !tiers.tiers.contains_key(&tiers.default_tier) {
            return Err(bad(format!(
                "default_tier {:?} is not a defined tier",
                tiers.default_tier
            )));
        }
        tiers
            .default_app_limits
            .validate()
            .map_err(|r| bad(format!("default_app_limits: {r}")))?;
        for (name, t) in &tiers.tiers {
            let as_overrides = Limits {
                max_concurrent_runs: Some(t.limits.max_concurrent_runs),
                max_parallel_children: Some(t.limits.max_parallel_children),
                max_websockets: Some(t.limits.max_websockets),
                requests_per_minute: Some(t.limits.requests_per_minute),
                retention_days: Some(t.limits.retention_days),
                included_credits: Some(t.limits.included_credits),
                overage_limit: Some(t.limits.overage_limit),
                user_daily_credits: t.limits.user_daily_credits,
                ..Default::default()
            };
            as_overrides
                .validate()
                .map_err(|r| bad(format!("tier {name}: {r}")))?;
        }
        Ok(tiers)
    }

    pub fn get(&self, name: &str) -> Option<&Tier> {
        self.tiers.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tiers.keys().map(String::as_str)
    }

    /// The app's tier, or the default tier when the app's tier is no longer defined.
    pub fn tier_of(&self, app: &App) -> &Tier {
        self.tiers
            .get(&app.tier)
            .or_else(|| self.tiers.get(&self.default_tier))
            .expect("validated: default_tier is defined")
    }

    /// The limits in force for `app`: its tier's defaults under its own overrides.
    pub fn effective_limits(&self, app: &App) -> EffectiveLimits {
        self.tier_of(app).limits.overlay(&app.limits)
    }

    /// The base of the WebSocket URL for the app's sessions: its own runtime when its tier has
    /// one and the app has a `runtime_url`, else `None` (the shared fleet).
    pub fn resolve_runtime<'a>(&self, app: &'a App) -> Option<&'a str> {
        if self.tier_of(app).has_own_runtime() {
            app.runtime_url.as_deref()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_tiers_parse_and_cover_the_seeds() {
        let t = Tiers::parse("embedded", EMBEDDED).unwrap();
        let names: Vec<&str> = t.names().collect();
        for want in ["horizons", "starter", "business", "dedicated", "export"] {
            assert!(names.contains(&want), "missing tier {want}");
        }
        assert_eq!(
            t.get("business").unwrap().database,
            DatabasePlacement::Dedicated
        );
        assert_eq!(t.get("starter").unwrap().runtime, RuntimePlacement::Shared);
        assert!(t.get("dedicated").unwrap().has_own_runtime());
        assert!(t.default_app_limits.requests_per_minute.is_some());
    }

    #[test]
    fn a_bad_tiers_file_is_refused_with_its_name() {
        let cases = [
            (
                "default_tier: \"unterminated",
                "found unexpected end of stream",
            ),
            ("default_tier: x\ntiers: {}\n", "no tiers"),
            (
                "default_tier: gold\ntiers:\n  silver: {runtime: shared, database: shared, limits: {max_concurrent_runs: 1, max_parallel_children: 1, max_websockets: 1, requests_per_minute: 1, retention_days: 1, included_credits: 1}}\n",
                "default_tier",
            ),
            (
                "default_tier: s\ntiers:\n  s: {runtime: shared, database: shared, limits: {max_concurrent_runs: 1}}\n",
                "missing field",
            ),
            (
                "default_tier: s\ntiers:\n  s: {runtime: moon, database: shared, limits: {max_concurrent_runs: 1, max_parallel_children: 1, max_websockets: 1, requests_per_minute: 1, retention_days: 1, included_credits: 1}}\n",
                "unknown variant",
            ),
            (
                "default_tier: s\ntiers:\n  s: {runtime: shared, database: shared, limits: {max_concurrent_runs: 1, max_parallel_children: 1, max_websockets: 1, requests_per_minute: 0, retention_days: 1, included_credits: 1}}\n",
                "requests_per_minute",
            ),
            (
                "default_tier: s\ntiers:\n  s: {runtime: shared, database: shared, colour: red, limits: {max_concurrent_runs: 1, max_parallel_children: 1, max_websockets: 1, requests_per_minute: 1, retention_days: 1, included_credits: 1}}\n",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let err = Tiers::parse("my-tiers.yaml", text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("my-tiers.yaml"), "{msg}");
            assert!(msg.contains(want), "{text}: {msg}");
        }
    }

    #[test]
    fn unknown_tier_of_an_app_falls_back_to_the_default_tier() {
        let t = Tiers::parse("embedded", EMBEDDED).unwrap();
        let now = chrono::Utc::now();
        let mut app = App {
            app_id: "a".into(),
            name: "A".into(),
            tier: "retired-plan".into(),
            status: Default::default(),
            workflows: None,
            limits: Limits::default(),
            context: Default::default(),
            runtime_url: Some("wss://acme.example.com".into()),
            storage: None,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        assert_eq!(
            t.effective_limits(&app),
            t.get("starter").unwrap().limits,
            "falls back to default_tier"
        );
        // A shared-runtime tier ignores a runtime_url; a dedicated one uses it.
        assert_eq!(t.resolve_runtime(&app), None);
        app.tier = "dedicated".into();
        assert_eq!(t.resolve_runtime(&app), Some("wss://acme.example.com"));
    }
}
