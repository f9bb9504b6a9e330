//! `GET /openapi.json`: an OpenAPI 3.1 document of every endpoint of the runtime.
//!
//! The document is built from [`OPERATIONS`], a table kept next to the router. A test reads the
//! router's source (`lib.rs`) and fails when a route is missing from the table or the table names
//! a route the router does not have, so the document cannot drift from the code. (A table rather
//! than `utoipa`: the handlers use custom extractors and hand-written JSON answers, so annotating
//! them would cost more than this file and still not cover the WebSocket.)

use std::sync::OnceLock;

use axum::Json;
use serde_json::{Map, Value, json};

/// The `app_id` scope of the ops endpoints.
const OPS_SCOPE: &[(&str, &str, bool)] = &[(
    "app_id",
    "Only this app (superadmin); an app's admin always sees only its own app.",
    false,
)];

/// `?status=&app_id=` of the ops agent's lists.
const OPS_LIST: &[(&str, &str, bool)] = &[
    ("status", "Only the entries of this status.", false),
    (
        "app_id",
        "Only this app (superadmin); an app's admin always sees only its own app.",
        false,
    ),
];

/// `?status=&app_id=` of the approvals.
const OPS_APPROVALS: &[(&str, &str, bool)] = &[
    (
        "status",
        "approval_required, approved, rejected or expired.",
        false,
    ),
    ("app_id", "Only this app.", false),
];

/// How an operation authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <user JWT>` (`aud = mozaiks`).
    User,
    /// `?token=<runtime JWT>` (`aud = mozaiks-runtime`) from the session broker.
    Runtime,
    /// A user token, or an app back-end's API key (`Authorization: Bearer mzk_…` or
    /// `X-Api-Key`), which acts for its app.
    UserOrKey,
}

/// One operation of the API.
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub auth: Auth,
    /// Query parameters: name, description, required.
    pub query: &'static [(&'static str, &'static str, bool)],
    /// The JSON request body's schema, if any.
    pub body: Option<fn() -> Value>,
    /// The success status.
    pub ok: u16,
    /// Error statuses (bodies are `{"error": {"code", "message"}}`).
    pub errors: &'static [u16],
}

const USER_ERRORS: &[u16] = &[401, 403, 404, 503];

