//! The ops agent's API (`/api/ops/*`): its policy, its incidents, its actions and the approvals of
//! risky actions. What the agent ([`mozaiks_ops`]) records is read from `MZ_OPS` and
//! `MZ_OPS_STATE` through its [`Journal`]; every replica answers the same.
//!
//! - `GET/PUT /api/ops/policy`, `GET/PUT /api/ops/policy/{app_id}` (superadmin): the default policy
//!   and an app's overrides, JSON merge patches checked before they are stored (422 with a stable
//!   code), applied live by the agent;
//! - `GET /api/ops/incidents[?status=&app_id=]`, `GET /api/ops/incidents/{id}` (role admin of the
//!   app: its own incidents only; superadmin: every app's);
//! - `GET /api/ops/actions[?status=&app_id=]` (scoped the same way), `POST
//!   /api/ops/actions/{id}/revert` (superadmin: ends an action in force on every replica);
//! - `GET /api/ops/approvals[?status=&app_id=]`, `POST /api/ops/approvals/{id}/approve` and
//!   `/reject` (superadmin): the agent only proposes risky actions; an approval runs one, as the
//!   approving user, exactly once (the decision is recorded first, expecting the approval's last
//!   sequence, so a second approver gets 409 `approval_not_pending`).
//!
//! The role is checked before anything is looked up, and another app's incident answers like
//! one that does not exist, so nothing leaks about other tenants.

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use chrono::Utc;
use mozaiks_control::{AppCommand, AppPatch, AppStatus};
use mozaiks_ops::approvals::{Approval, ApprovalStatus};
use mozaiks_ops::journal::{self, Appended, Journal};
use mozaiks_ops::policy::ProposalKind;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::{Instrument, info, info_span};

use crate::State;
use crate::apps::parse_limits;
use crate::authz::{User, check_app_id, check_id, operator_for, operator_only, ops_scope};
use crate::error::{ApiError, Body, Query};

impl From<journal::Error> for ApiError {
    fn from(e: journal::Error) -> ApiError {
        match e {
            journal::Error::Policy(p) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, p.code(), p.to_string())
            }
            journal::Error::Unavailable(d) => ApiError::unavailable_from("the ops journal", d),
        }
    }
}

async fn journal(state: &State) -> Result<Journal, ApiError> {
    Ok(Journal::open(&state.bus, format!("mozaiks/gateway/{}", state.instance)).await?)
}

fn count(endpoint: &'static str, outcome: &'static str) {
    metrics::counter!(mozaiks_ops::metrics::API, "endpoint" => endpoint, "outcome" => outcome)
        .increment(1);
}

// ---- policy ----

/// `GET /api/ops/policy`: the default policy in force and the stored patch it comes from.
pub async fn get_policy(St(state): St<State>, User(user): User) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "reading the ops policy")?;
    let j = journal(&state).await?;
    let patch = j.patch(mozaiks_ops::policy::DEFAULT_KEY).await?;
    let policy = j.policy(None).await?;
    count("policy", "read");
    Ok(Json(json!({ "policy": policy, "patch": patch })))
}

/// `PUT /api/ops/policy`: replaces the default policy's patch (a JSON merge patch over the
/// built-in policy); the agent applies it at its next evaluation.
pub async fn put_policy(
    St(state): St<State>,
    User(user): User,
    Body(patch): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "changing the ops policy")?;
    let policy = journal(&state)
        .await?
        .put_policy(None, patch.clone())
        .await?;
    info!(actor = %user.sub, "Default ops policy changed.");
    count("policy", "written");
    Ok(Json(json!({ "policy": policy, "patch": patch })))
}

/// `GET /api/ops/policy/{app_id}`: the app's effective policy and its overrides.
pub async fn get_app_policy(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    operator_for(&user, &app_id, "reading an app's ops policy")?;
    let j = journal(&state).await?;
    let patch = j.patch(&mozaiks_ops::policy::app_key(&app_id)).await?;
    let policy = j.policy(Some(&app_id)).await?;
    count("policy", "read");
    Ok(Json(
        json!({ "app_id": app_id, "policy": policy, "patch": patch }),
    ))
}

