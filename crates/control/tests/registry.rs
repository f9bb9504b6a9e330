//! The app aggregate driven over a real NATS server: the control log, the view, replicas,
//! concurrency and reconciliation.

use std::time::{Duration, Instant};

use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_control::{
    AppCommand, AppPatch, AppRecord, AppStatus, Error, Limits, Registry, Rejection,
};
use mozaiks_testkit::TestServers;

async fn bus(servers: &TestServers, name: &str) -> Bus {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, name)
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    bus
}

fn create(tier: &str) -> AppCommand {
    AppCommand::Create {
        name: "Acme".into(),
        tier: tier.into(),
        workflows: None,
        limits: Limits::default(),
        runtime_url: None,
        storage: None,
    }
}

fn rpm(n: u32) -> AppCommand {
    AppCommand::Patch(AppPatch {
        limits: Some(Limits {
            requests_per_minute: Some(n),
            ..Default::default()
        }),
        ..Default::default()
    })
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn types(log: &[(AppRecord, u64)]) -> Vec<&'static str> {
    log.iter().map(|(r, _)| r.event.type_name()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_logged_and_views_reach_another_replica() {
    let servers = TestServers::start_nats().await.unwrap();
    let a = Registry::open(&bus(&servers, "a").await).await.unwrap();
    let b = Registry::open(&bus(&servers, "b").await).await.unwrap();

    let app = a
        .execute("acme", &create("starter"), "root", None)
        .await
        .unwrap();
    assert_eq!(app.tier, "starter");
    assert!(app.version > 0);
    let app = a.execute("acme", &rpm(7), "root", None).await.unwrap();
    assert_eq!(app.limits.requests_per_minute, Some(7));
    assert_eq!(a.effective_limits(&app).requests_per_minute, 7);

    // The other replica learns the change from the bucket, without a restart.
    let seen = eventually("the patch on replica b", || {
        b.get("acme")
            .filter(|x| x.limits.requests_per_minute == Some(7))
    })
    .await;
    assert_eq!(seen.version, app.version);

    let log = a.read_log("acme").await.unwrap();
    assert_eq!(types(&log), ["app.created", "app.limits_changed"]);
    assert_eq!(
        log[1].1, app.version,
        "the view's version is its last event's sequence"
    );
    assert_eq!(log[1].0.actor, "root");

    // A change to nothing appends nothing.
    let same = a.execute("acme", &rpm(7), "root", None).await.unwrap();
    assert_eq!(same.version, app.version);
    assert_eq!(a.read_log("acme").await.unwrap().len(), 2);

    // Rejections carry their kind, and append nothing.
    let err = b
        .execute("acme", &create("starter"), "root", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(Rejection::AppExists)),
        "{err}"
    );
    let err = b
        .execute(
            "acme",
            &AppCommand::Patch(AppPatch {
                tier: Some("platinum".into()),
                ..Default::default()
            }),
            "root",
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(Rejection::UnknownTier(_))),
        "{err}"
    );
    let err = b
        .execute(
            "acme",
            &AppCommand::Patch(AppPatch {
                workflows: Some(Some(vec!["ghost".into()])),
                ..Default::default()
            }),
            "root",
            Some(&["hello".to_string()]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(Rejection::UnknownWorkflow(_))),
        "{err}"
    );
    let err = b
        .execute("nobody", &rpm(3), "root", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(Rejection::AppNotFound)),
        "{err}"
    );
    assert_eq!(a.read_log("acme").await.unwrap().len(), 2);

    // Delete: the view stays, marked deleted, and the id is not reusable.
    let gone = b
        .execute("acme", &AppCommand::Delete, "root", None)
        .await
        .unwrap();
    assert_eq!(gone.status, AppStatus::Deleted);
    eventually("the deletion on replica a", || {
        a.get("acme").filter(|x| x.is_deleted())
    })
    .await;
    let err = a
        .execute("acme", &create("starter"), "root", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected(Rejection::AppExists)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_serialized_by_the_log() {
    let servers = TestServers::start_nats().await.unwrap();
    let a = Registry::open(&bus(&servers, "a").await).await.unwrap();
    let b = Registry::open(&bus(&servers, "b").await).await.unwrap();

    // Two replicas create the same app at once: exactly one wins.
    let (ca, cb) = (create("starter"), create("business"));
    let (x, y) = tokio::join!(
        a.execute("race", &ca, "a", None),
        b.execute("race", &cb, "b", None)
    );
    assert_eq!(
        [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{x:?} {y:?}"
    );
    let loser = if x.is_ok() { y } else { x };
    assert!(matches!(loser, Err(Error::Rejected(Rejection::AppExists))));

    // Twenty patches of different fields from both replicas at once: every one lands, each
    // decided against the state it was appended after.
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            a.execute("race", &rpm(100 + i), "a", None).await.unwrap();
        }));
        tasks.push(tokio::spawn(async move {
            b.execute(
                "race",
                &AppCommand::Patch(AppPatch {
                    name: Some(format!("name {i}")),
                    ..Default::default()
                }),
                "b",
                None,
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = a.read_log("race").await.unwrap();
    assert_eq!(
        types(&log).iter().filter(|t| **t == "app.renamed").count(),
        10
    );
    assert_eq!(
        types(&log)
            .iter()
            .filter(|t| **t == "app.limits_changed")
            .count(),
        10
    );
    // The bucket converges on the fold of the log.
    let head = log.last().unwrap().1;
    let view = eventually("the final view", || {
        b.get("race").filter(|v| v.version == head)
    })
    .await;
    let folded = mozaiks_control::aggregate::fold(log.iter().map(|(r, s)| (r, *s))).unwrap();
    assert_eq!(*view, folded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_behind_the_log_is_repaired() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = bus(&servers, "a").await;
    let reg = Registry::open(&bus).await.unwrap();
    let app = reg
        .execute("acme", &create("starter"), "root", None)
        .await
        .unwrap();

    // A process appends an event and dies before writing the view.
    let crash = |rec: AppRecord, expected: u64| {
        let bus = bus.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected.to_string().as_str(),
            );
            let subject = bus.subjects().app_log("acme");
            bus.jetstream()
                .publish_with_headers(subject, headers, serde_json::to_vec(&rec).unwrap().into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    let seq = crash(
        AppRecord::new(
            "acme",
            "ghost",
            mozaiks_control::AppEvent::TierChanged {
                tier: "business".into(),
            },
        ),
        app.version,
    )
    .await;
    // The reconcile loop rewrites it from the log. The registry's own background loop (its first
    // pass starts with `open`) may get there first on a slow machine, so the view is checked, not
    // which of the two passes repaired it.
    assert!(reg.reconcile().await.unwrap() <= 1);
    let view = reg.read_through("acme").await.unwrap().unwrap();
    assert_eq!((view.tier.as_str(), view.version), ("business", seq));
    assert_eq!(reg.reconcile().await.unwrap(), 0, "nothing left to repair");

    // Again, but this time the next command finds out: its append expects the stale version,
    // is refused, and the command is decided again on the fold of the log.
    let seq = crash(
        AppRecord::new(
            "acme",
            "ghost",
            mozaiks_control::AppEvent::Renamed {
                name: "Acme Renamed".into(),
            },
        ),
        seq,
    )
    .await;
    let after = reg.execute("acme", &rpm(9), "root", None).await.unwrap();
    assert_eq!(after.name, "Acme Renamed");
    assert_eq!(after.limits.requests_per_minute, Some(9));
    assert!(after.version > seq);
    let view = reg.read_through("acme").await.unwrap().unwrap();
    assert_eq!(*view, *after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_app_is_idempotent_and_adopts_views_older_than_the_log() {
    let servers = TestServers::start_nats().await.unwrap();
    let bus = bus(&servers, "a").await;
    let reg = Registry::open(&bus).await.unwrap();
    let (x, y) = tokio::join!(
        reg.ensure_app("default", "Default app", "starter"),
        reg.ensure_app("default", "Default app", "starter")
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.version, y.version);
    assert!(x.workflows.is_none(), "every workflow allowed");
    assert_eq!(
        x.limits,
        reg.tiers().default_app_limits,
        "the default app gets the tiers file's overrides"
    );
    assert_eq!(
        types(&reg.read_log("default").await.unwrap()),
        ["app.created"]
    );

    // A view written before the control log existed (version 0) is adopted on its first change.
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_APPS"))
        .await
        .unwrap();
    let legacy = serde_json::json!({
        "app_id": "old", "name": "Old", "tier": "business", "status": "suspended",
        "workflows": ["hello"], "limits": {"max_websockets": 3}, "context": {"k": "v"},
        "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z"
    });
    kv.put("old", serde_json::to_vec(&legacy).unwrap().into())
        .await
        .unwrap();
    let same = reg.ensure_app("old", "ignored", "starter").await.unwrap();
    assert_eq!((same.name.as_str(), same.version), ("Old", 0));
    let app = reg.execute("old", &rpm(5), "root", None).await.unwrap();
    assert_eq!(
        types(&reg.read_log("old").await.unwrap()),
        ["app.created", "app.suspended", "app.limits_changed"]
    );
    assert_eq!(
        app.status,
        AppStatus::Suspended,
        "adoption keeps the status"
    );
    assert_eq!(app.tier, "business");
    assert_eq!(app.workflows.as_deref(), Some(&["hello".to_string()][..]));
    assert_eq!(app.context["k"], "v");
    assert_eq!(app.limits.requests_per_minute, Some(5));
}
