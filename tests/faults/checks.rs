//! What must hold after the faults, whatever happened during them:
//!
//! 1. every acknowledged input has its events on the log (its `message.user`, once, and the run
//!    it triggered, started and ended);
//! 2. every client's frames, across its reconnects, are the chat's log from seq 1 on: gapless,
//!    no duplicate event id, the log's events;
//! 3. the read models (`chat_sessions`, `chat_messages`) equal the log;
//! 4. the usage ledger equals the log's `usage.charged` events, each counted once;
//! 5. nothing is left in `MZ_CMD`;
//! 6. every process is healthy.
//!
//! 3–5 converge after the load stops; they are polled (up to `settle`) before being judged.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{Envelope, Event};
use mozaiks_store::mongodb::bson::{Document, doc};
use mozaiks_store::projection::{message_doc, status_after};
use serde_json::Value;

use crate::fleet::Fleet;
use crate::harness::Harness;
use crate::load::{ChatRecord, Input};

/// The findings: `failures` break a guarantee; `facts` describe the run.
#[derive(Default)]
pub struct Report {
    pub failures: Vec<String>,
    pub facts: Vec<String>,
}

impl Report {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// Panics with the failures and the facts: every fleet-wide failure, then the first 25 of a
    /// chat (there may be thousands of those).
    pub fn assert_clean(&self, context: &str) {
        let facts = self.facts.join("\n  ");
        if self.failures.is_empty() {
            eprintln!("{context}: every check holds\n  {facts}");
            return;
        }
        let (chats, fleet): (Vec<&String>, Vec<&String>) =
            self.failures.iter().partition(|f| f.starts_with("chat "));
        let mut shown: Vec<&str> = fleet.iter().map(|s| s.as_str()).collect();
        shown.extend(chats.iter().take(25).map(|s| s.as_str()));
        let more = chats.len().saturating_sub(25);
        panic!(
            "{context}: {} failure(s), {} of them in chats{}:\n- {}\n(facts)\n  {facts}",
            self.failures.len(),
            chats.len(),
            if more > 0 {
                format!(" ({more} not shown)")
            } else {
                String::new()
            },
            shown.join("\n- ")
        );
    }
}

/// A chat's log, read until two reads agree (the log may still grow while runs finish).
async fn read_log(bus: &Bus, chat_id: &str) -> Result<Vec<Envelope>, String> {
    let mut last_err = String::new();
    for _ in 0..20 {
        match bus.read_chat("default", chat_id, 0).await {
            Ok(events) => return Ok(events.into_iter().map(|(e, _)| e).collect()),
            Err(e) => last_err = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last_err)
}

/// Usage totals: prompt, completion, total tokens, charges, distinct runs.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Usage {
    prompt: u64,
    completion: u64,
    total: u64,
    charges: u64,
    runs: u64,
}

/// What the log says about one chat, for the read-model comparison.
struct Expected {
    last_seq: u64,
    last_type: String,
    status: String,
    /// (seq, event_id, type, text) of every message-like event.
    messages: Vec<(i64, String, String, String)>,
}

fn expected(log: &[Envelope]) -> Expected {
    let last = log.last().expect("a non-empty log");
    let status = log
        .iter()
        .filter_map(|e| status_after(&e.event))
        .next_back()
        .unwrap_or("active");
    Expected {
        last_seq: last.seq,
        last_type: last.event.type_name().to_string(),
        status: status.to_string(),
        messages: log
            .iter()
            .filter_map(message_doc)
            .map(|d| message_key(&d))
            .collect(),
    }
}

fn message_key(d: &Document) -> (i64, String, String, String) {
    (
        d.get_i64("seq")
            .or_else(|_| d.get_i32("seq").map(i64::from))
            .unwrap_or(-1),
        d.get_str("event_id").unwrap_or_default().to_string(),
        d.get_str("type").unwrap_or_default().to_string(),
        d.get_str("text").unwrap_or_default().to_string(),
    )
}

