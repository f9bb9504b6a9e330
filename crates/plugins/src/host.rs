//! Host functions: everything a plugin can do outside its own memory (import module `mozaiks`).
//!
//! | function | what |
//! |---|---|
//! | `input_len() -> i32`, `input_read(ptr)` | the call's JSON input (with `_context`) |
//! | `output(ptr, len)` | the JSON answer |
//! | `error(ptr, len)` | fail with `{"code": ..., "message": ...}` (or text) |
//! | `log(level, ptr, len)` | a log line (0 debug, 1 info, 2 warn, 3 error) |
//! | `result_read(ptr)` | copies the last host call's answer (its length was the call's result) |
//! | `kv_get(scope, kptr, klen) -> i32` | a value's length (then `result_read`), -1 absent |
//! | `kv_set(scope, kptr, klen, vptr, vlen) -> i32`, `kv_delete(scope, kptr, klen) -> i32` | 0 ok |
//! | `http_request(ptr, len) -> i32` | `{method, url, headers, body}` to an allowlisted host; the answer `{status, body}` |
//! | `publish(ptr, len) -> i32` | `{type, data}` on the app's own subject `mz.plugin.event.{app_id}.{plugin}` |
//! | `notify(ptr, len) -> i32` | `{user_id?, data}` to a user of the app (default: the caller) |
//!
//! The key-value store is scoped by the host: scope 0 is (app, plugin, user), scope 1 is (app,
//! plugin). A key is any 1 to 128 bytes, hex-encoded into the bucket's key, so a plugin can
//! neither name nor reach another app's, plugin's or user's entries. Negative results: -1 absent,
//! -2 refused (bad arguments, a host not on the allowlist), -3 unavailable, -4 a limit.
//! A pointer outside the module's memory traps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use mozaiks_bus::Bus;
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};
use wasmtime::{Caller, Linker, Memory, StoreLimits};

use crate::sandbox::{MAX_OUTPUT_BYTES, hex};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most host calls with I/O (kv, http, publish, notify) in one plugin call.
pub const MAX_IO_CALLS: u32 = 64;
/// Most log lines of one plugin call.
pub const MAX_LOG_LINES: u32 = 100;
/// Largest HTTP answer body kept, in bytes.
pub const MAX_HTTP_BODY: usize = 256 * 1024;
/// Largest request of `http_request`, `publish` or `notify`, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub const ABSENT: i32 = -1;
pub const REFUSED: i32 = -2;
pub const UNAVAILABLE: i32 = -3;
pub const LIMIT: i32 = -4;

/// Who a call is for: set by the server, never by the plugin or its caller.
#[derive(Clone, Debug, Default)]
pub struct CallContext {
    pub app_id: String,
    pub user_id: String,
    pub plugin: String,
    pub request_id: String,
    /// Hosts `http_request` may reach (the plugin's manifest).
    pub http_allowlist: Vec<String>,
}

/// The I/O behind the host functions: a runtime to wait on, the bus, the scoped bucket, HTTP.
pub struct Io {
    pub rt: tokio::runtime::Handle,
    pub bus: Bus,
    /// `MZ_PLUGIN_KV`.
    pub kv: kv::Store,
    /// Follows no redirects (a redirect could leave the allowlist).
    pub http: reqwest::Client,
}

/// A store's data: the call's input and output and its host-side limits.
pub struct HostState {
    pub(crate) limits: StoreLimits,
    input: Vec<u8>,
    pub(crate) output: Option<Vec<u8>>,
    pub(crate) error: Option<Vec<u8>>,
    result: Vec<u8>,
    ctx: CallContext,
    deadline: Instant,
    io_calls: u32,
    log_lines: u32,
    io: Option<Arc<Io>>,
}

impl HostState {
    pub(crate) fn new(
        input: Vec<u8>,
        ctx: CallContext,
        deadline: Instant,
        limits: StoreLimits,
        io: Option<Arc<Io>>,
    ) -> HostState {
        HostState {
            limits,
            input,
            output: None,
            error: None,
            result: Vec::new(),
            ctx,
            deadline,
            io_calls: 0,
            log_lines: 0,
            io,
        }
    }
}

/// Why a host function stopped the plugin.
#[derive(Debug, thiserror::Error)]
pub enum HostTrap {
    #[error("the module exports no memory")]
    NoMemory,
    #[error("a pointer or length is outside the module's memory")]
    OutOfBounds,
    #[error("the output is larger than {MAX_OUTPUT_BYTES} bytes")]
    OutputTooLarge,
    #[error("the wall-clock deadline passed during a host call")]
    Deadline,
}

