//! Plugins: per-app extensions as WebAssembly modules run in a Wasmtime sandbox.
//!
//! A plugin is a module that exports `memory` and `run: func() -> i32` and imports only the host
//! functions of [`host`] (module `mozaiks`): it reads its JSON input with `input_len` /
//! `input_read`, answers with `output`, fails with `error`, and reaches the world only through a
//! key-value store scoped to (app, plugin[, user]), HTTP to its allowlisted hosts, a log, events
//! on its app's own subject and notifications to its app's users. No WASI: no filesystem, clock,
//! randomness or sockets. Every call gets a fresh instance with a memory limit, fuel and a
//! wall-clock deadline ([`sandbox`]); a trap or a limit ends that call only.
//!
//! Plugins come from packs shipped with the fleet (`plugins/<name>/plugin.yaml` + module,
//! [`manifest`]) or are uploaded by an app's admins, stored in the `MZ_PLUGIN_MODULES` object
//! store with their manifest in `MZ_PLUGIN_KV`, so every replica runs them at once. Which
//! plugins an app may run: its tier ([`access`]) and its enabled list. Every execution is a
//! `plugin.executed` record on `mz.plugin.executed.{app_id}.{plugin}` (stream `MZ_PLUGINS`).

pub mod access;
pub mod host;
pub mod manifest;
pub mod metrics;
pub mod sandbox;
mod service;
#[cfg(test)]
mod tests;

pub use access::Access;
pub use host::CallContext;
pub use manifest::{Limits, Manifest, Pack, Packs};
pub use sandbox::Sandbox;
pub use service::{Call, Executed, Listing, PluginExecuted, Plugins, Upload, Via};

/// The JSON Schema of a `plugin.executed` record (`schemas/plugin.executed.schema.json`).
pub fn schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(PluginExecuted)).unwrap_or_default() + "\n"
}

/// Errors of plugins, each with a stable code ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no plugin {0:?} for this app")]
    NotFound(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("invalid plugin: {0}")]
    InvalidManifest(String),
    #[error("invalid module: {0}")]
    InvalidModule(String),
    #[error("the plugin trapped: {0}")]
    Trapped(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the plugin failed ({code}): {message}")]
    Plugin { code: String, message: String },
    #[error("{0}")]
    Busy(String),
    #[error("{0} is unavailable")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The stable code a client can match.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "plugin_not_found",
            Error::NotAllowed(_) => "plugin_not_allowed",
            Error::InvalidInput(_) => "invalid_input",
            Error::TooLarge(_) => "too_large",
            Error::InvalidManifest(_) => "invalid_plugin",
            Error::InvalidModule(_) => "invalid_module",
            Error::Trapped(_) => "plugin_trapped",
            Error::Timeout(_) => "plugin_timeout",
            Error::Plugin { .. } => "plugin_error",
            Error::Busy(_) => "plugin_busy",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
        }
    }

    /// The message without the code's words, for error bodies.
    pub fn message(&self) -> String {
        match self {
            Error::InvalidManifest(m) | Error::InvalidModule(m) => m.clone(),
            other => other.to_string(),
        }
    }
}
