//! Fleet-wide leases against a real nats-server: one holder at a time; a holder that stops
//! (gracefully or by dying) is replaced by another.

use std::time::{Duration, Instant};

use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_control::lease::{Leader, Leases};
use mozaiks_testkit::TestServers;
use tokio::sync::oneshot;

/// A bus with the shipped definitions, the lease bucket's TTL shortened to `ttl` for the test.
async fn bus(servers: &TestServers, name: &str, ttl: Duration) -> Bus {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, name)
        .await
        .unwrap();
    let mut defs = Definitions::embedded().unwrap();
    let leases = defs
        .buckets
        .iter_mut()
        .find(|b| b.bucket == "MZ_LEASES")
        .expect("MZ_LEASES is shipped");
    assert!(leases.max_age > 0, "the shipped lease bucket has a TTL");
    leases.max_age = ttl.as_nanos() as u64;
    bus.apply(&defs).await.unwrap();
    bus
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn leader(leases: Leases) -> (Leader, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let l = Leader::spawn(leases, "retention", async move {
        let _ = rx.await;
    });
    (l, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_two_holders_leads_and_the_other_takes_over_when_it_stops() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(2);
    let a = Leases::open(&bus(&servers, "a", ttl).await, "holder-a")
        .await
        .unwrap();
    let b = Leases::open(&bus(&servers, "b", ttl).await, "holder-b")
        .await
        .unwrap();
    assert_eq!(a.ttl(), ttl);
    let (la, stop_a) = leader(a.clone());
    let (lb, stop_b) = leader(b.clone());
    eventually("a leader", || la.is_leader() || lb.is_leader()).await;
    // Over several renewal periods, never both, and the holder stays the same.
    let first_is_a = la.is_leader();
    for _ in 0..40 {
        assert!(!(la.is_leader() && lb.is_leader()), "two holders at once");
        assert_eq!(la.is_leader(), first_is_a, "the lease changed hands");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder = a.holder_of("retention").await.unwrap().unwrap();
    assert_eq!(
        holder.holder,
        if first_is_a { "holder-a" } else { "holder-b" }
    );

    // The holder stops (releases); the other takes over.
    let (stop, other) = if first_is_a {
        (stop_a, &lb)
    } else {
        (stop_b, &la)
    };
    stop.send(()).unwrap();
    eventually("the other holder to take over", || other.is_leader()).await;
    let holder = a.holder_of("retention").await.unwrap().unwrap();
    assert_eq!(
        holder.holder,
        if first_is_a { "holder-b" } else { "holder-a" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lease_ages_out_and_its_late_renewal_is_refused() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(2);
    let a = Leases::open(&bus(&servers, "a", ttl).await, "holder-a")
        .await
        .unwrap();
    let b = Leases::open(&bus(&servers, "b", ttl).await, "holder-b")
        .await
        .unwrap();
    let mut dead = a
        .try_acquire("storage-move-acme", Some("moving"))
        .await
        .unwrap()
        .expect("a free lease is acquired");
    assert!(dead.is_valid());
    // Held: nobody else gets it.
    assert!(
        b.try_acquire("storage-move-acme", None)
            .await
            .unwrap()
            .is_none()
    );
    let rec = b.holder_of("storage-move-acme").await.unwrap().unwrap();
    assert_eq!(
        (rec.holder.as_str(), rec.purpose.as_deref()),
        ("holder-a", Some("moving"))
    );
    // A renewal moves it forward; another lease name is independent.
    assert!(dead.renew().await.unwrap());
    let other = b
        .try_acquire("storage-move-other", None)
        .await
        .unwrap()
        .expect("another name is free");
    other.release().await;

    // The holder dies (stops renewing): after the TTL the entry is gone and b acquires it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut taken = loop {
        if let Some(l) = b.try_acquire("storage-move-acme", None).await.unwrap() {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "the dead holder's lease never aged out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !dead.is_valid(),
        "the dead holder stopped believing it holds the lease"
    );
    // The dead holder coming back cannot renew over the new holder.
    assert!(!dead.renew().await.unwrap());
    assert!(taken.renew().await.unwrap());
    // Releasing hands it over at once.
    taken.release().await;
    assert!(
        a.try_acquire("storage-move-acme", None)
            .await
            .unwrap()
            .is_some()
    );
}
