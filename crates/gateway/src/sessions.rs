//! The session broker and the read endpoints: `POST /api/sessions`, `GET /api/sessions...`,
//! `GET /api/workflows`, `GET /api/usage/{app_id}`.

use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use mozaiks_events::{Command, CommandEnvelope, ids};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::info;

use crate::State;
use crate::authz::{Caller, acting_user, check_id, token_app};
use crate::error::{ApiError, Body, Query};
use crate::metrics as m;

/// Refusals of the session broker: an [`ApiError`], or a limit with its `Retry-After`.
#[derive(Debug)]
pub enum BrokerError {
    Api(ApiError),
    /// The app's `requests_per_minute` is reached.
    RateLimited {
        retry_after_secs: u64,
    },
    /// The app's runs in progress across every worker reached `max_concurrent_runs`.
    TooManyRuns {
        limit: u32,
    },
    /// An ops `pause_runs` is in force for the app (`mozaiks_control::ops_actions`).
    Paused {
        retry_after_secs: u64,
    },
}

impl From<ApiError> for BrokerError {
    fn from(e: ApiError) -> BrokerError {
        BrokerError::Api(e)
    }
}

impl From<mozaiks_bus::Error> for BrokerError {
    fn from(e: mozaiks_bus::Error) -> BrokerError {
        BrokerError::Api(e.into())
    }
}

impl From<mozaiks_auth::Error> for BrokerError {
    fn from(e: mozaiks_auth::Error) -> BrokerError {
        BrokerError::Api(e.into())
    }
}

impl aide::OperationOutput for BrokerError {
    type Inner = crate::error::ErrorBody;
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        let (e, retry_after) = match self {
            BrokerError::Api(e) => return e.into_response(),
            BrokerError::RateLimited { retry_after_secs } => (
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "the app's requests_per_minute limit is reached; retry in {retry_after_secs} s"
                    ),
                ),
                retry_after_secs,
            ),
            BrokerError::TooManyRuns { limit } => (
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_runs",
                    format!(
                        "the app has {limit} runs in progress across the fleet, its max_concurrent_runs; retry when one ends"
                    ),
                ),
                2,
            ),
            BrokerError::Paused { retry_after_secs } => (
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "app_paused",
                    format!(
                        "the operator paused the app's new runs; retry in {retry_after_secs} s"
                    ),
                ),
                retry_after_secs,
            ),
        };
        let mut resp = e.into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        resp
    }
}

/// `POST /api/sessions` body.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    /// Must be the token's app.
    pub app_id: String,
    pub workflow_name: String,
    /// Resume this chat (owner only), or start one with this id.
    #[serde(default)]
    pub chat_id: Option<String>,
    /// Context variables for a new chat.
    #[serde(default)]
    pub context: Option<serde_json::Map<String, Value>>,
    /// A first message, answered right away (new chats only).
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: Option<String>,
    /// Required with an API key (the user the app's back-end starts the session for; 422
    /// user_id_required); with a user token only the token's own sub (else 403 user_mismatch).
    #[serde(default)]
    pub user_id: Option<String>,
}

/// `POST /api/sessions` answer.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct SessionTicket {
    pub chat_id: String,
    /// WebSocket URL; append `?token=<runtime_token>&after=<last seq seen>`.
    pub ws_url: String,
    pub runtime_token: String,
    pub expires_at: DateTime<Utc>,
    pub app_id: String,
    pub workflow_name: String,
    /// Whether an existing chat was resumed.
    pub resumed: bool,
    /// The chat's last seq when the ticket was issued (0 for a new chat).
    pub last_seq: u64,
    /// The event log's epoch; pass it back as `epoch=` so a recreated log is detected.
    pub epoch: String,
}

