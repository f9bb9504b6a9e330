//! The app aggregate: pure `apply(state, event)` and `handle(state, command)`, no I/O.
//!
//! An app's events live on `mz.ctl.app.{app_id}` (stream `MZ_CTL`); its view is the fold of
//! those events ([`fold`]). [`crate::Registry::execute`] drives the aggregate over the bus.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::app::{App, AppStatus, AppStorage, Limits};
use crate::tiers::Tiers;

/// Largest `context` an app may carry, serialized.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;
/// Longest app name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Most workflows in an allowlist.
pub const MAX_WORKFLOWS: usize = 256;

mozaiks_events::named_enum! {
    /// What happened to an app. The `type` names are stable.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    // `app.created` carries the whole initial view; app events are rare and short-lived.
    #[allow(clippy::large_enum_variant)]
    pub enum AppEvent {
        Created {
            name: String,
            tier: String,
            #[serde(default)]
            workflows: Option<Vec<String>>,
            #[serde(default)]
            limits: Limits,
            #[serde(default)]
            context: Map<String, Value>,
            #[serde(default)]
            runtime_url: Option<String>,
            /// The app's own database (dedicated-database tiers); absent: the shared one.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            storage: Option<AppStorage>,
        } = "app.created",
        Renamed { name: String } = "app.renamed",
        TierChanged { tier: String } = "app.tier_changed",
        /// The app's overrides, all of them (an absent field falls back to the tier).
        LimitsChanged { limits: Limits } = "app.limits_changed",
        /// The allowlist; `None` allows every shipped workflow.
        WorkflowsChanged { workflows: Option<Vec<String>> } = "app.workflows_changed",
        ContextChanged { context: Map<String, Value> } = "app.context_changed",
        RuntimeChanged { runtime_url: Option<String> } = "app.runtime_changed",
        /// The app's read models now live in `storage` (`None`: the shared database). Recorded by a
        /// storage move after the new database was rebuilt from the log.
        StorageChanged { storage: Option<AppStorage> } = "app.storage_changed",
        Suspended {
            #[serde(default)]
            reason: String,
        } = "app.suspended",
        Resumed {} = "app.resumed",
        Deleted {} = "app.deleted",
    }
}

/// An app event as stored on `MZ_CTL` (JSON, field names on the wire).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// Record version; readers refuse versions they do not know.
    pub v: u32,
    pub event_id: Uuid,
    pub app_id: String,
    pub ts: DateTime<Utc>,
    /// Who caused it (a user id, or `system`).
    #[serde(default)]
    pub actor: String,
    #[serde(flatten)]
    pub event: AppEvent,
}

impl AppRecord {
    pub const VERSION: u32 = 1;

    pub fn new(app_id: &str, actor: &str, event: AppEvent) -> AppRecord {
        AppRecord {
            v: AppRecord::VERSION,
            event_id: Uuid::now_v7(),
            app_id: app_id.to_string(),
            ts: Utc::now(),
            actor: actor.to_string(),
            event,
        }
    }
}

/// A change to an app's settings; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppPatch {
    pub name: Option<String>,
    pub tier: Option<String>,
    /// Replaces the overrides.
    pub limits: Option<Limits>,
    /// `Some(None)` allows every workflow again.
    pub workflows: Option<Option<Vec<String>>>,
    pub context: Option<Map<String, Value>>,
    /// `Some(None)` removes the dedicated runtime.
    pub runtime_url: Option<Option<String>>,
    /// `Active` or `Suspended`.
    pub status: Option<AppStatus>,
}

/// What may be asked of an app.
#[derive(Clone, Debug, PartialEq)]
pub enum AppCommand {
    Create {
        name: String,
        tier: String,
        workflows: Option<Vec<String>>,
        limits: Limits,
        runtime_url: Option<String>,
        /// The app's own database (only for tiers with a dedicated database).
        storage: Option<AppStorage>,
    },
    Patch(AppPatch),
    /// Switches where the app's read models live (`None`: the shared database). Only a storage
    /// move issues it, once the target holds the app's read models.
    SetStorage(Option<AppStorage>),
    Delete,
}

/// Why a command was refused. [`Rejection::code`] is stable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("an app with this app_id exists (or existed)")]
    AppExists,
    #[error("no such app")]
    AppNotFound,
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
    #[error("unknown workflow {0:?}")]
    UnknownWorkflow(String),
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    #[error("invalid context: {0}")]
    InvalidContext(String),
    #[error("invalid workflows: {0}")]
    InvalidWorkflows(String),
    #[error("invalid runtime_url: {0}")]
    InvalidRuntimeUrl(String),
    #[error("status may be set to active or suspended; delete an app with DELETE")]
    InvalidStatus,
    #[error("invalid storage: {0}")]
    InvalidStorage(String),
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::AppExists => "app_exists",
            Rejection::AppNotFound => "app_not_found",
            Rejection::UnknownTier(_) => "unknown_tier",
            Rejection::UnknownWorkflow(_) => "unknown_workflow",
            Rejection::InvalidName(_) => "invalid_name",
            Rejection::InvalidLimits(_) => "invalid_limits",
            Rejection::InvalidContext(_) => "invalid_context",
            Rejection::InvalidWorkflows(_) => "invalid_workflows",
            Rejection::InvalidRuntimeUrl(_) => "invalid_runtime_url",
            Rejection::InvalidStatus => "invalid_status",
            Rejection::InvalidStorage(_) => "invalid_storage",
        }
    }
}

