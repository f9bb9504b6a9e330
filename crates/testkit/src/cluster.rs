//! NATS servers started from a configuration file: a JetStream cluster of several nodes on
//! loopback ([`NatsCluster::start`]), or a single node with another fsync policy
//! ([`NatsOptions::sync_always`]). Each node has its own store dir, its own client, cluster and
//! monitoring ports, and can be killed and restarted on the same ports with the same store
//! (where it catches up from the others).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mozaiks_testkit::Error> {
//! let mut cluster = mozaiks_testkit::NatsCluster::start(3).await?;
//! // cluster.url: "nats://127.0.0.1:A,nats://127.0.0.1:B,nats://127.0.0.1:C" (NATS_URL)
//! let mongo = mozaiks_testkit::TestServers::start_with_nats(&cluster.url).await?;
//! cluster.kill_node(1)?;
//! cluster.restart_node(1).await?; // returns when its /healthz is ok: caught up
//! # Ok(()) }
//! ```

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    Error, PORT_ATTEMPTS, READY_TIMEOUT, connect, ensure_installed, free_port, io_err, nats_info,
    random_hex, run_blocking, spawn_watchdog,
};

/// How the nodes of a [`NatsCluster`] are configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// `jetstream { sync_interval: always }`: fsync after every write (JetStream's default syncs
    /// every 2 minutes).
    pub sync_always: bool,
}

/// One nats-server of a [`NatsCluster`].
#[derive(Debug, Default)]
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn pid_file(&self) -> PathBuf {
        self.log.with_extension("pid")
    }

    fn spawn(&mut self, program: &Path) -> Result<(), Error> {
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(format!("opening {}", self.log.display())))?;
        let _ = writeln!(
            log,
            "=== mozaiks-testkit: starting {} on port {} ===",
            self.name, self.client_port
        );
        let err = log
            .try_clone()
            .map_err(io_err(format!("cloning {}", self.log.display())))?;
        let child = Command::new(program)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn {
                what: "nats-server",
                program: program.to_owned(),
                source,
            })?;
        let _ = fs::write(self.pid_file(), child.id().to_string());
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.pid_file());
    }

    fn not_ready(&self, reason: String) -> Error {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        Error::NotReady {
            what: "nats-server",
            reason,
            log: self.log.clone(),
            log_tail: lines[lines.len().saturating_sub(30)..].join("\n"),
        }
    }

    /// Whether this node is ours, up, and its `/healthz` answers 200 (JetStream has a meta
    /// leader and, for a restarted node, its streams and consumers are current).
    fn healthy(&self) -> bool {
        let ours = nats_info(self.client_port)
            .map(|info| info.contains(&format!("\"server_name\":\"{}\"", self.name)))
            .unwrap_or(false);
        ours && http_status(self.monitor_port, "/healthz") == Some(200)
    }

    fn wait_healthy(&mut self, deadline: Instant) -> Result<(), Error> {
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.not_ready(format!("it exited ({status})")));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "/healthz on 127.0.0.1:{} not ok within {} s",
                    self.monitor_port,
                    READY_TIMEOUT.as_secs() * 2
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// nats-server nodes with JetStream, forming one cluster when there are several. Dropping it
/// kills the nodes and removes their stores.
#[derive(Debug)]
pub struct NatsCluster {
    /// Every node's client URL, comma-separated (what `NATS_URL` takes).
    pub url: String,
    program: PathBuf,
    nodes: Vec<Node>,
    dir: Option<PathBuf>,
    watchdog: Option<Child>,
}

impl NatsCluster {
    /// Starts `nodes` nats-servers (a cluster when more than one) on free loopback ports and
    /// returns when every node's `/healthz` is ok.
    pub async fn start(nodes: usize) -> Result<NatsCluster, Error> {
        Self::start_with(nodes, NatsOptions::default()).await
    }

    /// [`NatsCluster::start`] with other node settings.
    pub async fn start_with(nodes: usize, options: NatsOptions) -> Result<NatsCluster, Error> {
        run_blocking(move || Self::start_blocking(nodes, options)).await
    }