/// Every operation, in the router's order.
pub const OPERATIONS: &[Op] = &[
    op(
        "get",
        "/api/health",
        "health",
        "Liveness.",
        Auth::None,
        200,
        &[],
    ),
    op(
        "get",
        "/health",
        "health",
        "Liveness.",
        Auth::None,
        200,
        &[],
    ),
    op(
        "get",
        "/health/live",
        "health",
        "Liveness.",
        Auth::None,
        200,
        &[],
    ),
    op(
        "get",
        "/health/ready",
        "health",
        "Readiness: 200 only when NATS and Mongo answer and the replica is not draining.",
        Auth::None,
        200,
        &[503],
    ),
    op(
        "get",
        "/metrics",
        "health",
        "Prometheus exposition.",
        Auth::None,
        200,
        &[],
    ),
    Op {
        body: Some(schemas::start_session),
        ..op(
            "post",
            "/api/sessions",
            "sessions",
            "Start or resume a session (the session broker): checks the app is active, the workflow allowlisted, the app's requests per minute shared among the live gateway replicas (429 rate_limited) and its runs in progress across every worker (429 too_many_runs, new sessions only) and the ops agent's actions in force (503 app_paused with Retry-After while a pause_runs lasts, 403 workflow_disabled while a disable_pack takes the workflow off); answers {chat_id, ws_url, runtime_token, expires_at, ...}. 201 new, 200 resumed (owner only).",
            Auth::UserOrKey,
            201,
            &[400, 401, 403, 404, 409, 422, 429, 503],
        )
    },
    Op {
        query: &[
            ("app_id", "The token's app.", true),
            ("user_id", "Another user's sessions (admins only).", false),
            ("limit", "1 to 200, default 50.", false),
        ],
        ..op(
            "get",
            "/api/sessions",
            "sessions",
            "A user's sessions, newest first.",
            Auth::UserOrKey,
            200,
            &[400, 401, 403, 422, 503],
        )
    },
    op(
        "get",
        "/api/sessions/{chat_id}",
        "sessions",
        "A session from the read model (owner or app admin).",
        Auth::UserOrKey,
        200,
        USER_ERRORS,
    ),
    Op {
        query: &[
            ("after", "Only messages with seq > after.", false),
            ("limit", "1 to 1000, default 500.", false),
        ],
        ..op(
            "get",
            "/api/sessions/{chat_id}/messages",
            "sessions",
            "A session's transcript.",
            Auth::UserOrKey,
            200,
            USER_ERRORS,
        )
    },
    op(
        "get",
        "/api/workflows",
        "sessions",
        "The workflow packs the caller's app may run: [{name, description}].",
        Auth::UserOrKey,
        200,
        USER_ERRORS,
    ),
    op(
        "get",
        "/api/usage/{app_id}",
        "usage",
        "Metered usage of an app (its admins, its API keys, or a superadmin): prompt_tokens, completion_tokens, total_tokens, charges, runs (all time) and storage_bytes (its read models); plugins {executions, by_plugin, window_days} (the plugin executions MZ_PLUGINS keeps, 30 days); with group_by=user|workflow|model|day, groups [{key, prompt_tokens, completion_tokens, total_tokens, credits, charges, runs}] of the charges with ts in [from, to) (RFC 3339); with group_by=plugin, groups [{key, executions, failed, fuel_used, duration_ms}] of the plugin executions in [from, to). 422 invalid_group_by, invalid_from, invalid_to, invalid_range, range_too_large, unknown_field.",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    op(
        "get",
        "/api/usage/{app_id}/export",
        "usage",
        "Every costed charge of an app with ts in [from, to), oldest first, streamed: format=csv (a header line, then one line per charge) or format=cloudevents (CloudEvents 1.0 JSON lines, the charge's event id as id, type mozaiks.usage.charged, for OpenMeter, Lago or Stripe meters to ingest idempotently); kind=plugins lists the plugin executions instead (CSV event_id,ts,app_id,plugin,version,user_id,chat_id,outcome,fuel_used,duration_ms, or CloudEvents of type mozaiks.plugin.executed). 422 invalid_format, invalid_kind, invalid_from, invalid_to, invalid_range, range_too_large, unknown_field.",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::notify),
        ..op(
            "post",
            "/api/notify",
            "notifications",
            "Send an ephemeral notification frame to one user of the caller's app, or to all of them, on every replica (role admin).",
            Auth::User,
            202,
            &[400, 401, 403, 413, 422, 503],
        )
    },
    Op {
        body: Some(schemas::create_app),
        ..op(
            "post",
            "/api/apps",
            "apps",
            "Create an app (role superadmin). 409 app_exists, 422 invalid_id / unknown_tier / unknown_workflow.",
            Auth::User,
            201,
            &[400, 401, 403, 409, 422, 503],
        )
    },
    op(
        "get",
        "/api/apps",
        "apps",
        "Every app (superadmin) or the caller's own app (admin).",
        Auth::User,
        200,
        &[401, 403, 503],
    ),
    op(
        "get",
        "/api/apps/{app_id}",
        "apps",
        "An app: settings, effective limits, placement (its admins, or a superadmin).",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::patch_app),
        ..op(
            "patch",
            "/api/apps/{app_id}",
            "apps",
            "Change an app. Its admins may change name, workflows and context; tier, limits, runtime_url and status need superadmin. Applies on every replica within a second.",
            Auth::User,
            200,
            &[400, 401, 403, 404, 409, 422, 503],
        )
    },
    op(
        "delete",
        "/api/apps/{app_id}",
        "apps",
        "Delete an app (superadmin): refuses its sessions everywhere, cancels its unfinished chats, removes its read models.",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::create_key),
        ..op(
            "post",
            "/api/apps/{app_id}/keys",
            "keys",
            "Create an API key for the app's back-end (its admins, or a superadmin). The key (mzk_…) is in the answer once; only its SHA-256 is stored. 409 too_many_keys, 422 invalid_name.",
            Auth::User,
            201,
            &[400, 401, 403, 404, 409, 422, 503],
        )
    },
    op(
        "get",
        "/api/apps/{app_id}/keys",
        "keys",
        "The app's API keys (ids, names, dates, revoked or not; never the keys).",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    op(
        "delete",
        "/api/apps/{app_id}/keys/{key_id}",
        "keys",
        "Revoke an API key (its app's admins, or a superadmin); refused on every replica within milliseconds. 404 key_not_found (also for another app's key).",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    op(
        "get",
        "/api/apps/{app_id}/credits",
        "credits",
        "The app's wallet for the current period (its admins, its API keys, a superadmin): balance, included, granted, consumed, period_start, period_end, overage, state ok|low|exhausted, blocked, enforced (MONETIZATION_ENABLED).",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::grant_credits),
        ..op(
            "post",
            "/api/apps/{app_id}/credits",
            "credits",
            "Grant credits to the app (superadmin): a top-up with an optional expiry, spent before the period's included credits; the same idempotency_key grants once (200 with the first grant when repeated; 409 when the key was used for another grant). 422 invalid_body, invalid_amount, invalid_reason, invalid_idempotency_key, invalid_expires_at.",
            Auth::User,
            201,
            &[400, 401, 403, 404, 409, 422, 503],
        )
    },
    Op {
        body: Some(schemas::move_storage),
        ..op(
            "post",
            "/api/apps/{app_id}/storage",
            "apps",
            "Move an app's read models to another database (superadmin): rebuilds them there from the log (MZ_EVT, and the ledger from MZ_USAGE), switches (app.storage_changed), then catches up the events appended meanwhile. Reads are served throughout; the old database is left intact. One move per app at a time across every replica (the lease storage-move-{app_id} in MZ_LEASES). 422 invalid_storage (bad name, credentials in the URI, or a tier with the shared database), 409 move_in_progress (a move of this app runs on some replica), 503 move_interrupted (the move lost its lease; repeat it).",
            Auth::User,
            200,
            &[400, 401, 403, 404, 409, 422, 503],
        )
    },
    op(
        "get",
        "/api/apps/{app_id}/storage",
        "apps",
        "Where the app's read models live (superadmin): {app_id, storage, db_name, shared, move}; move is null, or the move in progress on any replica {state: running, replica, started_at, renewed_at, target}.",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        query: OPS_SCOPE,
        ..op(
            "get",
            "/health/active-runs",
            "ops",
            "Runs in progress on every live worker (from MZ_PERF; role admin of the app, or superadmin for every app): {workers, count, runs: [{app_id, chat_id, workflow, run_id, started_at, elapsed_ms, step, agent, worker_id}]}.",
            Auth::User,
            200,
            &[400, 401, 403, 503],
        )
    },
    Op {
        query: OPS_SCOPE,
        ..op(
            "get",
            "/metrics/perf/aggregate",
            "ops",
            "Fleet totals since each live worker started (role admin/superadmin, scoped like active-runs): {workers, active_runs, runs_started, runs_completed, runs_failed, runs_cancelled, prompt_tokens, completion_tokens, total_tokens, tool_errors, turns, turn_avg_ms, turn_max_ms, apps: {app_id: the same fields}}.",
            Auth::User,
            200,
            &[400, 401, 403, 503],
        )
    },
    Op {
        query: OPS_SCOPE,
        ..op(
            "get",
            "/metrics/perf/chats",
            "ops",
            "Per chat with a run in progress (role admin/superadmin, scoped like active-runs): {count, chats: [{app_id, chat_id, workflow, run_id, started_at, elapsed_ms, step, agent, turns, prompt_tokens, completion_tokens, total_tokens, worker_id}]}.",
            Auth::User,
            200,
            &[400, 401, 403, 503],
        )
    },
    op(
        "get",
        "/api/ops/policy",
        "ops",
        "The default ops policy in force (superadmin): {policy: {rules: {noisy_neighbour, error_spike, cost_spike, socket_share, slow_start: {enabled, threshold, min_total, for_seconds, keep_firing_seconds, window_seconds, severity, actions, propose}}, actions: {throttle, pause_runs, disable_pack, notify, approval}}, patch: the stored merge patch or null}.",
        Auth::User,
        200,
        &[401, 403, 503],
    ),
    Op {
        body: Some(schemas::ops_policy),
        ..op(
            "put",
            "/api/ops/policy",
            "ops",
            "Replace the default policy's patch (superadmin): a JSON merge patch (RFC 7386) over the built-in policy, checked before it is stored in MZ_OPS_STATE and applied live by the ops agent. 422 invalid_policy (not an object, unknown field, wrong type), invalid_threshold, invalid_duration, invalid_webhook_url; 400 bad_json.",
            Auth::User,
            200,
            &[400, 401, 403, 415, 422, 503],
        )
    },
    op(
        "get",
        "/api/ops/policy/{app_id}",
        "ops",
        "An app's effective ops policy and its overrides (superadmin): {app_id, policy, patch}.",
        Auth::User,
        200,
        &[401, 403, 422, 503],
    ),
    Op {
        body: Some(schemas::ops_policy),
        ..op(
            "put",
            "/api/ops/policy/{app_id}",
            "ops",
            "Replace an app's overrides (superadmin): a merge patch over the default policy; the same 422 codes as PUT /api/ops/policy, 404 app_not_found.",
            Auth::User,
            200,
            &[400, 401, 403, 404, 415, 422, 503],
        )
    },
    Op {
        query: OPS_LIST,
        ..op(
            "get",
            "/api/ops/incidents",
            "ops",
            "Incidents, newest first, each as its latest CloudEvent's data (role admin: its own app's; superadmin: every app's, or ?app_id=): {count, incidents: [{incident_id, rule, status firing|resolved, severity, app_id, labels, annotations {summary, description}, starts_at, ends_at, fingerprint, values, actions, proposed}]}. ?status=firing|resolved (else 422 invalid_status).",
            Auth::User,
            200,
            &[400, 401, 403, 422, 503],
        )
    },
    op(
        "get",
        "/api/ops/incidents/{id}",
        "ops",
        "One incident (role admin of its app, or superadmin); 404 incident_not_found, also for another app's incident.",
        Auth::User,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        query: OPS_LIST,
        ..op(
            "get",
            "/api/ops/actions",
            "ops",
            "The ops agent's actions, newest first (scoped like incidents): {count, actions: [{action_id, kind throttle|pause_runs|disable_pack|notify, app_id, incident_id, by, reason, created_at, expires_at, max_concurrent_runs, retry_after_seconds, workflow, status applied|reverted|expired, reverted_at, reverted_by}]}.",
            Auth::User,
            200,
            &[400, 401, 403, 422, 503],
        )
    },
    op(
        "post",
        "/api/ops/actions/{id}/revert",
        "ops",
        "End an action in force now, on every replica (superadmin). 404 action_not_found, 409 action_not_in_force (ended already, or a notification).",
        Auth::User,
        200,
        &[401, 403, 404, 409, 422, 503],
    ),
    Op {
        query: OPS_APPROVALS,
        ..op(
            "get",
            "/api/ops/approvals",
            "ops",
            "Risky actions the ops agent proposed (superadmin): {count, approvals: [{approval_id, kind suspend_app|raise_limits|move_storage|scale, app_id, incident_id, rule, reason, requested_by, created_at, expires_at, status approval_required|approved|rejected|expired, decided_by, decided_at, comment, executed, outcome}]}.",
            Auth::User,
            200,
            &[400, 401, 403, 422, 503],
        )
    },
    Op {
        body: Some(schemas::ops_decision),
        ..op(
            "post",
            "/api/ops/approvals/{id}/approve",
            "ops",
            "Approve a proposal (superadmin): the decision is recorded first (once: a second decision gets 409 approval_not_pending), then the action runs as the approver: suspend_app, raise_limits (body limits, else 422 limits_required), move_storage (body db_name, else 422 db_name_required); scale is recorded, not executed (the deployment scales). 404 approval_not_found.",
            Auth::User,
            200,
            &[400, 401, 403, 404, 409, 415, 422, 503],
        )
    },
    Op {
        body: Some(schemas::ops_decision),
        ..op(
            "post",
            "/api/ops/approvals/{id}/reject",
            "ops",
            "Reject a proposal (superadmin): it is dropped, nothing runs. Body {comment}. 404 approval_not_found, 409 approval_not_pending.",
            Auth::User,
            200,
            &[400, 401, 403, 404, 409, 415, 422, 503],
        )
    },
    op(
        "get",
        "/openapi.json",
        "meta",
        "This document.",
        Auth::None,
        200,
        &[],
    ),
    Op {
        query: &[
            ("token", "The runtime token from POST /api/sessions.", true),
            (
                "after",
                "Replay every event with seq > after, then live.",
                false,
            ),
            (
                "epoch",
                "The log epoch from the ticket; a mismatch answers resync.",
                false,
            ),
        ],
        ..op(
            "get",
            "/ws/{workflow}/{app_id}/{chat_id}/{user_id}",
            "websocket",
            "WebSocket upgrade: replays the chat's events after `after`, then streams live events. Frames server→client {id, seq, type, ts, data}; ephemeral ones (error, pong, ack, resync, notification, and agent.delta token deltas while a model streams, merged for a slow client) carry seq null; client→server user.message, input.response, cancel, ping. Close codes 1008 token expired, 1009 frame too large, 1012 draining, 1013 slow consumer.",
            Auth::Runtime,
            101,
            &[401, 403],
        )
    },
    Op {
        query: &[
            (
                "token",
                "The runtime token from POST /api/sessions (or Authorization: Bearer with it).",
                false,
            ),
            (
                "after",
                "Replay every event with seq > after, then live; the Last-Event-ID header wins.",
                false,
            ),
            (
                "epoch",
                "The log epoch from the ticket; a mismatch sends a CUSTOM resync event and replays from the start.",
                false,
            ),
        ],
        ..op(
            "get",
            "/api/agui/{app_id}/{chat_id}",
            "websocket",
            "The chat's events as AG-UI events (https://docs.ag-ui.com) over Server-Sent Events: the replay after Last-Event-ID (or after), then live, gapless and without duplicates on any replica. Each SSE message's data is one AG-UI event (RUN_STARTED, RUN_FINISHED, RUN_ERROR, STEP_STARTED, STEP_FINISHED, TEXT_MESSAGE_START/CONTENT/END, TOOL_CALL_START/ARGS/END/RESULT, STATE_SNAPSHOT, STATE_DELTA, CUSTOM for the rest); the last event of each durable event has `id: <seq>`. The stream ends with a CUSTOM event named close (reason restarting, token_expired, log_unavailable or slow_consumer). Counts against the app's socket limits.",
            Auth::Runtime,
            200,
            &[400, 401, 403, 429],
        )
    },
    Op {
        body: Some(schemas::plugin_input),
        ..op(
            "post",
            "/api/execute/{plugin}",
            "plugins",
            "Run a plugin of the caller's app (a user token, or the app's API key as user key:{key_id}) with the body plus _context {app_id, user_id, roles, request_id, settings} from the verified caller (a client's _context, app_id or user_id is overwritten). Answers the plugin's JSON (X-Plugin-Version). 403 plugin_not_allowed (tier or enabled list), 404 plugin_not_found, 413 too_large, 422 invalid_input, plugin_error (with plugin_code), plugin_trapped, 429 plugin_busy (the app already runs 4 calls on this replica), 504 plugin_timeout.",
            Auth::UserOrKey,
            200,
            &[400, 401, 403, 404, 413, 422, 429, 503, 504],
        )
    },
    op(
        "get",
        "/api/plugins/{plugin}/settings",
        "plugins",
        "The caller's settings of a plugin ({} when none), per (app, user, plugin).",
        Auth::User,
        200,
        &[401, 404, 503],
    ),
    Op {
        body: Some(schemas::plugin_input),
        ..op(
            "put",
            "/api/plugins/{plugin}/settings",
            "plugins",
            "Replace the caller's settings of a plugin: a JSON object up to 16 KiB, handed to the plugin as _context.settings. 413 too_large, 422 invalid_input.",
            Auth::User,
            200,
            &[400, 401, 404, 413, 422, 503],
        )
    },
    op(
        "get",
        "/api/apps/{app_id}/plugins",
        "plugins",
        "The plugins the app sees (shipped and uploaded) with version, source and whether it may run each now (any caller of the app).",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::plugin_upload),
        ..op(
            "post",
            "/api/apps/{app_id}/plugins",
            "plugins",
            "Upload a plugin for the app (its admins or API key; tiers with uploads): compiled and checked first, stored in the MZ_PLUGIN_MODULES object store, run by every replica from the next call. 403 plugin_not_allowed, 413 too_large, 422 invalid_plugin, invalid_module.",
            Auth::UserOrKey,
            201,
            &[400, 401, 403, 404, 413, 422, 503],
        )
    },
    op(
        "get",
        "/api/apps/{app_id}/plugins/enabled",
        "plugins",
        "The app's enabled list of plugins (null: every plugin its tier allows).",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    op(
        "get",
        "/api/apps/{app_id}/plugins/usage",
        "plugins",
        "The app's plugin executions per plugin over the last 30 days (the plugin.executed records on MZ_PLUGINS): {app_id, executions: {plugin: n}, total, window_days} (its admins, its API keys, a superadmin).",
        Auth::UserOrKey,
        200,
        &[401, 403, 404, 422, 503],
    ),
    Op {
        body: Some(schemas::plugin_enabled),
        ..op(
            "put",
            "/api/apps/{app_id}/plugins/enabled",
            "plugins",
            "Set the app's enabled list (its admins): only these plugins run, within the tier's; null clears it. 422 invalid_input.",
            Auth::UserOrKey,
            200,
            &[400, 401, 403, 404, 422, 503],
        )
    },
];

