//! The AG-UI event stream (`GET /api/agui/{app_id}/{chat_id}`, issue 13): a run as AG-UI events
//! over SSE, in order; a reconnect with `Last-Event-ID` on another replica resumes without gap or
//! duplicate; the WebSocket's auth; bad input.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::fleet::*;

/// An open SSE response, read event by event.
pub struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: String,
    pub headers: reqwest::header::HeaderMap,
}

/// One SSE event: its `id` (the seq of the durable event it ends) and its AG-UI event.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub id: Option<u64>,
    pub event: Value,
}

impl Sse {
    /// Opens `path` (with its query) on gateway `gw`; `Err((status, body))` when refused.
    pub async fn open(
        fleet: &Fleet,
        gw: usize,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Sse, (u16, Value)> {
        let mut req = fleet.http.get(format!("{}{path}", fleet.gateways[gw]));
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        if r.status() != 200 {
            let s = r.status().as_u16();
            return Err((s, r.json().await.unwrap_or(Value::Null)));
        }
        let headers = r.headers().clone();
        Ok(Sse {
            body: Box::pin(r.bytes_stream()),
            buf: String::new(),
            headers,
        })
    }

    /// The next event (comments skipped); `None` when the stream ended. 20 s timeout.
    pub async fn next(&mut self) -> Option<Got> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse::<u64>().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let event = serde_json::from_str(&data).expect("AG-UI event is JSON");
                return Some(Got { id, event });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.body.next())
                .await
                .expect("timed out waiting for an SSE event");
            match chunk {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                Some(Err(e)) => panic!("SSE read failed: {e}"),
                None => return None,
            }
        }
    }

    /// Events until (and with) the first for which `stop` holds.
    pub async fn until(&mut self, stop: impl Fn(&Got) -> bool) -> Vec<Got> {
        let mut out = Vec::new();
        loop {
            let g = self.next().await.expect("stream ended early");
            let done = stop(&g);
            out.push(g);
            if done {
                return out;
            }
        }
    }
}

pub fn agui_path(ticket: &Value) -> String {
    format!(
        "/api/agui/{}/{}",
        ticket["app_id"].as_str().unwrap(),
        ticket["chat_id"].as_str().unwrap()
    )
}

fn token_of(ticket: &Value) -> String {
    ticket["runtime_token"].as_str().unwrap().to_string()
}

fn kind(g: &Got) -> String {
    match g.event["type"].as_str().unwrap() {
        "CUSTOM" => format!("CUSTOM:{}", g.event["name"].as_str().unwrap()),
        t => t.to_string(),
    }
}

/// `want` appears in `got`'s types in this order (other events may come between).
fn assert_in_order(got: &[Got], want: &[&str]) {
    let kinds: Vec<String> = got.iter().map(kind).collect();
    let mut at = 0;
    for w in want {
        match kinds[at..].iter().position(|k| k == w) {
            Some(i) => at += i + 1,
            None => panic!("{w} missing after position {at}: {kinds:#?}"),
        }
    }
}

/// The events that end a durable event (those with an id).
fn durable(got: &[Got]) -> Vec<Got> {
    got.iter().filter(|g| g.id.is_some()).cloned().collect()
}

/// Each text message's id and whole text, in order of their end.
fn texts(got: &[Got]) -> Vec<(String, String)> {
    texts_ending_from(got, 0)
}

/// Like [`texts`], for the messages whose end is at index `from` or later.
fn texts_ending_from(got: &[Got], from: usize) -> Vec<(String, String)> {
    let mut open: Vec<(String, String)> = Vec::new();
    let mut done = Vec::new();
    for (at, g) in got.iter().enumerate() {
        let id = g.event["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match g.event["type"].as_str().unwrap() {
            "TEXT_MESSAGE_START" => open.push((id, String::new())),
            "TEXT_MESSAGE_CONTENT" => {
                let m = open
                    .iter_mut()
                    .find(|(i, _)| *i == id)
                    .expect("content of an open message");
                m.1.push_str(g.event["delta"].as_str().unwrap());
            }
            "TEXT_MESSAGE_END" => {
                let i = open
                    .iter()
                    .position(|(i, _)| *i == id)
                    .expect("end of an open message");
                let m = open.remove(i);
                if at >= from {
                    done.push(m);
                }
            }
            _ => {}
        }
    }
    done
}

