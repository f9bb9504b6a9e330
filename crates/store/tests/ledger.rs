//! The usage ledger against a real Mongo-wire server: every charge counted exactly once, through
//! redeliveries, crashes between writes, rolls up to a floor (also racing ones and reads during
//! them), holds, unplaced charges, an abandoned transaction, and the previous ledger shapes.

use std::collections::HashSet;

use chrono::Utc;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, UsageCharged};
use mozaiks_store::ledger::{COMPACT_BATCH, Charged, UNPLACED, mark};
use mozaiks_store::mongodb::bson::{Document, doc};
use mozaiks_store::{LEDGER, RUNS, Store, USAGE_EVENTS, UsageDoc};
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

/// What the ledger must say for `charges` (each counted once).
fn expected(app: &str, charges: &[Envelope]) -> UsageDoc {
    let mut u = UsageDoc::empty(app);
    let mut seen = HashSet::new();
    let mut runs = HashSet::new();
    for env in charges {
        let Event::UsageCharged(c) = &env.event else {
            continue;
        };
        if env.app_id != app || !seen.insert(env.event_id) {
            continue;
        }
        u.prompt_tokens += c.prompt_tokens as i64;
        u.completion_tokens += c.completion_tokens as i64;
        u.total_tokens += c.total_tokens as i64;
        u.charges += 1;
        runs.insert(c.run_id);
    }
    u.runs = runs.len() as i64;
    u
}

/// Charges of `runs` runs with `per_run` charges each.
fn charges(app: &str, runs: usize, per_run: usize) -> Vec<Envelope> {
    (0..runs)
        .flat_map(|r| {
            let run = Uuid::now_v7();
            (0..per_run).map(move |i| charge(app, run, (r * 7 + i) as u64 + 1, 2))
        })
        .collect()
}

/// Marks of `n` charges from stream sequence `first` (epoch 1).
fn marks(first: u64, n: usize) -> Vec<String> {
    (0..n as u64).map(|i| mark(1, first + i)).collect()
}

async fn ledger_doc(db: &mozaiks_store::mongodb::Database, app: &str) -> Document {
    db.collection::<Document>(LEDGER)
        .find_one(doc! { "app_id": app })
        .await
        .unwrap()
        .unwrap()
}

async fn store(servers: &TestServers) -> Store {
    let store = Store::connect(&servers.mongo_uri, &servers.mongo_db)
        .await
        .unwrap();
    store.ensure_indexes(store.shared()).await.unwrap();
    store
}

#[tokio::test]
async fn a_charge_is_counted_once_however_often_it_is_applied() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let all = charges("app1", 3, 2);
    let m = marks(1, all.len());
    // Batch with a charge twice in it (redelivered while the first copy was still pending).
    let mut first = all[..4].to_vec();
    first.push(all[1].clone());
    let mut first_marks = m[..4].to_vec();
    first_marks.push(m[1].clone());
    let out = store
        .charge_marked(&db, &first, &first_marks)
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            Charged::Counted,
            Charged::Counted,
            Charged::Counted,
            Charged::Counted,
            Charged::Duplicate
        ]
    );
    // Redelivered again, with the rest.
    let out = store.charge_marked(&db, &all, &m).await.unwrap();
    assert_eq!(out.iter().filter(|c| **c == Charged::Counted).count(), 2);
    // Without a position (a storage move's copy): still a duplicate.
    assert_eq!(
        store.charge(&db, &all[5]).await.unwrap(),
        Charged::Duplicate
    );
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    // Another app is untouched; a non-charge changes nothing.
    assert_eq!(store.usage("app2").await.unwrap(), UsageDoc::empty("app2"));
    let mut other = all[0].clone();
    other.event = Event::SessionStarted(Default::default());
    assert_eq!(store.charge(&db, &other).await.unwrap(), Charged::Duplicate);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    // One document per charge and per run.
    let count = |coll: &'static str| {
        let db = db.clone();
        async move {
            db.collection::<Document>(coll)
                .count_documents(doc! { "app_id": "app1" })
                .await
                .unwrap()
        }
    };
    assert_eq!(count(USAGE_EVENTS).await, 6);
    assert_eq!(count(RUNS).await, 3);
}

