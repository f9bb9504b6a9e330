//! The lease primitive against a real nats-server: create, renew and release at a revision, the
//! TTL read from the bucket, the local validity deadline, and a dead holder's entry aging out.
//! Also the fleet's view of `MZ_PERF`, followed from the server.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::fleet::{self, ActiveRun, WorkerSnapshot, Workers};
use mozaiks_bus::lease::{Held, LeaseBucket, Renewal};
use mozaiks_testkit::TestServers;

/// A bus with a fresh lease bucket `base` whose entries age out after `max_age` (zero: never).
async fn bucket(servers: &TestServers, base: &str, max_age: Duration) -> Bus {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "lease-test")
        .await
        .unwrap();
    bus.jetstream()
        .create_key_value(kv::Config {
            bucket: bus.subjects().name(base),
            history: 1,
            max_age,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    bus
}

fn held(r: Renewal) -> Held {
    match r {
        Renewal::Kept(h) => h,
        Renewal::Lost => panic!("the renewal was refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_at_a_time_renewed_and_released_at_its_revision() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = bucket(&servers, "T_LEASES", Duration::from_secs(30)).await;
    let leases = LeaseBucket::open(&bus, "T_LEASES", None).await.unwrap();
    assert_eq!(leases.ttl(), Duration::from_secs(30));
    assert_eq!(leases.renew_every(), Duration::from_millis(7500));

    let a = leases
        .create("job", Bytes::from_static(b"a"))
        .await
        .unwrap()
        .expect("a free key is created");
    assert!(a.is_valid());
    // Taken: another create is refused; the entry says whose it is.
    assert_eq!(
        leases
            .create("job", Bytes::from_static(b"b"))
            .await
            .unwrap(),
        None
    );
    let now = leases.current("job").await.unwrap().unwrap();
    assert_eq!((now.value.as_ref(), now.revision), (&b"a"[..], a.revision));
    // Renewed at its revision: a new revision; a renewal at the old one is refused.
    let a2 = held(
        leases
            .renew("job", Bytes::from_static(b"a"), a.revision)
            .await
            .unwrap(),
    );
    assert!(a2.revision > a.revision);
    assert_eq!(
        leases
            .renew("job", Bytes::from_static(b"x"), a.revision)
            .await
            .unwrap(),
        Renewal::Lost
    );
    // A release at a stale revision deletes nothing; at the current one it frees the key.
    assert!(leases.release("job", a.revision).await.is_err());
    assert!(leases.current("job").await.unwrap().is_some());
    leases.release("job", a2.revision).await.unwrap();
    assert_eq!(leases.current("job").await.unwrap(), None);
    // A renewal of a released lease is refused; a new create succeeds.
    assert_eq!(
        leases
            .renew("job", Bytes::from_static(b"a"), a2.revision)
            .await
            .unwrap(),
        Renewal::Lost
    );
    let b = leases
        .create("job", Bytes::from_static(b"b"))
        .await
        .unwrap()
        .expect("a released key is free");
    assert_eq!(
        leases.current("job").await.unwrap().unwrap().revision,
        b.revision
    );
    // Keys are independent.
    assert!(
        leases
            .create("other", Bytes::from_static(b"a"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttl_comes_from_the_bucket_and_the_deadline_is_a_share_of_it_from_the_send() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = bucket(&servers, "T_TIMED", Duration::from_secs(10)).await;
    let leases = LeaseBucket::open(&bus, "T_TIMED", Some(Duration::from_secs(99)))
        .await
        .unwrap()
        .with_validity(0.7);
    assert_eq!(leases.ttl(), Duration::from_secs(10), "max_age wins");
    let share = Duration::from_secs(7);
    let before = Instant::now();
    let h = leases
        .create("k", Bytes::from_static(b"v"))
        .await
        .unwrap()
        .unwrap();
    let after = Instant::now();
    assert!(before + share <= h.valid_until && h.valid_until <= after + share);
    let before = Instant::now();
    let r = held(
        leases
            .renew("k", Bytes::from_static(b"v"), h.revision)
            .await
            .unwrap(),
    );
    let after = Instant::now();
    assert!(before + share <= r.valid_until && r.valid_until <= after + share);

    // A bucket without max_age: refused, unless a TTL is given for the local deadline.
    let bus = bucket(&servers, "T_FOREVER", Duration::ZERO).await;
    let err = LeaseBucket::open(&bus, "T_FOREVER", None)
        .await
        .err()
        .expect("a bucket without max_age is refused");
    assert!(err.to_string().contains("max_age"), "{err}");
    let forever = LeaseBucket::open(&bus, "T_FOREVER", Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(forever.ttl(), Duration::from_secs(5));
    // A bucket that does not exist.
    assert!(LeaseBucket::open(&bus, "T_NONE", None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_entry_ages_out_and_its_late_renewal_is_refused() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(1);
    let bus = bucket(&servers, "T_SHORT", ttl).await;
    let leases = LeaseBucket::open(&bus, "T_SHORT", None).await.unwrap();
    let dead = leases
        .create("job", Bytes::from_static(b"dead"))
        .await
        .unwrap()
        .unwrap();
    // The holder stops renewing: the entry ages out and another holder creates the key.
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        if let Some(h) = leases
            .create("job", Bytes::from_static(b"next"))
            .await
            .unwrap()
        {
            break h;
        }
        assert!(Instant::now() < deadline, "the entry never aged out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // By then the dead holder's own deadline (half the TTL) had long passed.
    assert!(!dead.is_valid());
    assert_eq!(
        leases
            .renew("job", Bytes::from_static(b"dead"), dead.revision)
            .await
            .unwrap(),
        Renewal::Lost
    );
    assert_eq!(
        leases.current("job").await.unwrap().unwrap().value.as_ref(),
        b"next"
    );
    assert!(matches!(
        leases
            .renew("job", Bytes::from_static(b"next"), taken.revision)
            .await
            .unwrap(),
        Renewal::Kept(_)
    ));
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_snapshots_are_followed_in_memory() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "fleet-test")
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name(fleet::PERF_BUCKET))
        .await
        .unwrap();
    let snap = |id: &str, apps: &[&str]| WorkerSnapshot {
        worker_id: id.into(),
        active_run_count: apps.len(),
        active_runs: apps
            .iter()
            .map(|a| ActiveRun {
                app_id: a.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let put = |id: &str, apps: &[&str]| {
        let body = serde_json::to_vec(&snap(id, apps)).unwrap();
        let (kv, key) = (kv.clone(), fleet::worker_key(id));
        async move { kv.put(key, body.into()).await.unwrap() }
    };
    // One written before the follower starts (its history), one after.
    put("w1", &["acme", "acme"]).await;
    let workers = Workers::follow(&bus).await.unwrap();
    put("w2", &["acme", "other"]).await;
    eventually("both workers", || workers.count() == 2).await;
    assert_eq!(
        (workers.active_runs("acme"), workers.active_runs("other")),
        (3, 1)
    );
    let live = workers.live();
    assert_eq!(
        live.iter()
            .map(|s| s.worker_id.as_str())
            .collect::<Vec<_>>(),
        ["w1", "w2"]
    );
    // A stopping worker deletes its key; garbage does not count.
    kv.delete(fleet::worker_key("w1")).await.unwrap();
    kv.put(fleet::worker_key("w2"), "not json".into())
        .await
        .unwrap();
    eventually("no worker", || workers.count() == 0).await;
    assert_eq!(workers.active_runs("acme"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_back_over_its_own_marker_and_only_if_still_free() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = bucket(&servers, "T_MARKS", Duration::from_secs(30)).await;
    let leases = LeaseBucket::open(&bus, "T_MARKS", None).await.unwrap();
    let me = Bytes::from_static(b"me");
    let a = leases.create("chat", me.clone()).await.unwrap().unwrap();
    let marker = leases.release_at("chat", a.revision).await.unwrap();
    assert!(marker > a.revision);
    assert_eq!(leases.current("chat").await.unwrap(), None);
    // Over its own marker: taken back, and held like a created lease.
    let b = leases
        .create_over("chat", me.clone(), marker)
        .await
        .unwrap()
        .expect("free: taken back");
    assert!(b.is_valid() && b.revision > marker);
    assert_eq!(leases.current("chat").await.unwrap().unwrap().value, me);
    // Held by somebody: refused, whatever marker is given.
    assert_eq!(
        leases
            .create_over("chat", Bytes::from_static(b"other"), marker)
            .await
            .unwrap(),
        None
    );
    // Released, then taken and released by another holder: a stale marker still takes the key
    // (through a plain create), because it is free.
    let m2 = leases.release_at("chat", b.revision).await.unwrap();
    let o = leases
        .create_over("chat", Bytes::from_static(b"other"), m2)
        .await
        .unwrap()
        .unwrap();
    leases.release_at("chat", o.revision).await.unwrap();
    let c = leases
        .create_over("chat", me.clone(), m2)
        .await
        .unwrap()
        .expect("free again: created");
    assert_eq!(
        leases.current("chat").await.unwrap().unwrap().revision,
        c.revision
    );
    // A release at a stale revision is refused and deletes nothing.
    assert!(leases.release_at("chat", b.revision).await.is_err());
    assert_eq!(leases.current("chat").await.unwrap().unwrap().value, me);
}
