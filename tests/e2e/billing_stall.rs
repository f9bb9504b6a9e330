//! Billing survives a stalled Mongo-wire server (issue 9, defect 5): the usage ledger catches up
//! promptly once Mongo answers again, and equals the charges on the log exactly once.
//!
//! Chats keep running while the Mongo-wire server is stopped with SIGSTOP for 20 s (a hung
//! server: its sockets stay open, nothing answers), so billing is in the middle of a charge when
//! the stall starts and charges pile up in `MZ_USAGE` meanwhile.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::Event;
use mozaiks_events::subjects::Subjects;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::{Fleet, send_json};

const CHATS: usize = 6;
const STALL: Duration = Duration::from_secs(20);
/// Between a run's end and the chat's next message, so the log grows at a steady pace.
const PAUSE: Duration = Duration::from_millis(250);
/// How long the ledger may take to catch up; the issue asks for 5 s, this is generous for a
/// loaded machine (before the fix it took about 60 s).
const CATCH_UP: Duration = Duration::from_secs(15);

/// The log's charges of an app: (prompt, completion, total, charges, distinct runs).
async fn charges_on_the_log(bus: &Bus, app_id: &str) -> (u64, u64, u64, u64, u64) {
    // `replay` takes the filter without the namespace and applies the bus's.
    let filter = Subjects::default().app_charges(app_id);
    let (mut p, mut c, mut t, mut n) = (0, 0, 0, 0);
    let mut runs = HashSet::new();
    let mut from = 1;
    loop {
        let batch = bus.replay("MZ_USAGE", &filter, from, 512).await.unwrap();
        for env in &batch.events {
            if let Event::UsageCharged(u) = &env.event {
                p += u.prompt_tokens;
                c += u.completion_tokens;
                t += u.total_tokens;
                n += 1;
                runs.insert(u.run_id);
            }
        }
        from = batch.next;
        if batch.done {
            return (p, c, t, n, runs.len() as u64);
        }
    }
}

fn ledger_of(v: &Value) -> (u64, u64, u64, u64, u64) {
    let f = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    (
        f("prompt_tokens"),
        f("completion_tokens"),
        f("total_tokens"),
        f("charges"),
        f("runs"),
    )
}

/// One chat's client: after each `run.completed`, another message, until `stop`; returns the
/// runs it saw complete.
async fn drive(url: String, chat: usize, stop: Arc<AtomicBool>) -> u64 {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let mut done = 0;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .unwrap_or_else(|_| panic!("chat {chat}: no frame for 60 s after {done} runs"))
            .expect("socket ended")
            .expect("socket error");
        let Message::Text(text) = frame else { continue };
        let f: Value = serde_json::from_str(text.as_str()).unwrap();
        if f["type"] == "error" {
            panic!("chat {chat}: error frame {f}");
        }
        if f["type"] != "run.completed" {
            continue;
        }
        done += 1;
        if stop.load(Ordering::Relaxed) {
            return done;
        }
        tokio::time::sleep(PAUSE).await;
        send_json(
            &mut ws,
            json!({"type": "user.message", "text": format!("message {done}"),
                   "client_msg_id": format!("c{chat}-m{done}")}),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_catches_up_within_seconds_of_a_mongo_stall_and_counts_every_charge_once() {
    let fleet = Fleet::start(1).await;
    let user = Fleet::token("stella", "default", &["user"]);
    let admin = Fleet::token("ops", "default", &["admin"]);
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();
    let usage = || async {
        let (s, v) = fleet.get(0, "/api/usage/default", &admin).await;
        (s == 200).then_some(v)
    };

    // Chats running before, during and after the stall (every session starts before it: only
    // the WebSocket traffic, which needs no Mongo, goes on during the stall).
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = Vec::new();
    for chat in 0..CHATS {
        let ticket = fleet
            .session(0, &user, "hello", Some(&format!("chat {chat}")))
            .await;
        let url = fleet.ws_url(0, &ticket, 0);
        drivers.push(tokio::spawn(drive(url, chat, stop.clone())));
    }
    // Billing works before the stall.
    fleet
        .eventually("the first charges in the ledger", || async {
            usage()
                .await
                .filter(|v| v["charges"].as_u64() >= Some(CHATS as u64))
        })
        .await;

    fleet.servers.pause_mongo().unwrap();
    let stalled_at = Instant::now();
    tokio::time::sleep(STALL).await;
    // Every charge appended until now is in MZ_USAGE (the server sources it from the log).
    let before_resume = charges_on_the_log(&bus, "default").await;
    fleet.servers.resume_mongo().unwrap();
    let resumed_at = Instant::now();
    eprintln!(
        "Mongo stalled for {:.1} s; {} charges on the log at its return",
        stalled_at.elapsed().as_secs_f64(),
        before_resume.3
    );

    // The backlog of the stall is billed promptly, while the chats keep running.
    let mut caught_up = None;
    let mut seen = None;
    while resumed_at.elapsed() < CATCH_UP {
        seen = usage().await;
        if seen.as_ref().and_then(|v| v["charges"].as_u64()) >= Some(before_resume.3) {
            caught_up = Some(resumed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = caught_up.unwrap_or_else(|| {
        panic!(
            "the ledger did not bill the {} charges appended before Mongo's return within {} s \
             (last answer {seen:?}); logs:\n{}",
            before_resume.3,
            CATCH_UP.as_secs(),
            fleet.logs()
        )
    });
    eprintln!(
        "ledger caught up with the charges of the stall {:.2} s after Mongo's return",
        caught_up.as_secs_f64()
    );

    // A few more runs after the stall, then the clients stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut runs = 0;
    for d in drivers {
        runs += d.await.unwrap();
    }
    let stopped_at = Instant::now();

    // The ledger equals the log's charges, each exactly once.
    let on_log = charges_on_the_log(&bus, "default").await;
    assert!(on_log.3 > before_resume.3, "no charges after the stall");
    assert!(
        on_log.4 >= runs,
        "{runs} runs completed, {on_log:?} on the log"
    );
    let mut last = None;
    while stopped_at.elapsed() < CATCH_UP {
        last = usage().await;
        if last.as_ref().map(ledger_of) == Some(on_log) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = last.expect("a usage answer");
    assert_eq!(
        ledger_of(&last),
        on_log,
        "ledger {last} != the log's charges (prompt, completion, total, charges, runs); logs:\n{}",
        fleet.logs()
    );
    eprintln!(
        "ledger equal to the log ({} charges, {} runs) {:.2} s after the last run",
        on_log.3,
        on_log.4,
        stopped_at.elapsed().as_secs_f64()
    );
}
