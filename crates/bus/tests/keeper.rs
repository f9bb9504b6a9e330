//! The keeper re-applies definitions the server lost, against a real nats-server: a restarted
//! single node loses its memory buckets; a deleted stream or consumer comes back too.

use std::time::{Duration, Instant};

use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_testkit::TestServers;

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_gets_its_lost_buckets_back_without_restarting_the_process() {
    let mut servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "keeper")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    assert!(bus.missing_definitions().await.unwrap().is_empty());
    assert!(bus.readiness().is_ready());

    let keeper = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.keep_definitions(std::future::pending()).await })
    };
    servers.restart_nats().await.unwrap();
    // The memory buckets are gone after a restart of a single node; the keeper notices the
    // reconnect and applies them again.
    until("the lost buckets to be re-created", async || {
        bus.missing_definitions().await.is_ok_and(|m| m.is_empty())
    })
    .await;
    until("readiness", async || bus.readiness().is_ready()).await;
    let owners = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_OWNERS"))
        .await
        .unwrap();
    owners.put("a.b", "w".into()).await.unwrap();

    // A stream deleted by mistake and a consumer deleted by mistake come back within a check.
    bus.jetstream()
        .delete_stream(bus.subjects().name("MZ_DLQ"))
        .await
        .unwrap();
    bus.stream("MZ_CMD")
        .await
        .unwrap()
        .delete_consumer(&bus.subjects().name("workers"))
        .await
        .unwrap();
    let missing = bus.missing_definitions().await.unwrap();
    assert_eq!(missing.len(), 2, "{missing:?}");
    bus.heal();
    until("the deleted stream and consumer", async || {
        bus.missing_definitions().await.is_ok_and(|m| m.is_empty())
    })
    .await;
    keeper.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_what_is_missing_and_what_a_role_reports() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "ready")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    assert!(bus.readiness().is_ready());
    bus.report("worker.commands", Err("consumer deleted".into()));
    let r = bus.readiness();
    assert!(!r.is_ready());
    assert_eq!(
        r.problems.get("worker.commands").map(String::as_str),
        Some("consumer deleted")
    );
    bus.report("worker.commands", Ok(()));
    assert!(bus.readiness().is_ready());

    bus.jetstream()
        .delete_key_value(bus.subjects().name("MZ_PERF"))
        .await
        .unwrap();
    // A check finds it missing (and applies it again).
    let missing = bus.check_definitions().await.unwrap();
    assert_eq!(
        missing,
        vec![format!("KV_{}", bus.subjects().name("MZ_PERF"))]
    );
    assert!(bus.missing_definitions().await.unwrap().is_empty());
    assert!(bus.readiness().is_ready());
}
