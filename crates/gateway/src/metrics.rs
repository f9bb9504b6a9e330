//! Metric names of the gateway. Labels stay bounded: `app_id` yes, `chat_id` never.

pub const ACTIVE_CONNECTIONS: &str = "mozaiks_active_connections";
pub const FRAMES_IN: &str = "mozaiks_ws_frames_in_total";
pub const FRAMES_OUT: &str = "mozaiks_ws_frames_out_total";
pub const WS_CLOSED: &str = "mozaiks_ws_closed_total";
pub const REPLAYED: &str = "mozaiks_ws_replayed_events";
pub const SESSIONS_STARTED: &str = "mozaiks_sessions_started_total";
pub const SESSIONS_REFUSED_RUNS: &str = "mozaiks_sessions_refused_concurrent_runs_total";
pub const SESSION_START_SECONDS: &str = "mozaiks_session_start_seconds";
pub const HTTP_REQUESTS: &str = "mozaiks_http_requests_total";
pub const RESUMES: &str = "mozaiks_ws_resumes_total";
pub const RESYNCS: &str = "mozaiks_ws_resyncs_total";
pub const REPLAY_SECONDS: &str = "mozaiks_ws_replay_seconds";
pub const SEEK_PROBES: &str = "mozaiks_ws_seek_probes";
pub const GAP_FETCHES: &str = "mozaiks_ws_gap_fetches_total";
pub const SLOW_CONSUMER_CLOSES: &str = "mozaiks_ws_slow_consumer_closes_total";
pub const WS_REFUSED: &str = "mozaiks_ws_refused_total";
pub const RATE_LIMITED: &str = "mozaiks_ws_rate_limited_frames_total";
pub const LIVE_FEEDS: &str = "mozaiks_ws_live_feeds";
pub const DRAIN_SECONDS: &str = "mozaiks_gateway_drain_seconds";
pub const NOTIFICATIONS_SENT: &str = "mozaiks_notifications_sent_total";
pub const NOTIFICATIONS_DELIVERED: &str = "mozaiks_notifications_delivered_total";
pub const API_KEY_AUTH: &str = "mozaiks_api_key_auth_total";
pub const API_KEYS_CREATED: &str = "mozaiks_api_keys_created_total";
pub const OPS_READ_SECONDS: &str = "mozaiks_ops_perf_read_seconds";
pub const DELTAS_IN: &str = "mozaiks_ws_deltas_in_total";
pub const DELTAS_OUT: &str = "mozaiks_ws_deltas_out_total";
pub const DELTAS_COALESCED: &str = "mozaiks_ws_deltas_coalesced_total";
pub const DELTAS_DROPPED: &str = "mozaiks_ws_deltas_dropped_total";
pub const NATS_RECONNECTS: &str = "mozaiks_gateway_nats_reconnects_total";
pub const RECONNECT_CHECKS: &str = "mozaiks_ws_reconnect_checks_total";
pub const RECONNECT_EVENTS: &str = "mozaiks_ws_reconnect_recovered_events_total";
pub const CORS_REFUSED: &str = "mozaiks_http_cors_refused_total";
pub const AGUI_STREAMS: &str = "mozaiks_agui_streams";
pub const AGUI_EVENTS_OUT: &str = "mozaiks_agui_events_out_total";
pub const CREDITS_REFUSED: &str = "mozaiks_credits_refusals_total";

