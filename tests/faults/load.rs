//! Clients that behave like chat UIs while the fleet is being hurt: each starts a chat with a
//! first message (POST /api/sessions), streams it over a WebSocket, sends further messages
//! (`user.message` with a `client_msg_id`) as runs end, and reconnects with `after` to the
//! other gateway whenever its socket ends (and, for half the chats, after every run). Each
//! records what it was acknowledged and every frame it received, for the checks.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::{Fleet, Ws};

/// How much load.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Chats in progress at once.
    pub in_flight: usize,
    /// Messages (hence runs) per chat: the POST's, then `runs - 1` `user.message` frames.
    pub runs: usize,
    /// Every n-th chat sends its first `user.message` right after connecting, before the first
    /// run ended (as a chat UI does); 0: never.
    pub eager_every: usize,
}

/// An input the fleet acknowledged: a 2xx answer to POST /api/sessions with a message, or an
/// `ack` frame for a `user.message`.
#[derive(Clone, Debug)]
pub enum Input {
    Post { text: String },
    Message { client_msg_id: String },
}

/// A durable frame as a client received it.
#[derive(Clone, Debug)]
pub struct Got {
    pub seq: u64,
    pub id: String,
    pub kind: String,
    /// The connection (index into `ChatRecord::conns`) it came on.
    pub conn: usize,
}

/// One WebSocket connection of a client.
#[derive(Clone, Debug)]
pub struct Conn {
    pub gw: usize,
    pub after: u64,
    /// How it ended: `close 1012 …`, `error …`, `eof`, `client` (the client closed it).
    pub end: String,
}

/// Everything one client saw.
#[derive(Debug, Default)]
pub struct ChatRecord {
    pub index: usize,
    pub chat_id: String,
    /// Inputs acknowledged, in the order they were sent.
    pub acked: Vec<Input>,
    /// `client_msg_id`s sent and never acknowledged (the socket ended or an error came back);
    /// each was sent again until acknowledged or seen in the log.
    pub unacked_sends: usize,
    pub frames: Vec<Got>,
    pub conns: Vec<Conn>,
    /// `error` and `resync` frames, refused POSTs: for the report.
    pub notes: Vec<String>,
    /// Why the client stopped before every run ended, if it did.
    pub gave_up: Option<String>,
    pub runs_ended: usize,
}

/// What the clients share with the test: where the gateways are, what they see.
pub struct Shared {
    pub gateways: Vec<String>,
    pub http: reqwest::Client,
    /// Open sockets per gateway.
    pub open: Vec<AtomicI64>,
    /// Close codes received: (gateway, code, when).
    pub closes: Mutex<Vec<(usize, u16, Instant)>>,
    /// Start no more chats.
    pub stop: AtomicBool,
    /// Clients stop waiting and report.
    pub give_up: AtomicBool,
    /// Runs ended, as seen by clients (progress).
    pub runs_ended: AtomicUsize,
    pub chats_started: AtomicUsize,
}

impl Shared {
    pub fn new(gateways: Vec<String>) -> Arc<Shared> {
        Arc::new(Shared {
            open: gateways.iter().map(|_| AtomicI64::new(0)).collect(),
            gateways,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            closes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            give_up: AtomicBool::new(false),
            runs_ended: AtomicUsize::new(0),
            chats_started: AtomicUsize::new(0),
        })
    }

    /// Close frames with `code` from gateway `gw` received since `since`.
    pub fn closes_since(&self, gw: usize, code: u16, since: Instant) -> usize {
        self.closes
            .lock()
            .unwrap()
            .iter()
            .filter(|(g, c, at)| *g == gw && *c == code && *at >= since)
            .count()
    }

    fn expired(&self) -> bool {
        self.give_up.load(Ordering::Relaxed)
    }
}

/// Keeps `plan.in_flight` chats going until `shared.stop`, then waits for them; returns every
/// chat's record.
pub async fn run(shared: Arc<Shared>, plan: Plan) -> Vec<ChatRecord> {
    let permits = Arc::new(tokio::sync::Semaphore::new(plan.in_flight));
    let mut tasks = Vec::new();
    let mut i = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(permit) =
            tokio::time::timeout(Duration::from_millis(200), permits.clone().acquire_owned()).await
        else {
            continue;
        };
        let permit = permit.unwrap();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let record = chat(&shared, i, plan).await;
            drop(permit);
            record
        }));
        i += 1;
        // Chats start spread out, not in bursts.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a client panicked"));
    }
    out
}

/// A small deterministic generator (no extra crate for randomness).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// The message a chat's `k`-th input carries.
pub fn text_of(chat_id: &str, k: usize) -> String {
    format!("message {k} of {chat_id}")
}

