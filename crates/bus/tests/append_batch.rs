//! A step's events appended together ([`Bus::append_all`], one NATS atomic batch) against a real
//! nats-server: stored in order and contiguously, guarded like a single append, all or nothing.

use chrono::Utc;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, MessageUser};
use mozaiks_testkit::TestServers;
use uuid::Uuid;

fn message(chat: &str, seq: u64) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: "app1".into(),
        chat_id: chat.into(),
        user_id: "u1".into(),
        workflow: "hello".into(),
        seq,
        ts: Utc::now(),
        parent_chat_id: None,
        causation_id: None,
        event: Event::MessageUser(MessageUser {
            text: format!("m{seq}"),
            client_msg_id: None,
        }),
    }
}

fn messages(chat: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Envelope> {
    seqs.map(|s| message(chat, s)).collect()
}

async fn bus() -> (TestServers, Bus) {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    (servers, bus)
}

#[tokio::test]
async fn a_batch_is_stored_in_order_and_contiguously_and_acknowledged_once() {
    let (_servers, bus) = bus().await;
    let first = bus.append(&message("c1", 1), 0).await.unwrap().stream_seq;
    bus.append(&message("other", 1), 0).await.unwrap();
    let last = bus
        .append_all(&messages("c1", 2..=6), first)
        .await
        .unwrap()
        .stream_seq;
    let all = bus.read_chat("app1", "c1", 0).await.unwrap();
    assert_eq!(
        all.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    let batch: Vec<u64> = all[1..].iter().map(|(_, s)| *s).collect();
    assert_eq!(batch, (last - 4..=last).collect::<Vec<_>>());
    // The next append is guarded by the batch's last event.
    bus.append(&message("c1", 7), last).await.unwrap();
    // One event goes as a plain append; none appends nothing.
    let pos = bus.chat_position("app1", "c1").await.unwrap();
    let one = bus
        .append_all(&messages("c1", 8..=8), pos.stream_seq)
        .await
        .unwrap();
    assert_eq!(
        bus.chat_position("app1", "c1").await.unwrap().stream_seq,
        one.stream_seq
    );
    assert_eq!(
        bus.append_all(&[], one.stream_seq)
            .await
            .unwrap()
            .stream_seq,
        one.stream_seq
    );
}

#[tokio::test]
async fn a_stale_batch_is_a_conflict_and_stores_nothing() {
    let (_servers, bus) = bus().await;
    let a = bus
        .append_all(&messages("c1", 1..=3), 0)
        .await
        .unwrap()
        .stream_seq;
    // Another writer appended after `a`: a batch expecting `a` is refused as a whole.
    let b = bus.append(&message("c1", 4), a).await.unwrap().stream_seq;
    let stale = bus.append_all(&messages("c1", 4..=6), a).await;
    assert!(
        matches!(stale, Err(mozaiks_bus::Error::Conflict { .. })),
        "{stale:?}"
    );
    // A new chat's batch expecting "no events" is refused once the chat has some.
    let dup = bus.append_all(&messages("c1", 1..=2), 0).await;
    assert!(
        matches!(dup, Err(mozaiks_bus::Error::Conflict { .. })),
        "{dup:?}"
    );
    let all = bus.read_chat("app1", "c1", 0).await.unwrap();
    assert_eq!(
        all.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(all.last().unwrap().1, b);
}

#[tokio::test]
async fn concurrent_batches_of_one_chat_store_one_and_refuse_the_other() {
    let (_servers, bus) = bus().await;
    let base = bus.append(&message("c1", 1), 0).await.unwrap().stream_seq;
    let (short, long) = (messages("c1", 2..=4), messages("c1", 2..=5));
    let (x, y) = tokio::join!(bus.append_all(&short, base), bus.append_all(&long, base));
    assert!(
        x.is_ok() != y.is_ok(),
        "exactly one batch wins: {x:?} / {y:?}"
    );
    let loser = if x.is_ok() { y } else { x };
    assert!(matches!(loser, Err(mozaiks_bus::Error::Conflict { .. })));
    let seqs: Vec<u64> = bus
        .read_chat("app1", "c1", 0)
        .await
        .unwrap()
        .iter()
        .map(|(e, _)| e.seq)
        .collect();
    assert!(
        seqs == [1, 2, 3, 4] || seqs == [1, 2, 3, 4, 5],
        "one whole batch, no mix: {seqs:?}"
    );
}

#[tokio::test]
async fn without_atomic_publish_on_the_stream_the_events_go_one_at_a_time() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    let mut defs = Definitions::embedded().unwrap();
    for s in &mut defs.streams {
        s.allow_atomic_publish = false;
    }
    bus.apply(&defs).await.unwrap();
    let last = bus
        .append_all(&messages("c1", 1..=3), 0)
        .await
        .unwrap()
        .stream_seq;
    let all = bus.read_chat("app1", "c1", 0).await.unwrap();
    assert_eq!(
        all.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(all.last().unwrap().1, last);
    // Still guarded.
    let stale = bus.append_all(&messages("c1", 4..=5), all[1].1).await;
    assert!(
        matches!(stale, Err(mozaiks_bus::Error::Conflict { .. })),
        "{stale:?}"
    );
}