pub fn describe() {
    metrics::describe_counter!(
        CREDITS_REFUSED,
        "Sessions and messages refused because the app's credits (credits_exhausted) or the user's daily budget (user_budget_exhausted) are spent, by app_id and code."
    );
    metrics::describe_counter!(
        CORS_REFUSED,
        "Cross-origin HTTP requests from an origin not allowed, by kind (preflight: refused with 403; request: answered without CORS headers)."
    );
    metrics::describe_gauge!(
        AGUI_STREAMS,
        "Open AG-UI event streams (SSE) on this replica."
    );
    metrics::describe_counter!(AGUI_EVENTS_OUT, "AG-UI events written to SSE streams.");
    metrics::describe_counter!(
        DELTAS_IN,
        "Token deltas received from the bus by this replica, by outcome (accepted, invalid)."
    );
    metrics::describe_counter!(DELTAS_OUT, "agent.delta frames queued to sockets.");
    metrics::describe_counter!(
        DELTAS_COALESCED,
        "Token deltas merged into another agent.delta frame for a socket that fell behind."
    );
    metrics::describe_counter!(
        DELTAS_DROPPED,
        "Token deltas not sent to a socket, by reason (stale, superseded, lagged, queue_full)."
    );
    metrics::describe_counter!(
        NATS_RECONNECTS,
        "NATS reconnects after which the followed chats were checked against the log."
    );
    metrics::describe_counter!(
        RECONNECT_CHECKS,
        "Chats checked against the log after a NATS reconnect, by outcome (current, behind)."
    );
    metrics::describe_counter!(
        RECONNECT_EVENTS,
        "Events stored during a NATS outage handed to sockets after the reconnect."
    );
    metrics::describe_histogram!(
        OPS_READ_SECONDS,
        metrics::Unit::Seconds,
        "Time to read every worker's MZ_PERF snapshot for an ops endpoint."
    );
    metrics::describe_counter!(
        API_KEY_AUTH,
        "API keys presented, by outcome (accepted, malformed, unknown, mismatch, revoked)."
    );
    metrics::describe_counter!(API_KEYS_CREATED, "API keys created, by app_id.");
    metrics::describe_gauge!(ACTIVE_CONNECTIONS, "Open WebSockets, by app_id.");
    metrics::describe_counter!(FRAMES_IN, "Client frames received, by type.");
    metrics::describe_counter!(FRAMES_OUT, "Frames sent to clients.");
    metrics::describe_counter!(WS_CLOSED, "WebSockets closed, by reason.");
    metrics::describe_histogram!(REPLAYED, "Events replayed on (re)connect.");
    metrics::describe_counter!(
        SESSIONS_STARTED,
        "Sessions started or resumed, by app_id and kind."
    );
    metrics::describe_counter!(
        SESSIONS_REFUSED_RUNS,
        "Session starts refused because the app's runs across every worker reached max_concurrent_runs, by app_id."
    );
    metrics::describe_histogram!(
        SESSION_START_SECONDS,
        metrics::Unit::Seconds,
        "POST /api/sessions latency."
    );
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP answers of the gateway, by method, route (the route template; unmatched for unknown paths) and status class (2xx, 4xx, ...)."
    );
    metrics::describe_counter!(
        RESUMES,
        "WebSockets opened with after > 0 (resumes), by app_id."
    );
    metrics::describe_counter!(
        RESYNCS,
        "resync frames sent (log recreated or events past retention), by app_id and reason."
    );
    metrics::describe_histogram!(
        REPLAY_SECONDS,
        metrics::Unit::Seconds,
        "Time from connect to the end of the catch-up replay."
    );
    metrics::describe_histogram!(
        SEEK_PROBES,
        "Direct gets to find where a catch-up starts in the stream."
    );
    metrics::describe_counter!(
        GAP_FETCHES,
        "Live events that arrived past a gap, refetched from JetStream."
    );
    metrics::describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "WebSockets closed with 1013 because their queue was full, by app_id."
    );
    metrics::describe_counter!(
        WS_REFUSED,
        "WebSocket upgrades refused, by app_id and reason."
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        "Client frames dropped for exceeding frames per second, by app_id."
    );
    metrics::describe_gauge!(
        LIVE_FEEDS,
        "Chats with a shared live subscription on this replica."
    );
    metrics::describe_histogram!(
        DRAIN_SECONDS,
        metrics::Unit::Seconds,
        "Time from SIGTERM until the last WebSocket closed (or the deadline)."
    );
    metrics::describe_counter!(
        NOTIFICATIONS_SENT,
        "Notifications published, by app_id and target (user, app)."
    );
    metrics::describe_counter!(
        NOTIFICATIONS_DELIVERED,
        "Notification frames handed to sockets of this replica, by app_id."
    );
}