    fn start_blocking(count: usize, options: NatsOptions) -> Result<NatsCluster, Error> {
        assert!(count >= 1, "a cluster needs a node");
        let program = ensure_installed()?.join("nats-server");
        let dir = std::env::temp_dir().join(format!("mozaiks-nats-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let watchdog = spawn_watchdog(&dir);
        let mut cluster = NatsCluster {
            url: String::new(),
            program,
            nodes: Vec::new(),
            dir: Some(dir.clone()),
            watchdog,
        };
        let cluster_name = format!("mz-c-{}", &random_hex()[..10]);
        for attempt in 1..=PORT_ATTEMPTS {
            match cluster.try_start(&cluster_name, count, options) {
                Ok(()) => break,
                // Another process took one of the free ports meanwhile: new ports, new stores.
                Err(e) if attempt < PORT_ATTEMPTS && cluster.lost_a_port() => {
                    let _ = e;
                    for node in &mut cluster.nodes {
                        node.kill();
                    }
                    cluster.nodes.clear();
                }
                Err(e) => return Err(e),
            }
        }
        cluster.url = cluster
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",");
        Ok(cluster)
    }

    /// Writes the nodes' configurations on fresh free ports, starts them, and waits until the
    /// cluster is formed.
    fn try_start(
        &mut self,
        cluster_name: &str,
        count: usize,
        options: NatsOptions,
    ) -> Result<(), Error> {
        let dir = self.dir.clone().expect("the cluster's dir");
        let attempt = random_hex()[..6].to_owned();
        let mut ports = std::collections::HashSet::new();
        let mut port = || -> Result<u16, Error> {
            loop {
                let p = free_port()?;
                if ports.insert(p) {
                    return Ok(p);
                }
            }
        };
        for i in 0..count {
            self.nodes.push(Node {
                name: format!("{cluster_name}-n{i}"),
                client_port: port()?,
                cluster_port: port()?,
                monitor_port: port()?,
                config: dir.join(format!("node{i}.conf")),
                log: dir.join(format!("node{i}.log")),
                child: None,
            });
        }
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats-route://127.0.0.1:{}\"", n.cluster_port))
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let store = dir.join(format!("node{i}-{attempt}"));
            let mut conf = format!(
                "server_name: \"{}\"\nlisten: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
                node.name,
                node.client_port,
                node.monitor_port,
                store.display(),
                if options.sync_always {
                    "  sync_interval: always\n"
                } else {
                    ""
                },
            );
            if count > 1 {
                conf.push_str(&format!(
                    "cluster {{\n  name: \"{cluster_name}\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                    node.cluster_port,
                    routes.join(", ")
                ));
            }
            fs::write(&node.config, conf)
                .map_err(io_err(format!("writing {}", node.config.display())))?;
        }
        let program = self.program.clone();
        for node in &mut self.nodes {
            node.spawn(&program)?;
        }
        // A cluster's JetStream answers once the nodes have elected a meta leader, and places
        // replicated streams once that leader sees every peer current.
        let deadline = Instant::now() + READY_TIMEOUT * 2;
        for node in &mut self.nodes {
            node.wait_healthy(deadline)?;
        }
        self.wait_formed(deadline)
    }

    /// Whether a node's log says one of its ports was taken.
    fn lost_a_port(&self) -> bool {
        self.nodes.iter().any(|n| {
            fs::read_to_string(&n.log)
                .unwrap_or_default()
                .to_ascii_lowercase()
                .contains("address already in use")
        })
    }

    /// Whether the JetStream meta group has a leader that sees every other node current (so a
    /// stream of up to `len()` replicas can be placed).
    pub fn formed(&self) -> bool {
        formed(&self.peers())
    }

