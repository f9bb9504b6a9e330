//! The usage ledger against a real Mongo-wire server: every charge counted exactly once, through
//! redeliveries, crashes between writes, compactions (also racing ones and reads during them),
//! an abandoned transaction, and totals written by the previous ledger shape.

use std::collections::HashSet;

use chrono::Utc;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, UsageCharged};
use mozaiks_store::ledger::{COMPACT_BATCH, Charged};
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
    // Batch with a charge twice in it (redelivered while the first copy was still pending).
    let mut first = all[..4].to_vec();
    first.push(all[1].clone());
    let out = store.charge_many(&db, &first).await.unwrap();
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
    let out = store.charge_many(&db, &all).await.unwrap();
    assert_eq!(out.iter().filter(|c| **c == Charged::Counted).count(), 2);
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
}

#[tokio::test]
async fn a_charge_written_by_an_attempt_that_died_before_its_run_gets_its_run_on_redelivery() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let c = charges("app1", 1, 1);
    store.charge(&db, &c[0]).await.unwrap();
    // The process died after writing the charge and before writing its run.
    db.collection::<Document>(RUNS)
        .delete_many(doc! { "app_id": "app1" })
        .await
        .unwrap();
    assert_eq!(store.usage("app1").await.unwrap().runs, 0);
    assert_eq!(store.charge(&db, &c[0]).await.unwrap(), Charged::Duplicate);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &c));
}

#[tokio::test]
async fn compaction_rolls_charges_into_the_ledger_without_changing_the_answer() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    // More than a compaction batch, in a few runs.
    let mut all = charges("app1", 30, 45);
    assert!(all.len() > COMPACT_BATCH);
    for chunk in all.chunks(200) {
        store.charge_many(&db, chunk).await.unwrap();
    }
    let want = expected("app1", &all);
    assert_eq!(store.usage("app1").await.unwrap(), want);

    // Two compactions at once (two replicas): every charge is rolled exactly once, and reads
    // made meanwhile are exact.
    let reads = async {
        for _ in 0..10 {
            assert_eq!(store.usage("app1").await.unwrap(), want);
        }
    };
    let (a, b, ()) = tokio::join!(
        store.compact_usage(&db, "app1"),
        store.compact_usage(&db, "app1"),
        reads
    );
    // The loser of a race gives up where it lost (what it rolled before stays rolled, once);
    // one more pass rolls what is left.
    for r in [a, b] {
        if let Err(e) = r {
            assert!(matches!(e, mozaiks_store::Error::Contended(_)), "{e}");
        }
    }
    store.compact_usage(&db, "app1").await.unwrap();
    for coll in [USAGE_EVENTS, RUNS] {
        let unrolled = db
            .collection::<Document>(coll)
            .count_documents(doc! { "app_id": "app1", "rolled": false })
            .await
            .unwrap();
        assert_eq!(unrolled, 0, "{coll}");
    }
    let ledger = db
        .collection::<Document>(LEDGER)
        .find_one(doc! { "app_id": "app1" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ledger.get_i64("charges").unwrap(), want.charges);
    assert_eq!(ledger.get_i64("runs").unwrap(), want.runs);
    assert_eq!(ledger.get_i64("total_tokens").unwrap(), want.total_tokens);
    assert_eq!(store.usage("app1").await.unwrap(), want);

    // Redelivered after the compaction: still once. New charges: rolled and unrolled add up.
    store.charge_many(&db, &all[..300]).await.unwrap();
    let more = charges("app1", 2, 3);
    store.charge_many(&db, &more).await.unwrap();
    all.extend(more);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    store.compact_usage(&db, "app1").await.unwrap();
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn an_abandoned_transaction_on_the_ledger_blocks_no_charge_and_no_read() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    let mut all = charges("app1", 2, 3);
    store.charge_many(&db, &all).await.unwrap();
    store.compact_usage(&db, "app1").await.unwrap();

    // A compaction cut off by a stall: its transaction holds the ledger document (the server
    // keeps it for 60 s).
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

    // Charges and reads go on at once; a compaction meanwhile conflicts and changes nothing.
    let more = charges("app1", 3, 2);
    let out = store.charge_many(&db, &more).await.unwrap();
    assert!(out.iter().all(|c| *c == Charged::Counted));
    all.extend(more);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
    assert!(store.compact_usage(&db, "app1").await.is_err());
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));

    // Once the transaction is gone, the next compaction rolls what is waiting.
    stuck.abort_transaction().await.unwrap();
    let c = store.compact_usage(&db, "app1").await.unwrap();
    assert_eq!(c.charges, 6);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}

#[tokio::test]
async fn totals_of_the_previous_ledger_shape_are_kept() {
    let servers = TestServers::start().await.unwrap();
    let store = store(&servers).await;
    let db = store.shared().clone();
    // Written by the transactional ledger: per-charge documents without `rolled`, counted in
    // the app's totals document.
    let old = charges("app1", 2, 2);
    let docs: Vec<Document> = old
        .iter()
        .map(|e| doc! { "app_id": "app1", "event_id": e.event_id.to_string(), "total_tokens": 5_i64 })
        .collect();
    db.collection::<Document>(USAGE_EVENTS)
        .insert_many(docs)
        .await
        .unwrap();
    let runs: HashSet<String> = old
        .iter()
        .filter_map(|e| match &e.event {
            Event::UsageCharged(c) => Some(c.run_id.to_string()),
            _ => None,
        })
        .collect();
    db.collection::<Document>(RUNS)
        .insert_many(
            runs.into_iter()
                .map(|r| doc! { "app_id": "app1", "run_id": r }),
        )
        .await
        .unwrap();
    let want_old = expected("app1", &old);
    db.collection::<Document>(LEDGER)
        .insert_one(doc! {
            "app_id": "app1",
            "prompt_tokens": want_old.prompt_tokens,
            "completion_tokens": want_old.completion_tokens,
            "total_tokens": want_old.total_tokens,
            "charges": want_old.charges,
            "runs": want_old.runs,
        })
        .await
        .unwrap();
    assert_eq!(store.usage("app1").await.unwrap(), want_old);
    // A redelivered old charge is a duplicate; new charges add to the old totals.
    assert_eq!(
        store.charge(&db, &old[0]).await.unwrap(),
        Charged::Duplicate
    );
    let new = charges("app1", 1, 3);
    store.charge_many(&db, &new).await.unwrap();
    store.compact_usage(&db, "app1").await.unwrap();
    let mut all = old.clone();
    all.extend(new);
    assert_eq!(store.usage("app1").await.unwrap(), expected("app1", &all));
}