/// The read models of one chat differ from the log: how, or `None`.
async fn read_model_diff(
    db: &mozaiks_store::mongodb::Database,
    chat_id: &str,
    want: &Expected,
) -> Option<String> {
    let session = match db
        .collection::<Document>("chat_sessions")
        .find_one(doc! { "app_id": "default", "chat_id": chat_id })
        .await
    {
        Ok(s) => s,
        Err(e) => return Some(format!("chat_sessions unreadable: {e}")),
    };
    let Some(session) = session else {
        return Some("no chat_sessions document".into());
    };
    let last_seq = session
        .get_i64("last_seq")
        .or_else(|_| session.get_i32("last_seq").map(i64::from))
        .unwrap_or(-1);
    let got = (
        last_seq,
        session.get_str("last_event_type").unwrap_or_default(),
        session.get_str("status").unwrap_or_default(),
    );
    let wanted = (
        want.last_seq as i64,
        want.last_type.as_str(),
        want.status.as_str(),
    );
    if got != wanted {
        return Some(format!(
            "chat_sessions (last_seq, last_event_type, status) = {got:?}, log says {wanted:?}"
        ));
    }
    let docs: Vec<Document> = match db
        .collection::<Document>("chat_messages")
        .find(doc! { "app_id": "default", "chat_id": chat_id })
        .sort(doc! { "seq": 1 })
        .await
    {
        Ok(c) => match c.try_collect().await {
            Ok(d) => d,
            Err(e) => return Some(format!("chat_messages unreadable: {e}")),
        },
        Err(e) => return Some(format!("chat_messages unreadable: {e}")),
    };
    let got: Vec<_> = docs.iter().map(message_key).collect();
    if got != want.messages {
        let g: Vec<i64> = got.iter().map(|m| m.0).collect();
        let w: Vec<i64> = want.messages.iter().map(|m| m.0).collect();
        return Some(format!(
            "chat_messages differ from the log: seqs {g:?}, log's {w:?}"
        ));
    }
    None
}

/// Whether `event` is the `message.user` of `input`.
fn is_message_of(input: &Input, event: &Event) -> bool {
    let Event::MessageUser(m) = event else {
        return false;
    };
    match input {
        Input::Post { text } => m.text == *text && m.client_msg_id.is_none(),
        Input::Message { client_msg_id } => m.client_msg_id.as_ref() == Some(client_msg_id),
    }
}

/// Checks 1 and 2 for one chat; adds its `usage.charged` events to `usage`.
fn check_chat(
    report: &mut Report,
    rec: &ChatRecord,
    log: &[Envelope],
    run_ids: &mut HashSet<uuid::Uuid>,
    usage: &mut Usage,
) {
    let chat = &rec.chat_id;
    // The log itself: seqs 1..=n, distinct ids.
    let mut ids = HashSet::new();
    for (i, e) in log.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            report.fail(format!(
                "chat {chat}: the log's seq {} at position {}",
                e.seq,
                i + 1
            ));
            break;
        }
        if !ids.insert(e.event_id) {
            report.fail(format!(
                "chat {chat}: event id {} twice in the log",
                e.event_id
            ));
        }
    }
    // 1. Every acknowledged input has its message and its run, started and ended.
    for input in &rec.acked {
        let what = match input {
            Input::Post { text } => format!("POST message {text:?}"),
            Input::Message { client_msg_id } => format!("user.message {client_msg_id}"),
        };
        let found: Vec<&Envelope> = log
            .iter()
            .filter(|e| is_message_of(input, &e.event))
            .collect();
        match found.as_slice() {
            [] => {
                report.fail(format!(
                    "chat {chat}: acknowledged {what} is not on the log (log: {} events, client: {})",
                    log.len(),
                    rec.gave_up.as_deref().unwrap_or("finished")
                ));
                continue;
            }
            [_] => {}
            many => report.fail(format!(
                "chat {chat}: acknowledged {what} is on the log {} times",
                many.len()
            )),
        }
        let trigger = found[0].seq;
        let run = log.iter().find_map(|e| match &e.event {
            Event::RunStarted(r) if r.trigger_seq == trigger => Some(r.run_id),
            _ => None,
        });
        let Some(run) = run else {
            report.fail(format!(
                "chat {chat}: acknowledged {what} (seq {trigger}) started no run"
            ));
            continue;
        };
        let ended = log.iter().any(|e| match &e.event {
            Event::RunCompleted(r) => r.run_id == run,
            Event::RunFailed(r) => r.run_id == run,
            Event::RunCancelled(r) => r.run_id == run,
            _ => false,
        });
        if !ended {
            report.fail(format!(
                "chat {chat}: the run of acknowledged {what} (seq {trigger}) never ended"
            ));
        }
    }
    // 2. The client's frames: seq 1.., no duplicate id, the log's events.
    let mut seen_ids = HashSet::new();
    for (i, f) in rec.frames.iter().enumerate() {
        let want_seq = i as u64 + 1;
        if f.seq != want_seq {
            let c = &rec.conns[f.conn];
            report.fail(format!(
                "chat {chat}: client got seq {} where {want_seq} was due (connection {} to gateway {} with after={}; previous ended: {})",
                f.seq,
                f.conn,
                c.gw,
                c.after,
                f.conn
                    .checked_sub(1)
                    .map(|p| rec.conns[p].end.as_str())
                    .unwrap_or("-")
            ));
            break;
        }
        if !seen_ids.insert(f.id.as_str()) {
            report.fail(format!("chat {chat}: client got event id {} twice", f.id));
        }
        match log.get(i) {
            Some(e) if e.event_id.to_string() == f.id && e.event.type_name() == f.kind => {}
            Some(e) => report.fail(format!(
                "chat {chat}: client's seq {} is {} {}, the log's is {} {}",
                f.seq,
                f.kind,
                f.id,
                e.event.type_name(),
                e.event_id
            )),
            None => report.fail(format!(
                "chat {chat}: client got seq {} beyond the log's end {}",
                f.seq,
                log.len()
            )),
        }
    }
    for e in log {
        if let Event::UsageCharged(u) = &e.event {
            usage.prompt += u.prompt_tokens;
            usage.completion += u.completion_tokens;
            usage.total += u.total_tokens;
            usage.charges += 1;
            if run_ids.insert(u.run_id) {
                usage.runs += 1;
            }
        }
    }
}