/// What `handle` checks commands against: the tiers, and the workflows the fleet ships (`None`:
/// not checked, e.g. for the default app created at start-up with every workflow).
pub struct Known<'a> {
    pub tiers: &'a Tiers,
    pub workflows: Option<&'a [String]>,
}

/// Folds one event into the state. Events for a state they do not fit are ignored (the log is
/// only ever written through [`handle`], so that does not happen).
pub fn apply(state: Option<App>, rec: &AppRecord, version: u64) -> Option<App> {
    let mut app = match (state, &rec.event) {
        (
            None,
            AppEvent::Created {
                name,
                tier,
                workflows,
                limits,
                context,
                runtime_url,
                storage,
            },
        ) => {
            return Some(App {
                app_id: rec.app_id.clone(),
                name: name.clone(),
                tier: tier.clone(),
                status: AppStatus::Active,
                workflows: workflows.clone(),
                limits: limits.clone(),
                context: context.clone(),
                runtime_url: runtime_url.clone(),
                storage: storage.clone(),
                created_at: rec.ts,
                updated_at: rec.ts,
                version,
            });
        }
        (None, _) => return None,
        (Some(app), _) => app,
    };
    match &rec.event {
        AppEvent::Created { .. } => return Some(app),
        AppEvent::Renamed { name } => app.name = name.clone(),
        AppEvent::TierChanged { tier } => app.tier = tier.clone(),
        AppEvent::LimitsChanged { limits } => app.limits = limits.clone(),
        AppEvent::WorkflowsChanged { workflows } => app.workflows = workflows.clone(),
        AppEvent::ContextChanged { context } => app.context = context.clone(),
        AppEvent::RuntimeChanged { runtime_url } => app.runtime_url = runtime_url.clone(),
        AppEvent::StorageChanged { storage } => app.storage = storage.clone(),
        AppEvent::Suspended { .. } => app.status = AppStatus::Suspended,
        AppEvent::Resumed {} => app.status = AppStatus::Active,
        AppEvent::Deleted {} => app.status = AppStatus::Deleted,
    }
    app.updated_at = rec.ts;
    app.version = version;
    Some(app)
}

/// The view after a sequence of `(record, stream sequence)`.
pub fn fold<'a>(records: impl IntoIterator<Item = (&'a AppRecord, u64)>) -> Option<App> {
    records
        .into_iter()
        .fold(None, |state, (rec, seq)| apply(state, rec, seq))
}

