//! Credits: `GET /api/apps/{app_id}/credits` (the app's admins, its API keys, a superadmin) and
//! `POST /api/apps/{app_id}/credits` (superadmin: a grant), and the refusals of a blocked app
//! (402 `credits_exhausted`, 402 `user_budget_exhausted`) used by the broker and the WebSocket.
//!
//! The wallet shown and enforced is the replica's copy of `MZ_CREDITS`
//! ([`mozaiks_control::credits::Wallets`]), written by billing. A grant is appended to
//! `MZ_BILLING` once per idempotency key ([`mozaiks_control::credits::append_grant`]); billing
//! records it and rewrites the wallet, which every replica then sees.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use mozaiks_control::credits::{Appended, Refusal, Wallet};
use mozaiks_events::credits::CreditGrant;
use mozaiks_store::credits::{GroupBy, Period};
use serde_json::{Map, Value, json};
use tracing::info;

use crate::State;
use crate::authz::{Caller, User, admin_for, check_app_id, operator_for};
use crate::error::{ApiError, Query};

/// The largest grant, in credits.
pub const MAX_GRANT: u64 = 1_000_000_000_000;
/// The longest `reason` and `idempotency_key`.
pub const MAX_REASON: usize = 500;
pub const MAX_KEY: usize = 200;

const FIELDS: &[&str] = &["amount", "reason", "expires_at", "idempotency_key"];

/// The 402 of a refusal.
pub fn payment_required(r: &Refusal) -> ApiError {
    ApiError::new(StatusCode::PAYMENT_REQUIRED, r.code(), r.to_string())
}

/// Refuses spending by `user_id` of `app_id` when enforcement is on and the app's wallet (or the
/// user's daily budget) is spent: from memory, no round trip.
pub fn check(state: &State, app_id: &str, user_id: &str) -> Result<(), Refusal> {
    let checked = state.wallets.check(app_id, user_id);
    if let Err(r) = &checked {
        ::metrics::counter!(crate::metrics::CREDITS_REFUSED, "app_id" => app_id.to_string(), "code" => r.code())
            .increment(1);
        info!(app_id, code = r.code(), "Spending refused.");
    }
    checked
}

/// The app, if it exists and is not deleted (else 404 `app_not_found`).
async fn existing_app(
    state: &State,
    app_id: &str,
) -> Result<std::sync::Arc<mozaiks_control::App>, ApiError> {
    let app = match state.registry.get(app_id) {
        Some(a) => Some(a),
        None => state
            .registry
            .read_through(app_id)
            .await
            .map_err(|e| ApiError::unavailable(format!("app registry: {e}")))?,
    };
    app.filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))
}

fn wallet_json(w: &Wallet, enforced: bool) -> Value {
    json!({
        "app_id": w.app_id,
        "balance": w.balance,
        "included": w.included,
        "granted": w.granted,
        "consumed": w.consumed,
        "period_start": w.period_start,
        "period_end": w.period_end,
        "overage": w.overage,
        "overage_policy": w.overage_policy,
        "overage_limit": w.overage_limit,
        "state": w.state.as_str(),
        "blocked": w.blocked,
        "enforced": enforced,
        "updated_at": w.updated_at,
    })
}

/// `GET /api/apps/{app_id}/credits`.
pub async fn get_credits(
    St(state): St<State>,
    caller: Caller,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_for(&caller.claims(), &app_id)?;
    check_app_id(&app_id)?;
    let app = existing_app(&state, &app_id).await?;
    let now = Utc::now();
    let wallet = match state.wallets.get(&app_id) {
        Some(w) if w.is_current(now) => (*w).clone(),
        // Nothing charged or granted yet, or the period just ended and billing has not written
        // the new one: the period's allowance, untouched.
        stale => {
            let limits = state.registry.effective_limits(&app);
            let p = Period::containing(now);
            let granted = stale.map(|w| w.granted).unwrap_or(0);
            let total = limits.included_credits.saturating_add(granted);
            Wallet {
                app_id: app_id.clone(),
                period: p.key(),
                period_start: p.start,
                period_end: p.end,
                included: limits.included_credits,
                granted,
                consumed: 0,
                balance: i64::try_from(total).unwrap_or(i64::MAX),
                overage: 0,
                overage_policy: limits.overage,
                overage_limit: limits.overage_limit,
                state: if total == 0 {
                    mozaiks_control::credits::WalletState::Low
                } else {
                    mozaiks_control::credits::WalletState::Ok
                },
                blocked: false,
                day: None,
                users_over_budget: Vec::new(),
                alerts: Vec::new(),
                next_expiry: None,
                updated_at: now,
            }
        }
    };
    Ok(Json(wallet_json(&wallet, state.wallets.enforcing())))
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

// Checked field by field with stable codes by `parse_grant`, not serde; the schema documents
// `POST /api/apps/{app_id}/credits` in /openapi.json.
/// `POST /api/apps/{app_id}/credits` body: a grant.
#[derive(schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub(crate) struct GrantRequest {
    /// Credits to grant.
    #[schemars(range(min = 1, max = 1_000_000_000_000u64))]
    amount: u64,
    #[schemars(length(max = 500))]
    reason: String,
    /// When the grant's unspent credits expire (in the future).
    expires_at: Option<DateTime<Utc>>,
    /// The same key twice grants once.
    #[schemars(length(max = 200))]
    idempotency_key: String,
}

