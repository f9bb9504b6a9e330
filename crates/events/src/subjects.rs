//! Subject and stream names. Every subject carries `app_id`, so tenants can be filtered,
//! limited and later isolated with NATS accounts.
//!
//! | subject | stream | what |
//! |---|---|---|
//! | `{ns}mz.evt.{app_id}.{chat_id}.{type}` | `{NS}MZ_EVT` | a chat's events (`type` has two tokens, e.g. `agent.message`) |
//! | `{ns}mz.cmd.{app_id}.{chat_id}` | `{NS}MZ_CMD` | commands to a chat's owner |
//! | `{ns}mz.evt.{app_id}.*.usage.charged` | `{NS}MZ_USAGE` (sourced from `MZ_EVT`) | token charges for billing |
//! | `{ns}mz.ops.>` | `{NS}MZ_OPS` | incidents and ops actions |
//! | `{ns}mz.live.{app_id}.{chat_id}.{type}` | core NATS (republished by `MZ_EVT`) | every *stored* event, with its stream sequence; gateways' live feed |
//! | `{ns}mz.dlt.{app_id}.{chat_id}` | core NATS (not stored) | token deltas while an agent streams text (`agent.delta` frames) |
//! | `{ns}mz.ntf.{app_id}` | core NATS | notifications to one user or the whole app, on every gateway replica |
//! | `{ns}mz.ctl.app.{app_id}` | `{NS}MZ_CTL` | the control plane's app events |
//!
//! `ns` is a namespace prefix (empty by default) so several installs or tests can share one
//! NATS server.

/// Builds subjects and stream names for one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `namespace` is empty for the default install; otherwise it must be a valid token.
    pub fn new(namespace: &str) -> Self {
        let prefix = if namespace.is_empty() {
            String::new()
        } else {
            format!("{namespace}.")
        };
        Self { prefix }
    }

    /// The namespace prefix of subjects, e.g. `"t1."`, or `""`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix for stream, consumer and bucket names, e.g. `"t1_"`, or `""`.
    pub fn name_prefix(&self) -> String {
        self.prefix.replace('.', "_")
    }

    /// A stream, consumer or bucket name in this namespace.
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.name_prefix())
    }

    /// The subject of one event of a chat.
    pub fn event(&self, app_id: &str, chat_id: &str, event_type: &str) -> String {
        format!("{}mz.evt.{app_id}.{chat_id}.{event_type}", self.prefix)
    }

    /// Every event of one chat.
    pub fn chat_events(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.evt.{app_id}.{chat_id}.>", self.prefix)
    }

    /// Every event of every chat.
    pub fn all_events(&self) -> String {
        format!("{}mz.evt.>", self.prefix)
    }

    /// Usage charges of every app (the filter `MZ_USAGE` sources from `MZ_EVT`).
    pub fn usage_filter(&self) -> String {
        format!("{}mz.evt.*.*.usage.charged", self.prefix)
    }

    /// The command subject of one chat.
    pub fn command(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.cmd.{app_id}.{chat_id}", self.prefix)
    }

    /// Every command.
    pub fn all_commands(&self) -> String {
        format!("{}mz.cmd.>", self.prefix)
    }

    /// Token deltas of one chat (core NATS, not stored).
    pub fn deltas(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.dlt.{app_id}.{chat_id}", self.prefix)
    }

    /// Ops incidents and actions.
    pub fn ops(&self, rest: &str) -> String {
        format!("{}mz.ops.{rest}", self.prefix)
    }

    /// Applies the namespace to a subject written without it in `streams/` files.
    pub fn apply(&self, subject: &str) -> String {
        format!("{}{subject}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_namespace_has_no_prefix() {
        let s = Subjects::new("");
        assert_eq!(
            s.event("a", "c", "agent.message"),
            "mz.evt.a.c.agent.message"
        );
        assert_eq!(s.chat_events("a", "c"), "mz.evt.a.c.>");
        assert_eq!(s.name("MZ_EVT"), "MZ_EVT");
    }

    #[test]
    fn namespaces_prefix_subjects_and_names() {
        let s = Subjects::new("t1");
        assert_eq!(s.command("a", "c"), "t1.mz.cmd.a.c");
        assert_eq!(s.name("MZ_EVT"), "t1_MZ_EVT");
        assert_eq!(s.usage_filter(), "t1.mz.evt.*.*.usage.charged");
        assert_eq!(s.deltas("a", "c"), "t1.mz.dlt.a.c");
    }
}