/// `PUT /api/ops/policy/{app_id}`: replaces the app's overrides (a merge patch over the
/// default policy). 404 `app_not_found` for an app that does not exist.
pub async fn put_app_policy(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    Body(patch): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    operator_for(&user, &app_id, "changing an app's ops policy")?;
    if state.registry.get(&app_id).is_none_or(|a| a.is_deleted()) {
        return Err(ApiError::not_found("app_not_found", "no such app"));
    }
    let policy = journal(&state)
        .await?
        .put_policy(Some(&app_id), patch.clone())
        .instrument(info_span!("ops_policy", app_id = %app_id))
        .await?;
    info!(app_id = %app_id, actor = %user.sub, "App ops policy changed.");
    count("policy", "written");
    Ok(Json(
        json!({ "app_id": app_id, "policy": policy, "patch": patch }),
    ))
}

// ---- incidents ----

/// `?status=&app_id=` of the lists.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the entries of this status (approvals: approval_required, approved, rejected or
    /// expired).
    #[serde(default)]
    pub status: Option<String>,
    /// Only this app (superadmin); an app's admin always sees only its own app.
    #[serde(default)]
    pub app_id: Option<String>,
}

fn check_status(status: Option<&str>, known: &[&str]) -> Result<(), ApiError> {
    match status {
        Some(s) if !known.contains(&s) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_status",
            format!("status must be one of {}", known.join(", ")),
        )),
        _ => Ok(()),
    }
}

fn scope(
    user: &mozaiks_auth::UserClaims,
    app_id: Option<String>,
) -> Result<Option<String>, ApiError> {
    if let Some(a) = &app_id {
        check_app_id(a)?;
    }
    ops_scope(user, app_id)
}

/// `GET /api/ops/incidents`: newest first, each as its latest event.
pub async fn list_incidents(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let scope = scope(&user, q.app_id)?;
    check_status(q.status.as_deref(), &["firing", "resolved"])?;
    let all = journal(&state).await?.incidents(scope.as_deref()).await?;
    let out: Vec<_> = all
        .into_iter()
        .filter(|i| {
            q.status
                .as_deref()
                .is_none_or(|s| serde_json::to_value(i.status).is_ok_and(|v| v.as_str() == Some(s)))
        })
        .collect();
    count("incidents", "read");
    Ok(Json(json!({ "count": out.len(), "incidents": out })))
}

/// `GET /api/ops/incidents/{id}`: 404 `incident_not_found` also for another app's incident.
pub async fn get_incident(
    St(state): St<State>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let scope = ops_scope(&user, None)?;
    check_id("incident_id", &id)?;
    let found = journal(&state)
        .await?
        .incidents(scope.as_deref())
        .await?
        .into_iter()
        .find(|i| i.incident_id == id)
        .ok_or_else(|| ApiError::not_found("incident_not_found", "no such incident"))?;
    count("incidents", "read");
    Ok(Json(serde_json::to_value(found).unwrap_or_default()))
}

// ---- actions ----

/// `GET /api/ops/actions`: every action, newest first, with its status (`applied`, `reverted`,
/// `expired`).
pub async fn list_actions(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let scope = scope(&user, q.app_id)?;
    check_status(q.status.as_deref(), &["applied", "reverted", "expired"])?;
    let out: Vec<_> = journal(&state)
        .await?
        .actions(scope.as_deref())
        .await?
        .into_iter()
        .filter(|a| q.status.as_deref().is_none_or(|s| a.status == s))
        .collect();
    count("actions", "read");
    Ok(Json(json!({ "count": out.len(), "actions": out })))
}

