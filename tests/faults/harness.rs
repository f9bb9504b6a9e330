//! A fleet for fault injection: every role a separate `mozaiks` process in a named slot (two
//! gateways, two workers, projector, billing) that can be signalled (SIGKILL, SIGTERM) and
//! started again with the same settings (a gateway on the same port).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mozaiks_testkit::TestServers;

use crate::fleet::{self, free_port};

/// One role process and what it needs to start again.
pub struct Slot {
    /// `gateway-0`, `worker-1`, …
    pub name: String,
    /// The `mozaiks` sub-command.
    pub role: &'static str,
    /// A gateway's `MOZAIKS_LISTEN` port.
    pub port: Option<u16>,
    /// `MOZAIKS_HEALTH_LISTEN` port of the other roles (when the binary has it).
    pub health_port: Option<u16>,
    pub child: Option<Child>,
    /// The current process's log.
    pub log: PathBuf,
    /// How many times the slot was started.
    pub starts: usize,
}

pub struct Harness {
    pub servers: TestServers,
    pub slots: Vec<Slot>,
    pub http: reqwest::Client,
    /// Whether the binary serves `/health/ready` on `MOZAIKS_HEALTH_LISTEN` for every role.
    pub health_listener: bool,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

/// `MOZAIKS_BIN`: a `mozaiks` binary to run instead of the one Cargo built for this test (the
/// durability measurement uses a release build).
pub fn other_binary() -> Option<PathBuf> {
    std::env::var_os("MOZAIKS_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Whether `mozaiks` knows `MOZAIKS_HEALTH_LISTEN` (its `--help` lists the variable).
fn binary_has_health_listener() -> bool {
    Command::new(other_binary().unwrap_or_else(|| env!("CARGO_BIN_EXE_mozaiks").into()))
        .args(["worker", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("MOZAIKS_HEALTH_LISTEN"))
        .unwrap_or(false)
}

impl Harness {
    /// Starts two gateways, two workers, a projector and billing against `servers`, with `env`
    /// added to every process, and waits until each is ready.
    pub async fn start(servers: TestServers, env: &[(&str, &str)]) -> Harness {
        let dir =
            std::env::temp_dir().join(format!("mozaiks-faults-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = Harness {
            servers,
            slots: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            health_listener: binary_has_health_listener(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        for (role, n) in [
            ("worker", 2),
            ("projector", 1),
            ("billing", 1),
            ("gateway", 2),
        ] {
            for i in 0..n {
                let gateway = role == "gateway";
                h.slots.push(Slot {
                    name: format!("{role}-{i}"),
                    role,
                    port: gateway.then(free_port),
                    health_port: (!gateway && h.health_listener).then(free_port),
                    child: None,
                    log: PathBuf::new(),
                    starts: 0,
                });
            }
        }
        for i in 0..h.slots.len() {
            h.spawn(i);
        }
        for i in 0..h.slots.len() {
            h.wait_ready(i).await;
        }
        h
    }

    /// The slot named `name`.
    pub fn slot(&self, name: &str) -> usize {
        self.slots
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no slot {name}"))
    }

    /// The gateways' base URLs, in slot order (`gateway-0` first).
    pub fn gateway_urls(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter_map(|s| s.port.map(|p| format!("http://127.0.0.1:{p}")))
            .collect()
    }

    /// Starts slot `i`'s process (the previous one must be gone).
    pub fn spawn(&mut self, i: usize) {
        let slot = &self.slots[i];
        let log = self.dir.join(format!("{}-{}.log", slot.name, slot.starts));
        let mut cmd = fleet::command(&self.servers, slot.role, &log);
        if let Some(bin) = other_binary() {
            // The same arguments and environment for another build (e.g. a release binary).
            let mut other = Command::new(bin);
            other.args(cmd.get_args()).env_clear();
            for (k, v) in cmd.get_envs() {
                if let Some(v) = v {
                    other.env(k, v);
                }
            }
            let out = std::fs::File::options().append(true).open(&log).unwrap();
            other.stdout(out.try_clone().unwrap()).stderr(out);
            cmd = other;
        }
        cmd.env("MOZAIKS_ARCHIVE_DIR", self.dir.join("archive"))
            .env("MOZAIKS_DRAIN_SECONDS", "3")
            .env("LOG_LEVEL", "info,async_nats=warn");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(p) = slot.port {
            cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{p}"));
        }
        if let Some(p) = slot.health_port {
            cmd.env("MOZAIKS_HEALTH_LISTEN", format!("127.0.0.1:{p}"));
        }
        let child = cmd.spawn().expect("spawn mozaiks");
        let slot = &mut self.slots[i];
        slot.child = Some(child);
        slot.log = log;
        slot.starts += 1;
    }

    /// Sends `SIG{signal}` to slot `i`'s process (with `kill(1)`: the workspace forbids unsafe).
    pub fn signal(&self, i: usize, signal: &str) {
        let pid = self.slots[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.slots[i].name))
            .id();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{signal} {pid} ({}) failed", self.slots[i].name);
    }

    /// SIGKILL slot `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        self.signal(i, "KILL");
        if let Some(mut c) = self.slots[i].child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM slot `i` and wait (up to 60 s) until it exits; returns its exit status.
    pub async fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        self.signal(i, "TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let child = self.slots[i].child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.slots[i].child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not stop within 60 s of SIGTERM; logs:\n{}",
                    self.slots[i].name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts slot `i` again and waits until it is ready.
    pub async fn restart(&mut self, i: usize) {
        if self.slots[i].child.is_some() {
            self.kill(i);
        }
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Whether slot `i`'s process exited because its port was taken.
    fn lost_its_port(&mut self, i: usize) -> bool {
        !self.alive(i)
            && std::fs::read_to_string(&self.slots[i].log)
                .is_ok_and(|log| log.contains("Address already in use"))
    }

    /// Whether slot `i`'s process runs.
    pub fn alive(&mut self, i: usize) -> bool {
        match self.slots[i].child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// The readiness URL of slot `i`, if it has one (gateways always; other roles with
    /// `MOZAIKS_HEALTH_LISTEN`).
    pub fn ready_url(&self, i: usize) -> Option<String> {
        let s = &self.slots[i];
        s.port
            .or(s.health_port)
            .map(|p| format!("http://127.0.0.1:{p}/health/ready"))
    }

    /// Slot `i`'s readiness now: the status and body of `/health/ready`, or, without a health
    /// listener, whether the process runs and logged that it is ready.
    pub async fn readiness(&mut self, i: usize) -> (bool, String) {
        if !self.alive(i) {
            return (false, "the process is not running".into());
        }
        match self.ready_url(i) {
            Some(url) => match self.http.get(&url).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = r.text().await.unwrap_or_default();
                    (status == 200, format!("{status} {body}"))
                }
                Err(e) => (false, format!("GET {url}: {e}")),
            },
            None => {
                let log = std::fs::read_to_string(&self.slots[i].log).unwrap_or_default();
                let ready = log.contains("Mozaiks ready.");
                (ready, format!("alive; ready logged: {ready}"))
            }
        }
    }

    /// Waits (up to 60 s) until slot `i` is ready. A first start whose port another process took
    /// between `free_port` and the bind (a race of the test machine, not of the fleet) is
    /// started again on fresh ports, up to three times.
    pub async fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut port_retries = 0;
        loop {
            let (ok, why) = self.readiness(i).await;
            if ok {
                return;
            }
            if port_retries < 3 && self.slots[i].starts == 1 + port_retries && self.lost_its_port(i)
            {
                port_retries += 1;
                let slot = &mut self.slots[i];
                slot.child = None;
                slot.port = slot.port.map(|_| free_port());
                slot.health_port = slot.health_port.map(|_| free_port());
                self.spawn(i);
                continue;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready within 60 s ({why}); logs:\n{}",
                    self.slots[i].name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of every slot's current log.
    pub fn logs(&self) -> String {
        self.slots
            .iter()
            .map(|s| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- {} (start {}) ---\n{}",
                    s.name,
                    s.starts,
                    lines[lines.len().saturating_sub(25)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // The test kit removes its servers' directories: keep their logs with ours.
            for (log, name) in [
                (self.servers.nats_log(), "nats-server.log"),
                (self.servers.mongo_log(), "mongo.log"),
            ] {
                if let Some(log) = log {
                    let _ = std::fs::copy(log, self.dir.join(name));
                }
            }
            eprintln!("process logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
