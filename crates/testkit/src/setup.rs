//! Installing the servers, the watchdog that cleans up after a killed test process, and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::*;

/// `<repo>`: two levels above this crate's manifest dir.
pub(crate) fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("..").join("..");
    root.canonicalize().unwrap_or(root)
}

/// Runs `scripts/servers.sh install` once per process (it is a no-op when the pinned
/// versions are installed, and locks against concurrent installs); returns the venv's bin dir.
pub(crate) fn ensure_installed() -> Result<PathBuf, Error> {
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
pub(crate) fn spawn_watchdog(dir: &Path) -> Option<Child> {
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
pub(crate) fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the bound port"))?
        .port();
    Ok(port)
}