/// `POST /api/ops/actions/{id}/revert` (superadmin): ends an action in force on every replica.
/// 404 `action_not_found`; 409 `action_not_in_force` for one that ended or has no lasting effect.
pub async fn revert_action(
    St(state): St<State>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "reverting an ops action")?;
    check_id("action_id", &id)?;
    let j = journal(&state).await?;
    let mut ev = j
        .actions(None)
        .await?
        .into_iter()
        .find(|a| a.action.action_id == id)
        .ok_or_else(|| ApiError::not_found("action_not_found", "no such action"))?;
    let span = info_span!("ops_revert", app_id = %ev.action.app_id, action_id = %id);
    if ev.status != "applied" || ev.action.expires_at.is_none() {
        count("revert", "refused");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "action_not_in_force",
            format!(
                "the action is {} and has no effect to revert",
                if ev.action.expires_at.is_none() {
                    "a notification"
                } else {
                    ev.status.as_str()
                }
            ),
        ));
    }
    let by = format!("user:{}", user.sub);
    j.revert(&ev.action, "reverted", &by)
        .instrument(span.clone())
        .await?;
    span.in_scope(|| info!(app_id = %ev.action.app_id, kind = %ev.action.kind, actor = %user.sub, "Ops action reverted by hand."));
    count("revert", "reverted");
    ev.status = "reverted".into();
    ev.reverted_at = Some(Utc::now());
    ev.reverted_by = Some(by);
    Ok(Json(serde_json::to_value(ev).unwrap_or_default()))
}

// ---- approvals ----

/// `GET /api/ops/approvals` (superadmin): newest first; `?status=approval_required` for the ones
/// waiting.
pub async fn list_approvals(
    St(state): St<State>,
    User(user): User,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "reading ops approvals")?;
    if let Some(a) = &q.app_id {
        check_app_id(a)?;
    }
    check_status(
        q.status.as_deref(),
        &["approval_required", "approved", "rejected", "expired"],
    )?;
    let want = q.status.as_deref().and_then(ApprovalStatus::parse);
    let out: Vec<Approval> = journal(&state)
        .await?
        .approvals(q.app_id.as_deref())
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| want.is_none_or(|w| a.status == w))
        .collect();
    count("approvals", "read");
    Ok(Json(json!({ "count": out.len(), "approvals": out })))
}

/// `POST /api/ops/approvals/{id}/approve` body: what the action needs that the agent could not
/// know (`limits` for raise_limits, `db_name` for move_storage), and a comment.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub comment: Option<String>,
    /// raise_limits: the limits to set (merged over the app's overrides).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::LimitsBody>")]
    pub limits: Option<Value>,
    /// move_storage: the target database.
    #[serde(default)]
    pub db_name: Option<String>,
    #[serde(default)]
    pub mongo_uri: Option<String>,
}

/// The approval `id`, still waiting (404 `approval_not_found`, 409 `approval_not_pending`).
async fn pending(j: &Journal, id: &str) -> Result<(u64, Approval), ApiError> {
    let (seq, a) = j
        .approval(id)
        .await?
        .ok_or_else(|| ApiError::not_found("approval_not_found", "no such approval"))?;
    let status = a.status_at(Utc::now());
    if status != ApprovalStatus::Pending {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_pending",
            format!("the approval is {}", status.as_str()),
        ));
    }
    Ok((seq, a))
}

fn check_comment(c: Option<&str>) -> Result<(), ApiError> {
    if c.is_some_and(|c| c.chars().count() > 1000) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_comment",
            "comment is at most 1000 characters",
        ));
    }
    Ok(())
}

/// Records `decided` (expecting the approval's last sequence `seq`): 409 when another decision
/// came first.
async fn decide(j: &Journal, decided: &Approval, seq: u64) -> Result<u64, ApiError> {
    match j.append_approval(decided, seq).await? {
        Appended::At(s) => Ok(s),
        Appended::Conflict => Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_not_pending",
            "the approval was decided meanwhile",
        )),
    }
}

