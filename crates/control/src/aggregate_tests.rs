//! Given events, when a command, then events (or a refusal).

use super::*;
use crate::tiers::{EMBEDDED, Tiers};

fn tiers() -> Tiers {
    Tiers::parse("embedded", EMBEDDED).unwrap()
}

fn shipped() -> Vec<String> {
    vec!["hello".into(), "triage_handoff".into()]
}

/// Folds `given` (stream sequences 1, 2, ...) and handles `when`.
fn given_when(given: &[AppEvent], when: AppCommand) -> Result<Vec<AppEvent>, Rejection> {
    let records: Vec<AppRecord> = given
        .iter()
        .map(|e| AppRecord::new("acme", "test", e.clone()))
        .collect();
    let state = fold(records.iter().zip(1..));
    let t = tiers();
    let w = shipped();
    let known = Known {
        tiers: &t,
        workflows: Some(&w),
    };
    handle(state.as_ref(), &when, &known)
}

fn created() -> AppEvent {
    AppEvent::Created {
        name: "Acme".into(),
        tier: "starter".into(),
        workflows: None,
        limits: Limits::default(),
        context: Map::new(),
        runtime_url: None,
        storage: None,
    }
}

fn create(tier: &str) -> AppCommand {
    AppCommand::Create {
        name: " Acme ".into(),
        tier: tier.into(),
        workflows: Some(vec!["hello".into(), "hello".into()]),
        limits: Limits::default(),
        runtime_url: None,
        storage: None,
    }
}

fn patch(p: AppPatch) -> AppCommand {
    AppCommand::Patch(p)
}

#[test]
fn create_a_new_app() {
    let events = given_when(&[], create("business")).unwrap();
    assert_eq!(
        events,
        vec![AppEvent::Created {
            name: "Acme".into(),
            tier: "business".into(),
            workflows: Some(vec!["hello".into()]),
            limits: Limits::default(),
            context: Map::new(),
            runtime_url: None,
            storage: None,
        }]
    );
}

#[test]
fn create_refusals() {
    assert_eq!(
        given_when(&[created()], create("starter")),
        Err(Rejection::AppExists)
    );
    assert_eq!(
        given_when(&[created(), AppEvent::Deleted {}], create("starter")),
        Err(Rejection::AppExists),
        "a deleted app's id stays taken"
    );
    assert_eq!(
        given_when(&[], create("platinum")),
        Err(Rejection::UnknownTier("platinum".into()))
    );
    let mut c = create("starter");
    if let AppCommand::Create { workflows, .. } = &mut c {
        *workflows = Some(vec!["nope".into()]);
    }
    assert_eq!(
        given_when(&[], c),
        Err(Rejection::UnknownWorkflow("nope".into()))
    );
    let mut c = create("starter");
    if let AppCommand::Create { name, .. } = &mut c {
        *name = "   ".into();
    }
    assert_eq!(given_when(&[], c).unwrap_err().code(), "invalid_name");
    let mut c = create("starter");
    if let AppCommand::Create { runtime_url, .. } = &mut c {
        *runtime_url = Some("wss://acme.example.com".into());
    }
    assert_eq!(
        given_when(&[], c).unwrap_err().code(),
        "invalid_runtime_url",
        "a shared tier has no runtime_url"
    );
}

