//! The OpenAI-compatible client against a local HTTP server that speaks the real wire format:
//! Server-Sent Events with `data:` lines, tool-call deltas, `[DONE]`, usage, and errors.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use mozaiks_engine::model::openai::{Client, Config};
use serde_json::{Value, json};

/// One scripted answer: status, headers, body pieces (each written separately), a delay.
#[derive(Clone, Default)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    pieces: Vec<String>,
    delay: Duration,
}

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Answer>>,
    /// Each request's headers and body.
    seen: Mutex<Vec<(HeaderMap, Value)>>,
    /// Answer once the script is used up.
    fallback: Mutex<Option<Answer>>,
}

async fn handler(State(s): State<Arc<Script>>, headers: HeaderMap, body: String) -> Response {
    s.seen
        .lock()
        .unwrap()
        .push((headers, serde_json::from_str(&body).unwrap_or(Value::Null)));
    let answer = s
        .answers
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| s.fallback.lock().unwrap().clone())
        .expect("no scripted answer left");
    tokio::time::sleep(answer.delay).await;
    let pieces: Vec<Result<String, std::io::Error>> = answer.pieces.into_iter().map(Ok).collect();
    let mut r = Response::builder().status(StatusCode::from_u16(answer.status).unwrap());
    for (k, v) in answer.headers {
        r = r.header(k, v);
    }
    r.body(Body::from_stream(futures::stream::iter(pieces)))
        .unwrap()
}

/// Starts the server; returns its base URL (`http://127.0.0.1:P/v1`) and the script.
async fn server(answers: Vec<Answer>) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        answers: Mutex::new(answers.into()),
        ..Default::default()
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(handler))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), script)
}

fn sse(chunks: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    out.push("data: [DONE]\n\n".into());
    out
}

fn ok(pieces: Vec<String>) -> Answer {
    Answer {
        status: 200,
        headers: vec![("content-type", "text/event-stream")],
        pieces,
        ..Default::default()
    }
}

fn status(code: u16, body: &str) -> Answer {
    Answer {
        status: code,
        headers: vec![("content-type", "application/json")],
        pieces: vec![body.to_string()],
        ..Default::default()
    }
}

fn client(base: &str, tune: impl FnOnce(&mut Config)) -> Client {
    let mut cfg = Config {
        base_url: base.to_string(),
        api_key: Some("sk-test".into()),
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..Default::default()
    };
    tune(&mut cfg);
    Client::new(cfg).unwrap()
}

fn delta(d: Value) -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-test",
           "choices": [{"index": 0, "delta": d, "finish_reason": null}]})
}

fn finish(reason: &str) -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-test",
           "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn usage(p: u64, c: u64) -> Value {
    json!({"id": "c", "object": "chat.completion.chunk", "model": "gpt-test", "choices": [],
           "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
}

fn user(text: &str) -> Vec<Value> {
    vec![json!({"role": "user", "content": text})]
}

#[tokio::test]
async fn a_content_stream_is_assembled_with_its_usage() {
    let (base, script) = server(vec![ok(sse(&[
        delta(json!({"role": "assistant", "content": ""})),
        delta(json!({"content": "Hel"})),
        delta(json!({"content": "lo!"})),
        finish("stop"),
        usage(12, 3),
    ]))])
    .await;
    let tools = vec![
        json!({"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}),
    ];
    let r = client(&base, |_| {})
        .complete("gpt-test", user("hi"), tools)
        .await
        .unwrap();
    assert_eq!(r.text, "Hello!");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (12, 3));
    assert_eq!(r.model, "gpt-test");
    assert!(r.tool_calls.is_empty());
    let seen = script.seen.lock().unwrap();
    let (headers, body) = &seen[0];
    assert_eq!(headers["authorization"], "Bearer sk-test");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["messages"][0]["content"], "hi");
    assert_eq!(body["tools"][0]["function"]["name"], "t");
}

#[tokio::test]
async fn tool_call_deltas_split_across_chunks_are_assembled_by_index() {
    let chunks = [
        delta(json!({"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": ""}}]})),
        delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\": "}}]})),
        delta(json!({"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "set_context", "arguments": "{\"key\""}}]})),
        delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"invoice\"}"}}]})),
        delta(
            json!({"tool_calls": [{"index": 1, "function": {"arguments": ": \"k\", \"value\": 2}"}}]}),
        ),
        finish("tool_calls"),
        usage(40, 9),
    ];
    // Cut the bytes at awkward places: mid-line and mid-UTF-8 are the server's right.
    let whole: String = sse(&chunks).concat();
    let bytes = whole.as_bytes();
    let pieces: Vec<String> = bytes
        .chunks(37)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let (base, _) = server(vec![ok(pieces)]).await;
    let r = client(&base, |_| {})
        .complete("m", user("x"), Vec::new())
        .await
        .unwrap();
    assert_eq!(r.text, "");
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.tool_calls[0].call_id, "call_a");
    assert_eq!(r.tool_calls[0].tool, "lookup");
    assert_eq!(r.tool_calls[0].arguments, json!({"q": "invoice"}));
    assert_eq!(r.tool_calls[1].call_id, "call_b");
    assert_eq!(r.tool_calls[1].arguments, json!({"key": "k", "value": 2}));
    assert_eq!((r.prompt_tokens, r.completion_tokens), (40, 9));
}