pub async fn start(
    St(state): St<State>,
    caller: Caller,
    headers: HeaderMap,
    Body(req): Body<StartSession>,
) -> Result<(StatusCode, Json<SessionTicket>), BrokerError> {
    let started = Instant::now();
    let user = caller.claims();
    check_id("app_id", &req.app_id)?;
    check_id("workflow_name", &req.workflow_name)?;
    if let Some(c) = &req.chat_id {
        check_id("chat_id", c)?;
    }
    token_app(&user, &req.app_id)?;
    if let Some(text) = &req.message
        && (text.trim().is_empty() || text.len() > mozaiks_events::frame_limits::MAX_TEXT_BYTES)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_message",
            "message must be non-empty and at most 32 KiB",
        )
        .into());
    }
    // The replica's view follows the bucket within moments; an app created a moment ago on
    // another replica may not be here yet, so a miss reads the bucket before answering 404.
    let app = match state.registry.get(&req.app_id) {
        Some(app) => Some(app),
        None => state
            .registry
            .read_through(&req.app_id)
            .await
            .map_err(|e| ApiError::unavailable_from("the app registry", e))?,
    };
    let app = app
        .filter(|a| a.status != mozaiks_control::AppStatus::Deleted)
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    if !app.is_active() {
        return Err(ApiError::forbidden("app_suspended", "the app is suspended").into());
    }
    // An ops disable_pack in force takes the workflow off the allowlist on every replica.
    if state
        .registry
        .ops_pack_disabled(&req.app_id, &req.workflow_name)
    {
        info!(app_id = %req.app_id, workflow = %req.workflow_name, "Session start refused: workflow disabled by an ops action.");
        return Err(ApiError::forbidden(
            "workflow_disabled",
            format!(
                "workflow {:?} is disabled for this app by the operator for a while",
                req.workflow_name
            ),
        )
        .into());
    }
    if state.catalog.get(&req.workflow_name).is_none() || !app.allows_workflow(&req.workflow_name) {
        return Err(ApiError::forbidden(
            "workflow_not_allowed",
            format!(
                "workflow {:?} is not enabled for this app",
                req.workflow_name
            ),
        )
        .into());
    }
    // The app's requests per minute, shared among the live gateway replicas (crate::presence).
    if let Err(wait) = state
        .registry
        .check_rate_among(&app, state.presence.live_gateways())
    {
        info!(app_id = %req.app_id, "Session start refused: requests_per_minute reached.");
        return Err(BrokerError::RateLimited {
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        });
    }
    let user_id = acting_user(&caller, req.user_id.as_deref())?;
    let (chat_id, resumed, last_seq) = match &req.chat_id {
        Some(chat_id) => match state.bus.last_event(&req.app_id, chat_id).await? {
            Some((last, _)) => {
                // Only the chat's owner may resume it; others learn nothing about it.
                if last.user_id != user_id {
                    return Err(ApiError::not_found("chat_not_found", "no such chat").into());
                }
                if last.workflow != req.workflow_name {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "workflow_mismatch",
                        format!("chat runs workflow {:?}", last.workflow),
                    )
                    .into());
                }
                (chat_id.clone(), true, last.seq)
            }
            None => (chat_id.clone(), false, 0),
        },
        None => (ids::new_chat_id(), false, 0),
    };
    if !resumed {
        // An ops pause_runs in force: no new run of the app on any replica.
        if let Some(wait) = state.registry.ops_paused(&req.app_id) {
            info!(app_id = %req.app_id, "Session start refused: the app's runs are paused by an ops action.");
            return Err(BrokerError::Paused {
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        // Credits (MONETIZATION_ENABLED): a blocked app or user starts nothing (crate::credits).
        if let Err(r) = crate::credits::check(&state, &req.app_id, &user_id) {
            return Err(crate::credits::payment_required(&r).into());
        }
        // max_concurrent_runs across every worker (their MZ_PERF snapshots, crate::presence).
        let limit = state.registry.effective_limits(&app).max_concurrent_runs;
        if state.presence.active_runs(&req.app_id) >= limit {
            info!(app_id = %req.app_id, limit, "Session start refused: max_concurrent_runs reached.");
            metrics::counter!(m::SESSIONS_REFUSED_RUNS, "app_id" => req.app_id.clone())
                .increment(1);
            return Err(BrokerError::TooManyRuns { limit });
        }
        let cmd = CommandEnvelope::new(
            &req.app_id,
            &chat_id,
            &user_id,
            &req.workflow_name,
            Command::StartSession {
                context: req.context.clone().unwrap_or_default(),
                parent_chat_id: None,
                message: req.message.clone(),
            },
        );
        // Dedup on the chat id: a retried start within the window is one command.
        state
            .bus
            .send_command(&cmd, Some(&format!("start:{}:{chat_id}", req.app_id)))
            .await?;
    }
    let (runtime_token, expires_at) =
        state
            .auth
            .mint_runtime(&req.app_id, &user_id, &chat_id, &req.workflow_name)?;
    // An admin's own socket gets the app's credit alerts (crate::admins).
    if let Caller::User(u) = &caller
        && u.has_role(mozaiks_auth::ROLE_ADMIN)
        && u.app_id == req.app_id
        && u.sub == user_id
    {
        state.admins.note(&req.app_id, &user_id);
    }
    // resolve_runtime: the app's own runtime when its tier has one, else the shared fleet.
    let base = match state.registry.resolve_runtime(&app) {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => state.ws_base(&headers),
    };
    let ws_url = format!(
        "{base}/ws/{}/{}/{chat_id}/{}",
        req.workflow_name, req.app_id, user_id
    );
    let kind = if resumed { "resumed" } else { "started" };
    metrics::counter!(m::SESSIONS_STARTED, "app_id" => req.app_id.clone(), "kind" => kind)
        .increment(1);
    metrics::histogram!(m::SESSION_START_SECONDS).record(started.elapsed().as_secs_f64());
    info!(app_id = %req.app_id, chat_id = %chat_id, workflow = %req.workflow_name, kind, "Session ticket issued.");
    let status = if resumed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(SessionTicket {
            chat_id,
            ws_url,
            runtime_token,
            expires_at,
            app_id: req.app_id,
            workflow_name: req.workflow_name,
            resumed,
            last_seq,
            epoch: state.epoch.clone(),
        }),
    ))
}