type Cx<'a> = Caller<'a, HostState>;

fn memory(caller: &mut Cx<'_>) -> wasmtime::Result<Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| HostTrap::NoMemory.into())
}

fn read(caller: &mut Cx<'_>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&caller);
    let end = ptr.checked_add(len).ok_or(HostTrap::OutOfBounds)?;
    data.get(ptr..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| HostTrap::OutOfBounds.into())
}

fn write(caller: &mut Cx<'_>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let mem = memory(caller)?;
    mem.write(&mut *caller, ptr as u32 as usize, bytes)
        .map_err(|_| HostTrap::OutOfBounds.into())
}

/// Counts an I/O call; `Err(code)` past the limit or without I/O.
fn io_call(caller: &mut Cx<'_>) -> Result<Arc<Io>, i32> {
    let st = caller.data_mut();
    st.io_calls += 1;
    if st.io_calls > MAX_IO_CALLS {
        return Err(LIMIT);
    }
    st.io.clone().ok_or(UNAVAILABLE)
}

/// Waits for `fut` on the I/O runtime until the call's deadline.
fn wait<F: Future>(io: &Io, deadline: Instant, fut: F) -> wasmtime::Result<F::Output> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HostTrap::Deadline.into());
    }
    io.rt
        .block_on(async { tokio::time::timeout(left, fut).await })
        .map_err(|_| HostTrap::Deadline.into())
}

/// The bucket key of a plugin's key in a scope: every part hex-encoded or a checked token.
fn scoped_key(ctx: &CallContext, scope: i32, key: &[u8]) -> Option<String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return None;
    }
    let (app, plugin) = (&ctx.app_id, &ctx.plugin);
    match scope {
        0 => Some(format!(
            "d.{app}.{plugin}.u.{}.{}",
            hex(ctx.user_id.as_bytes()),
            hex(key)
        )),
        1 => Some(format!("d.{app}.{plugin}.a.{}", hex(key))),
        _ => None,
    }
}

