//! Credits end to end (issue 11): two gateways and two workers with `MONETIZATION_ENABLED=true`;
//! an app with a small allowance runs until its credits are spent, then every replica refuses
//! new sessions, a run waiting for input ends `credits_exhausted` before its next model call, a
//! grant (idempotent on its key) restores service; billing SIGKILLed mid-stream, then two billing
//! replicas at once, still count every charge's cost exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::Event;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::{Fleet, code, events_until, next_frame, root, send_json};

const APP: &str = "metered";
const INCLUDED: u64 = 300;

/// Σ credits and the number of charges of `app_id` on the log, in the period `period` (the
/// wallet's key), and whether every charge carries its cost.
async fn credits_on_the_log(bus: &Bus, app_id: &str, period: &str) -> (u64, u64, bool) {
    // Without the namespace: `Bus::replay` applies it.
    let filter = mozaiks_events::subjects::Subjects::new("").app_charges(app_id);
    let (mut credits, mut n, mut all_costed) = (0, 0, true);
    let mut from = 1;
    loop {
        let batch = bus.replay("MZ_USAGE", &filter, from, 512).await.unwrap();
        for env in &batch.events {
            if let Event::UsageCharged(u) = &env.event {
                let key = mozaiks_store::credits::Period::containing(env.ts).key();
                if key != period {
                    continue;
                }
                all_costed &= u.credits.is_some() && u.price.is_some();
                credits += u.credits.unwrap_or(0);
                n += 1;
            }
        }
        from = batch.next;
        if batch.done {
            return (credits, n, all_costed);
        }
    }
}

/// Starts a session with a first message on gateway `gw`; `Err((status, code))` when refused,
/// else reads its run to the end and answers the frames.
async fn run_session(
    fleet: &Fleet,
    gw: usize,
    token: &str,
    workflow: &str,
    message: &str,
) -> Result<Vec<Value>, (u16, String)> {
    run_in(fleet, gw, token, APP, workflow, message).await
}

