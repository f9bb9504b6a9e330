//! The bus's error kinds against a real nats-server: what async-nats really returns for a missing
//! stream or consumer, a stale revision, a refused configuration and a server that is gone is
//! classified by its kind and codes, never its text.

use std::time::Duration;

use async_nats::jetstream::stream;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::{Bus, Error, ErrorKind};
use mozaiks_testkit::TestServers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_errors_get_their_kinds() {
    let mut servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "kinds")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();

    // A stream or a consumer the definitions provide, lost on the server: missing, retryable
    // (the keeper re-creates it).
    let e = bus.stream("MZ_NOPE").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.is_missing() && e.is_retryable(), "{e}");
    assert!(mozaiks_bus::keeper::is_missing(&e));
    let e = bus.durable("MZ_CMD", "nobody").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // A publish to a subject no stream takes.
    let ack = bus
        .jetstream()
        .publish(format!("{}nostream.x", bus.subjects().prefix()), "x".into())
        .await
        .unwrap()
        .await
        .unwrap_err();
    let e = Error::jetstream("publish", ack);
    assert!(e.is_missing(), "{e}: {:?}", e.kind());

    // A write at a stale revision: a conflict, found in the source chain.
    let owners = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_OWNERS"))
        .await
        .unwrap();
    owners.put("a.b", "w1".into()).await.unwrap();
    let stale = owners.update("a.b", "w2".into(), 999).await.unwrap_err();
    let e = Error::kv("update a.b", stale);
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(mozaiks_bus::wrong_last_sequence_in(&e), "{e}");

    // A configuration the server refuses (its subjects overlap MZ_EVT's): retrying cannot help.
    let refused = bus
        .jetstream()
        .create_stream(stream::Config {
            name: bus.subjects().name("MZ_OVERLAP"),
            subjects: vec![bus.subjects().all_events()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let e = Error::jetstream("create MZ_OVERLAP", refused);
    assert_eq!(e.kind(), ErrorKind::Rejected, "{e}");
    assert!(!e.is_retryable() && !e.is_missing(), "{e}");

    // The server is gone: a request fails as a failure of the moment.
    servers.kill_nats().unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), bus.stream("MZ_EVT"))
        .await
        .expect("the request to fail within its timeout")
        .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::TimedOut | ErrorKind::Disconnected | ErrorKind::NoResponders
        ),
        "{e}: {:?}",
        e.kind()
    );
    assert!(e.is_retryable(), "{e}");
}