    /// (name, monitoring port, running) of every node.
    fn peers(&self) -> Vec<(String, u16, bool)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.monitor_port, n.child.is_some()))
            .collect()
    }

    fn wait_formed(&self, deadline: Instant) -> Result<(), Error> {
        wait_formed(&self.peers(), deadline).map_err(|reason| self.nodes[0].not_ready(reason))
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s `server_name` (as in stream info's `cluster.leader` and `replicas`).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s index by `server_name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Node `i`'s client URL.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Node `i`'s monitoring base URL (`/healthz`, `/jsz`, `/varz`, …).
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].monitor_port)
    }

    /// Node `i`'s pid (`None` while it is down).
    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s log file.
    pub fn node_log(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Whether node `i` runs and its `/healthz` is ok.
    pub fn node_healthy(&self, i: usize) -> bool {
        self.nodes[i].child.is_some() && self.nodes[i].healthy()
    }

    /// The directory of the nodes' stores, configs and logs.
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Kills node `i` with SIGKILL and leaves it down until [`NatsCluster::restart_node`].
    pub fn kill_node(&mut self, i: usize) -> Result<(), Error> {
        self.nodes[i].kill();
        Ok(())
    }

    /// Kills node `i` if it runs, starts it again on the same ports with the same store, and
    /// returns once its `/healthz` is ok (it rejoined and its streams caught up).
    pub async fn restart_node(&mut self, i: usize) -> Result<(), Error> {
        let mut peers = self.peers();
        peers[i].2 = true;
        let mut node = std::mem::take(&mut self.nodes[i]);
        let program = self.program.clone();
        let (node, result) = run_blocking(move || {
            node.kill();
            let deadline = Instant::now() + READY_TIMEOUT * 2;
            let result = loop {
                if let Err(e) = node.spawn(&program) {
                    break Err(e);
                }
                match node.wait_healthy(deadline) {
                    Ok(()) => break Ok(()),
                    // The ports may still be held for a moment after the kill: try again.
                    Err(_) if Instant::now() < deadline => {
                        node.kill();
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => break Err(e),
                }
            };
            let result = result.and_then(|()| {
                wait_formed(&peers, deadline).map_err(|reason| node.not_ready(reason))
            });
            (node, result)
        })
        .await;
        self.nodes[i] = node;
        result
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        for node in &mut self.nodes {
            node.kill();
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                eprintln!("nats-server logs and stores kept in {}", dir.display());
            } else {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }
}

/// Whether the meta leader among `peers` (name, monitoring port, running) sees every other
/// peer current. A single node: whether it runs.
fn formed(peers: &[(String, u16, bool)]) -> bool {
    let n = peers.len();
    if n == 1 {
        return peers[0].2 && http_status(peers[0].1, "/healthz") == Some(200);
    }
    let meta = |port: u16| -> Option<serde_json::Value> {
        let (status, body) = http_get(port, "/jsz")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200).then(|| v["meta_cluster"].clone())
    };
    let Some(leader) = peers
        .iter()
        .filter(|p| p.2)
        .find_map(|p| meta(p.1)?["leader"].as_str().map(str::to_owned))
        .filter(|l| !l.is_empty())
    else {
        return false;
    };
    let Some(leader) = peers.iter().find(|p| p.0 == leader && p.2) else {
        return false;
    };
    let Some(m) = meta(leader.1) else {
        return false;
    };
    let replicas = m["replicas"].as_array().cloned().unwrap_or_default();
    m["cluster_size"].as_u64() == Some(n as u64)
        && replicas.len() == n - 1
        && replicas
            .iter()
            .all(|r| r["current"] == true && r["offline"] != true)
}

fn wait_formed(peers: &[(String, u16, bool)], deadline: Instant) -> Result<(), String> {
    while !formed(peers) {
        if Instant::now() >= deadline {
            return Err("the JetStream meta leader does not see every node current".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The status code of `GET {path}` on a loopback HTTP port.
fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// `GET {path}` on a loopback HTTP port (HTTP/1.0, no client library): status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = connect(port).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Some((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_three_node_cluster_survives_a_node_and_takes_it_back() {
        let mut c = NatsCluster::start(3).await.unwrap();
        assert_eq!(c.url.split(',').count(), 3);
        assert!(c.formed());
        for i in 0..3 {
            assert!(c.node_healthy(i), "node {i}");
            // Each node is routed to the other two.
            let (status, routez) = http_get(c.nodes[i].monitor_port, "/routez").unwrap();
            assert_eq!(status, 200);
            for j in (0..3).filter(|&j| j != i) {
                assert!(routez.contains(c.node_name(j)), "node {i}: {routez}");
            }
        }
        c.kill_node(2).unwrap();
        assert!(!c.node_healthy(2));
        assert!(c.node_healthy(0) && c.node_healthy(1));
        c.restart_node(2).await.unwrap();
        assert!(c.node_healthy(2) && c.formed());
        let conf = fs::read_to_string(&c.nodes[2].config).unwrap();
        assert!(
            conf.contains("routes") && !conf.contains("sync_interval"),
            "{conf}"
        );
    }

    #[tokio::test]
    async fn a_single_node_with_sync_always() {
        let c = NatsCluster::start_with(1, NatsOptions { sync_always: true })
            .await
            .unwrap();
        assert!(c.node_healthy(0));
        assert!(!c.url.contains(','));
        let conf = fs::read_to_string(&c.nodes[0].config).unwrap();
        assert!(
            conf.contains("sync_interval: always") && !conf.contains("cluster"),
            "{conf}"
        );
        let dir = c.data_dir().unwrap().to_owned();
        drop(c);
        assert!(!dir.exists());
    }
}