/// `POST /api/ops/approvals/{id}/approve` (superadmin): records the approval, then runs the
/// action as the approving user (`suspend_app`, `raise_limits` with `limits`, `move_storage` with
/// `db_name`); `scale` is the deployment's to do and is recorded as approved, not executed.
pub async fn approve(
    St(state): St<State>,
    User(user): User,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "approving a risky ops action")?;
    check_id("approval_id", &id)?;
    check_comment(d.comment.as_deref())?;
    let j = journal(&state).await?;
    let (seq, a) = pending(&j, &id).await?;
    // What the action needs is checked before the decision is recorded.
    let limits = match a.kind {
        ProposalKind::RaiseLimits => {
            let Some(l) = d.limits.clone() else {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "limits_required",
                    "raise_limits needs the limits to set in limits",
                ));
            };
            let app = state
                .registry
                .get(&a.app_id)
                .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
            let mut merged = serde_json::to_value(&app.limits).unwrap_or(Value::Object(Map::new()));
            mozaiks_ops::policy::merge_patch(&mut merged, &l);
            Some(parse_limits(merged)?)
        }
        _ => None,
    };
    if a.kind == ProposalKind::MoveStorage && d.db_name.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "db_name_required",
            "move_storage needs the target database in db_name",
        ));
    }
    let span = info_span!("ops_approval", app_id = %a.app_id, approval_id = %id);
    let decided = Approval {
        status: ApprovalStatus::Approved,
        decided_by: Some(format!("user:{}", user.sub)),
        decided_at: Some(Utc::now()),
        comment: d.comment.clone(),
        ..a
    };
    let seq = decide(&j, &decided, seq).instrument(span.clone()).await?;
    // The decision is recorded: the action runs once, whatever happens next.
    let actor = format!("{} (ops approval {id})", user.sub);
    let outcome: Result<(bool, String), ApiError> =
        async {
            match decided.kind {
            ProposalKind::SuspendApp => {
                let patch = AppPatch {
                    status: Some(AppStatus::Suspended),
                    ..Default::default()
                };
                state
                    .registry
                    .execute(&decided.app_id, &AppCommand::Patch(patch), &actor, None)
                    .await?;
                Ok((true, "the app is suspended".to_string()))
            }
            ProposalKind::RaiseLimits => {
                let patch = AppPatch {
                    limits,
                    ..Default::default()
                };
                state
                    .registry
                    .execute(&decided.app_id, &AppCommand::Patch(patch), &actor, None)
                    .await?;
                Ok((true, "the app's limits are raised".to_string()))
            }
            ProposalKind::MoveStorage => {
                let r = state
                    .admin
                    .move_storage(&decided.app_id, d.db_name.clone(), d.mongo_uri.clone(), &actor)
                    .await?;
                Ok((
                    true,
                    format!(
                        "the app's read models moved to {}",
                        serde_json::to_value(&r)
                            .ok()
                            .and_then(|v| v["db_name"].as_str().map(String::from))
                            .unwrap_or_else(|| "the shared database".into())
                    ),
                ))
            }
            ProposalKind::Scale => Ok((
                false,
                "approved; scaling is done by the deployment (add replicas), not by the runtime"
                    .to_string(),
            )),
        }
        }
        .instrument(span.clone())
        .await;
    let (executed, text, failed) = match outcome {
        Ok((x, t)) => (x, t, None),
        Err(e) => (false, format!("failed: {}", e.message), Some(e)),
    };
    let done = Approval {
        executed,
        outcome: Some(text),
        ..decided
    };
    // The outcome is recorded after the decision (a lost write here leaves `executed: false`).
    let _ = j.append_approval(&done, seq).await;
    span.in_scope(|| info!(app_id = %done.app_id, kind = done.kind.as_str(), executed, actor = %user.sub, "Risky ops action approved."));
    count(
        "approve",
        if failed.is_some() {
            "failed"
        } else {
            "approved"
        },
    );
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(Json(serde_json::to_value(done).unwrap_or_default()))
}

/// `POST /api/ops/approvals/{id}/reject` (superadmin): the proposal is dropped.
pub async fn reject(
    St(state): St<State>,
    User(user): User,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> Result<Json<Value>, ApiError> {
    operator_only(&user, "rejecting a risky ops action")?;
    check_id("approval_id", &id)?;
    check_comment(d.comment.as_deref())?;
    if d.limits.is_some() || d.db_name.is_some() || d.mongo_uri.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "a rejection takes only a comment",
        ));
    }
    let j = journal(&state).await?;
    let (seq, a) = pending(&j, &id).await?;
    let decided = Approval {
        status: ApprovalStatus::Rejected,
        decided_by: Some(format!("user:{}", user.sub)),
        decided_at: Some(Utc::now()),
        comment: d.comment,
        ..a
    };
    decide(&j, &decided, seq).await?;
    info!(app_id = %decided.app_id, approval_id = %id, kind = decided.kind.as_str(), actor = %user.sub, "Risky ops action rejected.");
    count("reject", "rejected");
    Ok(Json(serde_json::to_value(decided).unwrap_or_default()))
}