/// Decides the events a command causes, or why it is refused. A command that changes nothing
/// causes no events.
pub fn handle(
    state: Option<&App>,
    cmd: &AppCommand,
    known: &Known<'_>,
) -> Result<Vec<AppEvent>, Rejection> {
    match cmd {
        AppCommand::Create {
            name,
            tier,
            workflows,
            limits,
            runtime_url,
            storage,
        } => {
            // A deleted app's id stays taken: its history is on the log.
            if state.is_some() {
                return Err(Rejection::AppExists);
            }
            let name = check_name(name)?;
            check_tier(known, tier)?;
            let workflows = workflows
                .as_ref()
                .map(|w| check_workflows(known, w))
                .transpose()?;
            limits.validate().map_err(Rejection::InvalidLimits)?;
            if let Some(url) = runtime_url {
                check_runtime_url(known, tier, url)?;
            }
            if let Some(s) = storage {
                check_storage(known, tier, s)?;
            }
            Ok(vec![AppEvent::Created {
                name,
                tier: tier.clone(),
                workflows,
                limits: limits.clone(),
                context: Map::new(),
                runtime_url: runtime_url.clone(),
                storage: storage.clone(),
            }])
        }
        AppCommand::SetStorage(storage) => {
            let app = live(state)?;
            if let Some(s) = storage {
                check_storage(known, &app.tier, s)?;
            }
            if *storage == app.storage {
                return Ok(Vec::new());
            }
            Ok(vec![AppEvent::StorageChanged {
                storage: storage.clone(),
            }])
        }
        AppCommand::Delete => {
            live(state)?;
            Ok(vec![AppEvent::Deleted {}])
        }
        AppCommand::Patch(p) => {
            let app = live(state)?;
            let mut out = Vec::new();
            if let Some(name) = &p.name {
                let name = check_name(name)?;
                if name != app.name {
                    out.push(AppEvent::Renamed { name });
                }
            }
            let tier = p.tier.as_deref().unwrap_or(&app.tier);
            if let Some(t) = &p.tier {
                check_tier(known, t)?;
                if *t != app.tier {
                    out.push(AppEvent::TierChanged { tier: t.clone() });
                }
            }
            if let Some(limits) = &p.limits {
                limits.validate().map_err(Rejection::InvalidLimits)?;
                if *limits != app.limits {
                    out.push(AppEvent::LimitsChanged {
                        limits: limits.clone(),
                    });
                }
            }
            if let Some(w) = &p.workflows {
                let w = w.as_ref().map(|w| check_workflows(known, w)).transpose()?;
                if w != app.workflows {
                    out.push(AppEvent::WorkflowsChanged { workflows: w });
                }
            }
            if let Some(ctx) = &p.context {
                let size = serde_json::to_vec(ctx)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > MAX_CONTEXT_BYTES {
                    return Err(Rejection::InvalidContext(format!(
                        "at most {MAX_CONTEXT_BYTES} bytes of JSON"
                    )));
                }
                if *ctx != app.context {
                    out.push(AppEvent::ContextChanged {
                        context: ctx.clone(),
                    });
                }
            }
            let runtime_url = match &p.runtime_url {
                Some(url) => url.clone(),
                None => app.runtime_url.clone(),
            };
            if let Some(url) = &runtime_url {
                // Also refuses a tier change to a shared tier while a runtime_url is set.
                check_runtime_url(known, tier, url)?;
            }
            if runtime_url != app.runtime_url {
                out.push(AppEvent::RuntimeChanged { runtime_url });
            }
            if let Some(s) = &app.storage {
                // A tier change to a shared-database tier needs a move to the shared one first.
                check_storage(known, tier, s)?;
            }
            match p.status {
                None => {}
                Some(AppStatus::Deleted) => return Err(Rejection::InvalidStatus),
                Some(AppStatus::Suspended) if app.status == AppStatus::Active => {
                    out.push(AppEvent::Suspended {
                        reason: String::new(),
                    })
                }
                Some(AppStatus::Active) if app.status == AppStatus::Suspended => {
                    out.push(AppEvent::Resumed {})
                }
                Some(_) => {}
            }
            Ok(out)
        }
    }
}

fn live(state: Option<&App>) -> Result<&App, Rejection> {
    state
        .filter(|a| !a.is_deleted())
        .ok_or(Rejection::AppNotFound)
}

fn check_name(name: &str) -> Result<String, Rejection> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(Rejection::InvalidName(format!(
            "must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Rejection::InvalidName(
            "must not contain control characters".into(),
        ));
    }
    Ok(name.to_string())
}

fn check_tier(known: &Known<'_>, tier: &str) -> Result<(), Rejection> {
    if known.tiers.get(tier).is_none() {
        return Err(Rejection::UnknownTier(tier.to_string()));
    }
    Ok(())
}

fn check_workflows(known: &Known<'_>, list: &[String]) -> Result<Vec<String>, Rejection> {
    if list.len() > MAX_WORKFLOWS {
        return Err(Rejection::InvalidWorkflows(format!(
            "at most {MAX_WORKFLOWS} workflows"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for w in list {
        if let Some(shipped) = known.workflows
            && !shipped.iter().any(|s| s == w)
        {
            return Err(Rejection::UnknownWorkflow(w.clone()));
        }
        if !out.contains(w) {
            out.push(w.clone());
        }
    }
    Ok(out)
}

fn check_storage(known: &Known<'_>, tier: &str, storage: &AppStorage) -> Result<(), Rejection> {
    if !known.tiers.get(tier).is_some_and(|t| t.has_own_database()) {
        return Err(Rejection::InvalidStorage(format!(
            "tier {tier:?} uses the shared database; move the app to it first (POST /api/apps/{{app_id}}/storage)"
        )));
    }
    storage.validate().map_err(Rejection::InvalidStorage)
}

fn check_runtime_url(known: &Known<'_>, tier: &str, url: &str) -> Result<(), Rejection> {
    if !known.tiers.get(tier).is_some_and(|t| t.has_own_runtime()) {
        return Err(Rejection::InvalidRuntimeUrl(format!(
            "tier {tier:?} runs on the shared fleet; only dedicated and export apps have a runtime_url"
        )));
    }
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| Rejection::InvalidRuntimeUrl("must start with wss:// or ws://".into()))?;
    if rest.is_empty()
        || url.len() > 512
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
        || rest.contains(['?', '#'])
    {
        return Err(Rejection::InvalidRuntimeUrl(
            "must be a WebSocket base URL such as wss://runtime.example.com".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