/// Registers every host function.
pub fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const M: &str = "mozaiks";
    linker.func_wrap(M, "input_len", |caller: Cx<'_>| -> i32 {
        caller.data().input.len() as i32
    })?;
    linker.func_wrap(
        M,
        "input_read",
        |mut caller: Cx<'_>, ptr: i32| -> wasmtime::Result<()> {
            let input = std::mem::take(&mut caller.data_mut().input);
            let r = write(&mut caller, ptr, &input);
            caller.data_mut().input = input;
            r
        },
    )?;
    linker.func_wrap(
        M,
        "result_read",
        |mut caller: Cx<'_>, ptr: i32| -> wasmtime::Result<()> {
            let result = std::mem::take(&mut caller.data_mut().result);
            let r = write(&mut caller, ptr, &result);
            caller.data_mut().result = result;
            r
        },
    )?;
    linker.func_wrap(
        M,
        "output",
        |mut caller: Cx<'_>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            if len as u32 as usize > MAX_OUTPUT_BYTES {
                return Err(HostTrap::OutputTooLarge.into());
            }
            let bytes = read(&mut caller, ptr, len)?;
            caller.data_mut().output = Some(bytes);
            Ok(())
        },
    )?;
    linker.func_wrap(
        M,
        "error",
        |mut caller: Cx<'_>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let len = (len as u32).min(4096) as i32;
            let bytes = read(&mut caller, ptr, len)?;
            caller.data_mut().error = Some(bytes);
            Ok(())
        },
    )?;
    linker.func_wrap(
        M,
        "log",
        |mut caller: Cx<'_>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let st = caller.data_mut();
            st.log_lines += 1;
            if st.log_lines > MAX_LOG_LINES {
                return Ok(());
            }
            let len = (len as u32).min(2048) as i32;
            let bytes = read(&mut caller, ptr, len)?;
            let text = String::from_utf8_lossy(&bytes);
            let c = &caller.data().ctx;
            let (app_id, plugin, request_id) = (&c.app_id, &c.plugin, &c.request_id);
            match level {
                i32::MIN..=0 => {
                    debug!(app_id = %app_id, plugin = %plugin, request_id = %request_id, message = %text, "Plugin log.")
                }
                1 => {
                    info!(app_id = %app_id, plugin = %plugin, request_id = %request_id, message = %text, "Plugin log.")
                }
                2 => {
                    warn!(app_id = %app_id, plugin = %plugin, request_id = %request_id, message = %text, "Plugin log.")
                }
                _ => {
                    error!(app_id = %app_id, plugin = %plugin, request_id = %request_id, message = %text, "Plugin log.")
                }
            }
            Ok(())
        },
    )?;
    linker.func_wrap(
        M,
        "kv_get",
        |mut caller: Cx<'_>, scope: i32, kptr: i32, klen: i32| -> wasmtime::Result<i32> {
            let key = read(&mut caller, kptr, klen)?;
            let Some(key) = scoped_key(&caller.data().ctx, scope, &key) else {
                return Ok(REFUSED);
            };
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let deadline = caller.data().deadline;
            let got = wait(&io, deadline, io.kv.get(key))?;
            metric("kv_get", got.is_ok());
            Ok(match got {
                Ok(Some(v)) => {
                    let n = v.len() as i32;
                    caller.data_mut().result = v.to_vec();
                    n
                }
                Ok(None) => ABSENT,
                Err(_) => UNAVAILABLE,
            })
        },
    )?;
    linker.func_wrap(
        M,
        "kv_set",
        |mut caller: Cx<'_>,
         scope: i32,
         kptr: i32,
         klen: i32,
         vptr: i32,
         vlen: i32|
         -> wasmtime::Result<i32> {
            if vlen as u32 as usize > MAX_VALUE_BYTES {
                return Ok(LIMIT);
            }
            let key = read(&mut caller, kptr, klen)?;
            let value = read(&mut caller, vptr, vlen)?;
            let Some(key) = scoped_key(&caller.data().ctx, scope, &key) else {
                return Ok(REFUSED);
            };
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let deadline = caller.data().deadline;
            let put = wait(&io, deadline, io.kv.put(key, value.into()))?;
            metric("kv_set", put.is_ok());
            Ok(if put.is_ok() { 0 } else { UNAVAILABLE })
        },
    )?;
    linker.func_wrap(
        M,
        "kv_delete",
        |mut caller: Cx<'_>, scope: i32, kptr: i32, klen: i32| -> wasmtime::Result<i32> {
            let key = read(&mut caller, kptr, klen)?;
            let Some(key) = scoped_key(&caller.data().ctx, scope, &key) else {
                return Ok(REFUSED);
            };
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let deadline = caller.data().deadline;
            let del = wait(&io, deadline, io.kv.delete(key))?;
            metric("kv_delete", del.is_ok());
            Ok(if del.is_ok() { 0 } else { UNAVAILABLE })
        },
    )?;
    linker.func_wrap(
        M,
        "http_request",
        |mut caller: Cx<'_>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            if len as u32 as usize > MAX_REQUEST_BYTES {
                return Ok(LIMIT);
            }
            let bytes = read(&mut caller, ptr, len)?;
            let Ok(req) = serde_json::from_slice::<Value>(&bytes) else {
                return Ok(REFUSED);
            };
            let Some(url) = allowed_url(&caller.data().ctx, &req) else {
                metric("http", false);
                return Ok(REFUSED);
            };
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let deadline = caller.data().deadline;
            let method = req
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("GET")
                .to_ascii_uppercase();
            let Ok(method) = reqwest::Method::from_bytes(method.as_bytes()) else {
                return Ok(REFUSED);
            };
            let mut rb = io.http.request(method, url);
            if let Some(Value::Object(h)) = req.get("headers") {
                for (k, v) in h {
                    if let Some(v) = v.as_str() {
                        rb = rb.header(k.as_str(), v);
                    }
                }
            }
            match req.get("body") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => rb = rb.body(s.clone()),
                Some(other) => rb = rb.json(other),
            }
            let answer = wait(&io, deadline, async move {
                let resp = rb.send().await?;
                let status = resp.status().as_u16();
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, body))
            })?;
            metric("http", answer.is_ok());
            let Ok((status, body)) = answer else {
                return Ok(UNAVAILABLE);
            };
            let body = &body[..body.len().min(MAX_HTTP_BODY)];
            let text = String::from_utf8_lossy(body);
            let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text.into()));
            let out =
                serde_json::to_vec(&json!({"status": status, "body": body})).unwrap_or_default();
            let n = out.len() as i32;
            caller.data_mut().result = out;
            Ok(n)
        },
    )?;
    linker.func_wrap(
        M,
        "publish",
        |mut caller: Cx<'_>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            if len as u32 as usize > MAX_REQUEST_BYTES {
                return Ok(LIMIT);
            }
            let bytes = read(&mut caller, ptr, len)?;
            let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&bytes) else {
                return Ok(REFUSED);
            };
            let kind = req.get("type").and_then(Value::as_str).unwrap_or_default();
            let ok_kind = !kind.is_empty()
                && kind.len() <= 64
                && kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok_kind {
                return Ok(REFUSED);
            }
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let c = &caller.data().ctx;
            let subject = format!(
                "{}mz.plugin.event.{}.{}",
                io.bus.subjects().prefix(),
                c.app_id,
                c.plugin
            );
            let record = json!({
                "type": kind,
                "app_id": c.app_id,
                "plugin": c.plugin,
                "user_id": c.user_id,
                "request_id": c.request_id,
                "data": req.get("data").cloned().unwrap_or(Value::Null),
                "ts": chrono::Utc::now(),
            });
            let payload = serde_json::to_vec(&record).unwrap_or_default();
            let deadline = caller.data().deadline;
            let js = io.bus.jetstream().clone();
            let sent = wait(&io, deadline, async move {
                js.publish(subject, payload.into()).await?.await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })?;
            metric("publish", sent.is_ok());
            Ok(if sent.is_ok() { 0 } else { UNAVAILABLE })
        },
    )?;
    linker.func_wrap(
        M,
        "notify",
        |mut caller: Cx<'_>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            if len as u32 as usize > MAX_REQUEST_BYTES {
                return Ok(LIMIT);
            }
            let bytes = read(&mut caller, ptr, len)?;
            let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&bytes) else {
                return Ok(REFUSED);
            };
            let c = &caller.data().ctx;
            let user = match req.get("user_id") {
                None | Some(Value::Null) => c.user_id.clone(),
                Some(Value::String(u)) if mozaiks_events::ids::check_user(u).is_ok() => u.clone(),
                Some(_) => return Ok(REFUSED),
            };
            let wire = json!({
                "id": uuid::Uuid::now_v7(),
                "app_id": c.app_id,
                "user_id": user,
                "data": {
                    "plugin": c.plugin,
                    "data": req.get("data").cloned().unwrap_or(Value::Null),
                },
            });
            let io = match io_call(&mut caller) {
                Ok(io) => io,
                Err(code) => return Ok(code),
            };
            let subject = io.bus.subjects().notifications(&caller.data().ctx.app_id);
            let payload = serde_json::to_vec(&wire).unwrap_or_default();
            let deadline = caller.data().deadline;
            let client = io.bus.client().clone();
            let sent = wait(&io, deadline, client.publish(subject, payload.into()))?;
            metric("notify", sent.is_ok());
            Ok(if sent.is_ok() { 0 } else { UNAVAILABLE })
        },
    )?;
    Ok(())
}

