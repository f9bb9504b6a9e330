//! A server process the kit started: spawn, readiness, kill, restart on the same port.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::*;

/// Which server a [`Managed`] process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Nats,
    Mongo,
}

impl Kind {
    pub(crate) fn program_name(self) -> &'static str {
        match self {
            Kind::Nats => "nats-server",
            Kind::Mongo => "secantusd-py",
        }
    }

    pub(crate) fn file_stem(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Mongo => "mongo",
        }
    }
}

/// A server process started by the kit.
#[derive(Debug)]
pub(crate) struct Managed {
    pub(crate) kind: Kind,
    pub(crate) program: PathBuf,
    /// The data directory (`-sd` / `--storage-path`).
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) port: u16,
    /// NATS `server_name`, checked in the INFO line so that a foreign server that happens
    /// to listen on our port is never mistaken for ours.
    pub(crate) name: String,
    pub(crate) child: Option<Child>,
    /// Length of the log file when the current process was spawned: readiness and error
    /// reports look only at what it wrote.
    pub(crate) log_start: u64,
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Managed {
    pub(crate) fn args(&self) -> Vec<String> {
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

    pub(crate) fn pid_file(&self) -> PathBuf {
        self.log.with_extension("pid")
    }

    /// Spawns the process (the previous one must be gone).
    pub(crate) fn spawn(&mut self) -> Result<(), Error> {
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
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.pid_file());
    }

    /// What the current process wrote to the log.
    pub(crate) fn current_log(&self) -> String {
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

    pub(crate) fn not_ready(&self, reason: String) -> Error {
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
    pub(crate) fn wait_ready(&mut self, deadline: Instant) -> Result<bool, Error> {
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
    pub(crate) fn start_on_free_port(&mut self) -> Result<(), Error> {
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
    pub(crate) fn restart(&mut self) -> Result<(), Error> {
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

/// Sends `SIG{name}` to `pid` with `kill(1)` (the workspace forbids `unsafe`, so no libc).
pub(crate) fn signal(pid: u32, name: &str) -> Result<(), Error> {
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
