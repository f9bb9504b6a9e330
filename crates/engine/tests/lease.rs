//! Per-chat ownership leases and command forwarding against a real nats-server: one owner per
//! chat, release and renewal, a dead owner's lease aging out, a lost lease noticed, and a
//! JetStream message acknowledged by a worker other than the one that pulled it.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_engine::worker::forward::{self, Acker, Forwarded};
use mozaiks_engine::worker::lease::{BUCKET, Claim, Owners};
use mozaiks_events::{Command, CommandEnvelope};
use mozaiks_testkit::TestServers;

/// A bus with the shipped definitions, the owners bucket's TTL set to `ttl` for the test.
async fn bus(servers: &TestServers, name: &str, ttl: Duration) -> Bus {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, name)
        .await
        .unwrap();
    let mut defs = Definitions::embedded().unwrap();
    let owners = defs
        .buckets
        .iter_mut()
        .find(|b| b.bucket == BUCKET)
        .expect("MZ_OWNERS is shipped");
    assert!(owners.max_age > 0, "the shipped owners bucket has a TTL");
    owners.max_age = ttl.as_nanos() as u64;
    bus.apply(&defs).await.unwrap();
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_owns_a_chat_until_it_releases_it() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(5);
    let a = Owners::open(&bus(&servers, "a", ttl).await, "worker-a")
        .await
        .unwrap();
    let b = Owners::open(&bus(&servers, "b", ttl).await, "worker-b")
        .await
        .unwrap();
    assert_eq!(a.ttl(), ttl);
    let key = Owners::key("app1", "chat1");
    assert_eq!(key, "app1.chat1");

    // Both claim at once: exactly one owns it, the other is told who.
    let (ra, rb) = tokio::join!(a.claim(&key, false), b.claim(&key, false));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let (owner, other, other_claim) = match (&ra, &rb) {
        (Claim::Mine, Claim::Theirs(w)) => (&a, &b, w.clone()),
        (Claim::Theirs(w), Claim::Mine) => (&b, &a, w.clone()),
        _ => panic!("both or neither own the chat: {ra:?} {rb:?}"),
    };
    assert_eq!(other_claim, owner.me());
    assert!(owner.holds(&key) && !other.holds(&key));
    assert_eq!(owner.count(), 1);
    assert_eq!(
        other.owner(&key).await.unwrap().as_deref(),
        Some(owner.me())
    );
    // Claiming again is a no-op for the owner; other chats are independent.
    assert_eq!(owner.claim(&key, false).await.unwrap(), Claim::Mine);
    let key2 = Owners::key("app1", "chat2");
    assert_eq!(other.claim(&key2, false).await.unwrap(), Claim::Mine);
    // Another app's chat with the same id is another key.
    let key3 = Owners::key("app2", "chat1");
    assert_eq!(other.claim(&key3, false).await.unwrap(), Claim::Mine);

    // The owner releases it: the other worker's next claim succeeds.
    owner.release(&key).await;
    assert!(!owner.holds(&key));
    assert_eq!(other.owner(&key).await.unwrap(), None);
    assert_eq!(other.claim(&key, false).await.unwrap(), Claim::Mine);
    assert_eq!(
        owner.claim(&key, false).await.unwrap(),
        Claim::Theirs(other.me().to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_lease_and_a_dead_owners_lease_ages_out() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(1);
    let a = Owners::open(&bus(&servers, "a", ttl).await, "worker-a")
        .await
        .unwrap();
    let b = Owners::open(&bus(&servers, "b", ttl).await, "worker-b")
        .await
        .unwrap();
    let dead = Owners::open(&bus(&servers, "dead", ttl).await, "worker-dead")
        .await
        .unwrap();
    let live = Owners::key("app", "renewed");
    let abandoned = Owners::key("app", "abandoned");
    assert_eq!(a.claim(&live, false).await.unwrap(), Claim::Mine);
    assert_eq!(dead.claim(&abandoned, false).await.unwrap(), Claim::Mine);
    // `a` renews (one batched pass per quarter TTL) for three TTLs; `dead` never does, as a
    // killed worker would not.
    let started = Instant::now();
    let mut gone = false;
    while started.elapsed() < ttl * 3 {
        tokio::time::sleep(ttl / 4).await;
        assert!(a.renew().await.is_empty());
        assert_eq!(
            b.claim(&live, false).await.unwrap(),
            Claim::Theirs("worker-a".into()),
            "a renewed lease must not be taken"
        );
        gone |= b.owner(&abandoned).await.unwrap().is_none();
    }
    assert!(gone, "the abandoned lease never aged out");
    assert_eq!(b.claim(&abandoned, true).await.unwrap(), Claim::Mine);
    // `a` lets its lease go: at once free for `b`.
    a.release(&live).await;
    assert_eq!(b.claim(&live, false).await.unwrap(), Claim::Mine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_by_another_worker_is_reported_lost() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(1);
    let a = Owners::open(&bus(&servers, "a", ttl).await, "worker-a")
        .await
        .unwrap();
    let b = Owners::open(&bus(&servers, "b", ttl).await, "worker-b")
        .await
        .unwrap();
    let key = Owners::key("app", "chat");
    assert_eq!(a.claim(&key, false).await.unwrap(), Claim::Mine);
    // `a` stalls past the TTL (no renewal): `b` takes the chat.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.claim(&key, true).await.unwrap() != Claim::Mine {
        assert!(Instant::now() < deadline, "the stalled lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `a` wakes up: its renewal is refused, and it knows it lost the chat.
    assert_eq!(a.renew().await, vec![key.clone()]);
    assert!(!a.holds(&key));
    assert_eq!(
        a.claim(&key, false).await.unwrap(),
        Claim::Theirs("worker-b".into())
    );
    // `b`'s renewals are unaffected, and releasing what `a` no longer holds deletes nothing.
    a.release(&key).await;
    assert!(b.renew().await.is_empty());
    assert_eq!(a.owner(&key).await.unwrap().as_deref(), Some("worker-b"));
}

fn command(chat_id: &str) -> CommandEnvelope {
    CommandEnvelope::new(
        "app",
        chat_id,
        "u",
        "hello",
        Command::Cancel {
            reason: String::new(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_command_is_acknowledged_by_the_owner_not_the_puller() {
    let servers = TestServers::start_nats().await.unwrap();
    let puller = bus(&servers, "puller", Duration::from_secs(5)).await;
    let owner = bus(&servers, "owner", Duration::from_secs(5)).await;
    let consumer = puller.durable("MZ_CMD", "workers").await.unwrap();
    let cmd = command("c1");
    puller.send_command(&cmd, None).await.unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let msg = batch.next().await.unwrap().unwrap();
    let ack = Acker::of(puller.client(), &msg);

    // Nobody takes `mz.own.nobody`: no answer.
    assert_eq!(
        forward::forward(&puller, "nobody", &msg.payload, &ack).await,
        Forwarded::NoAnswer
    );

    // The owner takes it: answers `accepted`, then acknowledges the message itself.
    let mut inbox = owner
        .client()
        .subscribe(forward::inbox(&owner, "w-owner"))
        .await
        .unwrap();
    // A round trip on the owner's connection: the server has its subscription.
    owner.ping().await.unwrap();
    let owner_side = {
        let owner = owner.clone();
        tokio::spawn(async move {
            let req = inbox.next().await.unwrap();
            let got = mozaiks_events::codec::decode_command(&req.payload).unwrap();
            let ack_subject = req
                .headers
                .as_ref()
                .and_then(|h| h.get(forward::ACK_HEADER))
                .unwrap()
                .to_string();
            owner
                .client()
                .publish(req.reply.unwrap(), forward::ACCEPTED.into())
                .await
                .unwrap();
            Acker::remote(owner.client(), &ack_subject).ack().await;
            owner.client().flush().await.unwrap();
            got.command_id
        })
    };
    assert_eq!(
        forward::forward(&puller, "w-owner", &msg.payload, &ack).await,
        Forwarded::Accepted
    );
    assert_eq!(owner_side.await.unwrap(), cmd.command_id);
    drop(batch);

    // The message is acknowledged (by the owner's connection): nothing pending, nothing left.
    let mut consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = consumer;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not acknowledged: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_nats_stops_believing_it_owns_its_chats() {
    // Issue 9, defect 9: the lease has a local deadline shorter than its TTL, so a worker that
    // cannot renew stops counting a chat as its own before another worker may take it over.
    let mut servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(5);
    let a = Owners::open(&bus(&servers, "a", ttl).await, "worker-a")
        .await
        .unwrap();
    let key = Owners::key("app1", "chat-cut");
    assert_eq!(a.claim(&key, false).await.unwrap(), Claim::Mine);
    assert!(a.holds(&key));
    servers.kill_nats().unwrap();
    let cut = Instant::now();
    // No renewal can answer now; the local deadline passes before the server's TTL would.
    while a.holds(&key) {
        assert!(
            cut.elapsed() < ttl,
            "still believes it owns the chat after the lease's TTL without a renewal"
        );
        // A renewal cannot answer (it times out); the deadline does not wait for it.
        let _ = tokio::time::timeout(Duration::from_millis(100), a.renew()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut.elapsed() < ttl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_in_time_stays_valid_past_its_first_deadline() {
    let servers = TestServers::start_nats().await.unwrap();
    let ttl = Duration::from_secs(2);
    let a = Owners::open(&bus(&servers, "a", ttl).await, "worker-a")
        .await
        .unwrap();
    let key = Owners::key("app1", "chat-renewed");
    assert_eq!(a.claim(&key, false).await.unwrap(), Claim::Mine);
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        assert!(a.renew().await.is_empty());
        assert!(a.holds(&key), "a renewed lease is held");
        tokio::time::sleep(ttl / 4).await;
    }
}