#[tokio::test]
async fn rate_limits_are_retried_after_the_servers_delay() {
    let mut limited = status(
        429,
        r#"{"error": {"message": "slow down", "type": "rate_limit"}}"#,
    );
    limited.headers.push(("retry-after", "1"));
    let (base, script) = server(vec![
        limited,
        ok(sse(&[
            delta(json!({"content": "ok"})),
            finish("stop"),
            usage(1, 1),
        ])),
    ])
    .await;
    let r = client(&base, |_| {})
        .complete("m", user("x"), Vec::new())
        .await
        .unwrap();
    assert_eq!(r.text, "ok");
    assert_eq!(script.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempts_run_out() {
    let (base, script) = server(Vec::new()).await;
    *script.fallback.lock().unwrap() = Some(status(503, r#"{"error": {"message": "overloaded"}}"#));
    let e = client(&base, |c| c.max_attempts = 3)
        .complete("m", user("x"), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, "model_unavailable");
    assert!(e.retryable);
    assert!(
        e.message.contains("overloaded") && e.message.contains("3 attempts"),
        "{e}"
    );
    assert_eq!(script.seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let (base, script) = server(vec![
        status(
            401,
            r#"{"error": {"message": "Incorrect API key provided"}}"#,
        ),
        status(400, r#"{"error": {"message": "Invalid 'messages'"}}"#),
    ])
    .await;
    let c = client(&base, |_| {});
    let e = c.complete("m", user("x"), Vec::new()).await.unwrap_err();
    assert_eq!((e.code, e.retryable), ("model_unauthorized", false));
    assert!(e.message.contains("Incorrect API key"), "{e}");
    let e = c.complete("m", user("x"), Vec::new()).await.unwrap_err();
    assert_eq!((e.code, e.retryable), ("model_bad_request", false));
    assert_eq!(script.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_malformed_chunk_is_an_error() {
    let (base, _) = server(vec![ok(vec![
        format!("data: {}\n\n", delta(json!({"content": "a"}))),
        "data: {not json\n\n".into(),
    ])])
    .await;
    let e = client(&base, |_| {})
        .complete("m", user("x"), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, "model_bad_stream");
}

#[tokio::test]
async fn a_stream_cut_short_is_retried_then_fails() {
    let (base, script) = server(Vec::new()).await;
    *script.fallback.lock().unwrap() = Some(ok(vec![format!(
        "data: {}\n\n",
        delta(json!({"content": "par"}))
    )]));
    let e = client(&base, |c| c.max_attempts = 2)
        .complete("m", user("x"), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, "model_incomplete");
    assert_eq!(script.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let mut slow = ok(sse(&[delta(json!({"content": "late"})), finish("stop")]));
    slow.delay = Duration::from_secs(30);
    let (base, _) = server(vec![slow]).await;
    let e = client(&base, |c| {
        c.max_attempts = 1;
        c.request_timeout = Duration::from_millis(300);
    })
    .complete("m", user("x"), Vec::new())
    .await
    .unwrap_err();
    assert_eq!((e.code, e.retryable), ("model_timeout", true));
}

#[tokio::test]
async fn an_unreachable_server_is_a_connection_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = client(&format!("http://127.0.0.1:{port}/v1"), |c| {
        c.max_attempts = 2
    })
    .complete("m", user("x"), Vec::new())
    .await
    .unwrap_err();
    assert_eq!(e.code, "model_connection");
}

#[tokio::test]
async fn azure_style_key_header_and_query_are_supported() {
    let (base, script) = server(vec![ok(sse(&[
        delta(json!({"content": "hi"})),
        finish("stop"),
    ]))])
    .await;
    let r = client(&format!("{base}?api-version=2024-10-21"), |c| {
        c.api_key_header = Some("api-key".into())
    })
    .complete("m", user("x"), Vec::new())
    .await
    .unwrap();
    // no usage from this server: estimated
    assert!(r.prompt_tokens > 0 && r.completion_tokens > 0);
    let seen = script.seen.lock().unwrap();
    assert_eq!(seen[0].0["api-key"], "sk-test");
    assert!(seen[0].0.get("authorization").is_none());
}

#[test]
fn a_base_url_that_is_not_http_is_refused() {
    let e = Client::new(Config {
        base_url: "localhost:8080/v1".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.code, "model_config");
}

/// Drives a chat of `pack` on "hi" with the OpenAI-compatible model until it is idle.
async fn drive_with(
    model: &mozaiks_engine::model::Model,
    pack: &mozaiks_packs::Pack,
) -> Vec<mozaiks_events::Event> {
    use mozaiks_engine::chat::{Chat, Next};
    use mozaiks_events::{Event, MessageUser, SessionStarted};
    let mut chat = Chat::from_events([
        (&Event::SessionStarted(SessionStarted::default()), None),
        (
            &Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
            None,
        ),
    ]);
    let mut all = Vec::new();
    for _ in 0..100 {
        let events = match chat.next(pack, uuid::Uuid::now_v7()) {
            Next::Emit(ev) => ev,
            Next::CallModel { agent, round, .. } => {
                let agent = pack.agent(&agent).unwrap();
                let reply = model
                    .complete(pack, agent, &chat, round, None)
                    .await
                    .unwrap();
                chat.on_reply(round, &reply)
            }
            _ => return all,
        };
        for e in &events {
            chat.apply(e, None);
        }
        all.extend(events);
    }
    panic!("the run did not end");
}

const CONCIERGE: &str = "name: p\nstart_agent: intake\npattern: auto\nselector_model: gpt-select\nmax_turns: 3\nterminate_when: [{keyword: DONE}]\nagents:\n  - name: intake\n    description: Classifies the request\n    model: gpt-intake\n    output_schema: {type: object, properties: {topic: {type: string, enum: [dining, transport]}}, required: [topic]}\n    output_into: request\n  - name: dining\n    description: Books tables\n  - name: transport\n    description: Books taxis\n    handoff: {after_work: dining}\n";

fn text_answer(text: &str) -> Answer {
    ok(sse(&[
        delta(json!({"role": "assistant", "content": text})),
        finish("stop"),
        usage(20, 2),
    ]))
}

#[tokio::test]
async fn structured_output_and_speaker_selection_go_over_the_wire() {
    let pack = mozaiks_packs::Pack::parse(std::path::Path::new("p/workflow.yaml"), "p", CONCIERGE)
        .unwrap();
    let (base, script) = server(vec![
        text_answer(r#"{"topic": "transport"}"#),
        text_answer("transport"),
        text_answer("A taxi is booked."),
        // names no agent: the fallback is transport's after_work
        text_answer("Let me think about that."),
        text_answer("Table for two. DONE"),
    ])
    .await;
    let model = mozaiks_engine::model::Model::OpenAi(client(&base, |_| {}));
    let events = drive_with(&model, &pack).await;
    let seen: Vec<Value> = script
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(seen.len(), 5);
    // the structured agent asks for a strict JSON schema, closed objects included
    let format = &seen[0]["response_format"];
    assert_eq!(format["type"], "json_schema");
    assert_eq!(format["json_schema"]["name"], "intake");
    assert_eq!(format["json_schema"]["strict"], true);
    assert_eq!(
        format["json_schema"]["schema"]["additionalProperties"],
        false
    );
    assert_eq!(
        format["json_schema"]["schema"]["properties"]["topic"]["enum"],
        json!(["dining", "transport"])
    );
    assert_eq!(seen[0]["model"], "gpt-intake");
    // the selector: no tools, no response_format, the selector model, AG2's prompt
    let select = &seen[1];
    assert_eq!(select["model"], "gpt-select");
    assert!(select.get("tools").is_none() && select.get("response_format").is_none());
    let system = select["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("intake: Classifies the request")
            && system.contains("transport: Books taxis")
            && system.contains("[intake, dining, transport]"),
        "{system}"
    );
    let msgs = select["messages"].as_array().unwrap();
    assert_eq!(msgs[msgs.len() - 2]["name"], "intake");
    assert!(
        msgs.last().unwrap()["content"]
            .as_str()
            .unwrap()
            .contains("Only return the role")
    );
    // agents without a schema send no response_format
    assert!(seen[2].get("response_format").is_none());
    let selections: Vec<(Option<String>, String)> = events
        .iter()
        .filter_map(|e| match e {
            mozaiks_events::Event::SpeakerSelected(s) => Some((s.next.clone(), s.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        selections,
        [
            (Some("transport".into()), "auto".into()),
            (Some("dining".into()), "auto_fallback".into()),
            (None, "terminate_when".into()),
        ]
    );
    let structured = events.iter().find_map(|e| match e {
        mozaiks_events::Event::AgentMessage(m) => m.structured.clone(),
        _ => None,
    });
    assert_eq!(structured, Some(json!({"topic": "transport"})));
    let charged = events
        .iter()
        .filter(|e| e.type_name() == "usage.charged")
        .count();
    assert_eq!(charged, 5, "every call, selector calls included, once");
}

#[tokio::test]
async fn a_structured_reply_that_fails_twice_fails_the_run_after_one_retry() {
    let pack = mozaiks_packs::Pack::parse(std::path::Path::new("p/workflow.yaml"), "p", CONCIERGE)
        .unwrap();
    let (base, script) = server(vec![
        text_answer(r#"{"topic": "boat"}"#),
        text_answer("not even JSON"),
    ])
    .await;
    let model = mozaiks_engine::model::Model::OpenAi(client(&base, |_| {}));
    let events = drive_with(&model, &pack).await;
    let seen = script.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let retry = seen[1].1["messages"].as_array().unwrap();
    let last = retry.last().unwrap()["content"].as_str().unwrap();
    assert!(last.contains("$.topic"), "{last}");
    assert_eq!(retry[retry.len() - 2]["role"], "assistant");
    let Some(mozaiks_events::Event::RunFailed(f)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(f.code, "invalid_structured_output");
}

#[tokio::test]
async fn content_deltas_reach_the_sink_in_order_and_a_retry_restarts_them() {
    use mozaiks_engine::model::deltas::{Piece, Sink};
    let cut_short = ok(vec![format!(
        "data: {}\n\n",
        delta(json!({"content": "Hel"}))
    )]);
    let (base, _script) = server(vec![
        cut_short,
        ok(sse(&[
            delta(json!({"role": "assistant", "content": ""})),
            delta(json!({"content": "Hel"})),
            delta(json!({"content": "lo, "})),
            delta(json!({"content": "wörld"})),
            finish("stop"),
            usage(12, 3),
        ])),
    ])
    .await;
    let (sink, mut pieces) = Sink::channel();
    let r = client(&base, |_| {})
        .complete_streaming("gpt-test", user("hi"), Vec::new(), Some(&sink))
        .await
        .unwrap();
    drop(sink);
    assert_eq!(r.text, "Hello, wörld");
    let mut got = Vec::new();
    while let Some(p) = pieces.recv().await {
        got.push(p);
    }
    let text = |t: &str| Piece::Text(t.to_string());
    assert_eq!(
        got,
        vec![
            text("Hel"),
            Piece::Restart,
            text("Hel"),
            text("lo, "),
            text("wörld")
        ]
    );
}
