//! Plugin packs: `plugins/<name>/plugin.yaml` and its module, validated at load.
//!
//! ```yaml
//! name: todo                 # [a-z0-9_-], 1 to 64; the folder's name
//! version: 1.0.0             # 1 to 32 of [A-Za-z0-9.+_-]
//! description: A per-user to-do list.
//! module: todo.wat           # .wat (compiled at load) or .wasm, beside plugin.yaml
//! limits:                    # each optional, within the bounds below
//!   memory_mb: 16
//!   fuel: 50000000
//!   timeout_ms: 2000
//! http_allowlist: [api.example.com]   # hosts the plugin's http_request may reach
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Largest module accepted (binary or text), in bytes.
pub const MAX_MODULE_BYTES: usize = 4 * 1024 * 1024;
/// Most memory a plugin may be given, in MiB.
pub const MAX_MEMORY_MB: u32 = 256;
/// Most fuel (roughly, WebAssembly instructions) one call may burn.
pub const MAX_FUEL: u64 = 10_000_000_000;
/// Longest wall-clock time of one call.
pub const MAX_TIMEOUT_MS: u64 = 30_000;
/// Most hosts in an allowlist.
pub const MAX_HOSTS: usize = 32;

/// A plugin's limits per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory, MiB (1 to 256; default 16).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
    /// Fuel per call (1 to 10^10; default 50,000,000).
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Wall-clock time per call, host calls included (1 to 30000 ms; default 2000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: default_memory_mb(),
            fuel: default_fuel(),
            timeout_ms: default_timeout_ms(),
        }
    }
}

fn default_memory_mb() -> u32 {
    16
}
fn default_fuel() -> u64 {
    50_000_000
}
fn default_timeout_ms() -> u64 {
    2_000
}

/// `plugin.yaml`, or the description part of an upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// The module's file, beside `plugin.yaml` (packs only; an upload carries the module).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub module: String,
    #[serde(default)]
    pub limits: Limits,
    /// Hosts (`api.example.com`, or `127.0.0.1:8080` with a port) `http_request` may reach.
    #[serde(default)]
    pub http_allowlist: Vec<String>,
}

impl Manifest {
    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        check_name(&self.name)?;
        let bad = |field: &str, why: String| Error::InvalidManifest(format!("{field}: {why}"));
        if self.version.is_empty()
            || self.version.len() > 32
            || !self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        {
            return Err(bad(
                "version",
                "1 to 32 of letters, digits and '.', '_', '+', '-'".into(),
            ));
        }
        if self.description.len() > 1024 {
            return Err(bad("description", "at most 1024 bytes".into()));
        }
        let l = &self.limits;
        if l.memory_mb == 0 || l.memory_mb > MAX_MEMORY_MB {
            return Err(bad(
                "limits.memory_mb",
                format!("must be 1 to {MAX_MEMORY_MB}, got {}", l.memory_mb),
            ));
        }
        if l.fuel == 0 || l.fuel > MAX_FUEL {
            return Err(bad(
                "limits.fuel",
                format!("must be 1 to {MAX_FUEL}, got {}", l.fuel),
            ));
        }
        if l.timeout_ms == 0 || l.timeout_ms > MAX_TIMEOUT_MS {
            return Err(bad(
                "limits.timeout_ms",
                format!("must be 1 to {MAX_TIMEOUT_MS}, got {}", l.timeout_ms),
            ));
        }
        if self.http_allowlist.len() > MAX_HOSTS {
            return Err(bad("http_allowlist", format!("at most {MAX_HOSTS} hosts")));
        }
        for (i, h) in self.http_allowlist.iter().enumerate() {
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
            if !ok {
                return Err(bad(
                    &format!("http_allowlist[{i}]"),
                    format!("expected a host name or host:port, got {h:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a plugin name: `[a-z0-9_-]`, 1 to 64 characters (a NATS subject token and a key).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidManifest(format!(
            "name: {name:?} must be 1 to 64 of a-z, 0-9, '_' and '-'"
        )))
    }
}

/// A plugin pack: its manifest and module bytes (WebAssembly binary or text).
#[derive(Clone, Debug)]
pub struct Pack {
    pub manifest: Manifest,
    pub module: Vec<u8>,
}

/// Every pack of a folder, by name.
#[derive(Clone, Debug, Default)]
pub struct Packs {
    pub packs: BTreeMap<String, Pack>,
}

impl Packs {
    /// Reads `dir/<name>/plugin.yaml` and its module for every sub-folder. A missing folder is
    /// no packs; a broken pack is an error naming it. Modules are not compiled here (see
    /// [`crate::Sandbox::compile`]; `mozaiks plugins check` does both).
    pub fn load_dir(dir: &Path) -> Result<Packs, Error> {
        let mut packs = Packs::default();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(packs);
        };
        let mut dirs: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("plugin.yaml").is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            let pack = load_pack(&d)
                .map_err(|e| Error::InvalidManifest(format!("{}: {}", d.display(), e.message())))?;
            packs.packs.insert(pack.manifest.name.clone(), pack);
        }
        Ok(packs)
    }

    pub fn get(&self, name: &str) -> Option<&Pack> {
        self.packs.get(name)
    }
}