fn session_json(s: &mozaiks_store::SessionDoc) -> Value {
    json!({
        "app_id": s.app_id,
        "chat_id": s.chat_id,
        "user_id": s.user_id,
        "workflow_name": s.workflow_name,
        "status": s.status,
        "parent_chat_id": s.parent_chat_id,
        "last_seq": s.last_seq,
        "last_event_type": s.last_event_type,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

/// Whether the app is deleted (its read models are being archived and removed: reads show
/// nothing of it meanwhile).
fn is_deleted(state: &State, app_id: &str) -> bool {
    state.registry.get(app_id).is_some_and(|a| a.is_deleted())
}

/// Loads a session the caller may see: same app, and its owner (or an admin of the app).
async fn visible_session(
    state: &State,
    user: &mozaiks_auth::UserClaims,
    chat_id: &str,
) -> Result<mozaiks_store::SessionDoc, ApiError> {
    check_id("chat_id", chat_id)?;
    if is_deleted(state, &user.app_id) {
        return Err(ApiError::not_found("chat_not_found", "no such chat"));
    }
    let session = state
        .store
        .session(&user.app_id, chat_id)
        .await?
        .filter(|s| s.user_id == user.sub || user.is_admin())
        .ok_or_else(|| ApiError::not_found("chat_not_found", "no such chat"))?;
    Ok(session)
}

pub async fn get_session(
    St(state): St<State>,
    caller: Caller,
    Path(chat_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.claims();
    let s = visible_session(&state, &user, &chat_id).await?;
    Ok(Json(session_json(&s)))
}

/// `GET /api/sessions` query.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The token's app.
    pub app_id: String,
    /// Another user's sessions (admins only).
    #[serde(default)]
    pub user_id: Option<String>,
    /// 1 to 200, default 50.
    #[serde(default)]
    pub limit: Option<i64>,
}

pub async fn list_sessions(
    St(state): St<State>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.claims();
    check_id("app_id", &q.app_id)?;
    token_app(&user, &q.app_id)?;
    let user_id = q.user_id.unwrap_or_else(|| user.sub.clone());
    if user_id != user.sub && !user.is_admin() {
        return Err(ApiError::forbidden(
            "user_mismatch",
            "only admins may list other users' sessions",
        ));
    }
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let sessions = if is_deleted(&state, &q.app_id) {
        Vec::new()
    } else {
        state
            .store
            .sessions_of_user(&q.app_id, &user_id, limit)
            .await?
    };
    Ok(Json(
        json!({ "sessions": sessions.iter().map(session_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /api/sessions/{chat_id}/messages` query.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    /// Only messages with seq > after.
    #[serde(default)]
    pub after: Option<u64>,
    /// 1 to 1000, default 500.
    #[serde(default)]
    pub limit: Option<i64>,
}

pub async fn messages(
    St(state): St<State>,
    caller: Caller,
    Path(chat_id): Path<String>,
    Query(q): Query<MessagesQuery>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.claims();
    let s = visible_session(&state, &user, &chat_id).await?;
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    let msgs = state
        .store
        .messages(&s.app_id, &s.chat_id, q.after.unwrap_or(0), limit)
        .await?;
    let out: Vec<Value> = msgs
        .iter()
        .map(|m| {
            json!({
                "seq": m.seq, "id": m.event_id, "type": m.kind, "role": m.role,
                "agent": m.agent, "text": m.text, "data": m.data, "ts": m.ts,
            })
        })
        .collect();
    Ok(Json(
        json!({ "chat_id": s.chat_id, "last_seq": s.last_seq, "messages": out }),
    ))
}

pub async fn workflows(St(state): St<State>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let user = caller.claims();
    let app = state
        .registry
        .get(&user.app_id)
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    let list: Vec<Value> = state
        .catalog
        .iter()
        .filter(|p| app.allows_workflow(&p.name))
        .map(|p| json!({ "name": p.name, "description": p.description }))
        .collect();
    Ok(Json(Value::Array(list)))
}