async fn ledger(h: &Harness) -> Result<Usage, String> {
    let admin = Fleet::token("faults-admin", "default", &["admin"]);
    let mut last = String::new();
    for url in h.gateway_urls() {
        match h
            .http
            .get(format!("{url}/api/usage/default"))
            .bearer_auth(&admin)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                return Ok(Usage {
                    prompt: n("prompt_tokens"),
                    completion: n("completion_tokens"),
                    total: n("total_tokens"),
                    charges: n("charges"),
                    runs: n("runs"),
                });
            }
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// (messages in MZ_CMD, the `workers` consumer's pending + unacknowledged).
async fn commands_left(bus: &Bus) -> Result<(u64, u64), String> {
    let mut stream = bus.stream("MZ_CMD").await.map_err(|e| e.to_string())?;
    let messages = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    let mut consumer = bus
        .durable("MZ_CMD", "workers")
        .await
        .map_err(|e| e.to_string())?;
    let info = consumer.info().await.map_err(|e| e.to_string())?;
    Ok((messages, info.num_pending + info.num_ack_pending as u64))
}

async fn event_count(bus: &Bus) -> Result<u64, String> {
    let mut stream = bus.stream("MZ_EVT").await.map_err(|e| e.to_string())?;
    Ok(stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages)
}

/// Runs every check over `records` against the fleet of `h`, after letting the read models,
/// the ledger and the command stream settle for up to `settle`.
pub async fn run(h: &mut Harness, records: &[ChatRecord], settle: Duration) -> Report {
    let mut report = Report::default();
    let bus = Bus::connect(&h.servers.nats_url, &h.servers.namespace, "faults-checks")
        .await
        .expect("the checks' NATS connection");
    let mongo = mozaiks_store::mongodb::Client::with_uri_str(&h.servers.mongo_uri)
        .await
        .expect("the checks' Mongo client");
    let db = mongo.database(&h.servers.mongo_db);

    let deadline = Instant::now() + settle;
    // 5 (and the log's end): wait until MZ_CMD is empty, or the deadline.
    let mut left = commands_left(&bus).await;
    while !matches!(left, Ok((0, 0))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        left = commands_left(&bus).await;
    }

    // The logs, now that no command is left to change them.
    let mut logs: HashMap<&str, Vec<Envelope>> = HashMap::new();
    for rec in records {
        match read_log(&bus, &rec.chat_id).await {
            Ok(log) => {
                logs.insert(rec.chat_id.as_str(), log);
            }
            Err(e) => report.fail(format!("chat {}: log unreadable: {e}", rec.chat_id)),
        }
    }
    // 1 and 2.
    let mut usage = Usage::default();
    let mut run_ids = HashSet::new();
    for rec in records {
        if let Some(log) = logs.get(rec.chat_id.as_str()) {
            check_chat(&mut report, rec, log, &mut run_ids, &mut usage);
        }
    }
    let total_events: usize = logs.values().map(Vec::len).sum();
    match event_count(&bus).await {
        Ok(n) if n == total_events as u64 => {}
        Ok(n) => report.fail(format!(
            "MZ_EVT holds {n} events, the clients' chats {total_events}: events of chats no client started"
        )),
        Err(e) => report.fail(format!("MZ_EVT info: {e}")),
    }

    // 3 and 4, polled until they hold or the deadline passes.
    let wanted: Vec<(&str, Expected)> = logs
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(c, l)| (*c, expected(l)))
        .collect();
    let mut pending: Vec<usize> = (0..wanted.len()).collect();
    let mut diffs: HashMap<usize, String> = HashMap::new();
    let mut ledger_now;
    loop {
        let mut still = Vec::new();
        for i in pending {
            if let Some(d) = read_model_diff(&db, wanted[i].0, &wanted[i].1).await {
                diffs.insert(i, d);
                still.push(i);
            }
        }
        pending = still;
        ledger_now = ledger(h).await;
        let ledger_ok = matches!(&ledger_now, Ok(u) if *u == usage);
        if (pending.is_empty() && ledger_ok) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    for i in &pending {
        report.fail(format!("chat {}: {}", wanted[*i].0, diffs[i]));
    }
    match ledger_now {
        Ok(u) if u == usage => {}
        Ok(u) => report.fail(format!(
            "usage ledger {u:?} differs from the log's usage.charged events {usage:?}"
        )),
        Err(e) => report.fail(format!("GET /api/usage/default failed: {e}")),
    }
    match commands_left(&bus).await {
        Ok((0, 0)) => {}
        Ok((messages, pending)) => report.fail(format!(
            "MZ_CMD still holds {messages} command(s) ({pending} pending or unacknowledged at the workers consumer)"
        )),
        Err(e) => report.fail(format!("MZ_CMD info: {e}")),
    }

    // 6.
    for i in 0..h.slots.len() {
        let (ok, why) = h.readiness(i).await;
        if !ok {
            report.fail(format!(
                "{} is not healthy at the end: {why}",
                h.slots[i].name
            ));
        }
    }

    // Facts for the report.
    let acked: usize = records.iter().map(|r| r.acked.len()).sum();
    let conns: usize = records.iter().map(|r| r.conns.len()).sum();
    let frames: usize = records.iter().map(|r| r.frames.len()).sum();
    let gave_up = records.iter().filter(|r| r.gave_up.is_some()).count();
    let failed_runs = logs
        .values()
        .flatten()
        .filter(|e| matches!(e.event, Event::RunFailed(_)))
        .count();
    report.facts.push(format!(
        "{} chats, {acked} acknowledged inputs, {} runs ended at the clients, {failed_runs} run.failed on the log, {total_events} events",
        records.len(),
        records.iter().map(|r| r.runs_ended).sum::<usize>()
    ));
    report.facts.push(format!(
        "{conns} WebSocket connections, {frames} durable frames received, {} sends not acknowledged (sent again)",
        records.iter().map(|r| r.unacked_sends).sum::<usize>()
    ));
    report.facts.push(format!(
        "usage on the log: {usage:?}; {gave_up} client(s) gave up"
    ));
    let notes: Vec<&String> = records.iter().flat_map(|r| r.notes.iter()).collect();
    report.facts.push(format!(
        "{} note(s) (error frames, refused POSTs); first: {:?}",
        notes.len(),
        notes.iter().take(8).collect::<Vec<_>>()
    ));
    for r in records.iter().filter(|r| r.gave_up.is_some()).take(5) {
        report.facts.push(format!(
            "gave up: client {} (chat {}): {}",
            r.index,
            r.chat_id,
            r.gave_up.as_deref().unwrap_or_default()
        ));
    }
    report
}
