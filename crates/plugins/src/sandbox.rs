//! The Wasmtime sandbox: one engine per process, modules compiled once and cached by digest, a
//! fresh store and instance per call with a memory limit, fuel and an epoch deadline.
//!
//! The only imports a module may have are the host functions of [`crate::host`] (module
//! `mozaiks`): no WASI, so no filesystem, clock, randomness or sockets. A module that imports
//! anything else is refused when it is compiled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store, StoreLimitsBuilder, Trap};

use crate::Error;
use crate::host::{self, CallContext, HostState, Io};
use crate::manifest::{Limits, MAX_MODULE_BYTES};

/// How often the epoch ticks: the granularity of the wall-clock deadline.
pub const TICK: Duration = Duration::from_millis(10);
/// Compiled modules kept (by digest); past this the cache starts over.
const CACHE_ENTRIES: usize = 256;
/// Largest output a plugin may produce, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// A compiled module ready to instantiate.
pub struct Compiled {
    pub pre: InstancePre<HostState>,
    /// SHA-256 of the module's bytes, hex.
    pub digest: String,
}

/// The engine, its linker and the compile cache. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache: Arc<Mutex<HashMap<String, Arc<Compiled>>>>,
}

/// What a call produced.
#[derive(Debug)]
pub struct Run {
    /// The plugin's JSON answer (`null` when it wrote none).
    pub output: serde_json::Value,
    pub fuel_used: u64,
    pub duration: Duration,
}

/// How a call ended without an answer.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub fuel_used: u64,
    pub duration: Duration,
}

impl Sandbox {
    /// A sandbox with its own engine and an epoch ticker thread.
    pub fn new() -> Result<Sandbox, Error> {
        let mut cfg = Config::new();
        cfg.consume_fuel(true);
        cfg.epoch_interruption(true);
        cfg.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&cfg).map_err(|e| Error::Internal(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| Error::Internal(e.to_string()))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugins-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| Error::Internal(format!("epoch ticker: {e}")))?;
        Ok(Sandbox {
            engine,
            linker: Arc::new(linker),
            cache: Arc::default(),
        })
    }

    /// Compiles a module (binary or WAT text) and checks its imports and exports, or returns the
    /// cached compilation of the same bytes. CPU-heavy: call it off the async threads.
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<Compiled>, Error> {
        if bytes.len() > MAX_MODULE_BYTES {
            return Err(Error::InvalidModule(format!(
                "the module is larger than {MAX_MODULE_BYTES} bytes"
            )));
        }
        let digest = hex(&sha2::Sha256::digest(bytes));
        if let Some(c) = self.cache.lock().expect("cache lock").get(&digest) {
            return Ok(c.clone());
        }
        let started = Instant::now();
        let module =
            Module::new(&self.engine, bytes).map_err(|e| Error::InvalidModule(first_line(&e)))?;
        let has_run = module.exports().any(|e| {
            e.name() == "run"
                && e.ty()
                    .func()
                    .is_some_and(|f| f.params().len() == 0 && f.results().len() == 1)
        });
        if !has_run {
            return Err(Error::InvalidModule(
                "the module must export `run: func() -> i32`".into(),
            ));
        }
        if !module.exports().any(|e| e.name() == "memory") {
            return Err(Error::InvalidModule(
                "the module must export its memory as `memory`".into(),
            ));
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| Error::InvalidModule(first_line(&e)))?;
        metrics::histogram!(crate::metrics::COMPILE_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let compiled = Arc::new(Compiled {
            pre,
            digest: digest.clone(),
        });
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(digest, compiled.clone());
        Ok(compiled)
    }

    /// The compilation of the module with this digest, if this process has it.
    pub fn cached(&self, digest: &str) -> Option<Arc<Compiled>> {
        self.cache.lock().expect("cache lock").get(digest).cloned()
    }

    /// Runs `run()` of a fresh instance with `input` (JSON bytes). Blocking: host functions wait
    /// on `io`'s runtime, so call it from a blocking thread ([`tokio::task::spawn_blocking`]).
    pub fn run(
        &self,
        compiled: &Compiled,
        input: Vec<u8>,
        ctx: CallContext,
        limits: Limits,
        io: Option<Arc<Io>>,
    ) -> Result<Run, Failed> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(limits.timeout_ms);
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory_mb as usize * 1024 * 1024)
            .memories(1)
            .tables(4)
            .table_elements(10_000)
            .instances(1)
            .build();
        let state = HostState::new(input, ctx, deadline, store_limits, io);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let fail = |store: &Store<HostState>, error: Error| Failed {
            error,
            fuel_used: limits.fuel - store.get_fuel().unwrap_or(0),
            duration: started.elapsed(),
        };
        if let Err(e) = store.set_fuel(limits.fuel) {
            return Err(fail(&store, Error::Internal(e.to_string())));
        }
        let ticks = limits.timeout_ms.div_ceil(TICK.as_millis() as u64) + 1;
        store.set_epoch_deadline(ticks);
        let result = compiled.pre.instantiate(&mut store).and_then(|instance| {
            let run = instance.get_typed_func::<(), i32>(&mut store, "run")?;
            run.call(&mut store, ())
        });
        let code = match result {
            Ok(code) => code,
            Err(e) => {
                let error = classify(&e, &limits, started);
                return Err(fail(&store, error));
            }
        };
        let state = store.data_mut();
        let error = state.error.take();
        let output = state.output.take();
        if code != 0 || error.is_some() {
            let (code_s, message) = plugin_error(error.as_deref(), code);
            return Err(fail(
                &store,
                Error::Plugin {
                    code: code_s,
                    message,
                },
            ));
        }
        let output = match output {
            None => serde_json::Value::Null,
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    return Err(fail(
                        &store,
                        Error::Plugin {
                            code: "invalid_output".into(),
                            message: format!("the plugin's output is not JSON: {e}"),
                        },
                    ));
                }
            },
        };
        Ok(Run {
            output,
            fuel_used: limits.fuel - store.get_fuel().unwrap_or(0),
            duration: started.elapsed(),
        })
    }
}

