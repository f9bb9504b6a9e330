//! Retention against real servers: sessions past their app's retention are archived as JSON
//! lines, removed from the read models and purged from the log; the others stay.

use chrono::{DateTime, Duration, Utc};
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::{AppCommand, Limits, Registry};
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, MessageUser, SessionStarted};
use mozaiks_projector::retention::{Options, Retention};
use mozaiks_store::Store;
use mozaiks_testkit::TestServers;
use uuid::Uuid;

fn env(app: &str, chat: &str, seq: u64, ts: DateTime<Utc>, event: Event) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: app.into(),
        chat_id: chat.into(),
        user_id: "u1".into(),
        workflow: "hello".into(),
        seq,
        ts,
        parent_chat_id: None,
        causation_id: None,
        event,
    }
}

/// Appends a two-event chat last active at `ts` to the log and projects it.
async fn chat(bus: &Bus, store: &Store, app: &str, chat: &str, ts: DateTime<Utc>) {
    let events = vec![
        env(
            app,
            chat,
            1,
            ts,
            Event::SessionStarted(SessionStarted::default()),
        ),
        env(
            app,
            chat,
            2,
            ts,
            Event::MessageUser(MessageUser {
                text: format!("hello from {chat}"),
                client_msg_id: None,
            }),
        ),
    ];
    let mut expected = 0;
    for e in &events {
        expected = bus.append(e, expected).await.unwrap().stream_seq;
    }
    store.project(&events).await.unwrap();
}

