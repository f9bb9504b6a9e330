//! The ledger counts every charge exactly once, against a real Mongo-wire server and NATS.

use chrono::Utc;
use mozaiks_billing::{Applied, Billing};
use mozaiks_bus::Bus;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, UsageCharged};
use mozaiks_store::Store;
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