fn load_pack(dir: &Path) -> Result<Pack, Error> {
    let text = std::fs::read_to_string(dir.join("plugin.yaml"))
        .map_err(|e| Error::InvalidManifest(format!("plugin.yaml: {e}")))?;
    let manifest: Manifest = serde_norway::from_str(&text)
        .map_err(|e| Error::InvalidManifest(format!("plugin.yaml: {e}")))?;
    manifest.validate()?;
    let folder = dir
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    if folder != manifest.name {
        return Err(Error::InvalidManifest(format!(
            "name: {:?} differs from the folder's name {folder:?}",
            manifest.name
        )));
    }
    let file = &manifest.module;
    if file.is_empty() || file.contains('/') || file.contains("..") {
        return Err(Error::InvalidManifest(format!(
            "module: expected a file name beside plugin.yaml, got {file:?}"
        )));
    }
    let module = std::fs::read(dir.join(file))
        .map_err(|e| Error::InvalidManifest(format!("module {file}: {e}")))?;
    if module.len() > MAX_MODULE_BYTES {
        return Err(Error::InvalidModule(format!(
            "{file} is larger than {MAX_MODULE_BYTES} bytes"
        )));
    }
    Ok(Pack { manifest, module })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        serde_norway::from_str("name: echo\nversion: 1.0.0\nmodule: echo.wat\n").unwrap()
    }

    #[test]
    fn defaults_and_bounds() {
        let m = manifest();
        assert_eq!(m.limits, Limits::default());
        m.validate().unwrap();
        for (field, bad) in [
            ("limits.memory_mb", "limits: {memory_mb: 0}"),
            ("limits.memory_mb", "limits: {memory_mb: 1024}"),
            ("limits.fuel", "limits: {fuel: 0}"),
            ("limits.timeout_ms", "limits: {timeout_ms: 60000}"),
            ("version", "version: 'a b'"),
            ("http_allowlist[0]", "http_allowlist: ['http://x/']"),
        ] {
            let text = format!("name: echo\nversion: 1.0.0\n{bad}\n")
                .replace("version: 1.0.0\nversion", "version");
            let m: Manifest = serde_norway::from_str(&text).unwrap();
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        for name in ["", "Echo", "a.b", "a b", &"x".repeat(65)] {
            assert!(check_name(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_norway::from_str::<Manifest>("name: e\nversion: 1\nwasi: true\n").is_err());
    }

    #[test]
    fn shipped_packs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
        let packs = Packs::load_dir(&dir).unwrap();
        assert!(packs.get("todo").is_some(), "the example plugin ships");
    }
}