/// [`run_session`] in app `app`.
async fn run_in(
    fleet: &Fleet,
    gw: usize,
    token: &str,
    app: &str,
    workflow: &str,
    message: &str,
) -> Result<Vec<Value>, (u16, String)> {
    let (s, ticket) = fleet
        .post_session(
            gw,
            token,
            json!({"app_id": app, "workflow_name": workflow, "message": message}),
        )
        .await;
    if s != 201 {
        return Err((s, code(&ticket).to_string()));
    }
    let mut ws = fleet.connect(gw, &ticket, 0).await;
    let mut frames = Vec::new();
    loop {
        let f = next_frame(&mut ws).await;
        if f["seq"].is_null() {
            continue;
        }
        let end = matches!(
            f["type"].as_str(),
            Some("run.completed" | "run.failed" | "run.cancelled")
        );
        frames.push(f);
        if end {
            return Ok(frames);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_credits_stop_every_replica_before_the_next_model_call_and_a_grant_restores_them() {
    let fleet = Fleet::start_with(2, 2, &[("MONETIZATION_ENABLED", "true")]).await;
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({
                "app_id": APP, "name": "Metered", "tier": "starter",
                "workflows": ["hello", "support_triage"],
                "limits": {"included_credits": INCLUDED, "requests_per_minute": 100000},
            })),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let user = Fleet::token("ann", APP, &["user"]);
    let admin = Fleet::token("ada", APP, &["admin"]);
    let credits = |gw: usize| {
        let (fleet, admin) = (&fleet, admin.clone());
        async move {
            let (s, v) = fleet
                .get(gw, &format!("/api/apps/{APP}/credits"), &admin)
                .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    for gw in 0..2 {
        fleet
            .eventually("the app on every gateway", || async {
                let (s, _) = fleet.get(gw, &format!("/api/apps/{APP}"), &root()).await;
                (s == 200).then_some(())
            })
            .await;
    }
    let fresh = credits(1).await;
    assert_eq!(fresh["included"], INCLUDED);
    assert_eq!(fresh["state"], "ok");
    assert_eq!(fresh["enforced"], true);
    for k in [
        "balance",
        "included",
        "granted",
        "consumed",
        "period_start",
        "period_end",
        "overage",
        "state",
    ] {
        assert!(fresh.get(k).is_some(), "{k} missing in {fresh}");
    }

    // A run that waits for its user (support_triage's general agent asks a question) while the
    // app's credits run out elsewhere.
    let (s, waiting) = fleet
        .post_session(
            0,
            &user,
            json!({"app_id": APP, "workflow_name": "support_triage", "message": "Where is my parcel?"}),
        )
        .await;
    assert_eq!(s, 201, "{waiting}");
    let mut wws = fleet.connect(0, &waiting, 0).await;
    let asked = events_until(&mut wws, "input.requested").await;
    let request_id = asked.last().unwrap()["data"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Runs until the broker refuses: the small allowance is spent.
    let mut refused = None;
    for i in 0..80 {
        match run_session(&fleet, i % 2, &user, "hello", &format!("hello {i}")).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the allowance was never spent");
    assert_eq!(refused, (402, "credits_exhausted".to_string()));
    // Every replica refuses a new session.
    for gw in 0..2 {
        fleet
            .eventually("a refusal on every gateway", || async {
                let (s, v) = fleet
                    .post_session(
                        gw,
                        &user,
                        json!({"app_id": APP, "workflow_name": "hello", "message": "more"}),
                    )
                    .await;
                (s == 402 && code(&v) == "credits_exhausted").then_some(())
            })
            .await;
    }
    let spent = credits(1).await;
    assert_eq!(spent["state"], "exhausted", "{spent}");
    assert_eq!(spent["blocked"], true);
    assert!(spent["consumed"].as_u64().unwrap() >= INCLUDED, "{spent}");
    assert!(spent["balance"].as_i64().unwrap() <= 0, "{spent}");

    // The waiting run gets its answer: it makes no further model call and ends
    // credits_exhausted; nothing is charged after the refusal.
    send_json(
        &mut wws,
        json!({"type": "input.response", "request_id": request_id, "text": "A-300"}),
    )
    .await;
    let rest = events_until(&mut wws, "run.failed").await;
    assert_eq!(rest[0]["type"], "input.received", "{rest:#?}");
    let failed = rest.last().unwrap();
    assert_eq!(failed["data"]["code"], "credits_exhausted", "{failed}");
    for f in &rest {
        assert!(
            !matches!(
                f["type"].as_str(),
                Some("usage.charged" | "model.replied" | "agent.message")
            ),
            "a model call after the credits ran out: {rest:#?}"
        );
    }
    // A message that would start a run on the existing chat starts nothing.
    send_json(
        &mut wws,
        json!({"type": "user.message", "text": "hello?", "client_msg_id": "after-spent"}),
    )
    .await;
    let err = loop {
        let f = next_frame(&mut wws).await;
        assert!(
            f["seq"].is_null(),
            "a durable event after a refused message: {f}"
        );
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(err["data"]["code"], "credits_exhausted");

    // Bad grants' codes, an admin's grant (403) and a grant to no app (404) are checked in
    // process: crates/gateway/tests/credits.rs.
    let grant_path = format!("/api/apps/{APP}/credits");
    let ok = json!({"amount": 100000, "reason": "top-up", "idempotency_key": "order-1"});

    // A grant restores service on every replica; the same key twice grants once.
    let (s, first, _) = fleet
        .call(1, "POST", &grant_path, &root(), Some(ok.clone()))
        .await;
    assert_eq!(s, 201, "{first}");
    assert_eq!(first["replayed"], false);
    let (s, again, _) = fleet
        .call(0, "POST", &grant_path, &root(), Some(ok.clone()))
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["grant_id"], first["grant_id"]);
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            &grant_path,
            &root(),
            Some(json!({"amount": 5, "reason": "top-up", "idempotency_key": "order-1"})),
        )
        .await;
    assert_eq!((s, code(&v)), (409, "idempotency_key_reused"), "{v}");
    for gw in 0..2 {
        fleet
            .eventually("a session accepted again on every gateway", || async {
                run_session(&fleet, gw, &user, "hello", "back again")
                    .await
                    .ok()
            })
            .await;
    }
    let restored = credits(0).await;
    assert_eq!(restored["granted"], 100000, "granted once: {restored}");
    assert_eq!(restored["state"], "ok", "{restored}");

    // consumed is Σ cost over the log's charges of the period, each once.
    let period = mozaiks_store::credits::Period::containing(chrono::Utc::now()).key();
    let last = fleet
        .eventually("the wallet equal to the log", || async {
            let (on_log, n, costed) = credits_on_the_log(&bus, APP, &period).await;
            assert!(costed, "a charge without its cost on the log");
            let w = credits(1).await;
            (n > 0 && w["consumed"].as_u64() == Some(on_log)).then_some(w)
        })
        .await;
    let consumed = last["consumed"].as_i64().unwrap();
    assert_eq!(
        last["balance"].as_i64().unwrap(),
        INCLUDED as i64 + 100000 - consumed,
        "{last}"
    );
}

/// One chat's client: a message after each run's end, until `stop`. Fails (never hangs) when a
/// run does not end within [`RUN_DEADLINE`] (the gateway's pings would keep a per-frame timeout
/// from ever firing), when a run fails, or when the gateway answers a message with an error.
async fn drive(url: String, chat: usize, stop: Arc<AtomicBool>) -> u64 {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let mut done = 0;
    let mut deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "chat {chat}: run {} did not end within {RUN_DEADLINE:?}",
                    done + 1
                )
            })
            .unwrap_or_else(|| panic!("chat {chat}: socket ended after {done} runs"))
            .unwrap_or_else(|e| panic!("chat {chat}: socket error after {done} runs: {e}"));
        let Message::Text(text) = frame else { continue };
        let f: Value = serde_json::from_str(text.as_str()).unwrap();
        match f["type"].as_str() {
            Some("error" | "run.failed" | "run.cancelled") => {
                panic!("chat {chat}: after {done} runs: {f}")
            }
            Some("run.completed") => {}
            _ => continue,
        }
        done += 1;
        if stop.load(Ordering::Relaxed) {
            return done;
        }
        // Paced well under the gateway's 50 frames per second per socket: a faster client
        // gets `rate_limited` and its message is dropped (the cause of the old hang).
        tokio::time::sleep(PACE).await;
        deadline = tokio::time::Instant::now() + RUN_DEADLINE;
        send_json(
            &mut ws,
            json!({"type": "user.message", "text": format!("message {done}"),
                   "client_msg_id": format!("c{chat}-m{done}")}),
        )
        .await;
    }
}

/// The longest a driven run may take (runs of the offline model take moments).
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// The pause between a run's end and the next message.
const PACE: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_killed_mid_stream_counts_each_charges_cost_exactly_once() {
    let mut fleet = Fleet::start(1).await;
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();
    let user = Fleet::token("kim", "default", &["user"]);
    let admin = Fleet::token("ops", "default", &["admin"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = Vec::new();
    for chat in 0..4 {
        let ticket = fleet
            .session(0, &user, "hello", Some(&format!("chat {chat}")))
            .await;
        drivers.push(tokio::spawn(drive(
            fleet.ws_url(0, &ticket, 0),
            chat,
            stop.clone(),
        )));
    }
    async fn credits(fleet: &Fleet, admin: &str) -> Option<Value> {
        let (s, v) = fleet.get(0, "/api/apps/default/credits", admin).await;
        (s == 200).then_some(v)
    }
    fleet
        .eventually("charges in the wallet", || async {
            credits(&fleet, &admin)
                .await
                .filter(|v| v["consumed"].as_u64() > Some(0))
        })
        .await;
    // SIGKILL billing while charges stream in, then start another.
    let billing = fleet
        .procs
        .iter()
        .position(|p| p.role == "billing")
        .unwrap();
    fleet.procs[billing].child.kill().unwrap();
    let _ = fleet.procs[billing].child.wait();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Two billing replicas at once from here on: both write ledgers and wallets.
    fleet.spawn("billing", None);
    fleet.spawn("billing", None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        assert!(d.await.unwrap() > 0);
    }
    let period = mozaiks_store::credits::Period::containing(chrono::Utc::now()).key();
    let (on_log, n, costed) = credits_on_the_log(&bus, "default", &period).await;
    assert!(costed && n > 0, "{n} charges, all costed: {costed}");
    // Charges the killed billing had fetched and not acknowledged come back after the billing
    // consumer's ack_wait (30 s, streams/consumers/billing.json): wait longer than that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let wallet = credits(&fleet, &admin).await;
        let consumed = wallet.as_ref().and_then(|v| v["consumed"].as_u64());
        if consumed == Some(on_log) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumed {consumed:?} != Σ cost {on_log} over the log's {n} charges after 60 s: \
             {wallet:?}; logs:\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates `app` (tier starter, `hello` only) with `limits` on top of a high request rate, and
/// waits until every gateway knows it.
async fn create_app(fleet: &Fleet, app: &str, limits: Value) {
    let mut l = json!({"requests_per_minute": 100000});
    l.as_object_mut()
        .unwrap()
        .extend(limits.as_object().unwrap().clone());
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": app, "name": app, "tier": "starter",
                        "workflows": ["hello"], "limits": l})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for gw in 0..fleet.gateways.len() {
        fleet
            .eventually("the app on every gateway", || async {
                let (s, _) = fleet.get(gw, &format!("/api/apps/{app}"), &root()).await;
                (s == 200).then_some(())
            })
            .await;
    }
}

/// Runs `hello` sessions of `user` in `app` until one is refused (at most `max`); answers the
/// refusal and how many runs completed.
async fn run_until_refused(
    fleet: &Fleet,
    user: &str,
    app: &str,
    max: usize,
) -> ((u16, String), usize) {
    for i in 0..max {
        match run_in(
            fleet,
            i % fleet.gateways.len(),
            user,
            app,
            "hello",
            &format!("hi {i}"),
        )
        .await
        {
            // A session the broker accepted before the exhausting charge's wallet reached it
            // ends at its first model call instead; the next one is refused.
            Ok(frames) => {
                let last = frames.last().unwrap();
                let refused_late = last["type"] == "run.failed"
                    && matches!(
                        last["data"]["code"].as_str(),
                        Some("credits_exhausted" | "user_budget_exhausted")
                    );
                assert!(
                    last["type"] == "run.completed" || refused_late,
                    "{frames:#?}"
                );
            }
            Err(e) => return (e, i),
        }
    }
    panic!("{app}: never refused after {max} runs");
}

/// The alerts on `mz.billing.alert.{app}`: how many, the first and the last.
async fn alerts(bus: &Bus, app: &str) -> (usize, Option<Value>, Option<Value>) {
    let subject = bus.subjects().billing_alert(app);
    let stream = bus
        .jetstream()
        .get_stream(bus.subjects().name("MZ_BILLING"))
        .await
        .unwrap();
    let mut counts = stream.info_with_subjects(subject.clone()).await.unwrap();
    let mut n = 0;
    while let Some(item) = counts.next().await {
        let (s, count) = item.unwrap();
        if s == subject {
            n = count;
        }
    }
    if n == 0 {
        return (0, None, None);
    }
    let parse = |m: async_nats::jetstream::message::StreamMessage| {
        serde_json::from_slice::<Value>(&m.payload).unwrap()
    };
    let first = parse(
        stream
            .direct_get_first_for_subject(subject.clone())
            .await
            .unwrap(),
    );
    let last = parse(stream.direct_get_last_for_subject(subject).await.unwrap());
    (n, Some(first), Some(last))
}

/// Reads a socket's frames in the background until a `notification` whose data is
/// `{"marker": marker}`; answers the data of the notifications before it.
fn notifications_until(
    mut ws: crate::fleet::Ws,
    marker: &'static str,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(msg) = ws.next().await {
            let Ok(Message::Text(t)) = msg else {
                assert!(msg.is_ok(), "socket error: {msg:?}");
                continue;
            };
            let f: Value = serde_json::from_str(t.as_str()).unwrap();
            if f["type"] != "notification" {
                continue;
            }
            assert!(f["seq"].is_null(), "{f}");
            if f["data"]["marker"] == marker {
                return got;
            }
            got.push(f["data"].clone());
        }
        panic!("socket ended before the marker: {got:?}");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_allow_per_user_budgets_and_alerts_once_per_threshold() {
    let fleet = Fleet::start_with(2, 1, &[("MONETIZATION_ENABLED", "true")]).await;
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();

    // Overage allow: runs go on past the balance, reported as overage, up to the limit.
    let app = "overage";
    create_app(
        &fleet,
        app,
        json!({"included_credits": 200, "overage": "allow", "overage_limit": 300}),
    )
    .await;
    let admin = Fleet::token("ada", app, &["admin"]);
    let user = Fleet::token("ann", app, &["user"]);
    // Two admins, each with a socket on another gateway, and a user's socket: the alerts reach
    // the admins' sockets as notification frames, once per threshold, and not the user's.
    let alan = Fleet::token("alan", app, &["admin"]);
    let mut watchers = Vec::new();
    for (gw, token) in [(0, &admin), (1, &alan), (1, &user)] {
        let (s, ticket) = fleet
            .post_session(gw, token, json!({"app_id": app, "workflow_name": "hello"}))
            .await;
        assert_eq!(s, 201, "{ticket}");
        let ws = fleet.connect(gw, &ticket, 0).await;
        watchers.push(notifications_until(ws, "end"));
    }
    // Both admins are recorded in MZ_ADMINS (which every gateway follows) before any credit is
    // spent; the user is not.
    let admins_kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_ADMINS"))
        .await
        .unwrap();
    fleet
        .eventually("both admins in MZ_ADMINS", || async {
            let mut keys: Vec<String> = admins_kv
                .keys()
                .await
                .ok()?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            keys.sort();
            // {app}.{hex(user_id)}: "ada" and "alan".
            (keys == [format!("{app}.616461"), format!("{app}.616c616e")]).then_some(())
        })
        .await;
    let (refusal, runs) = run_until_refused(&fleet, &user, app, 200).await;
    assert_eq!(refusal, (402, "credits_exhausted".to_string()));
    let w = fleet
        .eventually("the exhausted wallet", || async {
            let (s, v) = fleet
                .get(1, &format!("/api/apps/{app}/credits"), &admin)
                .await;
            (s == 200 && v["state"] == "exhausted").then_some(v)
        })
        .await;
    assert_eq!(w["overage_policy"], "allow", "{w}");
    assert!(w["overage"].as_u64().unwrap() >= 300, "{w}");
    assert!(w["consumed"].as_u64().unwrap() >= 500, "{w}");
    assert!(w["balance"].as_i64().unwrap() <= -300, "{w}");
    assert!(runs > 0);
    // Each threshold alerted once: credits.low (80 %) then credits.exhausted (100 %).
    let (n, first, last) = fleet
        .eventually("both alerts", || async {
            let a = alerts(&bus, app).await;
            (a.0 >= 2).then_some(a)
        })
        .await;
    assert_eq!(n, 2, "one alert per threshold: {first:?} {last:?}");
    let (first, last) = (first.unwrap(), last.unwrap());
    assert_eq!(first["type"], "credits.low", "{first}");
    assert_eq!(last["type"], "credits.exhausted", "{last}");
    assert_eq!(last["app_id"], app);
    // Once both alerts are on the log, a marker notification to the whole app ends the watch;
    // each admin socket got each alert once, in order, and the user's socket none.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/notify",
            &admin,
            Some(json!({"data": {"marker": "end"}})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let mut got = Vec::new();
    for w in watchers {
        got.push(
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for (who, notes) in [("ada", &got[0]), ("alan", &got[1])] {
        let kinds: Vec<&str> = notes.iter().filter_map(|n| n["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["credits.low", "credits.exhausted"],
            "{who}: {notes:?}"
        );
        for n in notes.iter() {
            assert_eq!(n["app_id"], app, "{n}");
            assert_eq!(n["period"], first["period"], "{n}");
        }
        assert_eq!(notes[1]["consumed"], last["consumed"], "{who}: {notes:?}");
        assert_eq!(notes[1]["balance"], last["balance"], "{who}: {notes:?}");
    }
    assert!(got[2].is_empty(), "the user's socket: {:?}", got[2]);

    // A per-user daily budget: ann is refused, bob is not.
    let app = "budgeted";
    create_app(
        &fleet,
        app,
        json!({"included_credits": 1000000, "user_daily_credits": 150}),
    )
    .await;
    let ann = Fleet::token("ann", app, &["user"]);
    let bob = Fleet::token("bob", app, &["user"]);
    let (refusal, _) = run_until_refused(&fleet, &ann, app, 200).await;
    assert_eq!(refusal, (402, "user_budget_exhausted".to_string()));
    for gw in 0..2 {
        fleet
            .eventually("ann refused on every gateway", || async {
                let (s, v) = fleet
                    .post_session(
                        gw,
                        &ann,
                        json!({"app_id": app, "workflow_name": "hello", "message": "more"}),
                    )
                    .await;
                (s == 402 && code(&v) == "user_budget_exhausted").then_some(())
            })
            .await;
        let done = run_in(&fleet, gw, &bob, app, "hello", "bob is fine")
            .await
            .unwrap_or_else(|e| panic!("bob refused: {e:?}"));
        assert_eq!(done.last().unwrap()["type"], "run.completed");
    }
    let budget_admin = Fleet::token("ada", app, &["admin"]);
    let (s, w) = fleet
        .get(0, &format!("/api/apps/{app}/credits"), &budget_admin)
        .await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(w["state"], "ok", "the app itself is fine: {w}");
    assert_eq!(alerts(&bus, app).await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_period_restores_included_credits() {
    const PERIOD: u64 = 15;
    let fleet = Fleet::start_with(
        1,
        1,
        &[
            ("MONETIZATION_ENABLED", "true"),
            ("MOZAIKS_CREDITS_PERIOD_SECONDS", "15"),
        ],
    )
    .await;
    let app = "monthly";
    create_app(&fleet, app, json!({"included_credits": 150})).await;
    let admin = Fleet::token("ada", app, &["admin"]);
    let user = Fleet::token("ann", app, &["user"]);
    let wallet = || async {
        let (s, v) = fleet
            .get(0, &format!("/api/apps/{app}/credits"), &admin)
            .await;
        assert_eq!(s, 200, "{v}");
        v
    };
    // Spend the period's credits, from the start of a period (so that it does not end between
    // the refusal and the wallet's read).
    let w = wallet().await;
    let end = chrono::DateTime::parse_from_rfc3339(w["period_end"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let left = (end - chrono::Utc::now()).to_std().unwrap_or_default();
    if left < Duration::from_secs(10) {
        tokio::time::sleep(left + Duration::from_millis(300)).await;
    }
    let (refusal, _) = run_until_refused(&fleet, &user, app, 200).await;
    assert_eq!(refusal, (402, "credits_exhausted".to_string()));
    let spent = fleet
        .eventually("the exhausted wallet", || async {
            let w = wallet().await;
            (w["state"] == "exhausted").then_some(w)
        })
        .await;
    let end = chrono::DateTime::parse_from_rfc3339(spent["period_end"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let start = chrono::DateTime::parse_from_rfc3339(spent["period_start"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!((end - start).num_seconds(), PERIOD as i64, "{spent}");
    // The next period: included credits again (not rolled over), and sessions accepted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2 * PERIOD + 20);
    let fresh = loop {
        let w = wallet().await;
        if w["period_start"] != spent["period_start"] && w["state"] == "ok" {
            break w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new period after {} s: {w}; logs:\n{}",
            2 * PERIOD + 20,
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(fresh["included"], 150, "{fresh}");
    assert!(fresh["consumed"].as_u64().unwrap() < 150, "{fresh}");
    fleet
        .eventually("a session accepted in the new period", || async {
            run_in(&fleet, 0, &user, app, "hello", "new period")
                .await
                .ok()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_grouped_and_exported_as_csv_and_cloudevents_equal_the_log() {
    let fleet = Fleet::start(1).await;
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();
    let admin = Fleet::token("ada", "default", &["admin"]);
    for (user, runs) in [("ann", 3), ("bob", 2)] {
        let token = Fleet::token(user, "default", &["user"]);
        for i in 0..runs {
            let frames = run_in(&fleet, 0, &token, "default", "hello", &format!("hi {i}"))
                .await
                .unwrap();
            assert_eq!(frames.last().unwrap()["type"], "run.completed");
        }
    }
    let period = mozaiks_store::credits::Period::containing(chrono::Utc::now()).key();
    let (on_log, n, _) = credits_on_the_log(&bus, "default", &period).await;
    assert!(n >= 5, "{n} charges");
    let by_user = fleet
        .eventually("every charge in the ledger", || async {
            let (s, v) = fleet
                .get(0, "/api/usage/default?group_by=user", &admin)
                .await;
            assert_eq!(s, 200, "{v}");
            let credits: u64 = v["groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["credits"].as_u64().unwrap())
                .sum();
            (credits == on_log).then_some(v)
        })
        .await;
    let groups = by_user["groups"].as_array().unwrap();
    let keys: Vec<&str> = groups.iter().map(|g| g["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["ann", "bob"], "{by_user}");
    assert_eq!(groups[0]["runs"], 3, "{by_user}");
    assert_eq!(groups[1]["runs"], 2, "{by_user}");
    assert!(by_user["storage_bytes"].as_u64().unwrap() > 0, "{by_user}");
    for by in ["workflow", "model", "day"] {
        let (s, v) = fleet
            .get(0, &format!("/api/usage/default?group_by={by}"), &admin)
            .await;
        assert_eq!(s, 200, "{v}");
        let credits: u64 = v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["credits"].as_u64().unwrap())
            .sum();
        assert_eq!(credits, on_log, "{by}: {v}");
    }
    // A range that ends before the charges has none.
    let (s, v) = fleet
        .get(
            0,
            "/api/usage/default?group_by=day&from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z",
            &admin,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["groups"], json!([]), "{v}");

    // The exports: one line per charge of the log, with its event id.
    let base = &fleet.gateways[0];
    let export = |format: &str| {
        let url = format!("{base}/api/usage/default/export?format={format}");
        let (http, admin) = (fleet.http.clone(), admin.clone());
        async move {
            let r = http.get(url).bearer_auth(admin).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            (ct, r.text().await.unwrap())
        }
    };
    let (ct, csv) = export("csv").await;
    assert!(ct.starts_with("text/csv"), "{ct}");
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("event_id,ts,app_id"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len() as u64, n, "{csv}");
    let csv_credits: u64 = rows
        .iter()
        .map(|r| r.rsplit(',').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(csv_credits, on_log);
    let (_, lines) = export("cloudevents").await;
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len() as u64, n);
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| {
            assert_eq!(e["specversion"], "1.0");
            assert_eq!(e["type"], "mozaiks.usage.charged");
            e["id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, n, "every event id once");
    let batch = bus
        .replay("MZ_USAGE", "mz.evt.default.*.usage.charged", 1, 512)
        .await
        .unwrap();
    let mut log_ids: Vec<String> = batch
        .events
        .iter()
        .map(|e| e.event_id.to_string())
        .collect();
    log_ids.sort();
    assert_eq!(ids, log_ids);

    // Bad queries' codes are checked in process: crates/gateway/tests/credits.rs.
}

/// Issue 15, item 6: plugin executions count in the app's usage, next to its charges:
/// `GET /api/usage/{app_id}` counts them per plugin, `group_by=plugin` gives executions, failures,
/// fuel and time per plugin in `[from, to)`, and the export lists them (`kind=plugins`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_executions_count_in_the_apps_usage_and_export() {
    let fleet = Fleet::start(2).await;
    let app = "plugged";
    create_app(&fleet, app, json!({})).await;
    let ann = Fleet::token("ann", app, &["user"]);
    let admin = Fleet::token("ada", app, &["admin"]);
    let before = chrono::Utc::now();
    for i in 0..3 {
        let (s, v, _) = fleet
            .call(
                i % 2,
                "POST",
                "/api/execute/echo",
                &ann,
                Some(json!({"n": i})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let usage = fleet
        .eventually("the executions in the usage", || async {
            let (s, v) = fleet.get(1, &format!("/api/usage/{app}"), &admin).await;
            assert_eq!(s, 200, "{v}");
            (v["plugins"]["executions"] == 3).then_some(v)
        })
        .await;
    assert_eq!(usage["plugins"]["by_plugin"], json!({"echo": 3}), "{usage}");
    assert_eq!(usage["plugins"]["window_days"], 30, "{usage}");
    // The charges' totals are still there (no model call: zero).
    assert_eq!(usage["charges"], 0, "{usage}");

    let grouped = |query: String| {
        let (fleet, admin) = (&fleet, admin.clone());
        async move {
            let (s, v) = fleet
                .get(0, &format!("/api/usage/{app}?{query}"), &admin)
                .await;
            assert_eq!(s, 200, "{query}: {v}");
            v
        }
    };
    let v = grouped("group_by=plugin".into()).await;
    assert_eq!(v["group_by"], "plugin", "{v}");
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{v}");
    assert_eq!(groups[0]["key"], "echo");
    assert_eq!(groups[0]["executions"], 3);
    assert_eq!(groups[0]["failed"], 0);
    assert!(groups[0]["fuel_used"].as_u64().unwrap() > 0, "{v}");
    assert!(groups[0]["duration_ms"].as_f64().unwrap() > 0.0, "{v}");
    // [from, to): a range after the executions, or before them, holds none.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let v = grouped(format!("group_by=plugin&from={}", urlencode(&later))).await;
    assert_eq!(v["groups"], json!([]), "{v}");
    let earlier = (before - chrono::Duration::hours(1)).to_rfc3339();
    let v = grouped(format!(
        "group_by=plugin&from={}&to={}",
        urlencode(&earlier),
        urlencode(&before.to_rfc3339())
    ))
    .await;
    assert_eq!(v["groups"], json!([]), "{v}");

    // The export: CSV with its own columns, CloudEvents with the execution's event id as id.
    let export = |query: &str| {
        let url = format!("{}/api/usage/{app}/export?{query}", fleet.gateways[1]);
        let (http, admin) = (fleet.http.clone(), admin.clone());
        async move {
            let r = http.get(url).bearer_auth(admin).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (s, csv) = export("format=csv&kind=plugins").await;
    assert_eq!(s, 200, "{csv}");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "event_id,ts,app_id,plugin,version,user_id,chat_id,outcome,fuel_used,duration_ms"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().all(|r| r.contains(",plugged,echo,")), "{csv}");
    let (s, ce) = export("format=cloudevents&kind=plugins").await;
    assert_eq!(s, 200, "{ce}");
    let events: Vec<Value> = ce
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{ce}");
    let ids: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "distinct ids: {ce}");
    for e in &events {
        assert_eq!(e["type"], "mozaiks.plugin.executed", "{e}");
        assert_eq!(e["data"]["plugin"], "echo", "{e}");
        assert_eq!(e["data"]["user_id"], "ann", "{e}");
    }
    // The charges' export is unchanged (the default kind): a header and no charge.
    let (s, csv) = export("format=csv").await;
    assert_eq!(s, 200, "{csv}");
    assert_eq!(csv.lines().count(), 1, "{csv}");

    // Bad parameters get stable codes.
    for (query, want) in [
        ("format=csv&kind=tools", "invalid_kind"),
        ("format=csv&kind=plugins&group_by=plugin", "unknown_field"),
    ] {
        let (s, body) = export(query).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((s, code(&v)), (422, want), "{query}: {v}");
    }
    let (s, v) = fleet
        .get(0, &format!("/api/usage/{app}?group_by=plugins"), &admin)
        .await;
    assert_eq!((s, code(&v)), (422, "invalid_group_by"), "{v}");
    // Only the app's admins: its user is refused.
    let (s, v) = fleet
        .get(0, &format!("/api/usage/{app}?group_by=plugin"), &ann)
        .await;
    assert_eq!((s, code(&v)), (403, "admin_required"), "{v}");
}

/// `+` and `:` of an RFC 3339 time, escaped for a query string.
fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