async fn create(reg: &Registry, app: &str, retention_days: Option<u32>) {
    let cmd = AppCommand::Create {
        name: app.into(),
        tier: "starter".into(),
        workflows: None,
        limits: Limits {
            retention_days,
            ..Default::default()
        },
        runtime_url: None,
        storage: None,
    };
    reg.execute(app, &cmd, "test", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_past_retention_are_archived_removed_and_purged() {
    let servers = TestServers::start().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    let store = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    let reg = Registry::open(&bus).await.unwrap();
    create(&reg, "tiny", Some(1)).await; // a one-day retention
    create(&reg, "keep", None).await; // starter: 30 days

    let now = Utc::now();
    let old = now - Duration::days(3);
    chat(&bus, &store, "tiny", "oldchat", old).await;
    chat(&bus, &store, "tiny", "newchat", now).await;
    chat(&bus, &store, "keep", "oldchat", old).await;

    let dir = std::env::temp_dir().join(format!("mz-archive-{}", Uuid::now_v7().simple()));
    let opts = Options {
        dir: dir.clone(),
        every: std::time::Duration::from_secs(3600),
        purge_log: true,
        deleted_every: std::time::Duration::from_secs(5),
    };
    let retention = Retention::new(
        bus.clone(),
        store.clone(),
        reg.clone(),
        opts.clone(),
        InstanceId::new("test"),
    );
    let report = retention.sweep(now).await.unwrap();
    assert_eq!(
        (report.sessions, report.messages, report.events_purged),
        (1, 1, 2)
    );

    // The archive: one file for the app and the day, one line for the session and its transcript.
    let file = dir
        .join("tiny")
        .join(format!("{}.jsonl", old.format("%Y-%m-%d")));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["session"]["chat_id"], "oldchat");
    assert_eq!(lines[0]["messages"][0]["text"], "hello from oldchat");
    assert!(
        !dir.join("keep").exists(),
        "nothing of an app within retention is archived"
    );

    // Removed from the read models and the log; the rest is intact.
    assert!(store.session("tiny", "oldchat").await.unwrap().is_none());
    assert!(
        store
            .messages("tiny", "oldchat", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        bus.read_chat("tiny", "oldchat", 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.session("tiny", "newchat").await.unwrap().is_some());
    assert_eq!(bus.read_chat("tiny", "newchat", 0).await.unwrap().len(), 2);
    assert!(store.session("keep", "oldchat").await.unwrap().is_some());

    // Sweeping again finds nothing more.
    assert_eq!(retention.sweep(now).await.unwrap().sessions, 0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    // An archive that cannot be written: the sweep fails and nothing is removed.
    chat(&bus, &store, "tiny", "oldchat2", old).await;
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, b"a file, not a folder").unwrap();
    let bad = Retention::new(
        bus.clone(),
        store.clone(),
        reg.clone(),
        Options {
            dir: blocked,
            ..opts
        },
        InstanceId::new("test"),
    );
    let err = bad.sweep(now).await.unwrap_err();
    assert!(err.to_string().contains("archive"), "{err}");
    assert!(store.session("tiny", "oldchat2").await.unwrap().is_some());
    assert_eq!(bus.read_chat("tiny", "oldchat2", 0).await.unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_apps_read_models_are_archived_then_removed_by_the_lease_holder_only() {
    use mozaiks_control::lease::{Leader, Leases};
    use std::collections::HashSet;

    let servers = TestServers::start().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    let store = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    let reg = Registry::open(&bus).await.unwrap();
    create(&reg, "doomed", None).await;
    create(&reg, "alive", None).await;
    let now = Utc::now();
    let yesterday = now - Duration::days(1);
    chat(&bus, &store, "doomed", "c1", yesterday).await;
    chat(&bus, &store, "doomed", "c2", now).await;
    chat(&bus, &store, "alive", "c1", now).await;
    reg.execute("doomed", &AppCommand::Delete, "test", None)
        .await
        .unwrap();

    let dir = std::env::temp_dir().join(format!("mz-archive-{}", Uuid::now_v7().simple()));
    let retention = Retention::new(
        bus.clone(),
        store.clone(),
        reg.clone(),
        Options {
            dir: dir.clone(),
            every: std::time::Duration::from_secs(3600),
            purge_log: true,
            deleted_every: std::time::Duration::from_secs(5),
        },
        InstanceId::new("test"),
    );
    let (_stop_a, stop_rx_a) = tokio::sync::oneshot::channel::<()>();
    let a = Leader::spawn(
        Leases::open(&bus, "holder-a").await.unwrap(),
        "retention",
        async move {
            let _ = stop_rx_a.await;
        },
    );
    a.wait_leader().await;
    let (_stop_b, stop_rx_b) = tokio::sync::oneshot::channel::<()>();
    let b = Leader::spawn(
        Leases::open(&bus, "holder-b").await.unwrap(),
        "retention",
        async move {
            let _ = stop_rx_b.await;
        },
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!b.is_leader());

    // A replica without the lease does nothing.
    let mut settled = HashSet::new();
    let n = retention
        .archive_deleted_apps(now, &mut settled, &b)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(store.session("doomed", "c1").await.unwrap().is_some());

    // An archive that cannot be written: nothing is removed.
    let blocked_dir = dir.join("blocked");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&blocked_dir, b"a file, not a folder").unwrap();
    let blocked = Retention::new(
        bus.clone(),
        store.clone(),
        reg.clone(),
        Options {
            dir: blocked_dir,
            every: std::time::Duration::from_secs(3600),
            purge_log: true,
            deleted_every: std::time::Duration::from_secs(5),
        },
        InstanceId::new("test"),
    );
    assert!(
        blocked
            .archive_deleted_apps(now, &mut settled, &a)
            .await
            .is_err()
    );
    assert!(store.session("doomed", "c1").await.unwrap().is_some());

    // The holder archives every session of the deleted app, then removes them.
    let n = retention
        .archive_deleted_apps(now, &mut settled, &a)
        .await
        .unwrap();
    assert_eq!(n, 2);
    for (chat_id, day) in [("c1", yesterday), ("c2", now)] {
        let file = dir
            .join("doomed")
            .join(format!("{}.jsonl", day.format("%Y-%m-%d")));
        let text = std::fs::read_to_string(&file).unwrap();
        let line: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|l| l["session"]["chat_id"] == chat_id)
            .unwrap_or_else(|| panic!("{chat_id} not in {text}"));
        assert_eq!(line["reason"], "app_deleted");
        assert_eq!(line["session"]["app_id"], "doomed");
        assert_eq!(line["messages"][0]["text"], format!("hello from {chat_id}"));
        assert!(store.session("doomed", chat_id).await.unwrap().is_none());
        assert!(
            store
                .messages("doomed", chat_id, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    // The live app is untouched; the log keeps the deleted app's history.
    assert!(store.session("alive", "c1").await.unwrap().is_some());
    assert_eq!(store.messages("alive", "c1", 0, 10).await.unwrap().len(), 1);
    assert!(!dir.join("alive").exists());
    assert_eq!(bus.read_chat("doomed", "c1", 0).await.unwrap().len(), 2);

    // Idempotent: again, nothing more is archived; within the grace period the app is still
    // looked at, so a late projection is archived and removed too.
    assert_eq!(
        retention
            .archive_deleted_apps(now, &mut settled, &a)
            .await
            .unwrap(),
        0
    );
    assert!(settled.contains("doomed"));
    chat(&bus, &store, "doomed", "late", now).await;
    assert_eq!(
        retention
            .archive_deleted_apps(now, &mut settled, &a)
            .await
            .unwrap(),
        1
    );
    assert!(store.session("doomed", "late").await.unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