/// The SSE ids of `got` are `from..` consecutive, each on the last event of its group.
fn assert_ids_gapless(got: &[Got], from: u64) -> u64 {
    let ids: Vec<u64> = got.iter().filter_map(|g| g.id).collect();
    let want: Vec<u64> = (from..from + ids.len() as u64).collect();
    assert_eq!(ids, want, "gap or duplicate in the SSE ids");
    *ids.last().unwrap_or(&(from - 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_streams_as_agui_events_and_resumes_on_another_replica_without_gap_or_duplicate() {
    let fleet = Fleet::start(2).await;
    let user = Fleet::token("eve", "default", &["user"]);
    let ticket = fleet
        .session(0, &user, "support_triage", Some("Where is my parcel?"))
        .await;
    let (path, token) = (agui_path(&ticket), token_of(&ticket));

    // From the start on replica 0, until general support asks the user.
    let mut first = Sse::open(&fleet, 0, &format!("{path}?token={token}&after=0"), &[])
        .await
        .expect("stream opens");
    assert!(
        first.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let head = first.until(|g| g.event["name"] == "input.requested").await;
    // The durable events' order (the last AG-UI event of each carries its seq); an assistant
    // message streamed live from token deltas starts before its durable events.
    assert_in_order(
        &durable(&head),
        &[
            "STATE_SNAPSHOT",
            "TEXT_MESSAGE_END",
            "RUN_STARTED",
            "STEP_STARTED",
            "CUSTOM:model.replied",
            "TOOL_CALL_END",
            "TOOL_CALL_RESULT",
            "STATE_DELTA",
            "CUSTOM:model.replied",
            "TEXT_MESSAGE_END",
            "CUSTOM:usage.charged",
            "CUSTOM:speaker.selected",
            "STEP_FINISHED",
            "STEP_STARTED",
            "TOOL_CALL_END",
            "CUSTOM:input.requested",
        ],
    );
    assert_in_order(
        &head,
        &["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"],
    );
    let said: Vec<String> = texts(&head).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        said,
        [
            "Where is my parcel?",
            "Triage: this is a general request; routing it."
        ]
    );
    let k = assert_ids_gapless(&head, 1);
    assert_eq!(head[0].event["snapshot"]["priority"], "normal");
    assert_eq!(
        (
            head[1].event["type"].as_str(),
            head[1].event["role"].as_str()
        ),
        (Some("TEXT_MESSAGE_START"), Some("user"))
    );
    let run_started = head
        .iter()
        .find(|g| g.event["type"] == "RUN_STARTED")
        .unwrap();
    assert_eq!(run_started.event["threadId"], ticket["chat_id"]);
    let classify = head
        .iter()
        .find(|g| g.event["type"] == "TOOL_CALL_START")
        .unwrap();
    assert_eq!(classify.event["toolCallName"], "classify");
    let result = head
        .iter()
        .find(|g| g.event["type"] == "TOOL_CALL_RESULT")
        .unwrap();
    assert_eq!(
        (
            result.event["toolCallId"].clone(),
            result.event["content"].clone()
        ),
        (classify.event["toolCallId"].clone(), json!("general"))
    );
    let delta = head
        .iter()
        .find(|g| g.event["type"] == "STATE_DELTA")
        .unwrap();
    assert_eq!(
        delta.event["delta"],
        json!([{"op": "add", "path": "/category", "value": "general"}])
    );
    for g in &head {
        assert!(g.event["timestamp"].as_i64().unwrap() > 0, "{g:?}");
    }
    let asked = &head.last().unwrap().event["value"];
    let request_id = asked["request_id"].as_str().unwrap().to_string();
    drop(first);

    // Reconnect on replica 1 from the middle: Last-Event-ID wins over `after`; the replay is
    // exactly what the first stream had after that id.
    let m = k / 2;
    let mut second = Sse::open(
        &fleet,
        1,
        &format!("{path}?token={token}&after=0"),
        &[("Last-Event-ID", m.to_string())],
    )
    .await
    .expect("resume opens");
    let cut = head.iter().position(|g| g.id == Some(m)).unwrap() + 1;
    let replayed = second.until(|g| g.id == Some(k)).await;
    // Live, an assistant message may have started from token deltas (no id) before its durable
    // events; replayed, it comes whole. The durable events and the texts are the same.
    let durable = |gs: &[Got]| {
        gs.iter()
            .filter(|g| g.id.is_some())
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        durable(&replayed),
        durable(&head[cut..]),
        "the resume differs"
    );
    assert_eq!(texts(&replayed), texts_ending_from(&head, cut));

    // Answer over the WebSocket (replica 0): the rest arrives live on replica 1's stream.
    let mut ws = fleet.connect(0, &ticket, k).await;
    send_json(
        &mut ws,
        json!({"type": "input.response", "request_id": request_id, "text": "A-300"}),
    )
    .await;
    let rest = second.until(|g| g.event["type"] == "RUN_FINISHED").await;
    let n = assert_ids_gapless(&rest, k + 1);
    assert_in_order(
        &rest,
        &[
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "TOOL_CALL_RESULT",
            "TEXT_MESSAGE_END",
            "STEP_FINISHED",
            "RUN_FINISHED",
        ],
    );
    let said: Vec<String> = texts(&rest).into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        said,
        [
            "A-300",
            "General: thanks, I noted \"A-300\". A colleague will follow up."
        ],
        "{rest:#?}"
    );
    let finished = &rest.last().unwrap().event;
    assert_eq!(finished["runId"], run_started.event["runId"]);
    assert_eq!(
        finished["result"],
        "General: thanks, I noted \"A-300\". A colleague will follow up."
    );

    // The stream's ids are the log's seqs: the WebSocket's replay ends at the same one.
    let mut ws = fleet.connect(1, &ticket, 0).await;
    let frames = events_until(&mut ws, "run.completed").await;
    assert_gapless(&frames, 1);
    assert_eq!(frames.last().unwrap()["seq"].as_u64(), Some(n));

    // Logs written to files carry no colour codes.
    for p in &fleet.procs {
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(!text.contains('\u{1b}'), "ANSI codes in {}'s log", p.role);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agui_takes_the_ticket_as_a_bearer_and_tells_an_after_beyond_the_head() {
    let fleet = Fleet::start(1).await;
    let user = Fleet::token("eve", "default", &["user"]);
    let ticket = fleet.session(0, &user, "hello", Some("hi")).await;
    let (path, token) = (agui_path(&ticket), token_of(&ticket));
    // The refusals (the WebSocket's token rules, bad resume input) are checked in process:
    // crates/gateway/tests/agui.rs.

    // The ticket in the Authorization header works too; `after` past the head is told, then the
    // stream goes on from the head.
    let mut s = Sse::open(
        &fleet,
        0,
        &format!("{path}?after=999"),
        &[("Authorization", format!("Bearer {token}"))],
    )
    .await
    .expect("bearer ticket");
    let first = s.next().await.unwrap();
    assert_eq!(
        (
            first.event["name"].as_str(),
            first.event["value"]["code"].as_str()
        ),
        (Some("error"), Some("after_beyond_head"))
    );
    // A new message on the chat reaches the stream live.
    let mut ws = fleet.connect(0, &ticket, 0).await;
    events_until(&mut ws, "run.completed").await;
    send_json(
        &mut ws,
        json!({"type": "user.message", "text": "once more", "client_msg_id": "m2"}),
    )
    .await;
    s.until(|g| g.event["delta"] == "once more").await;
    let live = s.until(|g| g.event["type"] == "RUN_FINISHED").await;
    assert!(
        live.iter()
            .any(|g| g.event["delta"] == "Hello! You said: once more"
                || g.event["result"] == "Hello! You said: once more"),
        "{live:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_ends_its_agui_streams_and_they_resume_on_another() {
    let fleet = Fleet::start(2).await;
    let user = Fleet::token("eve", "default", &["user"]);
    let ticket = fleet.session(0, &user, "hello", Some("hi")).await;
    let (path, token) = (agui_path(&ticket), token_of(&ticket));
    let mut s = Sse::open(&fleet, 1, &format!("{path}?token={token}"), &[])
        .await
        .expect("stream opens");
    let first = s.until(|g| g.event["type"] == "RUN_FINISHED").await;
    let k = assert_ids_gapless(&first, 1);

    // SIGTERM: the stream says why it ends, then ends, and the replica stops (an SSE stream does
    // not hold its drain).
    let gw = fleet
        .procs
        .iter()
        .filter(|p| p.role == "gateway")
        .nth(1)
        .unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    let close = s.until(|g| g.event["name"] == "close").await;
    assert_eq!(close.last().unwrap().event["value"]["reason"], "restarting");
    assert!(s.next().await.is_none(), "the stream goes on after close");
    fleet
        .eventually("the drained gateway to stop", || async {
            std::fs::read_to_string(&gw.log)
                .unwrap_or_default()
                .contains("Gateway stopped.")
                .then_some(())
        })
        .await;

    // Resume on the other replica from the last id; the next run arrives live, gapless.
    let mut s = Sse::open(
        &fleet,
        0,
        &format!("{path}?token={token}"),
        &[("Last-Event-ID", k.to_string())],
    )
    .await
    .expect("resume opens");
    let mut ws = fleet.connect(0, &ticket, k).await;
    send_json(
        &mut ws,
        json!({"type": "user.message", "text": "again", "client_msg_id": "m2"}),
    )
    .await;
    let rest = s.until(|g| g.event["type"] == "RUN_FINISHED").await;
    assert_ids_gapless(&rest, k + 1);
    assert_eq!(
        rest.last().unwrap().event["result"],
        "Hello! You said: again"
    );
}
