//! The sandbox against hostile modules, and the service against a real nats-server.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::host::CallContext;
use crate::{Call, Error, Limits, Manifest, Plugins, Sandbox, Via};

const ECHO: &str = r#"(module
  (import "mozaiks" "input_len" (func $len (result i32)))
  (import "mozaiks" "input_read" (func $read (param i32)))
  (import "mozaiks" "output" (func $out (param i32 i32)))
  (memory (export "memory") 5)
  (func (export "run") (result i32)
    (call $read (i32.const 0))
    (call $out (i32.const 0) (call $len))
    (i32.const 0)))"#;

const LOOP: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

/// Grows its memory a page at a time for ever, touching each page.
const GREEDY: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $p i32)
    (loop $l
      (local.set $p (memory.grow (i32.const 1)))
      (if (i32.eq (local.get $p) (i32.const -1)) (then unreachable))
      (i32.store (i32.mul (local.get $p) (i32.const 65536)) (i32.const 1))
      (br $l))
    (i32.const 0)))"#;

/// Asks the host to write far outside its memory.
const WILD: &str = r#"(module
  (import "mozaiks" "input_read" (func $read (param i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32) (call $read (i32.const -16)) (i32.const 0)))"#;

const FAILS: &str = r#"(module
  (import "mozaiks" "error" (func $err (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{\"code\":\"no_such_item\",\"message\":\"nothing to do\"}")
  (func (export "run") (result i32) (call $err (i32.const 0) (i32.const 49)) (i32.const 1)))"#;

fn ctx() -> CallContext {
    CallContext {
        app_id: "a1".into(),
        user_id: "u1".into(),
        plugin: "t".into(),
        request_id: "r1".into(),
        http_allowlist: Vec::new(),
    }
}

fn run(sb: &Sandbox, wat: &str, limits: Limits) -> Result<Value, Error> {
    let c = sb.compile(wat.as_bytes())?;
    sb.run(&c, b"{\"x\":1}".to_vec(), ctx(), limits, None)
        .map(|r| r.output)
        .map_err(|f| f.error)
}

#[test]
fn a_module_answers_its_input() {
    let sb = Sandbox::new().unwrap();
    assert_eq!(run(&sb, ECHO, Limits::default()).unwrap(), json!({"x": 1}));
    // Compiled once: the same bytes give the same compilation.
    let a = sb.compile(ECHO.as_bytes()).unwrap();
    let b = sb.compile(ECHO.as_bytes()).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn invalid_modules_are_refused_at_compile() {
    let sb = Sandbox::new().unwrap();
    for (bad, why) in [
        (&b"not wasm at all"[..], "garbage"),
        (&b"\0asm\x01\0\0\0\xff"[..], "truncated binary"),
        (
            br#"(module (memory (export "memory") 1))"#,
            "no run export",
        ),
        (
            br#"(module (func (export "run") (result i32) (i32.const 0)))"#,
            "no memory export",
        ),
        (
            br#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            "a WASI import",
        ),
        (
            br#"(module (import "mozaiks" "no_such_call" (func)) (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            "an unknown host function",
        ),
    ] {
        match sb.compile(bad) {
            Err(Error::InvalidModule(_)) => {}
            other => panic!("{why}: {:?}", other.map(|c| c.digest.clone())),
        }
    }
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let sb = Sandbox::new().unwrap();
    let limits = Limits {
        fuel: 1_000_000,
        ..Limits::default()
    };
    let err = run(&sb, LOOP, limits).unwrap_err();
    assert_eq!(err.code(), "plugin_timeout", "{err}");
}

#[test]
fn an_endless_loop_hits_the_wall_clock_deadline() {
    let sb = Sandbox::new().unwrap();
    let limits = Limits {
        fuel: crate::manifest::MAX_FUEL,
        timeout_ms: 100,
        ..Limits::default()
    };
    let c = sb.compile(LOOP.as_bytes()).unwrap();
    let f = sb.run(&c, b"{}".to_vec(), ctx(), limits, None).unwrap_err();
    assert_eq!(f.error.code(), "plugin_timeout", "{}", f.error);
    assert!(f.error.to_string().contains("100 ms"), "{}", f.error);
    // And the sandbox still serves the next call.
    assert_eq!(run(&sb, ECHO, Limits::default()).unwrap(), json!({"x": 1}));
}

#[test]
fn unbounded_allocation_stops_at_the_memory_limit() {
    let sb = Sandbox::new().unwrap();
    let limits = Limits {
        memory_mb: 2,
        ..Limits::default()
    };
    let err = run(&sb, GREEDY, limits).unwrap_err();
    assert_eq!(err.code(), "plugin_trapped", "{err}");
    // A module whose initial memory exceeds the limit is refused too.
    let big = r#"(module (memory (export "memory") 100) (func (export "run") (result i32) (i32.const 0)))"#;
    let err = run(&sb, big, limits).unwrap_err();
    assert_eq!(err.code(), "plugin_trapped", "{err}");
}

#[test]
fn a_wild_pointer_traps_without_harm() {
    let sb = Sandbox::new().unwrap();
    let err = run(&sb, WILD, Limits::default()).unwrap_err();
    assert_eq!(err.code(), "plugin_trapped", "{err}");
}

#[test]
fn a_plugin_error_keeps_its_code() {
    let sb = Sandbox::new().unwrap();
    match run(&sb, FAILS, Limits::default()).unwrap_err() {
        Error::Plugin { code, message } => {
            assert_eq!(code, "no_such_item");
            assert_eq!(message, "nothing to do");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn io_without_a_bus_is_unavailable_not_a_crash() {
    // kv_get without I/O answers -3; the module reports what it got.
    let wat = r#"(module
      (import "mozaiks" "kv_get" (func $get (param i32 i32 i32) (result i32)))
      (import "mozaiks" "output" (func $out (param i32 i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "k")
      (func (export "run") (result i32)
        (i32.store8 (i32.const 8) (i32.add (i32.const 48) (i32.sub (i32.const 0) (call $get (i32.const 0) (i32.const 0) (i32.const 1)))))
        (call $out (i32.const 8) (i32.const 1))
        (i32.const 0)))"#;
    let sb = Sandbox::new().unwrap();
    assert_eq!(run(&sb, wat, Limits::default()).unwrap(), json!(3));
}

// ---- the service, on a real nats-server ----

async fn plugins() -> (mozaiks_testkit::TestServers, mozaiks_bus::Bus, Plugins) {
    let servers = mozaiks_testkit::TestServers::start_nats().await.unwrap();
    let bus = mozaiks_bus::Bus::connect(&servers.nats_url, &servers.namespace, "plugins-test")
        .await
        .unwrap();
    bus.apply(&mozaiks_bus::definitions::Definitions::embedded().unwrap())
        .await
        .unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let p = Plugins::open(&bus, &dir).await.unwrap();
    (servers, bus, p)
}

fn call(app: &str, user: &str, plugin: &str, input: Value) -> Call {
    Call {
        app_id: app.into(),
        tier: "starter".into(),
        user_id: user.into(),
        roles: vec!["user".into()],
        request_id: "req-1".into(),
        plugin: plugin.into(),
        input,
        via: Via::Http,
        chat_id: None,
    }
}

#[tokio::test]
async fn the_context_is_the_servers_and_the_store_is_scoped() {
    let (_servers, _bus, p) = plugins().await;
    // A client's _context, app_id and user_id are replaced.
    let out = p
        .execute(call(
            "a1",
            "alice",
            "echo",
            json!({"q": 1, "_context": {"app_id": "a2", "user_id": "root"}, "app_id": "a2", "user_id": "root"}),
        ))
        .await
        .unwrap()
        .output;
    assert_eq!(out["q"], 1);
    assert_eq!(out["app_id"], "a1");
    assert_eq!(out["user_id"], "alice");
    assert_eq!(out["_context"]["app_id"], "a1");
    assert_eq!(out["_context"]["user_id"], "alice");
    assert_eq!(out["_context"]["roles"], json!(["user"]));
    assert_eq!(out["_context"]["request_id"], "req-1");

    // The to-do list is per (app, user).
    let add = |app: &str, user: &str, item: &str| {
        p.execute(call(app, user, "todo", json!({"item": item})))
    };
    assert_eq!(
        add("a1", "alice", "milk").await.unwrap().output,
        json!({"items": ["milk"]})
    );
    assert_eq!(
        add("a1", "alice", "eggs \"large\"").await.unwrap().output,
        json!({"items": ["milk", "eggs \"large\""]})
    );
    assert_eq!(
        add("a1", "bob", "tea").await.unwrap().output,
        json!({"items": ["tea"]})
    );
    let list = |app: &str, user: &str| p.execute(call(app, user, "todo", json!({})));
    assert_eq!(
        list("a2", "alice").await.unwrap().output,
        json!({"items": []})
    );
    assert_eq!(
        list("a1", "alice").await.unwrap().output,
        json!({"items": ["milk", "eggs \"large\""]})
    );
}

#[tokio::test]
async fn another_apps_key_reads_nothing() {
    let (_servers, bus, p) = plugins().await;
    // App a2 keeps a secret in its app scope.
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PLUGIN_KV"))
        .await
        .unwrap();
    let secret_key = format!("d.a2.thief.a.{}", crate::sandbox::hex(b"secret"));
    kv.put(secret_key.clone(), "s3cret".into()).await.unwrap();
    // A plugin of a1 asks for that exact bucket key, and for "secret", in both scopes.
    let thief = |key: &str| {
        format!(
            r#"(module
          (import "mozaiks" "kv_get" (func $get (param i32 i32 i32) (result i32)))
          (import "mozaiks" "output" (func $out (param i32 i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "{key}")
          (data (i32.const 200) "null")
          (func (export "run") (result i32)
            (if (i32.ne (call $get (i32.const 1) (i32.const 0) (i32.const {n})) (i32.const -1)) (then (return (i32.const 7))))
            (if (i32.ne (call $get (i32.const 0) (i32.const 0) (i32.const {n})) (i32.const -1)) (then (return (i32.const 8))))
            (call $out (i32.const 200) (i32.const 4))
            (i32.const 0)))"#,
            n = key.len()
        )
    };
    for key in [secret_key.as_str(), "secret", "../a2/secret"] {
        let manifest = Manifest {
            name: "thief".into(),
            version: "1".into(),
            description: String::new(),
            module: String::new(),
            limits: Limits::default(),
            http_allowlist: Vec::new(),
        };
        p.store_upload("a1", "starter", "admin", manifest, thief(key).into_bytes())
            .await
            .unwrap();
        let out = p.execute(call("a1", "alice", "thief", json!({}))).await;
        assert_eq!(out.unwrap().output, Value::Null, "key {key}");
    }
}

#[tokio::test]
async fn uploads_tiers_and_the_enabled_list() {
    let (_servers, bus, p) = plugins().await;
    let manifest = |v: &str| Manifest {
        name: "mine".into(),
        version: v.into(),
        description: "an echo of my own".into(),
        module: String::new(),
        limits: Limits::default(),
        http_allowlist: Vec::new(),
    };
    // Not yet uploaded.
    let err = p
        .execute(call("a1", "u", "mine", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_not_found");
    // An invalid module is refused, nothing is stored.
    let err = p
        .store_upload("a1", "starter", "admin", manifest("1"), b"(module".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_module");
    // A tier without uploads.
    let err = p
        .store_upload("a1", "horizons", "admin", manifest("1"), ECHO.into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_not_allowed");
    let up = p
        .store_upload("a1", "starter", "admin", manifest("1"), ECHO.into())
        .await
        .unwrap();
    assert_eq!(up.object, "a1/mine/1");
    // Another process (a second replica) runs it from the store.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
    let other = Plugins::open(&bus, &dir).await.unwrap();
    let ran = other
        .execute(call("a1", "u", "mine", json!({"k": 2})))
        .await
        .unwrap();
    assert_eq!(ran.output["k"], 2);
    assert_eq!(ran.version, "1");
    // Only for its app.
    let err = other
        .execute(call("a2", "u", "mine", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_not_found");
    // Tier refusal of a shipped pack.
    let mut c = call("a1", "u", "echo", json!({}));
    c.tier = "horizons".into();
    assert_eq!(p.execute(c).await.unwrap_err().code(), "plugin_not_allowed");
    // The enabled list narrows the tier.
    p.set_enabled("a1", Some(vec!["todo".into()]))
        .await
        .unwrap();
    let err = p
        .execute(call("a1", "u", "echo", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_not_allowed");
    p.execute(call("a1", "u", "todo", json!({}))).await.unwrap();
    p.set_enabled("a1", None).await.unwrap();
    p.execute(call("a1", "u", "echo", json!({}))).await.unwrap();
    let names: Vec<String> = p
        .list("a1", "starter")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(names.contains(&"mine".to_string()) && names.contains(&"todo".to_string()));
}

#[tokio::test]
async fn every_execution_is_recorded() {
    let (_servers, bus, p) = plugins().await;
    p.execute(call("a1", "u", "echo", json!({}))).await.unwrap();
    let manifest = Manifest {
        name: "spin".into(),
        version: "2".into(),
        description: String::new(),
        module: String::new(),
        limits: Limits {
            fuel: 100_000,
            ..Limits::default()
        },
        http_allowlist: Vec::new(),
    };
    p.store_upload("a1", "starter", "admin", manifest, LOOP.into())
        .await
        .unwrap();
    let err = p
        .execute(call("a1", "u", "spin", json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_timeout");
    let stream = bus.stream("MZ_PLUGINS").await.unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        outcomes.clear();
        for seq in 1..=2 {
            if let Ok(m) = stream.get_raw_message(seq).await {
                let rec: crate::PluginExecuted = serde_json::from_slice(&m.payload).unwrap();
                outcomes.push((rec.plugin, rec.version, rec.outcome, rec.fuel_used > 0));
            }
        }
        if outcomes.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        outcomes,
        vec![
            ("echo".into(), "1.0.0".into(), "ok".into(), true),
            ("spin".into(), "2".into(), "plugin_timeout".into(), true),
        ]
    );
}

#[tokio::test]
async fn settings_are_per_user_and_reach_the_plugin() {
    let (_servers, _bus, p) = plugins().await;
    p.set_settings("a1", "alice", "echo", json!({"lang": "fr"}))
        .await
        .unwrap();
    assert_eq!(
        p.settings("a1", "alice", "echo").await.unwrap(),
        json!({"lang": "fr"})
    );
    assert_eq!(p.settings("a1", "bob", "echo").await.unwrap(), json!({}));
    assert_eq!(p.settings("a2", "alice", "echo").await.unwrap(), json!({}));
    let out = p
        .execute(call("a1", "alice", "echo", json!({})))
        .await
        .unwrap();
    assert_eq!(out.output["_context"]["settings"], json!({"lang": "fr"}));
    let err = p
        .set_settings("a1", "alice", "echo", json!([1]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_input");
    let err = p
        .set_settings("a1", "alice", "nope", json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "plugin_not_found");
    let big = json!({"x": "y".repeat(20_000)});
    let err = p
        .set_settings("a1", "alice", "echo", big)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_app_cannot_hold_every_sandbox_thread() {
    let (_servers, _bus, p) = plugins().await;
    let manifest = Manifest {
        name: "spin".into(),
        version: "1".into(),
        description: String::new(),
        module: String::new(),
        limits: Limits {
            fuel: crate::manifest::MAX_FUEL,
            timeout_ms: 1500,
            ..Limits::default()
        },
        http_allowlist: Vec::new(),
    };
    p.store_upload("a1", "starter", "admin", manifest, LOOP.into())
        .await
        .unwrap();
    let n = crate::service::MAX_INFLIGHT_PER_APP as usize + 1;
    let calls = (0..n).map(|_| p.execute(call("a1", "u", "spin", json!({}))));
    let mut codes: Vec<&str> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap_err().code())
        .collect();
    codes.sort();
    let mut expected = vec!["plugin_timeout"; n - 1];
    expected.insert(0, "plugin_busy");
    assert_eq!(codes, expected);
    // Another app is not affected, and the slots come back.
    p.execute(call("a2", "u", "echo", json!({}))).await.unwrap();
    p.execute(call("a1", "u", "echo", json!({}))).await.unwrap();
}
