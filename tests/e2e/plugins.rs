//! Plugins end to end (issue 15) on two gateway replicas: execute with the server's context,
//! tier refusal, settings, upload on one replica then execute on the other, hostile modules,
//! and a plugin as a workflow tool. The endpoints' bad-input refusals run in process:
//! crates/gateway/tests/plugins.rs.

use serde_json::{Value, json};

use crate::fleet::*;

const LOOP: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

const GREEDY: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $p i32)
    (loop $l
      (local.set $p (memory.grow (i32.const 1)))
      (if (i32.eq (local.get $p) (i32.const -1)) (then unreachable))
      (br $l))
    (i32.const 0)))"#;

const ECHO: &str = r#"(module
  (import "mozaiks" "input_len" (func $len (result i32)))
  (import "mozaiks" "input_read" (func $read (param i32)))
  (import "mozaiks" "output" (func $out (param i32 i32)))
  (memory (export "memory") 5)
  (func (export "run") (result i32)
    (call $read (i32.const 0)) (call $out (i32.const 0) (call $len)) (i32.const 0)))"#;

async fn create_app(fleet: &Fleet, body: Value) {
    let (s, v, _) = fleet
        .call(0, "POST", "/api/apps", &root(), Some(body))
        .await;
    assert_eq!(s, 201, "{v}");
}