#[tokio::test]
async fn a_charge_written_by_an_attempt_that_died_before_its_run_gets_its_run_on_redelivery() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let c = charges("app1", 1, 1);
    let m = marks(1, 1);
    store.charge_marked(&db, &c, &m).await.unwrap();
    // The process died after writing the charge and before writing its run.
    db.collection::<Document>(RUNS)
        .delete_many(doc! { "app_id": "app1" })
        .await
        .unwrap();
    assert_eq!(store.usage("app1").await.unwrap().runs, 0);
    // Redelivered to another process (the one that died remembered the run as written).
    let again = self::store(&servers).await;
    assert_eq!(
        again.charge_marked(&db, &c, &m).await.unwrap(),
        [Charged::Duplicate]
    );
    assert_eq!(again.usage("app1").await.unwrap(), expected("app1", &c));
    // A later charge of a run this process wrote does not write the run again.
    let later = vec![charge("app1", run_of(&c[0]), 4, 4)];
    again
        .charge_marked(&db, &later, &marks(2, 1))
        .await
        .unwrap();
    let runs = db
        .collection::<Document>(RUNS)
        .find_one(doc! { "app_id": "app1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(runs.get_str("mark").unwrap(), m[0]);
}

fn run_of(env: &Envelope) -> Uuid {
    match &env.event {
        Event::UsageCharged(c) => c.run_id,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn rolls_move_the_watermark_to_the_floor_without_changing_the_answer() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    // More than a batch of the previous shape, in a few runs; another app's charges between.
    let mut all = charges("app1", 30, 45);
    assert!(all.len() > COMPACT_BATCH);
    let m: Vec<String> = (0..all.len() as u64).map(|i| mark(1, 2 * i + 1)).collect();
    for (chunk, marks) in all.chunks(200).zip(m.chunks(200)) {
        store.charge_marked(&db, chunk, marks).await.unwrap();
    }
    let others = charges("app2", 5, 2);
    let om: Vec<String> = (0..others.len() as u64)
        .map(|i| mark(1, 2 * i + 2))
        .collect();
    store.charge_marked(&db, &others, &om).await.unwrap();
    let want = expected("app1", &all);
    assert_eq!(store.usage("app1").await.unwrap(), want);

    // Up to a floor in the middle: what is above it stays read from the documents.
    let mid = m[700].clone();
    let c = store.compact_usage(&db, "app1", &mid).await.unwrap();
    assert_eq!(c.charges, 701);
    assert_eq!(ledger_doc(&db, "app1").await.get_str("mark").unwrap(), mid);
    assert_eq!(store.usage("app1").await.unwrap(), want);
    // A floor at or below the watermark rolls nothing.
    assert_eq!(
        store.compact_usage(&db, "app1", &m[10]).await.unwrap(),
        Default::default()
    );

    // Two rolls at once (two replicas): one moves the watermark, the other loses and changes
    // nothing; reads made meanwhile are exact.
    let top = mark(1, 1_000_000);
    let reads = async {
        for _ in 0..10 {
            assert_eq!(store.usage("app1").await.unwrap(), want);
        }
    };
    let (a, b, ()) = tokio::join!(
        store.compact_usage(&db, "app1", &top),
        store.compact_usage(&db, "app1", &top),
        reads
    );
    let mut rolled = 0;
    for r in [a, b] {
        match r {
            Ok(c) => rolled += c.charges,
            Err(e) => assert!(matches!(e, mozaiks_store::Error::Contended(_)), "{e}"),
        }
    }
    rolled += store
        .compact_usage(&db, "app1", &top)
        .await
        .unwrap()
        .charges;
    assert_eq!(rolled as usize, all.len() - 701);
    let ledger = ledger_doc(&db, "app1").await;
    assert_eq!(ledger.get_i64("charges").unwrap(), want.charges);
    assert_eq!(ledger.get_i64("runs").unwrap(), want.runs);
    assert_eq!(ledger.get_i64("total_tokens").unwrap(), want.total_tokens);
    assert_eq!(store.usage("app1").await.unwrap(), want);
    assert_eq!(
        store.usage("app2").await.unwrap(),
        expected("app2", &others)
    );

    // Redelivered at or below the watermark: duplicates. New charges above it add up.
    let out = store
        .charge_marked(&db, &all[..300], &m[..300])
        .await
        .unwrap();
    assert!(out.iter().all(|c| *c == Charged::Duplicate));
    let more = charges("app1", 2, 3);
    store
        .charge_marked(&db, &more, &marks(2_000_000, more.len()))
        .await
        .unwrap();
    all.extend(more);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    store
        .compact_usage(&db, "app1", &mark(1, 3_000_000))
        .await
        .unwrap();
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    // A new epoch (the consumer created again, sequences from 1): after every earlier mark.
    let reborn = charges("app1", 1, 2);
    store
        .charge_marked(&db, &reborn, &[mark(2, 1), mark(2, 2)])
        .await
        .unwrap();
    all.extend(reborn);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    let c = store.compact_usage(&db, "app1", &mark(2, 2)).await.unwrap();
    assert_eq!(c.charges, 2);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn unplaced_charges_are_never_rolled_and_count_once() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let placed = charges("app1", 2, 2);
    store
        .charge_marked(&db, &placed, &marks(1, placed.len()))
        .await
        .unwrap();
    let copied = charges("app1", 1, 3);
    store.charge_many(&db, &copied).await.unwrap();
    let mut all = placed.clone();
    all.extend(copied);
    let c = store
        .compact_usage(&db, "app1", &mark(1, u64::MAX))
        .await
        .unwrap();
    assert_eq!(c.charges, 4);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    // Not even a floor past every mark takes them.
    assert_eq!(
        store.compact_usage(&db, "app1", UNPLACED).await.unwrap(),
        Default::default()
    );
    assert_eq!(ledger_doc(&db, "app1").await.get_i64("charges").unwrap(), 4);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn a_held_ledger_counts_every_document_and_rolls_nothing_until_released() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let all = charges("app1", 3, 3);
    let m = marks(1, all.len());
    store.charge_marked(&db, &all, &m).await.unwrap();
    store.compact_usage(&db, "app1", &m[8]).await.unwrap();
    // A rebuild: held (totals zeroed), documents deleted, written again from the log.
    store.hold_usage(&db, "app1").await.unwrap();
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    for coll in [USAGE_EVENTS, RUNS] {
        db.collection::<Document>(coll)
            .delete_many(doc! { "app_id": "app1" })
            .await
            .unwrap();
    }
    assert_eq!(store.usage("app1").await.unwrap(), UsageDoc::empty("app1"));
    store.charge_marked(&db, &all[..4], &m[..4]).await.unwrap();
    // Live billing's roll meanwhile: nothing.
    assert_eq!(
        store.compact_usage(&db, "app1", &m[8]).await.unwrap(),
        Default::default()
    );
    let again = self::store(&servers).await;
    again.charge_marked(&db, &all, &m).await.unwrap();
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    store.release_usage(&db, "app1").await.unwrap();
    let c = store.compact_usage(&db, "app1", &m[8]).await.unwrap();
    assert_eq!((c.charges, c.runs), (9, 3));
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn an_abandoned_transaction_on_the_ledger_blocks_no_charge_and_no_read() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let mut all = charges("app1", 2, 3);
    store
        .charge_marked(&db, &all, &marks(1, all.len()))
        .await
        .unwrap();
    store.compact_usage(&db, "app1", &mark(1, 6)).await.unwrap();

    // A transaction cut off by a stall (a roll of the previous shape, a tool) holds the ledger
    // document (the server keeps it for 60 s).
    let client = mozaiks_store::mongodb::Client::with_uri_str(&servers.mongo_uri)
        .await
        .unwrap();
    let mut stuck = client.start_session().await.unwrap();
    stuck.start_transaction().await.unwrap();
    client
        .database(&servers.mongo_db)
        .collection::<Document>(LEDGER)
        .update_one(
            doc! { "app_id": "app1" },
            doc! { "$inc": { "charges": 1000 } },
        )
        .session(&mut stuck)
        .await
        .unwrap();

    // Charges and reads go on at once; a roll meanwhile fails or waits, and changes nothing
    // that a read could see twice.
    let more = charges("app1", 3, 2);
    let out = store
        .charge_marked(&db, &more, &marks(7, more.len()))
        .await
        .unwrap();
    assert!(out.iter().all(|c| *c == Charged::Counted));
    all.extend(more);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    let floor = mark(1, 12);
    let roll = store.compact_usage(&db, "app1", &floor);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), roll).await;
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));

    // Once the transaction is gone, rolls go on (the one that waited on it may land first: the
    // next one then loses the compare-and-set and the one after finds nothing left).
    stuck.abort_transaction().await.unwrap();
    for attempt in 0.. {
        match store.compact_usage(&db, "app1", &floor).await {
            Ok(_) => break,
            Err(mozaiks_store::Error::Contended(_)) if attempt < 20 => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let ledger = ledger_doc(&db, "app1").await;
    assert_eq!(ledger.get_str("mark").unwrap(), mark(1, 12));
    assert_eq!(ledger.get_i64("charges").unwrap(), 12);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn the_previous_ledger_shapes_are_kept_and_rolled() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    // A database of the previous shapes, with their indexes.
    for (coll, keys, unique) in [
        (USAGE_EVENTS, doc! { "app_id": 1, "event_id": 1 }, true),
        (USAGE_EVENTS, doc! { "app_id": 1, "rolled": 1 }, false),
        (RUNS, doc! { "app_id": 1, "run_id": 1 }, true),
        (RUNS, doc! { "app_id": 1, "rolled": 1 }, false),
    ] {
        db.collection::<Document>(coll)
            .create_index(
                mozaiks_store::mongodb::IndexModel::builder()
                    .keys(keys)
                    .options(
                        mozaiks_store::mongodb::options::IndexOptions::builder()
                            .unique(unique)
                            .build(),
                    )
                    .build(),
            )
            .await
            .unwrap();
    }
    // Written by the transactional ledger: per-charge documents without `rolled`, counted in
    // the app's totals document; then by the rolled-flag ledger: `rolled: false`, not counted.
    let oldest = charges("app1", 2, 2);
    let old = charges("app1", 2, 2);
    let docs = |envs: &[Envelope], rolled: Option<bool>| -> Vec<Document> {
        envs.iter()
            .map(|e| {
                let mut d = doc! {
                    "app_id": "app1", "event_id": e.event_id.to_string(), "total_tokens": 5_i64,
                    "prompt_tokens": 3_i64, "completion_tokens": 2_i64,
                };
                if let Some(r) = rolled {
                    d.insert("rolled", r);
                }
                d
            })
            .collect()
    };
    let run_docs = |envs: &[Envelope], rolled: Option<bool>| -> Vec<Document> {
        let runs: HashSet<String> = envs.iter().map(|e| run_of(e).to_string()).collect();
        runs.into_iter()
            .map(|r| {
                let mut d = doc! { "app_id": "app1", "run_id": r };
                if let Some(r) = rolled {
                    d.insert("rolled", r);
                }
                d
            })
            .collect()
    };
    let events = db.collection::<Document>(USAGE_EVENTS);
    events.insert_many(docs(&oldest, None)).await.unwrap();
    events.insert_many(docs(&old, Some(false))).await.unwrap();
    let runs = db.collection::<Document>(RUNS);
    runs.insert_many(run_docs(&oldest, None)).await.unwrap();
    runs.insert_many(run_docs(&old, Some(false))).await.unwrap();
    db.collection::<Document>(LEDGER)
        .insert_one(doc! {
            "app_id": "app1",
            "prompt_tokens": 12_i64,
            "completion_tokens": 8_i64,
            "total_tokens": 20_i64,
            "charges": 4_i64,
            "runs": 2_i64,
        })
        .await
        .unwrap();
    let mut all: Vec<Envelope> = oldest.clone();
    all.extend(old.clone());
    let want = |all: &[Envelope]| {
        // The test documents of the previous shapes hold 3 + 2 tokens each.
        let mut u = expected("app1", all);
        let n = (oldest.len() + old.len()) as i64;
        let theirs = expected("app1", &all[..n as usize]);
        u.prompt_tokens += 3 * n - theirs.prompt_tokens;
        u.completion_tokens += 2 * n - theirs.completion_tokens;
        u.total_tokens += 5 * n - theirs.total_tokens;
        u
    };
    assert_eq!(store.usage("app1").await.unwrap(), want(&all));
    // A redelivered old charge is a duplicate; new charges add to the old totals.
    for e in [&oldest[0], &old[0]] {
        assert_eq!(
            store
                .charge_marked(&db, std::slice::from_ref(e), &marks(1, 1))
                .await
                .unwrap(),
            [Charged::Duplicate]
        );
    }
    let new = charges("app1", 1, 3);
    store
        .charge_marked(&db, &new, &marks(2, new.len()))
        .await
        .unwrap();
    all.extend(new);
    assert_eq!(store.usage("app1").await.unwrap(), want(&all));
    // A roll takes the unrolled ones of the previous shape by transaction, the new ones by mark.
    let c = store
        .compact_usage(&db, "app1", &mark(1, 100))
        .await
        .unwrap();
    assert_eq!((c.charges, c.runs), (4 + 3, 2 + 1));
    assert_eq!(
        events
            .count_documents(doc! { "app_id": "app1", "rolled": false })
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.usage("app1").await.unwrap(), want(&all));
    assert_eq!(
        ledger_doc(&db, "app1").await.get_i64("charges").unwrap(),
        11
    );
}
