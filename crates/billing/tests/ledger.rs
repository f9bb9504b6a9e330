//! The ledger counts every charge exactly once, against a real Mongo-wire server and NATS: through
//! redeliveries, racing replicas, a billing killed between its writes and the roll of the
//! ledger's watermark, and two replicas interleaving sequences.

use std::time::Duration;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use mozaiks_billing::{Applied, Billing};
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, UsageCharged};
use mozaiks_store::ledger::{Charged, mark};
use mozaiks_store::mongodb::bson::{Document, doc};
use mozaiks_store::{LEDGER, Store, USAGE_EVENTS};
use mozaiks_testkit::TestServers;
use uuid::Uuid;

fn charge(app: &str, run_id: Uuid, prompt: u64, completion: u64) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: app.into(),
        chat_id: "c1".into(),
        user_id: "u1".into(),
        workflow: "hello".into(),
        seq: 1,
        ts: Utc::now(),
        parent_chat_id: None,
        causation_id: None,
        event: Event::UsageCharged(UsageCharged {
            run_id,
            step: 1,
            agent: "a".into(),
            model: "m".into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            purpose: None,
            credits: None,
            price: None,
        }),
    }
}

async fn billing(servers: &TestServers) -> (Billing, Store) {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    let store = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    store.ensure_indexes(store.shared()).await.unwrap();
    (Billing::new(bus, store.clone()), store)
}

#[tokio::test]
async fn a_redelivered_charge_is_counted_once() {
    let servers = TestServers::start().await.unwrap();
    let (b, store) = billing(&servers).await;
    let run = Uuid::now_v7();
    let first = charge("app1", run, 10, 5);
    assert_eq!(b.apply(&first).await.unwrap(), Applied::Charged);
    assert_eq!(b.apply(&first).await.unwrap(), Applied::Duplicate);
    assert_eq!(
        b.apply(&charge("app1", run, 3, 2)).await.unwrap(),
        Applied::Charged
    );
    let u = store.usage("app1").await.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (13, 7, 20)
    );
    assert_eq!((u.charges, u.runs), (2, 1));
    // Other apps are untouched.
    assert_eq!(store.usage("app2").await.unwrap().total_tokens, 0);
}

#[tokio::test]
async fn racing_replicas_count_a_charge_once() {
    let servers = TestServers::start().await.unwrap();
    let (a, store) = billing(&servers).await;
    let (b, _) = billing(&servers).await;
    let mut expected = 0;
    for i in 0..10u64 {
        let c = charge("app1", Uuid::now_v7(), i + 1, 1);
        expected += i + 2;
        let (ra, rb) = tokio::join!(a.apply(&c), b.apply(&c));
        // No transaction to conflict: one of them counts it, the other sees a duplicate.
        let mut outcomes = [ra.unwrap(), rb.unwrap()];
        outcomes.sort_by_key(|o| matches!(o, Applied::Duplicate));
        assert_eq!(
            outcomes,
            [Applied::Charged, Applied::Duplicate],
            "charge {i}"
        );
    }
    let u = store.usage("app1").await.unwrap();
    assert_eq!(u.total_tokens as u64, expected);
    assert_eq!(u.charges, 10);
}

/// `n` charges of `app` on the log, each in its own chat (appended as a worker appends them).
async fn append(bus: &Bus, app: &str, n: usize) -> Vec<Envelope> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut env = charge(app, Uuid::now_v7(), i as u64 + 1, 2);
        env.chat_id = format!("chat-{}", Uuid::now_v7());
        bus.append(&env, 0).await.unwrap();
        out.push(env);
    }
    out
}

