//! The plugin endpoints' refusals, each with its status and code, in process with the
//! repository's plugins (moved from the e2e test `plugins::plugin_endpoints_refuse_bad_input`;
//! e2e keeps what needs two replicas or a worker: execution everywhere, uploads seen by the other
//! replica, hostile modules, plugins as workflow tools).

mod support;

use serde_json::{Value, json};
use support::{Gw, root, token};

const ECHO: &str = r#"(module
  (import "mozaiks" "input_len" (func $len (result i32)))
  (import "mozaiks" "input_read" (func $read (param i32)))
  (import "mozaiks" "output" (func $out (param i32 i32)))
  (memory (export "memory") 5)
  (func (export "run") (result i32)
    (call $read (i32.const 0)) (call $out (i32.const 0) (call $len)) (i32.const 0)))"#;

/// A bad-input case: what, the bearer token, (method, path, body), status, code.
type Case<'a> = (
    &'a str,
    Option<&'a str>,
    (&'a str, &'a str, Option<Value>),
    u16,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_endpoints_refuse_bad_input() {
    let gw = Gw::start_with(true).await;
    let user = token("u", "default", &["user"]);
    let admin = token("a", "default", &["admin"]);
    let root = root();
    let u = Some(user.as_str());
    let a = Some(admin.as_str());
    let r = Some(root.as_str());
    let upload = |body: Value| ("POST", "/api/apps/default/plugins", Some(body));
    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            ("POST", "/api/execute/echo", Some(json!({}))),
            401,
            "token_missing",
        ),
        (
            "not an object",
            u,
            ("POST", "/api/execute/echo", Some(json!([1, 2]))),
            422,
            "invalid_input",
        ),
        (
            "unknown plugin",
            u,
            ("POST", "/api/execute/nope", Some(json!({}))),
            404,
            "plugin_not_found",
        ),
        (
            "a bad name",
            u,
            ("POST", "/api/execute/a.b", Some(json!({}))),
            404,
            "plugin_not_found",
        ),
        (
            "settings not an object",
            u,
            ("PUT", "/api/plugins/echo/settings", Some(json!("x"))),
            422,
            "invalid_input",
        ),
        (
            "settings too large",
            u,
            (
                "PUT",
                "/api/plugins/echo/settings",
                Some(json!({"x": "y".repeat(20_000)})),
            ),
            413,
            "too_large",
        ),
        (
            "settings of no plugin",
            u,
            ("GET", "/api/plugins/nope/settings", None),
            404,
            "plugin_not_found",
        ),
        (
            "upload by a user",
            u,
            upload(json!({"name": "x", "version": "1", "wat": ECHO})),
            403,
            "admin_required",
        ),
        (
            "an invalid module",
            a,
            upload(json!({"name": "x", "version": "1", "wat": "(module"})),
            422,
            "invalid_module",
        ),
        (
            "a module without run",
            a,
            upload(
                json!({"name": "x", "version": "1", "wat": "(module (memory (export \"memory\") 1))"}),
            ),
            422,
            "invalid_module",
        ),
        (
            "a WASI module",
            r,
            upload(
                json!({"name": "x", "version": "1", "wat": "(module (import \"wasi_snapshot_preview1\" \"fd_write\" (func)) (memory (export \"memory\") 1) (func (export \"run\") (result i32) (i32.const 0)))"}),
            ),
            422,
            "invalid_module",
        ),
        (
            "bad base64",
            a,
            upload(json!({"name": "x", "version": "1", "module_base64": "%%%"})),
            422,
            "invalid_module",
        ),
        (
            "no module",
            a,
            upload(json!({"name": "x", "version": "1"})),
            422,
            "invalid_module",
        ),
        (
            "a bad plugin name",
            a,
            upload(json!({"name": "X Y", "version": "1", "wat": ECHO})),
            422,
            "invalid_plugin",
        ),
        (
            "too much memory",
            a,
            upload(
                json!({"name": "x", "version": "1", "wat": ECHO, "limits": {"memory_mb": 4096}}),
            ),
            422,
            "invalid_plugin",
        ),
        (
            "an enabled list with a bad name",
            a,
            (
                "PUT",
                "/api/apps/default/plugins/enabled",
                Some(json!({"plugins": ["a b"]})),
            ),
            422,
            "invalid_input",
        ),
        (
            "a bad app id",
            r,
            ("GET", "/api/apps/bad%20id/plugins", None),
            422,
            "invalid_id",
        ),
    ];
    for (what, token, (method, path, body), status, expect) in cases {
        let r = gw.call(method, path, token, body).await;
        assert_eq!((r.status, r.code()), (status, expect), "{what}: {}", r.body);
    }
    // An input larger than the body limit.
    let big = json!({"x": "y".repeat(300 * 1024)});
    let r = gw
        .call("POST", "/api/execute/echo", Some(&user), Some(big))
        .await;
    assert_eq!(r.status, 413);
}
