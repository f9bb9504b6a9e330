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
//! | `{ns}mz.live.{app_id}.{chat_id}.delta` | core NATS (not stored, no `Nats-Sequence`) | token deltas while an agent streams text (`agent.delta` frames); under the chat's live subject so a gateway follows a chat with one subscription (one token after the chat: never an event type, which has two) |
//! | `{ns}mz.dlt.{app_id}.{chat_id}` | core NATS (not stored) | the same deltas on their first subject, still published for consumers outside the runtime |
//! | `{ns}mz.ntf.{app_id}` | core NATS | notifications to one user or the whole app, on every gateway replica |
//! | `{ns}mz.ctl.app.{app_id}` | `{NS}MZ_CTL` | the control plane's app events |
//! | `{ns}mz.dlq.cmd.{app_id}.{chat_id}` | `{NS}MZ_DLQ` | dead letters: commands that can never apply |
//! | `{ns}mz.own.{worker_id}` | core NATS | commands forwarded to the worker that owns their chat |
//! | `{ns}mz.billing.grant.{app_id}.{key}` | `{NS}MZ_BILLING` | credit grants (one per idempotency key) |
//! | `{ns}mz.billing.period.{app_id}.{period}` | `{NS}MZ_BILLING` | the start of an app's credit period |
//! | `{ns}mz.billing.alert.{app_id}` | `{NS}MZ_BILLING` | credit alerts (`credits.low`, `credits.exhausted`) |
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

    /// Every event of one app's chats (a storage move's or a rebuild's replay).
    pub fn app_events(&self, app_id: &str) -> String {
        format!("{}mz.evt.{app_id}.>", self.prefix)
    }

    /// One app's usage charges (on `MZ_USAGE`).
    pub fn app_charges(&self, app_id: &str) -> String {
        format!("{}mz.evt.{app_id}.*.usage.charged", self.prefix)
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

    /// Token deltas of one chat (core NATS, not stored), under the chat's live subject: the
    /// gateways' one subscription per chat ([`Subjects::chat_live`]) gets them.
    pub fn deltas(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.live.{app_id}.{chat_id}.delta", self.prefix)
    }

    /// The first subject of a chat's token deltas, still published alongside
    /// [`Subjects::deltas`] for consumers outside the runtime; the gateways no longer read it.
    pub fn legacy_deltas(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.dlt.{app_id}.{chat_id}", self.prefix)
    }

    /// Ops incidents and actions.
    pub fn ops(&self, rest: &str) -> String {
        format!("{}mz.ops.{rest}", self.prefix)
    }

    /// Every stored event of one chat as republished live (core NATS, with `Nats-Sequence`).
    pub fn chat_live(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.live.{app_id}.{chat_id}.>", self.prefix)
    }

    /// One type of stored event as republished live; any part may be the wildcard `*`.
    pub fn live_event(&self, app_id: &str, chat_id: &str, event_type: &str) -> String {
        format!("{}mz.live.{app_id}.{chat_id}.{event_type}", self.prefix)
    }

    /// The dead letter of a command of one chat (`_` for an app or chat that is not known).
    pub fn dead_letter(&self, app_id: &str, chat_id: &str) -> String {
        format!("{}mz.dlq.cmd.{app_id}.{chat_id}", self.prefix)
    }

    /// Notifications to one app's users (core NATS, every gateway replica).
    pub fn notifications(&self, app_id: &str) -> String {
        format!("{}mz.ntf.{app_id}", self.prefix)
    }

    /// Every app's notifications.
    pub fn all_notifications(&self) -> String {
        format!("{}mz.ntf.>", self.prefix)
    }

    /// The app a [`Subjects::notifications`] subject names, if it is one.
    pub fn notifications_app<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("mz.ntf.")
    }

    /// Where a worker takes the commands other workers forward to it (core NATS).
    pub fn owner_inbox(&self, worker_id: &str) -> String {
        format!("{}mz.own.{worker_id}", self.prefix)
    }

    /// One app's control-plane events.
    pub fn app_log(&self, app_id: &str) -> String {
        format!("{}mz.ctl.app.{app_id}", self.prefix)
    }

    /// Every app's control-plane events.
    pub fn all_app_logs(&self) -> String {
        format!("{}mz.ctl.app.>", self.prefix)
    }

    /// The app an [`Subjects::app_log`] subject names, if it is one.
    pub fn app_log_app<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("mz.ctl.app.")
    }

    /// A credit grant of an app, one subject per idempotency key (`key` is a token derived from
    /// it), so the first grant with a key is the only one (appended expecting none before).
    pub fn credit_grant(&self, app_id: &str, key: &str) -> String {
        format!("{}mz.billing.grant.{app_id}.{key}", self.prefix)
    }

    /// One app's credit grants.
    pub fn app_credit_grants(&self, app_id: &str) -> String {
        format!("{}mz.billing.grant.{app_id}.>", self.prefix)
    }

    /// Every app's credit grants.
    pub fn all_credit_grants(&self) -> String {
        format!("{}mz.billing.grant.>", self.prefix)
    }

    /// The start of an app's credit period (`period`: the period's key), recorded once.
    pub fn credit_period(&self, app_id: &str, period: &str) -> String {
        format!("{}mz.billing.period.{app_id}.{period}", self.prefix)
    }

    /// Credit alerts of an app (`credits.low`, `credits.exhausted`), for ops agents and external
    /// billing.
    pub fn billing_alert(&self, app_id: &str) -> String {
        format!("{}mz.billing.alert.{app_id}", self.prefix)
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
        assert_eq!(s.deltas("a", "c"), "t1.mz.live.a.c.delta");
        assert_eq!(s.legacy_deltas("a", "c"), "t1.mz.dlt.a.c");
    }

    #[test]
    fn every_subject_keeps_its_contract_shape() {
        for (ns, p) in [("", ""), ("t1", "t1.")] {
            let s = Subjects::new(ns);
            let with = |x: &str| format!("{p}{x}");
            assert_eq!(s.chat_live("a", "c"), with("mz.live.a.c.>"));
            assert_eq!(
                s.live_event("*", "*", "run.completed"),
                with("mz.live.*.*.run.completed")
            );
            assert_eq!(s.dead_letter("a", "c"), with("mz.dlq.cmd.a.c"));
            assert_eq!(s.dead_letter("_", "_"), with("mz.dlq.cmd._._"));
            assert_eq!(s.notifications("a"), with("mz.ntf.a"));
            assert_eq!(s.all_notifications(), with("mz.ntf.>"));
            assert_eq!(s.owner_inbox("w-1"), with("mz.own.w-1"));
            assert_eq!(s.app_log("a"), with("mz.ctl.app.a"));
            assert_eq!(s.all_app_logs(), with("mz.ctl.app.>"));
            assert_eq!(s.ops("incident.x"), with("mz.ops.incident.x"));
            assert_eq!(s.credit_grant("a", "k"), with("mz.billing.grant.a.k"));
            assert_eq!(s.all_credit_grants(), with("mz.billing.grant.>"));
            assert_eq!(s.app_credit_grants("a"), with("mz.billing.grant.a.>"));
            assert_eq!(s.app_events("a"), with("mz.evt.a.>"));
            assert_eq!(s.app_charges("a"), with("mz.evt.a.*.usage.charged"));
            assert_eq!(s.credit_period("a", "p"), with("mz.billing.period.a.p"));
            assert_eq!(s.billing_alert("a"), with("mz.billing.alert.a"));
        }
    }

    #[test]
    fn app_ids_are_read_back_from_subjects_of_the_same_namespace_only() {
        let s = Subjects::new("t1");
        assert_eq!(s.notifications_app(&s.notifications("acme")), Some("acme"));
        assert_eq!(s.app_log_app(&s.app_log("acme")), Some("acme"));
        assert_eq!(s.notifications_app("mz.ntf.acme"), None);
        assert_eq!(s.app_log_app("t1.mz.ntf.acme"), None);
        let default = Subjects::new("");
        assert_eq!(default.notifications_app("mz.ntf.acme"), Some("acme"));
        assert_eq!(default.app_log_app("t1.mz.ctl.app.acme"), None);
    }
}