/// Waits until `MZ_USAGE` holds `n` charges (the server sources them from the log).
async fn sourced(bus: &Bus, n: usize) {
    for _ in 0..200 {
        let b = bus.replay("MZ_USAGE", "mz.evt.>", 1, 10_000).await.unwrap();
        if b.events.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("MZ_USAGE never held {n} charges");
}

/// Total tokens and charges of `charges` of `app`.
fn tokens(app: &str, charges: &[Envelope]) -> (i64, i64) {
    let mut out = (0, 0);
    for env in charges.iter().filter(|e| e.app_id == app) {
        if let Event::UsageCharged(u) = &env.event {
            out.0 += u.total_tokens as i64;
            out.1 += 1;
        }
    }
    out
}

/// Waits until `app`'s usage counts `charges` exactly, and checks that its ledger's totals are
/// exactly its documents at or below the watermark (each rolled once); answers the ledger.
async fn settled(store: &Store, app: &str, charges: &[Envelope]) -> Document {
    let want = tokens(app, charges);
    let mut seen = None;
    for _ in 0..300 {
        let u = store.usage(app).await.unwrap();
        seen = Some((u.total_tokens, u.charges));
        if seen == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, Some(want), "{app}'s usage");
    let db = store.shared();
    let ledger = db
        .collection::<Document>(LEDGER)
        .find_one(doc! { "app_id": app })
        .await
        .unwrap()
        .unwrap_or_default();
    let w = ledger.get_str("mark").unwrap_or_default().to_string();
    let below: Vec<Document> = db
        .collection::<Document>(USAGE_EVENTS)
        .find(doc! { "app_id": app, "mark": { "$lte": &w } })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let rolled_tokens: i64 = below
        .iter()
        .map(|d| d.get_i64("total_tokens").unwrap())
        .sum();
    assert_eq!(
        (
            ledger.get_i64("total_tokens").unwrap_or(0),
            ledger.get_i64("charges").unwrap_or(0)
        ),
        (rolled_tokens, below.len() as i64),
        "{app}'s ledger {ledger}"
    );
    ledger
}

async fn fleet(servers: &TestServers) -> (Bus, Store) {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    let store = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    store.ensure_indexes(store.shared()).await.unwrap();
    (bus, store)
}

/// Runs a billing replica (rolling after every few charges) until the answer is dropped.
fn replica(bus: &Bus, store: &Store) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b = Billing::new(bus.clone(), store.clone()).roll_every(7, Duration::from_millis(20));
    tokio::spawn(b.run(async move {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test]
async fn a_billing_killed_between_its_writes_and_the_roll_counts_each_charge_once() {
    let servers = TestServers::start().await.unwrap();
    let (bus, store) = fleet(&servers).await;
    let mut all = append(&bus, "app1", 40).await;
    sourced(&bus, 40).await;

    // A billing fetched 30 charges, wrote them with their marks, acknowledged 20 and was killed
    // before acknowledging the rest and before any roll.
    let mut consumer = bus.durable("MZ_USAGE", "billing").await.unwrap();
    let epoch = consumer
        .info()
        .await
        .unwrap()
        .created
        .unix_timestamp_nanos();
    let mut msgs = Vec::new();
    while msgs.len() < 30 {
        let mut batch = consumer
            .fetch()
            .max_messages(30 - msgs.len())
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            msgs.push(m.unwrap());
        }
    }
    let envs: Vec<Envelope> = msgs
        .iter()
        .map(|m| mozaiks_events::codec::decode_event(&m.payload).unwrap())
        .collect();
    let marks: Vec<String> = msgs
        .iter()
        .map(|m| mark(epoch, m.info().unwrap().stream_sequence))
        .collect();
    let out = store
        .charge_marked(store.shared(), &envs, &marks)
        .await
        .unwrap();
    assert!(out.iter().all(|c| *c == Charged::Counted));
    for m in &msgs[..20] {
        m.double_ack().await.unwrap();
    }
    // The other ten come back after the consumer's ack_wait; handed back now to keep the
    // test short.
    for m in &msgs[20..] {
        m.ack_with(async_nats::jetstream::AckKind::Nak(None))
            .await
            .unwrap();
    }
    assert_eq!(store.usage("app1").await.unwrap().charges, 30);

    // Another billing: the ten are duplicates, the last ten new; rolls go up to the floor.
    let _b = replica(&bus, &store);
    settled(&store, "app1", &all).await;
    // More charges, more rolls: the watermark passes every charge of the crash, once.
    all.extend(append(&bus, "app1", 30).await);
    let mut ledger = settled(&store, "app1", &all).await;
    for _ in 0..100 {
        if ledger.get_i64("charges").unwrap_or(0) > 40 {
            break;
        }
        all.extend(append(&bus, "app1", 1).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        ledger = settled(&store, "app1", &all).await;
    }
    assert!(ledger.get_i64("charges").unwrap() > 40, "{ledger}");
    assert_eq!(store.usage("app1").await.unwrap().charges, all.len() as i64);
}

#[tokio::test]
async fn two_billing_replicas_interleaving_roll_each_charge_once() {
    let servers = TestServers::start().await.unwrap();
    let (bus, store) = fleet(&servers).await;
    let _a = replica(&bus, &store);
    let _b = replica(&bus, &store);
    let mut all = Vec::new();
    for _ in 0..6 {
        all.extend(append(&bus, "app1", 25).await);
        all.extend(append(&bus, "app2", 15).await);
    }
    for app in ["app1", "app2"] {
        // Rolled while both replicas wrote (a roll every 7 charges or 20 ms). A roll reads the
        // consumer's acknowledgement floor, which may not have passed the last batches yet, and
        // only a later charge of the app starts the next roll: so a few more charges may be
        // needed before the watermark moves (on a loaded machine every roll may have come
        // too early).
        let mut ledger = settled(&store, app, &all).await;
        for _ in 0..100 {
            if ledger.get_i64("charges").unwrap_or(0) > 0 {
                break;
            }
            all.extend(append(&bus, app, 1).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
            ledger = settled(&store, app, &all).await;
        }
        assert!(ledger.get_i64("charges").unwrap_or(0) > 0, "{ledger}");
    }
    let mut runs = std::collections::HashSet::new();
    for env in all.iter().filter(|e| e.app_id == "app1") {
        if let Event::UsageCharged(u) = &env.event {
            runs.insert(u.run_id);
        }
    }
    assert_eq!(store.usage("app1").await.unwrap().runs, runs.len() as i64);
}
