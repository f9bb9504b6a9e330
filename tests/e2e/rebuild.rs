//! `mozaiks rebuild` (issue 14, item 6): the read models it rebuilds from the log, while the
//! fleet keeps running, equal the projections the live fleet wrote — sessions, transcripts, the
//! usage ledger, the grants and the wallets (`MZ_CREDITS`) that billing computes from them; it is
//! idempotent, `--from` re-applies without dropping, and bad arguments are refused.

use std::process::Output;

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mozaiks_bus::Bus;
use serde_json::{Value, json};

use crate::fleet::*;

/// `mozaiks rebuild {args}` against the fleet's servers.
fn rebuild(fleet: &Fleet, args: &[&str]) -> Output {
    rebuild_command(fleet, args)()
}

/// A closure running `mozaiks rebuild {args}` (to run on another thread while chats go on).
fn rebuild_command(fleet: &Fleet, args: &[&str]) -> impl FnOnce() -> Output + Send + 'static {
    let dir = std::env::temp_dir().join(format!("mozaiks-rebuild-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = command(&fleet.servers, "rebuild", &dir.join("rebuild.log"));
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    move || {
        let out = cmd.output().expect("run mozaiks rebuild");
        let _ = std::fs::remove_dir_all(&dir);
        out
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every document of `coll` for `app`, without the fields that record when (not what) was
/// written, sorted.
async fn docs(db: &mongodb::Database, coll: &str, app: &str) -> Vec<String> {
    let mut out: Vec<String> = db
        .collection::<Document>(coll)
        .find(doc! {"app_id": app})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .into_iter()
        .map(|mut d| {
            for f in ["_id", "billed_at", "rolled"] {
                d.remove(f);
            }
            serde_json::to_string(&d).unwrap()
        })
        .collect();
    out.sort();
    out
}

/// The read models of `app`: sessions, messages, charges, runs (in `db`), grants (shared).
async fn snapshot(
    db: &mongodb::Database,
    shared: &mongodb::Database,
    app: &str,
) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for coll in [
        "chat_sessions",
        "chat_messages",
        "usage_events",
        "usage_runs",
    ] {
        out.push((coll.to_string(), docs(db, coll, app).await));
    }
    out.push((
        "credit_grants".into(),
        docs(shared, "credit_grants", app).await,
    ));
    out
}

/// The wallet of `app` in `MZ_CREDITS` without `updated_at` (when, not what, billing wrote).
async fn wallet(bus: &Bus, app: &str) -> Option<Value> {
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_CREDITS"))
        .await
        .unwrap();
    let bytes = kv.get(app).await.unwrap()?;
    let mut w: Value = serde_json::from_slice(&bytes).unwrap();
    w.as_object_mut().unwrap().remove("updated_at");
    Some(w)
}

/// Credits of `app`'s charges in the current period, from the ledger's documents in `db`.
async fn consumed(db: &mongodb::Database, app: &str) -> u64 {
    let period = mozaiks_store::credits::Period::containing(chrono::Utc::now()).key();
    db.collection::<Document>("usage_events")
        .find(doc! {"app_id": app, "period": &period})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| match d.get("credits") {
            Some(mongodb::bson::Bson::Int64(n)) => *n as u64,
            Some(mongodb::bson::Bson::Int32(n)) => *n as u64,
            _ => 0,
        })
        .sum()
}

/// Live billing's wallet of `app`, once it counts every charge of the ledger in `db`.
async fn settled_wallet(bus: &Bus, db: &mongodb::Database, app: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let want = consumed(db, app).await;
        let w = wallet(bus, app).await;
        if let Some(w) = w.as_ref().filter(|w| w["consumed"].as_u64() == Some(want))
            && want > 0
        {
            return w.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app}'s wallet does not count the ledger's {want} credits: {w:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Runs one chat of `app` to its end.
async fn chat(fleet: &Fleet, token: &str, app: &str, text: &str) {
    let (s, ticket) = fleet
        .post_session(
            0,
            token,
            json!({"app_id": app, "workflow_name": "hello", "message": text}),
        )
        .await;
    assert_eq!(s, 201, "{ticket}");
    let mut ws = fleet.connect(0, &ticket, 0).await;
    events_until(&mut ws, "run.completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_read_models_equal_the_live_projections() {
    let fleet = Fleet::start(1).await;
    let mongo = mongodb::Client::with_uri_str(&fleet.servers.mongo_uri)
        .await
        .unwrap();
    let shared = mongo.database(&fleet.servers.mongo_db);
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();

    // Two apps: the default one in the shared database, a business one in its own.
    let (s, biz, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(
                json!({"app_id": "biz", "name": "Biz", "tier": "business", "workflows": ["hello"]}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{biz}");
    let biz_db = mongo.database(biz["storage"]["db_name"].as_str().unwrap());
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/biz/credits",
            &root(),
            Some(json!({"amount": 500, "reason": "rebuild test", "idempotency_key": "k-1"})),
        )
        .await;
    assert!(s == 200 || s == 201, "grant: {s} {v}");

    let dee = Fleet::token("dee", "default", &["user"]);
    let bea = Fleet::token("bea", "biz", &["user"]);
    for i in 0..3 {
        chat(&fleet, &dee, "default", &format!("hello {i}")).await;
    }
    for i in 0..2 {
        chat(&fleet, &bea, "biz", &format!("hi {i}")).await;
    }

    // The live projections, once they stop changing.
    let live_default = settled(&shared, &shared, "default", 3, false).await;
    let live_biz = settled(&biz_db, &shared, "biz", 2, true).await;
    assert_eq!(live_default[0].1.len(), 3, "three sessions");
    let (_, usage_before) = fleet
        .get(0, "/api/usage/biz", &Fleet::token("bo", "biz", &["admin"]))
        .await;
    assert_nonempty(&live_biz);
    let wallet_default = settled_wallet(&bus, &shared, "default").await;
    let wallet_biz = settled_wallet(&bus, &biz_db, "biz").await;
    assert_eq!(wallet_biz["granted"], 500, "{wallet_biz}");

    // One app, from scratch: dropped, then rebuilt equal. Its wallet is made wrong first (as if
    // billing had counted nothing): the rebuild recomputes it from the rebuilt ledger and grants.
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_CREDITS"))
        .await
        .unwrap();
    let mut wrong = wallet_biz.clone();
    wrong["consumed"] = json!(0);
    wrong["balance"] = json!(wallet_biz["included"].as_i64().unwrap() + 500);
    wrong["updated_at"] = json!(chrono::Utc::now());
    kv.put("biz", serde_json::to_vec(&wrong).unwrap().into())
        .await
        .unwrap();
    assert_ne!(wallet(&bus, "biz").await.as_ref(), Some(&wallet_biz));
    let out = rebuild(&fleet, &["--app", "biz"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rebuilt 1 app(s)"), "{}", text(&out));
    assert!(!stdout.contains(" 0 document(s) dropped"), "{}", text(&out));
    assert!(stdout.contains("1 wallet(s) recomputed"), "{}", text(&out));
    assert_eq!(snapshot(&biz_db, &shared, "biz").await, live_biz);
    assert_eq!(wallet(&bus, "biz").await, Some(wallet_biz.clone()));
    let (_, usage_after) = fleet
        .get(0, "/api/usage/biz", &Fleet::token("bo", "biz", &["admin"]))
        .await;
    assert_eq!(usage_after, usage_before);
    // Progress on stderr (a line per tenth off a terminal) and the final counts.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("events: 100%")
            && stderr.contains("charges: ")
            && stderr.contains("grants: 1 applied")
            && stderr.contains("wallets: 1 applied"),
        "{}",
        text(&out)
    );

    // Every app, twice: idempotent.
    for _ in 0..2 {
        let out = rebuild(&fleet, &["--quiet"]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(snapshot(&shared, &shared, "default").await, live_default);
        assert_eq!(snapshot(&biz_db, &shared, "biz").await, live_biz);
        assert_eq!(wallet(&bus, "default").await, Some(wallet_default.clone()));
        assert_eq!(wallet(&bus, "biz").await, Some(wallet_biz.clone()));
    }

    // --from: nothing dropped, the range re-applied.
    let out = rebuild(&fleet, &["--app", "default", "--from", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" 0 document(s) dropped"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&shared, &shared, "default").await, live_default);

    // While chats run: a rebuild of every app with the fleet writing at the same time comes to
    // the same read models as a rebuild on a quiet fleet (which equals the live projections).
    let fleet_ref = &fleet;
    let busy = async {
        for i in 0..3 {
            chat(
                fleet_ref,
                &dee,
                "default",
                &format!("during the rebuild {i}"),
            )
            .await;
        }
    };
    let rebuilding = tokio::task::spawn_blocking(rebuild_command(&fleet, &[]));
    busy.await;
    let out = rebuilding.await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let during = settled(&shared, &shared, "default", 6, false).await;
    assert_eq!(during[0].1.len(), 6, "six sessions");
    let wallet_during = settled_wallet(&bus, &shared, "default").await;
    assert!(
        wallet_during["consumed"].as_u64() > wallet_default["consumed"].as_u64(),
        "{wallet_during} after {wallet_default}"
    );
    let out = rebuild(&fleet, &["--quiet"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(&shared, &shared, "default").await, during);
    assert_eq!(wallet(&bus, "default").await, Some(wallet_during));

    // Refusals: an unknown app, a sequence of 0, an id that is a subject pattern.
    for (args, want) in [
        (vec!["--app", "no-such-app"], "no app no-such-app"),
        (vec!["--from", "0"], "--from is a stream sequence"),
        (vec!["--app", "a.>"], "is not an app id"),
    ] {
        let out = rebuild(&fleet, &args);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{}",
            text(&out)
        );
    }
}

/// The read models of `app` once two snapshots 700 ms apart agree and the charges (and grants)
/// are in.
async fn settled(
    db: &mongodb::Database,
    shared: &mongodb::Database,
    app: &str,
    sessions: usize,
    grants: bool,
) -> Vec<(String, Vec<String>)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = snapshot(db, shared, app).await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let now = snapshot(db, shared, app).await;
        // The projector and billing follow the log on their own: wait for every session and
        // something in every collection, then for a sample that did not change.
        let complete = now[0].1.len() == sessions
            && now[..4].iter().all(|(_, docs)| !docs.is_empty())
            && (!grants || !now[4].1.is_empty());
        if complete && now == last {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app}'s read models do not settle: {now:?}"
        );
        last = now;
    }
}

fn assert_nonempty(snap: &[(String, Vec<String>)]) {
    for (coll, docs) in snap {
        assert!(!docs.is_empty(), "no {coll} to compare: {snap:?}");
    }
}