#[test]
fn patch_emits_one_event_per_change_and_nothing_for_no_change() {
    let events = given_when(
        &[created()],
        patch(AppPatch {
            name: Some("Acme Inc".into()),
            tier: Some("dedicated".into()),
            limits: Some(Limits {
                requests_per_minute: Some(5),
                ..Default::default()
            }),
            workflows: Some(Some(vec!["hello".into()])),
            context: Some(
                serde_json::json!({"brand": "acme"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            runtime_url: Some(Some("wss://acme.example.com".into())),
            status: Some(AppStatus::Suspended),
        }),
    )
    .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.type_name()).collect();
    assert_eq!(
        types,
        [
            "app.renamed",
            "app.tier_changed",
            "app.limits_changed",
            "app.workflows_changed",
            "app.context_changed",
            "app.runtime_changed",
            "app.suspended"
        ]
    );
    let same = given_when(
        &[created()],
        patch(AppPatch {
            name: Some("Acme".into()),
            tier: Some("starter".into()),
            status: Some(AppStatus::Active),
            workflows: Some(None),
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(same.is_empty(), "{same:?}");
}

#[test]
fn patch_refusals() {
    let cases: Vec<(Vec<AppEvent>, AppPatch, &str)> = vec![
        (vec![], AppPatch::default(), "app_not_found"),
        (
            vec![created(), AppEvent::Deleted {}],
            AppPatch::default(),
            "app_not_found",
        ),
        (
            vec![created()],
            AppPatch {
                tier: Some("gold".into()),
                ..Default::default()
            },
            "unknown_tier",
        ),
        (
            vec![created()],
            AppPatch {
                workflows: Some(Some(vec!["hello".into(), "ghost".into()])),
                ..Default::default()
            },
            "unknown_workflow",
        ),
        (
            vec![created()],
            AppPatch {
                limits: Some(Limits {
                    max_websockets: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "invalid_limits",
        ),
        (
            vec![created()],
            AppPatch {
                status: Some(AppStatus::Deleted),
                ..Default::default()
            },
            "invalid_status",
        ),
        (
            vec![created()],
            AppPatch {
                context: Some(
                    serde_json::json!({"big": "x".repeat(MAX_CONTEXT_BYTES)})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
                ..Default::default()
            },
            "invalid_context",
        ),
        (
            vec![
                created(),
                AppEvent::TierChanged {
                    tier: "dedicated".into(),
                },
            ],
            AppPatch {
                runtime_url: Some(Some("https://not-a-websocket".into())),
                ..Default::default()
            },
            "invalid_runtime_url",
        ),
        (
            // Moving a dedicated app with a runtime_url to a shared tier must drop the URL too.
            vec![
                created(),
                AppEvent::TierChanged {
                    tier: "dedicated".into(),
                },
                AppEvent::RuntimeChanged {
                    runtime_url: Some("wss://acme.example.com".into()),
                },
            ],
            AppPatch {
                tier: Some("starter".into()),
                ..Default::default()
            },
            "invalid_runtime_url",
        ),
    ];
    for (given, p, want) in cases {
        let err = given_when(&given, patch(p.clone())).unwrap_err();
        assert_eq!(err.code(), want, "given {given:?} when {p:?}");
    }
}

#[test]
fn delete_then_nothing_more() {
    assert_eq!(
        given_when(&[created()], AppCommand::Delete).unwrap(),
        vec![AppEvent::Deleted {}]
    );
    assert_eq!(
        given_when(&[created(), AppEvent::Deleted {}], AppCommand::Delete),
        Err(Rejection::AppNotFound)
    );
}

#[test]
fn fold_builds_the_view_with_its_version() {
    let recs: Vec<AppRecord> = [
        created(),
        AppEvent::LimitsChanged {
            limits: Limits {
                requests_per_minute: Some(7),
                ..Default::default()
            },
        },
        AppEvent::Suspended {
            reason: "billing".into(),
        },
        AppEvent::Resumed {},
        AppEvent::WorkflowsChanged {
            workflows: Some(vec!["hello".into()]),
        },
    ]
    .into_iter()
    .map(|e| AppRecord::new("acme", "test", e))
    .collect();
    let app = fold(recs.iter().zip([3, 9, 12, 13, 40])).unwrap();
    assert_eq!(app.version, 40);
    assert_eq!(app.limits.requests_per_minute, Some(7));
    assert!(app.is_active());
    assert!(app.allows_workflow("hello"));
    assert!(!app.allows_workflow("triage_handoff"));
    assert_eq!(app.created_at, recs[0].ts);
    // An event before creation changes nothing.
    assert!(fold([(&recs[1], 1)]).is_none());
}

#[test]
fn records_round_trip_as_json_with_stable_type_names() {
    let rec = AppRecord::new(
        "acme",
        "alice",
        AppEvent::TierChanged {
            tier: "business".into(),
        },
    );
    let v = serde_json::to_value(&rec).unwrap();
    assert_eq!(v["type"], "app.tier_changed");
    assert_eq!(v["data"]["tier"], "business");
    assert_eq!(v["app_id"], "acme");
    let back: AppRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, rec);
    let resumed = serde_json::to_value(AppRecord::new("a", "s", AppEvent::Resumed {})).unwrap();
    let back: AppRecord = serde_json::from_value(resumed).unwrap();
    assert_eq!(back.event, AppEvent::Resumed {});
}

fn own_db(name: &str) -> AppStorage {
    AppStorage {
        db_name: name.into(),
        mongo_uri: None,
    }
}

#[test]
fn storage_moves_only_for_dedicated_database_tiers() {
    let business = AppEvent::TierChanged {
        tier: "business".into(),
    };
    let set = |s: Option<AppStorage>| AppCommand::SetStorage(s);
    assert_eq!(
        given_when(&[created(), business.clone()], set(Some(own_db("acme")))),
        Ok(vec![AppEvent::StorageChanged {
            storage: Some(own_db("acme"))
        }])
    );
    let moved = AppEvent::StorageChanged {
        storage: Some(own_db("acme")),
    };
    assert_eq!(
        given_when(
            &[created(), business.clone(), moved.clone()],
            set(Some(own_db("acme")))
        ),
        Ok(vec![]),
        "no change, no event"
    );
    assert_eq!(
        given_when(&[created(), business.clone(), moved.clone()], set(None)),
        Ok(vec![AppEvent::StorageChanged { storage: None }]),
        "back to the shared database"
    );
    assert_eq!(
        given_when(&[created()], set(Some(own_db("acme"))))
            .unwrap_err()
            .code(),
        "invalid_storage",
        "starter uses the shared database"
    );
    assert_eq!(
        given_when(&[created(), business.clone()], set(Some(own_db("a.b"))))
            .unwrap_err()
            .code(),
        "invalid_storage"
    );
    assert_eq!(
        given_when(
            &[created(), business.clone(), AppEvent::Deleted {}],
            set(None)
        ),
        Err(Rejection::AppNotFound)
    );
    // Down to a shared-database tier only after moving back.
    let down = patch(AppPatch {
        tier: Some("starter".into()),
        ..Default::default()
    });
    assert_eq!(
        given_when(&[created(), business.clone(), moved.clone()], down.clone())
            .unwrap_err()
            .code(),
        "invalid_storage"
    );
    assert!(
        given_when(
            &[
                created(),
                business,
                moved,
                AppEvent::StorageChanged { storage: None }
            ],
            down
        )
        .is_ok()
    );
    // The fold follows.
    let recs: Vec<AppRecord> = [
        created(),
        AppEvent::StorageChanged {
            storage: Some(own_db("acme")),
        },
    ]
    .into_iter()
    .map(|e| AppRecord::new("acme", "t", e))
    .collect();
    assert_eq!(
        fold(recs.iter().zip(1..)).unwrap().storage,
        Some(own_db("acme"))
    );
}