#[allow(clippy::too_many_arguments)]
const fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    auth: Auth,
    ok: u16,
    errors: &'static [u16],
) -> Op {
    Op {
        method,
        path,
        tag,
        summary,
        auth,
        query: &[],
        body: None,
        ok,
        errors,
    }
}

fn path_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

fn operation(op: &Op) -> Value {
    let mut params: Vec<Value> = path_params(op.path)
        .into_iter()
        .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_@.:|-]{1,128}$"}}))
        .collect();
    for (name, description, required) in op.query {
        params.push(json!({"name": name, "in": "query", "required": required, "description": description, "schema": {"type": "string"}}));
    }
    let mut responses = Map::new();
    let ok_description = if op.ok == 101 {
        "Switching protocols to WebSocket."
    } else {
        "Success."
    };
    if op.path.starts_with("/api/agui/") {
        params.push(json!({"name": "Last-Event-ID", "in": "header", "required": false, "description": "The seq of the last event received (sent by EventSource when it reconnects).", "schema": {"type": "string", "pattern": "^[0-9]+$"}}));
        responses.insert(
            op.ok.to_string(),
            json!({"description": "An SSE stream of AG-UI events.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}),
        );
    } else {
        responses.insert(
            op.ok.to_string(),
            json!({"description": ok_description, "content": {"application/json": {"schema": {}}}}),
        );
    }
    if op.method == "post" && op.path == "/api/sessions" {
        responses.insert(
            "200".into(),
            json!({"description": "An existing chat resumed (owner only).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SessionTicket"}}}}),
        );
        responses.insert(
            "201".into(),
            json!({"description": "A new chat.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SessionTicket"}}}}),
        );
    }
    for status in op.errors {
        let mut r = json!({"description": "Error.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        if *status == 429 {
            r["headers"] = json!({"Retry-After": {"description": "Seconds until a retry may succeed.", "schema": {"type": "integer"}}});
        }
        responses.insert(status.to_string(), r);
    }
    let mut o = json!({
        "operationId": format!("{} {}", op.method, op.path),
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": params,
        "responses": responses,
    });
    match op.auth {
        Auth::None => o["security"] = json!([]),
        Auth::User => o["security"] = json!([{"bearer": []}]),
        Auth::Runtime => o["security"] = json!([{"runtimeToken": []}]),
        Auth::UserOrKey => {
            o["security"] = json!([{"bearer": []}, {"apiKeyHeader": []}, {"apiKeyBearer": []}])
        }
    }
    if let Some(schema) = op.body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": schema()}}});
    }
    o
}

