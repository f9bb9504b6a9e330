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

/// A loopback port that was free a moment ago, for a server or role a test starts.
///
/// Picked at random *below* the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), not
/// with a bind to port 0: a port-0 bind hands out an ephemeral port, the very range every
/// outgoing connection of every process on the machine takes its local port from, so between
/// this check and the server's own bind a client connection elsewhere could take it ("Address
/// already in use" on loaded CI machines). Below the range only another listener can, and two
/// picks at random out of ~20,000 ports rarely meet. Falls back to port 0 when no port in the
/// range is free.
pub fn free_port() -> Result<u16, Error> {
    let (low, _) = ephemeral_range();
    let floor: u16 = 10_000;
    if low > floor + 1_000 {
        let span = u64::from(low - floor);
        let mut seed = random_u64();
        for _ in 0..64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let port = floor + ((seed >> 33) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the bound port"))?
        .port();
    Ok(port)
}

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
pub(crate) fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A random seed from the standard library's per-process hasher keys (no dependency for it).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}