fn parse_grant(body: &[u8], now: DateTime<Utc>) -> Result<GrantRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("not JSON: {e}")))?;
    let obj: Map<String, Value> = match v {
        Value::Object(o) => o,
        _ => return Err(invalid("invalid_body", "the body must be a JSON object")),
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            "unknown_field",
            format!("unknown field {k:?}; known: {}", FIELDS.join(", ")),
        ));
    }
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => return Err(invalid("invalid_amount", "amount is required")),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(0), _, _) => return Err(invalid("invalid_amount", "amount must be at least 1")),
            (Some(a), _, _) if a > MAX_GRANT => {
                return Err(invalid(
                    "amount_too_large",
                    format!("amount must be at most {MAX_GRANT} credits"),
                ));
            }
            (Some(a), _, _) => a,
            (None, Some(_), _) => {
                return Err(invalid("invalid_amount", "amount must be positive"));
            }
            (None, None, Some(f)) if f.fract() == 0.0 && f > MAX_GRANT as f64 => {
                return Err(invalid(
                    "amount_too_large",
                    format!("amount must be at most {MAX_GRANT} credits"),
                ));
            }
            (None, None, Some(f)) if f < 0.0 => {
                return Err(invalid("invalid_amount", "amount must be positive"));
            }
            _ => {
                return Err(invalid(
                    "invalid_amount",
                    "amount must be a whole number of credits",
                ));
            }
        },
        Some(_) => {
            return Err(invalid(
                "invalid_amount",
                "amount must be a whole number of credits (a JSON number)",
            ));
        }
    };
    let text = |field: &str, max: usize, code: &'static str| -> Result<String, ApiError> {
        match obj.get(field) {
            Some(Value::String(s))
                if !s.trim().is_empty() && s.len() <= max && !s.chars().any(char::is_control) =>
            {
                Ok(s.clone())
            }
            _ => Err(invalid(
                code,
                format!("{field} must be 1 to {max} printable characters"),
            )),
        }
    };
    let reason = text("reason", MAX_REASON, "invalid_reason")?;
    let idempotency_key = text("idempotency_key", MAX_KEY, "invalid_idempotency_key")?;
    let expires_at = match obj.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|e| {
                    invalid(
                        "invalid_expires_at",
                        format!("expires_at must be an RFC 3339 time: {e}"),
                    )
                })?
                .with_timezone(&Utc);
            if t <= now {
                return Err(invalid(
                    "expires_at_in_past",
                    "expires_at must be in the future",
                ));
            }
            Some(t)
        }
        Some(_) => {
            return Err(invalid(
                "invalid_expires_at",
                "expires_at must be an RFC 3339 time",
            ));
        }
    };
    Ok(GrantRequest {
        amount,
        reason,
        expires_at,
        idempotency_key,
    })
}

fn grant_json(g: &CreditGrant, replayed: bool) -> Value {
    json!({
        "grant_id": g.grant_id,
        "app_id": g.app_id,
        "amount": g.amount,
        "reason": g.reason,
        "expires_at": g.expires_at,
        "idempotency_key": g.idempotency_key,
        "granted_at": g.granted_at,
        "granted_by": g.granted_by,
        "replayed": replayed,
    })
}