/// The OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPERATIONS {
        let item = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        item[op.method] = operation(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Mozaiks Runtime",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Event-sourced, multi-tenant runtime for AI-agent chat apps. Every gateway replica serves every endpoint. Errors are {\"error\": {\"code\", \"message\"}} with a stable code. Browsers on another origin (CORS): an origin listed in the app's allowed_origins (the app named by the path, else by the token's app_id) or in the fleet-wide MOZAIKS_CORS_ORIGINS gets Access-Control-Allow-Origin echoed (never *, no credentials); a preflight from any other origin gets 403 origin_not_allowed.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "A user token: HS256 (JWT_SECRET), iss=mozaiks, aud=mozaiks, claims sub, app_id, roles (user, admin, superadmin)."},
                "runtimeToken": {"type": "apiKey", "in": "query", "name": "token", "description": "A runtime token from POST /api/sessions (aud=mozaiks-runtime), scoped to app, user, chat and workflow."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key", "description": "An app back-end's API key (mzk_…, from POST /api/apps/{app_id}/keys). It acts for its app: starts sessions for any of its users (body user_id), reads its sessions, workflows and usage; refused everywhere else."},
                "apiKeyBearer": {"type": "http", "scheme": "bearer", "bearerFormat": "mzk_…", "description": "The same API key as Authorization: Bearer mzk_…."},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "SessionTicket": schemas::session_ticket(),
                "Limits": schemas::limits(),
                "OpsRule": {"type": "object", "additionalProperties": false, "properties": {
                    "enabled": {"type": "boolean"}, "threshold": {"type": "number", "exclusiveMinimum": 0},
                    "min_total": {"type": "number", "minimum": 0}, "for_seconds": {"type": "number", "minimum": 0},
                    "keep_firing_seconds": {"type": "number", "minimum": 0}, "window_seconds": {"type": "number", "minimum": 0},
                    "severity": {"enum": ["info", "warning", "critical"]},
                    "actions": {"type": "array", "items": {"enum": ["throttle", "pause_runs", "disable_pack", "notify"]}},
                    "propose": {"type": "array", "items": {"enum": ["suspend_app", "raise_limits", "move_storage", "scale"]}},
                }},
            },
        },
    })
}