#[tokio::test]
async fn plugins_execute_with_the_servers_context_on_every_replica() {
    let fleet = Fleet::start(2).await;
    create_app(
        &fleet,
        json!({"app_id": "pa", "name": "A", "tier": "starter"}),
    )
    .await;
    create_app(
        &fleet,
        json!({"app_id": "pb", "name": "B", "tier": "starter"}),
    )
    .await;
    create_app(
        &fleet,
        json!({"app_id": "ph", "name": "H", "tier": "horizons"}),
    )
    .await;
    let alice = Fleet::token("alice", "pa", &["user"]);
    let admin = Fleet::token("ada", "pa", &["admin"]);
    let bob = Fleet::token("bob", "pb", &["user"]);

    // The client's _context, app_id and user_id are overwritten by the server's.
    let forged = json!({"q": 1, "_context": {"app_id": "pb", "user_id": "root", "roles": ["superadmin"]},
                        "app_id": "pb", "user_id": "root"});
    for gw in 0..2 {
        let (s, v, _) = fleet
            .call(
                gw,
                "POST",
                "/api/execute/echo",
                &alice,
                Some(forged.clone()),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["q"], 1);
        assert_eq!(v["app_id"], "pa");
        assert_eq!(v["user_id"], "alice");
        assert_eq!(v["_context"]["app_id"], "pa");
        assert_eq!(v["_context"]["user_id"], "alice");
        assert_eq!(v["_context"]["roles"], json!(["user"]));
        assert!(
            v["_context"]["request_id"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
    }
    // The app's API key executes as the key.
    let (s, key, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/pa/keys",
            &admin,
            Some(json!({"name": "backend"})),
        )
        .await;
    assert_eq!(s, 201, "{key}");
    let key = key["key"].as_str().unwrap().to_string();
    let (s, v, _) = fleet
        .call(1, "POST", "/api/execute/echo", &key, Some(json!({})))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["_context"]["app_id"], "pa");
    assert!(
        v["_context"]["user_id"]
            .as_str()
            .unwrap()
            .starts_with("key:")
    );

    // The to-do list is per user, and the same on both replicas.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/execute/todo",
            &alice,
            Some(json!({"item": "milk"})),
        )
        .await;
    assert_eq!((s, &v), (200, &json!({"items": ["milk"]})));
    let (_, v, _) = fleet
        .call(1, "POST", "/api/execute/todo", &alice, Some(json!({})))
        .await;
    assert_eq!(v, json!({"items": ["milk"]}));
    let (_, v, _) = fleet
        .call(1, "POST", "/api/execute/todo", &bob, Some(json!({})))
        .await;
    assert_eq!(v, json!({"items": []}));

    // Tier: horizons runs todo only.
    let hank = Fleet::token("hank", "ph", &["user"]);
    let (s, v, _) = fleet
        .call(0, "POST", "/api/execute/echo", &hank, Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (403, "plugin_not_allowed"), "{v}");
    let (s, _, _) = fleet
        .call(0, "POST", "/api/execute/todo", &hank, Some(json!({})))
        .await;
    assert_eq!(s, 200);
    // The app's enabled list narrows its tier (admin only).
    let (s, v, _) = fleet
        .call(
            0,
            "PUT",
            "/api/apps/pa/plugins/enabled",
            &alice,
            Some(json!({"plugins": ["todo"]})),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "admin_required"));
    let (s, _, _) = fleet
        .call(
            0,
            "PUT",
            "/api/apps/pa/plugins/enabled",
            &admin,
            Some(json!({"plugins": ["todo"]})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v, _) = fleet
        .call(1, "POST", "/api/execute/echo", &alice, Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (403, "plugin_not_allowed"));
    let (_, v) = fleet.get(1, "/api/apps/pa/plugins/enabled", &admin).await;
    assert_eq!(v["plugins"], json!(["todo"]));
    let (s, _, _) = fleet
        .call(
            0,
            "PUT",
            "/api/apps/pa/plugins/enabled",
            &admin,
            Some(json!({"plugins": null})),
        )
        .await;
    assert_eq!(s, 200);

    // Settings: per (app, user, plugin), visible on the other replica and in _context.
    let (s, v, _) = fleet
        .call(
            0,
            "PUT",
            "/api/plugins/echo/settings",
            &alice,
            Some(json!({"lang": "fr"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = fleet.get(1, "/api/plugins/echo/settings", &alice).await;
    assert_eq!(v, json!({"lang": "fr"}));
    let (_, v) = fleet.get(1, "/api/plugins/echo/settings", &bob).await;
    assert_eq!(v, json!({}));
    let (_, v, _) = fleet
        .call(1, "POST", "/api/execute/echo", &alice, Some(json!({})))
        .await;
    assert_eq!(v["_context"]["settings"], json!({"lang": "fr"}));

    // Upload on replica 0 (admin), execute on replica 1; B never sees it.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/pa/plugins",
            &alice,
            Some(json!({"name": "mine", "version": "1", "wat": ECHO})),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "admin_required"));
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/pa/plugins",
            &admin,
            Some(json!({"name": "mine", "version": "1.0.0", "wat": ECHO})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v, h) = fleet
        .call(
            1,
            "POST",
            "/api/execute/mine",
            &alice,
            Some(json!({"k": 2})),
        )
        .await;
    assert_eq!(s, 200, "{v} {h:?}");
    assert_eq!(v["k"], 2);
    let (s, v, _) = fleet
        .call(1, "POST", "/api/execute/mine", &bob, Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (404, "plugin_not_found"));
    let (_, v) = fleet.get(1, "/api/apps/pa/plugins", &alice).await;
    let names: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"mine") && names.contains(&"todo"), "{v}");
    // A binary module as base64 works too.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ECHO);
    let (s, v, _) = fleet
        .call(
            1,
            "POST",
            "/api/apps/pa/plugins",
            &key,
            Some(json!({"name": "mine", "version": "2", "module_base64": b64})),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    // Hostile modules: limits hit, the replicas stay healthy.
    for (name, wat, status, expect) in [
        ("spin", LOOP, 504, "plugin_timeout"),
        ("greedy", GREEDY, 422, "plugin_trapped"),
    ] {
        let (s, v, _) = fleet
            .call(0, "POST", "/api/apps/pa/plugins", &admin,
                  Some(json!({"name": name, "version": "1", "wat": wat, "limits": {"memory_mb": 2, "fuel": 1000000, "timeout_ms": 500}})))
            .await;
        assert_eq!(s, 201, "{v}");
        for gw in 0..2 {
            let (s, v, _) = fleet
                .call(
                    gw,
                    "POST",
                    &format!("/api/execute/{name}"),
                    &alice,
                    Some(json!({})),
                )
                .await;
            assert_eq!((s, code(&v)), (status, expect), "{name}: {v}");
        }
    }
    // Every execution counts in the app's plugin usage (plugin.executed records).
    let usage = fleet
        .eventually("the executions counted", || async {
            let (s, v) = fleet.get(1, "/api/apps/pa/plugins/usage", &admin).await;
            assert_eq!(s, 200, "{v}");
            (v["executions"]["spin"] == 2 && v["executions"]["greedy"] == 2).then_some(v)
        })
        .await;
    assert!(
        usage["executions"]["echo"].as_u64().unwrap() >= 4,
        "{usage}"
    );
    assert!(usage["executions"].get("todo").is_some(), "{usage}");
    let (s, v) = fleet.get(1, "/api/apps/pa/plugins/usage", &alice).await;
    assert_eq!((s, code(&v)), (403, "admin_required"));
    for gw in 0..2 {
        let (s, _) = fleet.get(gw, "/health/ready", &alice).await;
        assert_eq!(s, 200);
        let (s, _, _) = fleet
            .call(gw, "POST", "/api/execute/echo", &alice, Some(json!({})))
            .await;
        assert_eq!(s, 200);
    }
}

#[tokio::test]
async fn a_plugin_is_a_workflow_tool() {
    // A workflows folder with the shipped packs and one whose tool is the todo plugin.
    let dir =
        std::env::temp_dir().join(format!("mozaiks-e2e-wf-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(dir.join("todo_agent")).unwrap();
    std::fs::write(
        dir.join("todo_agent/workflow.yaml"),
        r#"name: todo_agent
description: Adds each message to the user's to-do list with the todo plugin.
version: 1
start_agent: keeper
max_turns: 1
tools:
  - name: add_item
    description: Adds an item to the user's to-do list.
    parameters: {type: object, properties: {item: {type: string}}}
    plugin: todo
agents:
  - name: keeper
    system_message: You keep the user's to-do list.
    tools: [add_item]
    offline:
      tool_calls: [{tool: add_item, arguments: {item: "{input}"}}]
      reply: "Noted."
"#,
    )
    .unwrap();
    let wf = dir.to_string_lossy().to_string();
    let fleet = Fleet::start_with(2, 1, &[("MOZAIKS_WORKFLOWS_DIR", wf.as_str())]).await;
    let user = Fleet::token("tina", "default", &["user"]);
    let ticket = fleet
        .session(0, &user, "todo_agent", Some("buy milk"))
        .await;
    let mut ws = fleet.connect(1, &ticket, 0).await;
    let frames = events_until(&mut ws, "run.completed").await;
    let call = frames
        .iter()
        .find(|f| f["type"] == "tool.call")
        .expect("tool.call");
    assert_eq!(call["data"]["tool"], "add_item");
    let result = frames
        .iter()
        .find(|f| f["type"] == "tool.result")
        .expect("tool.result");
    assert_eq!(
        result["data"]["result"],
        json!({"items": ["buy milk"]}),
        "{result}"
    );
    // The tool ran with the chat's app and user: the same list over HTTP.
    let (s, v, _) = fleet
        .call(1, "POST", "/api/execute/todo", &user, Some(json!({})))
        .await;
    assert_eq!((s, v), (200, json!({"items": ["buy milk"]})));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin that sends `request` with `http_request` and answers the host's reply, or
/// `{"refused": <code>}` when the host refuses.
fn http_plugin(request: &Value) -> String {
    let req = request.to_string();
    format!(
        r#"(module
  (import "mozaiks" "http_request" (func $http (param i32 i32) (result i32)))
  (import "mozaiks" "result_read" (func $rr (param i32)))
  (import "mozaiks" "output" (func $out (param i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "{escaped}")
  (data (i32.const 1024) "{{\"refused\":true}}")
  (func (export "run") (result i32)
    (local $n i32)
    (local.set $n (call $http (i32.const 0) (i32.const {len})))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (call $out (i32.const 1024) (i32.const 16)) (return (i32.const 0))))
    (call $rr (i32.const 4096))
    (call $out (i32.const 4096) (local.get $n))
    (i32.const 0)))"#,
        escaped = req.replace('\\', "\\\\").replace('"', "\\\""),
        len = req.len()
    )
}

#[tokio::test]
async fn http_reaches_only_the_allowlist_and_packs_are_checked() {
    let fleet = Fleet::start(1).await;
    let admin = Fleet::token("a", "default", &["admin"]);
    let host = fleet.gateways[0].trim_start_matches("http://").to_string();
    let health = format!("http://{host}/api/health");
    for (name, allow, expect_refused) in [
        ("fetch", vec![host.clone()], false),
        ("fetch-other", vec!["example.com".to_string()], true),
    ] {
        let wat = http_plugin(&json!({"method": "GET", "url": health}));
        let (s, v, _) = fleet
            .call(
                0,
                "POST",
                "/api/apps/default/plugins",
                &admin,
                Some(json!({"name": name, "version": "1", "wat": wat, "http_allowlist": allow})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v, _) = fleet
            .call(
                0,
                "POST",
                &format!("/api/execute/{name}"),
                &admin,
                Some(json!({})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        if expect_refused {
            assert_eq!(v, json!({"refused": true}), "{name}");
        } else {
            assert_eq!(v["status"], 200, "{name}: {v}");
        }
    }

    // `mozaiks plugins check`: the shipped packs pass, a broken one fails naming itself.
    let bin = env!("CARGO_BIN_EXE_mozaiks");
    let out = std::process::Command::new(bin)
        .args(["plugins", "check"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("todo") && stdout.contains("echo"),
        "{stdout}"
    );
    let dir = std::env::temp_dir().join(format!(
        "mozaiks-e2e-plugins-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(
        dir.join("broken/plugin.yaml"),
        "name: broken\nversion: 1\nmodule: broken.wat\n",
    )
    .unwrap();
    std::fs::write(dir.join("broken/broken.wat"), "(module (func))").unwrap();
    let out = std::process::Command::new(bin)
        .args(["plugins", "check"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("broken"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
