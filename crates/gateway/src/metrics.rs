//! Metric names of the gateway. Labels stay bounded: `app_id` yes, `chat_id` never.

pub const ACTIVE_CONNECTIONS: &str = "mozaiks_active_connections";
pub const FRAMES_IN: &str = "mozaiks_ws_frames_in_total";
pub const FRAMES_OUT: &str = "mozaiks_ws_frames_out_total";
pub const WS_CLOSED: &str = "mozaiks_ws_closed_total";
pub const REPLAYED: &str = "mozaiks_ws_replayed_events";
pub const SESSIONS_STARTED: &str = "mozaiks_sessions_started_total";
pub const SESSION_START_SECONDS: &str = "mozaiks_session_start_seconds";
pub const HTTP_REQUESTS: &str = "mozaiks_http_requests_total";

pub fn describe() {
    metrics::describe_gauge!(ACTIVE_CONNECTIONS, "Open WebSockets, by app_id.");
    metrics::describe_counter!(FRAMES_IN, "Client frames received, by type.");
    metrics::describe_counter!(FRAMES_OUT, "Frames sent to clients.");
    metrics::describe_counter!(WS_CLOSED, "WebSockets closed, by reason.");
    metrics::describe_histogram!(REPLAYED, "Events replayed on (re)connect.");
    metrics::describe_counter!(
        SESSIONS_STARTED,
        "Sessions started or resumed, by app_id and kind."
    );
    metrics::describe_histogram!(
        SESSION_START_SECONDS,
        metrics::Unit::Seconds,
        "POST /api/sessions latency."
    );
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests, by status class.");
}