/// A trap or a limit as the caller's error.
fn classify(e: &wasmtime::Error, limits: &Limits, started: Instant) -> Error {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Error::Timeout(format!(
            "the plugin used all its fuel ({} units)",
            limits.fuel
        )),
        Some(Trap::Interrupt) => Error::Timeout(format!(
            "the plugin ran longer than {} ms",
            limits.timeout_ms
        )),
        Some(trap) => Error::Trapped(trap.to_string()),
        None => {
            if let Some(h) = e.downcast_ref::<host::HostTrap>() {
                return match h {
                    host::HostTrap::Deadline => Error::Timeout(format!(
                        "the plugin ran longer than {} ms (in a host call after {} ms)",
                        limits.timeout_ms,
                        started.elapsed().as_millis()
                    )),
                    other => Error::Trapped(other.to_string()),
                };
            }
            Error::Trapped(first_line(e))
        }
    }
}

/// The `{code, message}` of a plugin's error: its `error(ptr, len)` JSON, or text, or the
/// return code alone.
fn plugin_error(bytes: Option<&[u8]>, rc: i32) -> (String, String) {
    let Some(bytes) = bytes else {
        return ("plugin_failed".into(), format!("run() returned {rc}"));
    };
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(bytes) {
        let code = m
            .get("code")
            .and_then(|c| c.as_str())
            .filter(|c| {
                !c.is_empty()
                    && c.len() <= 64
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            })
            .unwrap_or("plugin_failed")
            .to_string();
        let message = m
            .get("message")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .chars()
            .take(1000)
            .collect();
        return (code, message);
    }
    let text: String = String::from_utf8_lossy(bytes).chars().take(1000).collect();
    ("plugin_failed".into(), text)
}

fn first_line(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    text.chars().take(500).collect()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
