//! A chat's log against a real nats-server: optimistic appends and the reads workers rely on.

use chrono::Utc;
use futures::StreamExt;
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

async fn bus() -> (TestServers, Bus) {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    (servers, bus)
}

#[tokio::test]
async fn appends_are_ordered_by_the_log_and_a_stale_writer_is_refused() {
    let (_servers, bus) = bus().await;
    let mut last = 0;
    let mut positions = Vec::new();
    for seq in 1..=5 {
        last = bus
            .append(&message("c1", seq), last)
            .await
            .unwrap()
            .stream_seq;
        positions.push(last);
        // Another chat interleaves on the same stream.
        bus.append(&message(&format!("other{seq}"), 1), 0)
            .await
            .unwrap();
    }
    // A writer that did not see the last event is refused.
    let stale = bus.append(&message("c1", 5), positions[3]).await;
    assert!(matches!(stale, Err(mozaiks_bus::Error::Conflict { .. })));

    let all = bus.read_chat("app1", "c1", 0).await.unwrap();
    assert_eq!(
        all.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(all.iter().map(|(_, s)| *s).collect::<Vec<_>>(), positions);

    // Catching up from a known position reads only what came after it.
    let since = bus
        .read_chat_since("app1", "c1", positions[2])
        .await
        .unwrap();
    assert_eq!(since.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(), [4, 5]);
    assert!(
        bus.read_chat_since("app1", "c1", last)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.read_chat_since("app1", "nobody", 0)
            .await
            .unwrap()
            .is_empty()
    );

    // After N reads the same as the full read past N.
    let after = bus.read_chat("app1", "c1", 3).await.unwrap();
    assert_eq!(after.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(), [4, 5]);
    let pos = bus.chat_position("app1", "c1").await.unwrap();
    assert_eq!((pos.seq, pos.stream_seq), (5, last));
}

#[tokio::test]
async fn long_chats_are_read_whole() {
    let (_servers, bus) = bus().await;
    let mut last = 0;
    for seq in 1..=120 {
        last = bus
            .append(&message("long", seq), last)
            .await
            .unwrap()
            .stream_seq;
    }
    let all = bus.read_chat("app1", "long", 0).await.unwrap();
    assert_eq!(all.len(), 120);
    assert!(all.windows(2).all(|w| w[1].0.seq == w[0].0.seq + 1));
}

#[tokio::test]
async fn ranges_are_read_in_batches_without_a_consumer() {
    let (_servers, bus) = bus().await;
    let n = (mozaiks_bus::BATCH * 2 + 37) as u64;
    let durables = bus
        .stream("MZ_EVT")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .consumer_count;
    let mut last = 0;
    let mut positions = vec![0];
    for seq in 1..=n {
        last = bus
            .append(&message("ranged", seq), last)
            .await
            .unwrap()
            .stream_seq;
        positions.push(last);
        if seq % 100 == 0 {
            // Another chat interleaves on the same stream.
            bus.append(&message(&format!("noise{seq}"), 1), 0)
                .await
                .unwrap();
        }
    }
    let seqs = |v: &[(Envelope, u64)]| v.iter().map(|(e, _)| e.seq).collect::<Vec<_>>();

    // The whole chat, across three batches, in order, with stream sequences.
    let all = bus
        .read_chat_range("app1", "ranged", 1, last, usize::MAX)
        .await
        .unwrap();
    assert_eq!(seqs(&all), (1..=n).collect::<Vec<_>>());
    assert_eq!(
        all.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        positions[1..]
    );
    // A window: from the 10th event's position through the 700th's, inclusive.
    let window = bus
        .read_chat_range("app1", "ranged", positions[10], positions[700], usize::MAX)
        .await
        .unwrap();
    assert_eq!(seqs(&window), (10..=700).collect::<Vec<_>>());
    // `max` bounds a read; the caller continues after the last one.
    let first = bus
        .read_chat_range("app1", "ranged", 1, u64::MAX, 600)
        .await
        .unwrap();
    assert_eq!(seqs(&first), (1..=600).collect::<Vec<_>>());
    let rest = bus
        .read_chat_range("app1", "ranged", first.last().unwrap().1 + 1, u64::MAX, 600)
        .await
        .unwrap();
    assert_eq!(seqs(&rest), (601..=n).collect::<Vec<_>>());
    // Past the end, an empty range, a chat that does not exist, another chat's window.
    assert!(
        bus.read_chat_range("app1", "ranged", last + 1, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.read_chat_range("app1", "ranged", 5, 4, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.read_chat_range("app1", "nobody", 1, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.read_chat_range("app2", "ranged", 1, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // `read_chat` after N uses the same reads: exactly the events past N.
    let tail = bus.read_chat("app1", "ranged", n - 3).await.unwrap();
    assert_eq!(seqs(&tail), [n - 2, n - 1, n]);
    // None of these reads created a consumer (only the durable ones of `streams/` exist).
    let mut stream = bus.stream("MZ_EVT").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, durables);
    // A replay reads the same window either way: batched gets for a short one, an ordered
    // consumer for a long one; both stop at the window's end though the chat goes on.
    for expected in [1, mozaiks_bus::STREAM_ABOVE + 1] {
        let replay: Vec<_> = bus
            .replay_chat("app1", "ranged", positions[10], positions[700], expected)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(seqs(&replay), (10..=700).collect::<Vec<_>>(), "{expected}");
    }
}

#[tokio::test]
async fn a_command_id_with_cr_or_lf_is_refused_with_an_error_not_a_panic() {
    let (_servers, bus) = bus().await;
    let cmd = mozaiks_events::CommandEnvelope::new(
        "app1",
        "c1",
        "u1",
        "hello",
        mozaiks_events::Command::UserMessage {
            text: "hi".into(),
            client_msg_id: Some("a\nb".into()),
        },
    );
    let refused = bus.send_command(&cmd, Some("msg:app1:c1:a\nb")).await;
    assert!(
        matches!(
            refused,
            Err(mozaiks_bus::Error::Codec(
                mozaiks_events::Error::InvalidId {
                    what: "Nats-Msg-Id",
                    ..
                }
            ))
        ),
        "{refused:?}"
    );
    // The connection is unharmed: a good id goes through.
    bus.send_command(&cmd, Some("msg:app1:c1:ok"))
        .await
        .unwrap();
}