/// `POST /api/apps/{app_id}/credits`: a grant (superadmin). 201 the grant; 200 the first grant
/// with the same `idempotency_key` (`replayed: true`); 409 `idempotency_key_reused` when that
/// first grant differs.
pub async fn grant(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    operator_for(&user, &app_id, "granting credits")?;
    check_app_id(&app_id)?;
    existing_app(&state, &app_id).await?;
    let now = Utc::now();
    let req = parse_grant(&body, now)?;
    let grant = CreditGrant {
        grant_id: uuid::Uuid::now_v7().to_string(),
        app_id: app_id.clone(),
        amount: req.amount,
        reason: req.reason,
        expires_at: req.expires_at,
        idempotency_key: req.idempotency_key,
        granted_at: now,
        granted_by: user.sub.clone(),
    };
    let appended = mozaiks_control::credits::append_grant(&state.bus, &grant)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    match appended {
        Appended::New(g) => {
            info!(app_id = %app_id, grant_id = %g.grant_id, amount = g.amount, by = %g.granted_by, "Credits granted.");
            Ok((StatusCode::CREATED, Json(grant_json(&g, false))))
        }
        Appended::Existing(first) => {
            let same = first.amount == grant.amount
                && first.reason == grant.reason
                && first.expires_at == grant.expires_at;
            if !same {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_reused",
                    "a different grant was made with this idempotency_key",
                ));
            }
            Ok((StatusCode::OK, Json(grant_json(&first, true))))
        }
    }
}

/// The query of `GET /api/usage/{app_id}` and of its export, checked with stable codes.
#[derive(Debug, PartialEq)]
struct UsageQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    group_by: Option<Grouping>,
    format: Option<ExportFormat>,
    /// What an export lists.
    kind: ExportKind,
}

/// How `GET /api/usage/{app_id}` groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grouping {
    /// The charges, by one of their fields.
    Charges(GroupBy),
    /// The plugin executions (`MZ_PLUGINS`, 30 days), by plugin.
    Plugin,
}

/// What an export lists: the costed charges (the default) or the plugin executions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExportKind {
    Charges,
    Plugins,
}

/// The most plugin executions one answer reads (a narrower `from`/`to` reads more).
const MAX_PLUGIN_EXECUTIONS: usize = 100_000;

/// What an export is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExportFormat {
    Csv,
    CloudEvents,
}

/// Parses `q`; `export` says which parameters are known (`format` for an export, `group_by`
/// otherwise).
fn parse_usage_query(
    q: &std::collections::HashMap<String, String>,
    export: bool,
) -> Result<UsageQuery, ApiError> {
    let known: &[&str] = if export {
        &["from", "to", "format", "kind"]
    } else {
        &["from", "to", "group_by"]
    };
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(invalid(
            "unknown_field",
            format!("unknown parameter {k:?}; known: {}", known.join(", ")),
        ));
    }
    let time = |k: &str, code: &'static str| -> Result<Option<DateTime<Utc>>, ApiError> {
        match q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => DateTime::parse_from_rfc3339(v)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|e| invalid(code, format!("{k} must be an RFC 3339 time: {e}"))),
        }
    };
    let from = time("from", "invalid_from")?;
    let to = time("to", "invalid_to")?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(invalid("invalid_range", "from must be before to"));
    }
    let group_by = match q.get("group_by").map(String::as_str) {
        None => None,
        Some("plugin") => Some(Grouping::Plugin),
        Some(g) => Some(Grouping::Charges(GroupBy::parse(g).ok_or_else(|| {
            invalid(
                "invalid_group_by",
                "group_by must be user, workflow, model, day or plugin",
            )
        })?)),
    };
    let kind = match q.get("kind").map(String::as_str) {
        None | Some("charges") => ExportKind::Charges,
        Some("plugins") => ExportKind::Plugins,
        Some(_) => return Err(invalid("invalid_kind", "kind must be charges or plugins")),
    };
    let format = match q.get("format").map(String::as_str) {
        None if export => {
            return Err(invalid(
                "invalid_format",
                "format is required: csv or cloudevents",
            ));
        }
        None => None,
        Some("csv") => Some(ExportFormat::Csv),
        Some("cloudevents") => Some(ExportFormat::CloudEvents),
        Some(_) => {
            return Err(invalid(
                "invalid_format",
                "format must be csv or cloudevents",
            ));
        }
    };
    Ok(UsageQuery {
        from,
        to,
        group_by,
        format,
        kind,
    })
}