/// `GET /openapi.json`.
pub async fn serve() -> Json<Value> {
    static DOC: OnceLock<Value> = OnceLock::new();
    Json(DOC.get_or_init(document).clone())
}

/// Hand-written JSON Schemas (2020-12, as OpenAPI 3.1 uses) of the request bodies.
mod schemas {
    use serde_json::{Value, json};

    pub fn start_session() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["app_id", "workflow_name"], "properties": {
            "app_id": {"type": "string", "description": "Must be the token's app."},
            "workflow_name": {"type": "string"},
            "chat_id": {"type": "string", "description": "Resume this chat (owner only), or start one with this id."},
            "context": {"type": "object"},
            "message": {"type": "string", "maxLength": 32768},
            "user_id": {"type": "string", "description": "Required with an API key (the user the app's back-end starts the session for; 422 user_id_required); with a user token only the token's own sub (else 403 user_mismatch)."},
        }})
    }

    pub fn session_ticket() -> Value {
        json!({"type": "object", "properties": {
            "chat_id": {"type": "string"}, "ws_url": {"type": "string"}, "runtime_token": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time"}, "app_id": {"type": "string"},
            "workflow_name": {"type": "string"}, "resumed": {"type": "boolean"}, "last_seq": {"type": "integer"},
            "epoch": {"type": "string"},
        }})
    }

    pub fn notify() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["data"], "properties": {
            "user_id": {"type": "string"}, "data": {},
        }})
    }

    pub fn limits() -> Value {
        let count = json!({"type": ["integer", "null"], "minimum": 1});
        json!({"type": "object", "additionalProperties": false, "description": "Overrides of the tier's limits; an absent field falls back to the tier (config/tiers.yaml).", "properties": {
            "max_concurrent_runs": count, "max_parallel_children": {"type": ["integer", "null"], "minimum": 0},
            "max_websockets": count, "requests_per_minute": count, "retention_days": count,
            "included_credits": {"type": ["integer", "null"], "minimum": 0},
            "max_websockets_per_user": count, "max_frames_per_second": count,
            "allowed_origins": {"type": ["array", "null"], "items": {"type": "string"}},
        }})
    }

    pub fn create_app() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["name", "tier"], "properties": {
            "app_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "description": "Generated when absent."},
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "tier": {"type": "string", "enum": ["horizons", "starter", "business", "dedicated", "export"], "description": "A tier of config/tiers.yaml (the shipped ones are listed)."},
            "workflows": {"type": ["array", "null"], "items": {"type": "string"}, "description": "The allowlist; absent allows every shipped workflow."},
            "limits": {"$ref": "#/components/schemas/Limits"},
            "runtime_url": {"type": "string", "description": "ws:// or wss:// base of a dedicated runtime (dedicated and export tiers)."},
        }})
    }

    pub fn grant_credits() -> Value {
        json!({"type": "object", "required": ["amount", "reason", "idempotency_key"], "additionalProperties": false, "properties": {
            "amount": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000_000_u64, "description": "Credits to grant."},
            "reason": {"type": "string", "maxLength": 500},
            "expires_at": {"type": "string", "format": "date-time", "description": "When the grant's unspent credits expire (in the future)."},
            "idempotency_key": {"type": "string", "maxLength": 200, "description": "The same key twice grants once."}
        }})
    }
    pub fn plugin_input() -> Value {
        json!({"type": "object", "description": "Any JSON object (the plugin defines it)."})
    }

    pub fn plugin_upload() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["name", "version"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
            "version": {"type": "string", "pattern": "^[A-Za-z0-9._+-]{1,32}$"},
            "description": {"type": "string", "maxLength": 1024},
            "limits": {"type": "object", "additionalProperties": false, "properties": {
                "memory_mb": {"type": "integer", "minimum": 1, "maximum": 256},
                "fuel": {"type": "integer", "minimum": 1, "maximum": 10_000_000_000_u64},
                "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 30000}
            }},
            "http_allowlist": {"type": "array", "maxItems": 32, "items": {"type": "string"}},
            "wat": {"type": "string", "description": "The module as WebAssembly text (or module_base64)."},
            "module_base64": {"type": "string", "description": "The module (binary or text), base64, up to 4 MiB."}
        }})
    }

    pub fn plugin_enabled() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["plugins"], "properties": {
            "plugins": {"type": ["array", "null"], "maxItems": 256, "items": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}}
        }})
    }

    pub fn create_key() -> Value {
        json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100, "description": "What the key is for, e.g. \"billing backend\"."},
        }})
    }

    pub fn move_storage() -> Value {
        json!({"type": "object", "additionalProperties": false, "properties": {
            "db_name": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]{1,63}$", "description": "The target database; null or absent (or the shared database's name) moves the app back to the shared database."},
            "mongo_uri": {"type": "string", "description": "Another MongoDB deployment (mongodb:// or mongodb+srv://, no credentials: authenticate by certificate options or network policy)."},
        }})
    }

    pub fn ops_policy() -> Value {
        json!({"type": "object", "description": "A JSON merge patch over the built-in policy (null removes an override).", "properties": {
            "rules": {"type": "object", "additionalProperties": false, "properties": {
                "noisy_neighbour": {"$ref": "#/components/schemas/OpsRule"},
                "error_spike": {"$ref": "#/components/schemas/OpsRule"},
                "cost_spike": {"$ref": "#/components/schemas/OpsRule"},
                "socket_share": {"$ref": "#/components/schemas/OpsRule"},
                "slow_start": {"$ref": "#/components/schemas/OpsRule"},
            }},
            "actions": {"type": "object", "additionalProperties": false, "properties": {
                "throttle": {"type": "object", "properties": {"ttl_seconds": {"type": "number"}, "factor": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "max_concurrent_runs": {"type": ["integer", "null"], "minimum": 1}}},
                "pause_runs": {"type": "object", "properties": {"ttl_seconds": {"type": "number"}, "retry_after_seconds": {"type": "integer"}}},
                "disable_pack": {"type": "object", "properties": {"ttl_seconds": {"type": "number"}}},
                "notify": {"type": "object", "properties": {"webhook_url": {"type": ["string", "null"]}, "format": {"enum": ["slack", "alertmanager"]}}},
                "approval": {"type": "object", "properties": {"ttl_seconds": {"type": "number"}}},
            }},
        }})
    }

    pub fn ops_decision() -> Value {
        json!({"type": "object", "additionalProperties": false, "properties": {
            "comment": {"type": "string", "maxLength": 1000},
            "limits": {"$ref": "#/components/schemas/Limits"},
            "db_name": {"type": "string"},
            "mongo_uri": {"type": "string"},
        }})
    }

    pub fn patch_app() -> Value {
        json!({"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "tier": {"type": "string", "description": "superadmin only."},
            "limits": {"$ref": "#/components/schemas/Limits", "description": "Replaces the overrides (superadmin only)."},
            "workflows": {"type": ["array", "null"], "items": {"type": "string"}, "description": "The allowlist; null allows every shipped workflow; unknown names are refused (422 unknown_workflow)."},
            "context": {"type": "object", "description": "Replaces the app's context variables (at most 64 KiB)."},
            "runtime_url": {"type": ["string", "null"], "description": "superadmin only."},
            "status": {"type": "string", "enum": ["active", "suspended"], "description": "superadmin only."},
        }})
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `(method, path)` of every `.route(...)` in the router's source.
    fn routes_in_router() -> BTreeSet<(String, String)> {
        let src = include_str!("lib.rs");
        let start = src.find("pub fn router(").expect("router fn");
        let src = &src[start..];
        let mut out = BTreeSet::new();
        let mut rest = src;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            let q1 = rest.find('"').unwrap();
            let q2 = q1 + 1 + rest[q1 + 1..].find('"').unwrap();
            let path = &rest[q1 + 1..q2];
            // The method router: up to the parenthesis that closes `.route(`.
            let mut depth = 1;
            let mut end = q2 + 1;
            for (j, c) in rest[q2 + 1..].char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = q2 + 1 + j;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let methods = &rest[q2 + 1..end];
            for m in ["get", "post", "put", "patch", "delete"] {
                let bare = methods.match_indices(&format!("{m}(")).any(|(k, _)| {
                    k == 0
                        || !methods[..k]
                            .chars()
                            .last()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if bare {
                    out.insert((m.to_string(), path.to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn every_route_of_the_router_is_documented_and_nothing_else() {
        let routes = routes_in_router();
        assert!(routes.len() >= 15, "parsed too few routes: {routes:?}");
        let documented: BTreeSet<(String, String)> = OPERATIONS
            .iter()
            .map(|o| (o.method.to_string(), o.path.to_string()))
            .collect();
        let missing: Vec<_> = routes.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.rs OPERATIONS: {missing:?}"
        );
        let stale: Vec<_> = documented.difference(&routes).collect();
        assert!(stale.is_empty(), "OPERATIONS not in the router: {stale:?}");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_path_parameter_declared() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.contains_key("/ws/{workflow}/{app_id}/{chat_id}/{user_id}"));
        assert!(paths["/api/apps/{app_id}"]["patch"]["requestBody"].is_object());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let declared: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                let wanted: BTreeSet<&str> = path_params(path).into_iter().collect();
                assert_eq!(declared, wanted, "{method} {path}");
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
        assert!(
            paths["/api/sessions"]["post"]["responses"]["429"]["headers"]["Retry-After"]
                .is_object()
        );
    }
}
