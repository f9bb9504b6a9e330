//! Tier → plugins: which plugins an app's tier may run (`plugins/access.yaml`), narrowed by the
//! app's own enabled list.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::Error;

/// One tier's plugins.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPlugins {
    /// Shipped packs the tier may run; `"*"` is every one.
    #[serde(default)]
    pub shipped: Vec<String>,
    /// Whether the tier's apps may upload and run their own plugins.
    #[serde(default)]
    pub uploads: bool,
}

/// `plugins/access.yaml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    #[serde(default)]
    pub tiers: BTreeMap<String, TierPlugins>,
}

/// The file shipped in the binary.
pub const EMBEDDED: &str = include_str!("../../../plugins/access.yaml");

impl Access {
    pub fn parse(text: &str) -> Result<Access, Error> {
        serde_norway::from_str(text)
            .map_err(|e| Error::InvalidManifest(format!("access.yaml: {e}")))
    }

    /// `dir/access.yaml`, or the embedded file when there is none.
    pub fn load(dir: &Path) -> Result<Access, Error> {
        match std::fs::read_to_string(dir.join("access.yaml")) {
            Ok(text) => Access::parse(&text),
            Err(_) => Access::parse(EMBEDDED),
        }
    }

    /// Whether `tier` may run the shipped pack `name`.
    pub fn allows_shipped(&self, tier: &str, name: &str) -> bool {
        self.tiers
            .get(tier)
            .is_some_and(|t| t.shipped.iter().any(|s| s == "*" || s == name))
    }

    /// Whether `tier` may upload and run its own plugins.
    pub fn allows_uploads(&self, tier: &str) -> bool {
        self.tiers.get(tier).is_some_and(|t| t.uploads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_parses_and_answers() {
        let a = Access::parse(EMBEDDED).unwrap();
        assert!(a.allows_shipped("starter", "todo"));
        assert!(a.allows_shipped("starter", "anything"));
        assert!(a.allows_shipped("horizons", "todo"));
        assert!(!a.allows_shipped("horizons", "echo"));
        assert!(!a.allows_shipped("no-such-tier", "todo"));
        assert!(a.allows_uploads("starter"));
        assert!(!a.allows_uploads("horizons"));
    }
}
