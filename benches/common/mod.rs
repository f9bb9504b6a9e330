//! What the fleet benchmarks share: finding the `mozaiks` binary, a free loopback port, and a
//! `mozaiks` command whose environment points at the test kit's servers and nothing else.
//! Included with `mod common;` by the benches that start `mozaiks` processes.

// Each bench uses the part it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use mozaiks_testkit::TestServers;

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `MOZAIKS_BIN`, else the binary Cargo built alongside this bench (`CARGO_BIN_EXE_mozaiks`),
/// else `mozaiks` next to this bench's profile dir (`target/release/deps/..`), else
/// `<manifest>/target/release/mozaiks`, else `<manifest>/target/debug/mozaiks`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("MOZAIKS_BIN")
        && !p.is_empty()
    {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "MOZAIKS_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let mut candidates = Vec::new();
    // Cargo builds the package's binaries for its benches (bench profile) and says where.
    if let Some(p) = option_env!("CARGO_BIN_EXE_mozaiks") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("mozaiks"));
    }
    candidates.push(manifest_dir().join("target/release/mozaiks"));
    candidates.push(manifest_dir().join("target/debug/mozaiks"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("no mozaiks binary: run `cargo build --release --bin mozaiks` or set MOZAIKS_BIN")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A `mozaiks` command with a clean environment pointing at the test servers (NATS, Mongo, the
/// test's namespace and database), logging at `warn`. Callers add their role's settings.
pub fn mozaiks(bin: &Path, servers: &TestServers) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATS_URL", &servers.nats_url)
        .env("MONGO_URI", &servers.mongo_uri)
        .env("MOZAIKS_MONGO_DB", &servers.mongo_db)
        .env("MOZAIKS_NAMESPACE", &servers.namespace)
        .env("LOG_LEVEL", "warn");
    cmd
}