pub fn client_msg_id(chat_id: &str, k: usize) -> String {
    format!("{chat_id}-m{k}")
}

/// A `user.message` sent and not yet known to be durable.
struct Pending {
    k: usize,
    id: String,
    /// Sent on the current connection.
    sent: bool,
    sent_at: Instant,
    acked: bool,
    /// Its `message.user` came back.
    seen: bool,
}

enum Read {
    Frame(Value),
    Ended(String, Option<u16>),
    Idle,
}

async fn read(ws: &mut Ws) -> Read {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Err(_) => return Read::Idle,
            Ok(None) => return Read::Ended("eof".into(), None),
            Ok(Some(Err(e))) => return Read::Ended(format!("error {e}"), None),
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(t.as_str()) {
                Ok(v) => return Read::Frame(v),
                Err(e) => return Read::Ended(format!("bad frame {e}: {t}"), None),
            },
            Ok(Some(Ok(Message::Close(c)))) => {
                let code = c.as_ref().map(|c| u16::from(c.code));
                return Read::Ended(
                    format!(
                        "close {}",
                        c.map(|c| format!("{} {}", u16::from(c.code), c.reason))
                            .unwrap_or_default()
                    ),
                    code,
                );
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One client: a chat of `plan.runs` messages.
async fn chat(shared: &Shared, index: usize, plan: Plan) -> ChatRecord {
    shared.chats_started.fetch_add(1, Ordering::Relaxed);
    let n_gw = shared.gateways.len();
    let chat_id = uuid::Uuid::now_v7().simple().to_string();
    let user = format!("client-{index}");
    let token = Fleet::token(&user, "default", &["user"]);
    let mut rec = ChatRecord {
        index,
        chat_id: chat_id.clone(),
        ..Default::default()
    };
    let mut rng = 0x5eed_u64 ^ (index as u64).wrapping_mul(0x9e37_79b9);
    let mut gw = index % n_gw;

    // 1. The session with its first message; retried with the same chat id (the start is
    //    deduplicated on it) until a 2xx.
    let ticket = loop {
        if shared.expired() {
            rec.gave_up = Some("POST /api/sessions never answered 2xx".into());
            return rec;
        }
        let body = json!({
            "app_id": "default", "workflow_name": "hello",
            "chat_id": chat_id, "message": text_of(&chat_id, 0),
        });
        let r = shared
            .http
            .post(format!("{}/api/sessions", shared.gateways[gw]))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let ticket: Value = r.json().await.unwrap_or(Value::Null);
                if ticket["runtime_token"].is_string() {
                    rec.acked.push(Input::Post {
                        text: text_of(&chat_id, 0),
                    });
                    break ticket;
                }
                rec.notes
                    .push(format!("POST 2xx without a ticket on gw {gw}: {ticket}"));
            }
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                rec.notes
                    .push(format!("POST on gw {gw}: {status} {text:.200}"));
            }
            Err(_) => {} // the gateway is down: try the other
        }
        gw = (gw + 1) % n_gw;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let eager = plan.eager_every > 0 && index.is_multiple_of(plan.eager_every);
    let reconnect_after_runs = index.is_multiple_of(2);
    let mut last_seq = 0u64;
    let mut next_k = 1usize;
    let mut pending: Option<Pending> = None;
    let mut acked_ids: HashSet<String> = HashSet::new();
    let mut ended_runs: Vec<String> = Vec::new();
    let mut next_send_at = Instant::now();

    'connect: loop {
        if ended_runs.len() >= plan.runs {
            break;
        }
        if shared.expired() {
            rec.gave_up = Some(format!(
                "{} of {} runs ended; pending {:?}",
                ended_runs.len(),
                plan.runs,
                pending.as_ref().map(|p| (&p.id, p.acked, p.seen))
            ));
            break;
        }
        let url = ws_url(shared, gw, &ticket, last_seq);
        let mut ws = match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            _ => {
                gw = (gw + 1) % n_gw;
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        shared.open[gw].fetch_add(1, Ordering::Relaxed);
        let conn = rec.conns.len();
        rec.conns.push(Conn {
            gw,
            after: last_seq,
            end: String::new(),
        });
        if let Some(p) = pending.as_mut() {
            p.sent = false;
        }
        let mut awaiting: VecDeque<String> = VecDeque::new();
        let mut last_frame = Instant::now();
        let end: (String, Option<u16>) = loop {
            // Send the next message when its turn has come (or the pending one again).
            if let Some(p) = pending.as_ref()
                && (p.acked || p.seen)
            {
                pending = None;
            }
            if pending.is_none()
                && next_k < plan.runs
                && (ended_runs.len() >= next_k || (eager && next_k == 1))
                && Instant::now() >= next_send_at
            {
                pending = Some(Pending {
                    k: next_k,
                    id: client_msg_id(&chat_id, next_k),
                    sent: false,
                    sent_at: Instant::now(),
                    acked: false,
                    seen: false,
                });
                next_k += 1;
            }
            if let Some(p) = pending.as_mut()
                && !p.sent
            {
                let frame = json!({
                    "type": "user.message",
                    "text": text_of(&chat_id, p.k),
                    "client_msg_id": p.id,
                });
                if ws
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    break ("error on send".into(), None);
                }
                p.sent = true;
                p.sent_at = Instant::now();
                awaiting.push_back(p.id.clone());
            }
            if ended_runs.len() >= plan.runs && pending.is_none() {
                let _ = ws.close(None).await;
                break ("client".into(), None);
            }
            match read(&mut ws).await {
                Read::Frame(f) => {
                    last_frame = Instant::now();
                    let kind = f["type"].as_str().unwrap_or_default().to_string();
                    if let Some(seq) = f["seq"].as_u64() {
                        last_seq = last_seq.max(seq);
                        rec.frames.push(Got {
                            seq,
                            id: f["id"].as_str().unwrap_or_default().to_string(),
                            kind: kind.clone(),
                            conn,
                        });
                        if kind == "message.user"
                            && let Some(p) = pending.as_mut()
                            && f["data"]["client_msg_id"] == p.id.as_str()
                        {
                            p.seen = true;
                        }
                        if matches!(
                            kind.as_str(),
                            "run.completed" | "run.failed" | "run.cancelled"
                        ) {
                            let run = f["data"]["run_id"].as_str().unwrap_or_default();
                            if !ended_runs.iter().any(|r| r == run) {
                                ended_runs.push(run.to_string());
                                shared.runs_ended.fetch_add(1, Ordering::Relaxed);
                                // The user reads the answer before typing the next message.
                                next_send_at = Instant::now()
                                    + Duration::from_millis(200 + lcg(&mut rng) % 400);
                                if reconnect_after_runs && ended_runs.len() < plan.runs {
                                    let _ = ws.close(None).await;
                                    break ("client".into(), None);
                                }
                            }
                        }
                    } else {
                        match kind.as_str() {
                            // Acks and refusals answer this socket's sends in order.
                            "ack" => {
                                if let Some(id) = awaiting.pop_front() {
                                    if !acked_ids.contains(&id) {
                                        acked_ids.insert(id.clone());
                                        rec.acked.push(Input::Message {
                                            client_msg_id: id.clone(),
                                        });
                                    }
                                    if let Some(p) = pending.as_mut()
                                        && p.id == id
                                    {
                                        p.acked = true;
                                    }
                                } else {
                                    rec.notes
                                        .push(format!("ack for nothing sent on gw {gw}: {f}"));
                                }
                            }
                            "error" => {
                                rec.notes.push(format!("error frame on gw {gw}: {f}"));
                                if let Some(id) = awaiting.pop_front() {
                                    rec.unacked_sends += 1;
                                    if let Some(p) = pending.as_mut()
                                        && p.id == id
                                        && !p.acked
                                        && !p.seen
                                    {
                                        // Not accepted: send it again in a moment.
                                        p.sent = false;
                                        tokio::time::sleep(Duration::from_millis(300)).await;
                                    }
                                }
                            }
                            "resync" => rec.notes.push(format!("resync on gw {gw}: {f}")),
                            _ => {}
                        }
                    }
                }
                Read::Ended(why, code) => break (why, code),
                Read::Idle => {
                    if shared.expired() {
                        let _ = ws.close(None).await;
                        break ("client (gave up)".into(), None);
                    }
                    // An ack that does not come, or a chat silent for long while a run is
                    // due: try the other gateway (a real client's watchdog).
                    let unacked = pending.as_ref().is_some_and(|p| {
                        p.sent
                            && !p.acked
                            && !p.seen
                            && p.sent_at.elapsed() > Duration::from_secs(10)
                    });
                    if unacked || last_frame.elapsed() > Duration::from_secs(20) {
                        let _ = ws.close(None).await;
                        break ("client (silent)".into(), None);
                    }
                }
            }
        };
        shared.open[gw].fetch_sub(1, Ordering::Relaxed);
        if let Some(code) = end.1 {
            shared
                .closes
                .lock()
                .unwrap()
                .push((gw, code, Instant::now()));
        }
        rec.unacked_sends += awaiting.len();
        rec.conns[conn].end = end.0;
        gw = (gw + 1) % n_gw;
        if rec.conns[conn].end != "client" {
            tokio::time::sleep(Duration::from_millis(100 + lcg(&mut rng) % 300)).await;
        }
        continue 'connect;
    }
    rec.runs_ended = ended_runs.len();
    rec
}