/// `GET /api/usage/{app_id}?from=&to=&group_by=user|workflow|model|day` (the app's admins, its
/// API keys, a superadmin): the app's metered usage (all time), its read models' size
/// (`storage_bytes`) and, with `group_by`, tokens, credits and runs per group of the charges with
/// `ts` in `[from, to)`.
pub async fn usage(
    St(state): St<State>,
    caller: Caller,
    Path(app_id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.claims();
    check_app_id(&app_id)?;
    admin_for(&user, &app_id)?;
    let q = parse_usage_query(&q, false)?;
    let u = state.store.usage(&app_id).await?;
    let storage_bytes = state.store.storage_bytes(&app_id).await?;
    let mut out = json!({
        "app_id": u.app_id,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "charges": u.charges,
        "runs": u.runs,
        "storage_bytes": storage_bytes,
    });
    // Plugin executions count in the app's usage too (issue 15): per plugin, over what
    // `MZ_PLUGINS` keeps (30 days).
    if let Some(p) = &state.plugins {
        let counts = p
            .usage(&app_id)
            .await
            .map_err(|e| ApiError::unavailable_from("the plugin executions", e))?;
        let total: u64 = counts.values().sum();
        out["plugins"] = json!({"executions": total, "by_plugin": counts, "window_days": 30});
    }
    match q.group_by {
        None => {}
        Some(Grouping::Charges(by)) => {
            let groups = state.store.usage_grouped(&app_id, q.from, q.to, by).await?;
            out["group_by"] = json!(format!("{by:?}").to_lowercase());
            out["from"] = json!(q.from);
            out["to"] = json!(q.to);
            out["groups"] = json!(groups);
        }
        Some(Grouping::Plugin) => {
            let runs = plugin_executions(&state, &app_id, q.from, q.to).await?;
            out["group_by"] = json!("plugin");
            out["from"] = json!(q.from);
            out["to"] = json!(q.to);
            out["groups"] = json!(plugin_groups(&runs));
        }
    }
    Ok(Json(out))
}

/// The app's plugin executions with `ts` in `[from, to)` (none without plugins).
async fn plugin_executions(
    state: &State,
    app_id: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Vec<mozaiks_plugins::PluginExecuted>, ApiError> {
    let Some(p) = &state.plugins else {
        return Ok(Vec::new());
    };
    p.executions(app_id, from, to, MAX_PLUGIN_EXECUTIONS)
        .await
        .map_err(|e| match e {
            mozaiks_plugins::Error::TooLarge(m) => invalid("range_too_large", m),
            e => ApiError::unavailable_from("the plugin executions", e),
        })
}

/// Executions, failures (any outcome but `ok`), fuel and time per plugin, sorted by plugin.
fn plugin_groups(runs: &[mozaiks_plugins::PluginExecuted]) -> Vec<Value> {
    let mut by: std::collections::BTreeMap<&str, (u64, u64, u64, f64)> = Default::default();
    for r in runs {
        let g = by.entry(r.plugin.as_str()).or_default();
        g.0 += 1;
        g.1 += u64::from(r.outcome != "ok");
        g.2 = g.2.saturating_add(r.fuel_used);
        g.3 += r.duration_ms;
    }
    by.into_iter()
        .map(|(k, (n, failed, fuel, ms))| {
            json!({"key": k, "executions": n, "failed": failed, "fuel_used": fuel,
                   "duration_ms": (ms * 1000.0).round() / 1000.0})
        })
        .collect()
}

/// The CSV columns of a plugin export.
const PLUGIN_CSV_COLUMNS: &[&str] = &[
    "event_id",
    "ts",
    "app_id",
    "plugin",
    "version",
    "user_id",
    "chat_id",
    "outcome",
    "fuel_used",
    "duration_ms",
];

/// One exported line of a plugin execution.
fn plugin_line(r: &mozaiks_plugins::PluginExecuted, format: ExportFormat) -> String {
    let ts = r.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    match format {
        ExportFormat::Csv => {
            [
                csv_field(&r.event_id),
                ts,
                csv_field(&r.app_id),
                csv_field(&r.plugin),
                csv_field(&r.version),
                csv_field(&r.user_id),
                csv_field(r.chat_id.as_deref().unwrap_or_default()),
                csv_field(&r.outcome),
                r.fuel_used.to_string(),
                format!("{:.3}", r.duration_ms),
            ]
            .join(",")
                + "\n"
        }
        ExportFormat::CloudEvents => {
            json!({
                "specversion": "1.0",
                "id": r.event_id,
                "source": format!("mozaiks/apps/{}", r.app_id),
                "type": "mozaiks.plugin.executed",
                "subject": r.user_id,
                "time": ts,
                "datacontenttype": "application/json",
                "data": {
                    "app_id": r.app_id,
                    "plugin": r.plugin,
                    "version": r.version,
                    "user_id": r.user_id,
                    "chat_id": r.chat_id,
                    "outcome": r.outcome,
                    "fuel_used": r.fuel_used,
                    "duration_ms": r.duration_ms,
                },
            })
            .to_string()
                + "\n"
        }
    }
}

/// The CSV columns of an export.
const CSV_COLUMNS: &[&str] = &[
    "event_id",
    "ts",
    "app_id",
    "chat_id",
    "user_id",
    "workflow",
    "run_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "credits",
];

/// A CSV field: quoted when needed; a text starting with `=`, `+`, `-` or `@` is prefixed with
/// `'` so that a spreadsheet never runs it as a formula.
fn csv_field(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@']) {
        format!("'{v}")
    } else {
        v.to_string()
    };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

/// One exported line of a charge document.
fn export_line(d: &mozaiks_store::mongodb::bson::Document, format: ExportFormat) -> String {
    use mozaiks_store::mongodb::bson::Bson;
    let text = |k: &str| d.get_str(k).unwrap_or_default().to_string();
    let num = |k: &str| match d.get(k) {
        Some(Bson::Int64(n)) => (*n).max(0) as u64,
        Some(Bson::Int32(n)) => (*n).max(0) as u64,
        Some(Bson::Double(f)) => f.max(0.0) as u64,
        _ => 0,
    };
    let ts = d
        .get_datetime("ts")
        .map(|t| t.to_chrono())
        .unwrap_or_default();
    match format {
        ExportFormat::Csv => {
            let mut cells: Vec<String> = Vec::with_capacity(CSV_COLUMNS.len());
            for c in CSV_COLUMNS {
                cells.push(match *c {
                    "ts" => ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "prompt_tokens" | "completion_tokens" | "total_tokens" | "credits" => {
                        num(c).to_string()
                    }
                    _ => csv_field(&text(c)),
                });
            }
            cells.join(",") + "\n"
        }
        ExportFormat::CloudEvents => {
            let app = text("app_id");
            let ev = json!({
                "specversion": "1.0",
                "id": text("event_id"),
                "source": format!("mozaiks/apps/{app}"),
                "type": "mozaiks.usage.charged",
                "subject": text("user_id"),
                "time": ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "datacontenttype": "application/json",
                "data": {
                    "app_id": app,
                    "chat_id": text("chat_id"),
                    "user_id": text("user_id"),
                    "workflow": text("workflow"),
                    "run_id": text("run_id"),
                    "model": text("model"),
                    "prompt_tokens": num("prompt_tokens"),
                    "completion_tokens": num("completion_tokens"),
                    "total_tokens": num("total_tokens"),
                    "credits": num("credits"),
                },
            });
            ev.to_string() + "\n"
        }
    }
}

/// `GET /api/usage/{app_id}/export?format=csv|cloudevents&from=&to=` (the app's admins, its API
/// keys, a superadmin): every costed charge with `ts` in `[from, to)`, oldest first, streamed as
/// CSV (a header line first) or CloudEvents 1.0 JSON lines (the charge's event id as `id`, so
/// OpenMeter, Lago or Stripe meters ingest them idempotently).
pub async fn export(
    St(state): St<State>,
    caller: Caller,
    Path(app_id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let user = caller.claims();
    check_app_id(&app_id)?;
    admin_for(&user, &app_id)?;
    let q = parse_usage_query(&q, true)?;
    let format = q.format.unwrap_or(ExportFormat::Csv);
    let content_type = match format {
        ExportFormat::Csv => "text/csv; charset=utf-8",
        ExportFormat::CloudEvents => "application/cloudevents-batch+json; charset=utf-8",
    };
    if q.kind == ExportKind::Plugins {
        let runs = plugin_executions(&state, &app_id, q.from, q.to).await?;
        info!(app_id = %app_id, format = ?format, executions = runs.len(), "Plugin usage export.");
        let mut body = match format {
            ExportFormat::Csv => PLUGIN_CSV_COLUMNS.join(",") + "\n",
            ExportFormat::CloudEvents => String::new(),
        };
        for r in &runs {
            body.push_str(&plugin_line(r, format));
        }
        return Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response());
    }
    let cursor = state.store.charges(&app_id, q.from, q.to).await?;
    info!(app_id = %app_id, format = ?format, "Usage export.");
    let header = match format {
        ExportFormat::Csv => Some(CSV_COLUMNS.join(",") + "\n"),
        ExportFormat::CloudEvents => None,
    };
    let lines = cursor.map(move |d| match d {
        Ok(d) => Ok::<_, std::io::Error>(export_line(&d, format)),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    });
    let body = futures::stream::iter(header.map(Ok)).chain(lines);
    Ok((
        [(axum::http::header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_grants_get_stable_codes() {
        let now = Utc::now();
        let code = |body: &str| match parse_grant(body.as_bytes(), now) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code.to_string(),
        };
        let ok = r#"{"amount": 10, "reason": "top-up", "idempotency_key": "k1"}"#;
        assert_eq!(code(ok), "ok");
        assert_eq!(code("[1]"), "invalid_body");
        assert_eq!(code("{"), "invalid_body");
        for (body, want) in [
            (
                r#"{"amount": -5, "reason": "r", "idempotency_key": "k"}"#,
                "invalid_amount",
            ),
            (
                r#"{"amount": 0, "reason": "r", "idempotency_key": "k"}"#,
                "invalid_amount",
            ),
            (
                r#"{"amount": 1.5, "reason": "r", "idempotency_key": "k"}"#,
                "invalid_amount",
            ),
            (
                r#"{"amount": "10", "reason": "r", "idempotency_key": "k"}"#,
                "invalid_amount",
            ),
            (
                r#"{"reason": "r", "idempotency_key": "k"}"#,
                "invalid_amount",
            ),
            (
                r#"{"amount": 1e30, "reason": "r", "idempotency_key": "k"}"#,
                "amount_too_large",
            ),
            (
                r#"{"amount": 1000000000001, "reason": "r", "idempotency_key": "k"}"#,
                "amount_too_large",
            ),
            (
                r#"{"amount": 1, "reason": "r", "idempotency_key": "k", "currency": "eur"}"#,
                "unknown_field",
            ),
            (
                r#"{"amount": 1, "reason": "", "idempotency_key": "k"}"#,
                "invalid_reason",
            ),
            (r#"{"amount": 1, "reason": "r"}"#, "invalid_idempotency_key"),
            (
                r#"{"amount": 1, "reason": "r", "idempotency_key": "k", "expires_at": "2001-01-01T00:00:00Z"}"#,
                "expires_at_in_past",
            ),
            (
                r#"{"amount": 1, "reason": "r", "idempotency_key": "k", "expires_at": "tomorrow"}"#,
                "invalid_expires_at",
            ),
        ] {
            assert_eq!(code(body), want, "{body}");
        }
    }

    #[test]
    fn bad_usage_queries_get_stable_codes() {
        let q = |pairs: &[(&str, &str)], export: bool| {
            let m: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            match parse_usage_query(&m, export) {
                Ok(_) => "ok".to_string(),
                Err(e) => e.code.to_string(),
            }
        };
        assert_eq!(q(&[], false), "ok");
        assert_eq!(q(&[("group_by", "model")], false), "ok");
        assert_eq!(
            q(
                &[
                    ("from", "2026-12-01T00:00:00Z"),
                    ("to", "2026-12-02T00:00:00Z"),
                    ("group_by", "day")
                ],
                false
            ),
            "ok"
        );
        assert_eq!(q(&[("group_by", "tenant")], false), "invalid_group_by");
        assert_eq!(q(&[("from", "yesterday")], false), "invalid_from");
        assert_eq!(q(&[("to", "1")], false), "invalid_to");
        assert_eq!(
            q(
                &[
                    ("from", "2026-12-02T00:00:00Z"),
                    ("to", "2026-12-01T00:00:00Z")
                ],
                false
            ),
            "invalid_range"
        );
        assert_eq!(q(&[("limit", "5")], false), "unknown_field");
        assert_eq!(q(&[("format", "csv")], false), "unknown_field");
        assert_eq!(q(&[("format", "csv")], true), "ok");
        assert_eq!(q(&[("format", "cloudevents")], true), "ok");
        assert_eq!(q(&[], true), "invalid_format");
        assert_eq!(q(&[("format", "xml")], true), "invalid_format");
        assert_eq!(
            q(&[("format", "csv"), ("group_by", "user")], true),
            "unknown_field"
        );
        // Plugin executions: group_by=plugin, an export of kind plugins.
        assert_eq!(q(&[("group_by", "plugin")], false), "ok");
        assert_eq!(q(&[("group_by", "plugins")], false), "invalid_group_by");
        assert_eq!(q(&[("format", "csv"), ("kind", "plugins")], true), "ok");
        assert_eq!(q(&[("format", "csv"), ("kind", "charges")], true), "ok");
        assert_eq!(
            q(&[("format", "csv"), ("kind", "tools")], true),
            "invalid_kind"
        );
        assert_eq!(q(&[("kind", "plugins")], false), "unknown_field");
    }

    #[test]
    fn plugin_executions_are_grouped_and_exported() {
        let run = |plugin: &str, outcome: &str, fuel: u64, ms: f64| {
            serde_json::from_value::<mozaiks_plugins::PluginExecuted>(json!({
                "type": "plugin.executed", "event_id": format!("e-{plugin}-{fuel}"),
                "app_id": "a", "plugin": plugin, "version": "1.0.0", "source": "shipped",
                "user_id": "=u", "request_id": "r", "via": "http", "duration_ms": ms,
                "fuel_used": fuel, "outcome": outcome, "ts": "2026-12-07T10:00:00Z",
            }))
            .unwrap()
        };
        let runs = [
            run("echo", "ok", 10, 0.5),
            run("todo", "plugin_error", 7, 1.25),
            run("echo", "ok", 5, 0.25),
        ];
        let groups = plugin_groups(&runs);
        assert_eq!(
            json!(groups),
            json!([
                {"key": "echo", "executions": 2, "failed": 0, "fuel_used": 15, "duration_ms": 0.75},
                {"key": "todo", "executions": 1, "failed": 1, "fuel_used": 7, "duration_ms": 1.25},
            ])
        );
        let csv = plugin_line(&runs[1], ExportFormat::Csv);
        assert_eq!(
            csv,
            "e-todo-7,2026-12-07T10:00:00.000000Z,a,todo,1.0.0,'=u,,plugin_error,7,1.250\n"
        );
        assert_eq!(csv.split(',').count(), PLUGIN_CSV_COLUMNS.len());
        let ce: Value =
            serde_json::from_str(&plugin_line(&runs[0], ExportFormat::CloudEvents)).unwrap();
        assert_eq!(ce["id"], "e-echo-10");
        assert_eq!(ce["type"], "mozaiks.plugin.executed");
        assert_eq!(ce["data"]["fuel_used"], 10);
    }

    #[test]
    fn exported_lines_are_csv_or_cloudevents() {
        use mozaiks_store::mongodb::bson::{self, doc};
        let ts = Utc::now();
        let d = doc! {
            "event_id": "e1", "app_id": "a", "chat_id": "c", "user_id": "=cmd,\"x\"",
            "workflow": "hello", "run_id": "r", "model": "m", "prompt_tokens": 3i64,
            "completion_tokens": 4i64, "total_tokens": 7i64, "credits": 7i64,
            "ts": bson::DateTime::from_chrono(ts),
        };
        let csv = export_line(&d, ExportFormat::Csv);
        assert!(csv.starts_with("e1,"), "{csv}");
        assert!(csv.contains(",\"'=cmd,\"\"x\"\"\","), "{csv}");
        assert!(csv.ends_with(",3,4,7,7\n"), "{csv}");
        let ce: Value = serde_json::from_str(&export_line(&d, ExportFormat::CloudEvents)).unwrap();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "e1");
        assert_eq!(ce["type"], "mozaiks.usage.charged");
        assert_eq!(ce["data"]["credits"], 7);
    }
}
