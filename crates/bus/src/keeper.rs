//! Keeps the server's streams, consumers and buckets as `streams/` defines them, and tells every
//! role whether the bus can do its work.
//!
//! Definitions are applied at start ([`Bus::apply`]), but a server can lose them while the
//! process runs: a single nats-server restarted loses its memory-stored buckets (`MZ_OWNERS`,
//! `MZ_PERF`, `MZ_PRESENCE`), an operator may delete a stream by mistake, a server can come back
//! with an empty store. [`Bus::keep_definitions`] checks that everything exists after every
//! reconnect, whenever a role reports a "no stream" / "no consumer" error ([`Bus::heal`]), and every
//! few seconds, and re-applies the definitions (idempotently) when something is missing, so a
//! restarted nats-server heals without restarting any role.
//!
//! [`Readiness`] is the process's honest answer to "can every role work now": the bus connection,
//! the definitions, and whatever each role reports ([`Bus::report`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::definitions::Definitions;
use crate::{Bus, Error, ErrorKind, metrics as m};

/// How often the keeper checks that the definitions exist when nothing else wakes it.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often the keeper looks at the connection's connect counter.
const CONNECT_POLL: Duration = Duration::from_millis(100);

/// State shared by every clone of a [`Bus`].
#[derive(Default)]
pub(crate) struct Shared {
    defs: Mutex<Option<Arc<Definitions>>>,
    /// Whether the last check found every definition on the server.
    defs_ok: AtomicBool,
    wake: Notify,
    problems: Mutex<BTreeMap<String, String>>,
}

/// What keeps a process from working, by component (empty: ready).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub problems: BTreeMap<String, String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Bus {
    pub(crate) fn remember(&self, defs: &Definitions) {
        *self
            .shared
            .defs
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(defs.clone()));
        self.shared.defs_ok.store(true, Ordering::Relaxed);
    }

    fn definitions(&self) -> Option<Arc<Definitions>> {
        self.shared
            .defs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks the keeper to check the definitions now (a role saw "no stream", "no consumer" or
    /// "no responders": [`is_missing`]).
    pub fn heal(&self) {
        self.shared.wake.notify_one();
    }

    /// Whether the last check found every stream, consumer and bucket on the server.
    pub fn definitions_ok(&self) -> bool {
        self.shared.defs_ok.load(Ordering::Relaxed)
    }

    /// Records whether `component` (e.g. `worker.commands`) can work: `Err(reason)` makes the
    /// process not ready until the component reports `Ok` again.
    pub fn report(&self, component: &str, state: Result<(), String>) {
        let mut p = self
            .shared
            .problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match state {
            Ok(()) => {
                p.remove(component);
            }
            Err(reason) => {
                p.insert(component.to_string(), reason);
            }
        }
    }

    /// What keeps this process from working now: the connection, the definitions, and every
    /// component's report.
    pub fn readiness(&self) -> Readiness {
        let mut problems = self
            .shared
            .problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !self.is_connected() {
            problems.insert("nats".into(), "not connected".into());
        }
        if !self.definitions_ok() {
            problems.insert(
                "definitions".into(),
                "streams, consumers or buckets missing on the server".into(),
            );
        }
        Readiness { problems }
    }

    /// Checks that every stream, consumer and bucket of the applied definitions exists; returns
    /// the missing ones' names.
    pub async fn missing_definitions(&self) -> Result<Vec<String>, Error> {
        let Some(defs) = self.definitions() else {
            return Ok(Vec::new());
        };
        let s = self.subjects();
        let mut missing = Vec::new();
        let mut names: Vec<String> = defs.streams.iter().map(|c| s.name(&c.name)).collect();
        names.extend(
            defs.buckets
                .iter()
                .map(|b| format!("KV_{}", s.name(&b.bucket))),
        );
        names.extend(
            defs.objects
                .iter()
                .map(|b| format!("OBJ_{}", s.name(&b.bucket))),
        );
        for name in names {
            if !self.stream_exists(&name).await? {
                missing.push(name);
            }
        }
        for c in &defs.consumers {
            let stream = s.name(&c.stream);
            let Some(durable) = c.config.durable_name.as_deref().map(|n| s.name(n)) else {
                continue;
            };
            if missing.contains(&stream) {
                missing.push(format!("{stream}/{durable}"));
                continue;
            }
            let st = self.jetstream().get_stream_no_info(&stream).await;
            let exists = match st {
                Ok(st) => match st.consumer_info(&durable).await {
                    Ok(_) => true,
                    Err(e) if crate::kind_of(&e) == ErrorKind::NotFound => false,
                    Err(e) => return Err(Error::jetstream(format!("consumer {durable}"), e)),
                },
                Err(e) => return Err(Error::jetstream(format!("stream {stream}"), e)),
            };
            if !exists {
                missing.push(format!("{stream}/{durable}"));
            }
        }
        Ok(missing)
    }

    async fn stream_exists(&self, name: &str) -> Result<bool, Error> {
        match self.jetstream().get_stream(name).await {
            Ok(_) => Ok(true),
            Err(e) if crate::kind_of(&e) == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::jetstream(format!("stream {name}"), e)),
        }
    }

    /// One check: re-applies the definitions if anything is missing. Returns what was missing.
    pub async fn check_definitions(&self) -> Result<Vec<String>, Error> {
        let missing = self.missing_definitions().await?;
        if missing.is_empty() {
            self.shared.defs_ok.store(true, Ordering::Relaxed);
            return Ok(missing);
        }
        self.shared.defs_ok.store(false, Ordering::Relaxed);
        warn!(missing = %missing.join(", "), "Stream definitions missing on the server (restarted without its data, or deleted); applying them again.");
        let Some(defs) = self.definitions() else {
            return Ok(missing);
        };
        self.apply(&defs).await?;
        metrics::counter!(m::DEFINITIONS_HEALED).increment(1);
        info!(
            healed = missing.len(),
            "Stream definitions applied again; the bus is whole."
        );
        Ok(missing)
    }

    /// Keeps the definitions on the server until `stop` resolves: after every reconnect, when a
    /// role asks ([`Bus::heal`]), and every [`CHECK_EVERY`].
    pub async fn keep_definitions(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let stats = self.client().statistics();
        let mut connects = stats.connects.load(Ordering::Relaxed);
        let mut retry = Duration::from_millis(200);
        loop {
            let wait = if self.definitions_ok() {
                CHECK_EVERY
            } else {
                retry
            };
            let deadline = tokio::time::Instant::now() + wait;
            // Wake early on a reconnect or a role's request.
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = self.shared.wake.notified() => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = tokio::time::sleep(CONNECT_POLL) => {
                        let now = stats.connects.load(Ordering::Relaxed);
                        if now != connects && self.is_connected() {
                            connects = now;
                            break;
                        }
                    }
                }
            }
            if !self.is_connected() {
                continue;
            }
            match self.check_definitions().await {
                Ok(_) => retry = Duration::from_millis(200),
                Err(e) => {
                    self.shared.defs_ok.store(false, Ordering::Relaxed);
                    warn!(error = %e, "Cannot check the stream definitions; retrying.");
                    retry = (retry * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Whether an error (of the bus, of async-nats, or one wrapping either) says something the
/// definitions provide is missing, or the server has no JetStream answering yet: a reason to
/// [`Bus::heal`]. Decided by the error's kind ([`crate::Error::is_missing`]), not its text.
pub fn is_missing(error: &(dyn std::error::Error + 'static)) -> bool {
    crate::is_missing_in(error)
}