/// The ticket's WebSocket URL on gateway `gw`, resuming after `after`, with the log's epoch.
fn ws_url(shared: &Shared, gw: usize, ticket: &Value, after: u64) -> String {
    let base = shared.gateways[gw].replace("http://", "ws://");
    let path = ticket["ws_url"].as_str().unwrap_or_default();
    let path = &path[path.find("/ws/").unwrap_or(0)..];
    format!(
        "{base}{path}?token={}&after={after}&epoch={}",
        ticket["runtime_token"].as_str().unwrap_or_default(),
        ticket["epoch"].as_str().unwrap_or_default()
    )
}

/// A socket of the test's own on a gateway about to drain: an idle chat (no message), opened
/// and live before the SIGTERM, so that the drain has a socket to close with 1012 whatever the
/// clients happen to be doing at that moment.
pub struct DrainObserver {
    pub record: ChatRecord,
    ticket: Value,
    reader: tokio::task::JoinHandle<(Vec<Value>, String, Option<u16>)>,
}

impl DrainObserver {
    /// Starts an idle chat and connects to gateway `gw`; returns once its first event arrived.
    pub async fn open(shared: &Shared, gw: usize, name: &str) -> DrainObserver {
        let chat_id = uuid::Uuid::now_v7().simple().to_string();
        let token = Fleet::token(name, "default", &["user"]);
        let r = shared
            .http
            .post(format!("{}/api/sessions", shared.gateways[gw]))
            .bearer_auth(&token)
            .json(&json!({ "app_id": "default", "workflow_name": "hello", "chat_id": chat_id }))
            .send()
            .await
            .expect("the drain observer's session");
        assert!(r.status().is_success(), "drain observer: {}", r.status());
        let ticket: Value = r.json().await.unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(shared, gw, &ticket, 0))
            .await
            .expect("the drain observer's socket");
        // Live: its session.started came.
        let first = loop {
            match read(&mut ws).await {
                Read::Frame(f) if f["seq"].is_u64() => break f,
                Read::Frame(_) | Read::Idle => continue,
                Read::Ended(why, _) => panic!("the drain observer's socket ended: {why}"),
            }
        };
        let reader = tokio::spawn(async move {
            let mut frames = vec![first];
            loop {
                match read(&mut ws).await {
                    Read::Frame(f) => frames.push(f),
                    Read::Idle => continue,
                    Read::Ended(why, code) => return (frames, why, code),
                }
            }
        });
        let mut record = ChatRecord {
            index: usize::MAX,
            chat_id,
            ..Default::default()
        };
        record.conns.push(Conn {
            gw,
            after: 0,
            end: String::new(),
        });
        DrainObserver {
            record,
            ticket,
            reader,
        }
    }

    /// Waits (up to 60 s) for the socket to end, then resumes on gateway `other` with `after`.
    /// Returns the close code and the record of both connections.
    pub async fn finish(mut self, shared: &Shared, other: usize) -> (Option<u16>, ChatRecord) {
        let (frames, why, code) = tokio::time::timeout(Duration::from_secs(60), self.reader)
            .await
            .expect("the drained gateway closed the observer's socket within 60 s")
            .expect("the observer's reader");
        let mut last = 0;
        for f in frames.iter().filter(|f| f["seq"].is_u64()) {
            last = f["seq"].as_u64().unwrap();
            self.record.frames.push(Got {
                seq: last,
                id: f["id"].as_str().unwrap_or_default().to_string(),
                kind: f["type"].as_str().unwrap_or_default().to_string(),
                conn: 0,
            });
        }
        self.record.conns[0].end = why;
        // Resume elsewhere: the socket opens and brings nothing new (the chat is idle).
        let (mut ws, _) =
            tokio_tungstenite::connect_async(ws_url(shared, other, &self.ticket, last))
                .await
                .expect("the observer resumes on the other gateway");
        self.record.conns.push(Conn {
            gw: other,
            after: last,
            end: "client".into(),
        });
        loop {
            match read(&mut ws).await {
                Read::Frame(f) if f["seq"].is_u64() => self.record.frames.push(Got {
                    seq: f["seq"].as_u64().unwrap(),
                    id: f["id"].as_str().unwrap_or_default().to_string(),
                    kind: f["type"].as_str().unwrap_or_default().to_string(),
                    conn: 1,
                }),
                Read::Frame(_) => continue,
                Read::Idle | Read::Ended(..) => break,
            }
        }
        let _ = ws.close(None).await;
        (code, self.record)
    }
}
