//! The storage measure of an app against a real Mongo-wire server: documents and bytes per
//! collection, recorded once and shared by its readers (the projectors' gauges, the usage
//! endpoint's `storage_bytes`), taken again only when the recorded one is too old.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use mozaiks_store::Store;
use mozaiks_store::storage_size::MEASURES;
use mozaiks_testkit::TestServers;

async fn store(servers: &TestServers) -> Store {
    let s = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    s.ensure_indexes(s.shared()).await.unwrap();
    s
}

#[tokio::test]
async fn one_recorded_measure_serves_every_reader_until_it_is_too_old() {
    let servers = TestServers::start().await.unwrap();
    let s = store(&servers).await;
    let sessions = s.shared().collection::<Document>("chat_sessions");
    sessions
        .insert_many([
            doc! {"app_id": "a", "chat_id": "c1", "status": "running"},
            doc! {"app_id": "a", "chat_id": "c2", "status": "completed"},
            doc! {"app_id": "b", "chat_id": "c3", "status": "running"},
        ])
        .await
        .unwrap();
    s.shared()
        .collection::<Document>("chat_messages")
        .insert_one(doc! {"app_id": "a", "chat_id": "c1", "seq": 1_i64, "text": "hello"})
        .await
        .unwrap();

    // Measured now: app a's documents only, by collection, and recorded.
    let m = s.measure_storage_now("a").await.unwrap();
    let of = |c: &str| {
        m.collections
            .iter()
            .find(|x| x.collection == c)
            .cloned()
            .unwrap()
    };
    assert_eq!(of("chat_sessions").documents, 2);
    assert_eq!(of("chat_messages").documents, 1);
    assert_eq!(of("usage_events").documents, 0);
    assert!(of("chat_sessions").bytes > of("chat_messages").bytes);
    assert_eq!(
        m.bytes(),
        m.collections.iter().map(|c| c.bytes).sum::<u64>()
    );
    let recorded = s
        .shared()
        .collection::<Document>(MEASURES)
        .find_one(doc! {"app_id": "a"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recorded.get_i64("bytes").unwrap() as u64, m.bytes());

    // A reader that accepts a minute-old measure gets the recorded one: the document written
    // since is not in it, and the usage endpoint answers the same bytes.
    sessions
        .insert_one(doc! {"app_id": "a", "chat_id": "c4", "status": "running"})
        .await
        .unwrap();
    let again = s
        .storage_measure("a", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again, m);
    assert_eq!(s.storage_bytes("a").await.unwrap(), m.bytes());

    // A reader that needs a fresher one measures again, and records it for the others.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fresh = s
        .storage_measure("a", Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(
        fresh
            .collections
            .iter()
            .find(|c| c.collection == "chat_sessions")
            .unwrap()
            .documents,
        3
    );
    assert!(fresh.measured_at > m.measured_at);
    assert_eq!(s.storage_bytes("a").await.unwrap(), fresh.bytes());
    // One document per app.
    assert_eq!(
        s.shared()
            .collection::<Document>(MEASURES)
            .count_documents(doc! {"app_id": "a"})
            .await
            .unwrap(),
        1
    );
}