/// The request's URL when its scheme is http(s) and its host (or host:port) is allowlisted.
fn allowed_url(ctx: &CallContext, req: &Value) -> Option<reqwest::Url> {
    let url = reqwest::Url::parse(req.get("url")?.as_str()?).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    let with_port = url.port().map(|p| format!("{host}:{p}"));
    let allowed = ctx.http_allowlist.iter().any(|h| {
        let h = h.to_ascii_lowercase();
        h == host && url.port().is_none() || Some(&h) == with_port.as_ref()
    });
    allowed.then_some(url)
}

fn metric(call: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(crate::metrics::HOST_CALLS, "call" => call, "outcome" => outcome)
        .increment(1);
}

/// The HTTP client of the host functions: no redirects, a short connect timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_and_cannot_escape() {
        let ctx = CallContext {
            app_id: "a1".into(),
            user_id: "u@x".into(),
            plugin: "todo".into(),
            ..Default::default()
        };
        let k = scoped_key(&ctx, 0, b"list").unwrap();
        assert_eq!(k, format!("d.a1.todo.u.{}.{}", hex(b"u@x"), hex(b"list")));
        // A key naming another app's entry stays inside this app's scope.
        let k = scoped_key(&ctx, 1, b"d.a2.todo.a.6c697374").unwrap();
        assert!(k.starts_with("d.a1.todo.a."));
        assert!(k[12..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(scoped_key(&ctx, 2, b"x").is_none());
        assert!(scoped_key(&ctx, 0, b"").is_none());
        assert!(scoped_key(&ctx, 0, &[b'x'; 129]).is_none());
    }

    #[test]
    fn only_allowlisted_hosts() {
        let ctx = CallContext {
            http_allowlist: vec!["api.example.com".into(), "127.0.0.1:8080".into()],
            ..Default::default()
        };
        let ok = |u: &str| allowed_url(&ctx, &json!({"url": u})).is_some();
        assert!(ok("https://api.example.com/x"));
        assert!(ok("http://127.0.0.1:8080/y"));
        assert!(!ok("http://127.0.0.1:8081/y"));
        assert!(!ok("http://127.0.0.1/y"));
        assert!(!ok("https://api.example.com.evil.net/"));
        assert!(!ok("file:///etc/passwd"));
        assert!(!ok("not a url"));
    }
}
