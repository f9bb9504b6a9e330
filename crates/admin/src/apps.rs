//! Creating and deleting apps: the steps beyond the app aggregate's own command.
//!
//! Commands go through the app aggregate ([`mozaiks_control::Registry::execute`]): events on
//! `MZ_CTL`, the view in `MZ_APPS`, on every replica within a second.

use std::sync::Arc;

use mozaiks_control::{App, AppCommand, Limits};
use mozaiks_events::{Command, CommandEnvelope};
use tracing::warn;

use crate::{Admin, Error, storage};

/// A new app, as the operator describes it.
#[derive(Clone, Debug)]
pub struct NewApp {
    pub name: String,
    pub tier: String,
    /// The allowlist; `None` allows every shipped workflow.
    pub workflows: Option<Vec<String>>,
    pub limits: Limits,
    pub runtime_url: Option<String>,
}

impl Admin {
    /// Creates `app_id` on behalf of `actor`; `shipped` are the workflow names an allowlist is
    /// checked against. A tier with a dedicated database gives the app its own from the start
    /// ([`storage::for_new_app`]).
    pub async fn create_app(
        &self,
        app_id: &str,
        new: NewApp,
        actor: &str,
        shipped: &[String],
    ) -> Result<Arc<App>, Error> {
        let storage = storage::for_new_app(
            self.registry.tiers(),
            self.store.shared().name(),
            &new.tier,
            app_id,
        );
        let cmd = AppCommand::Create {
            name: new.name,
            tier: new.tier,
            workflows: new.workflows,
            limits: new.limits,
            runtime_url: new.runtime_url,
            storage,
        };
        Ok(self
            .registry
            .execute(app_id, &cmd, actor, Some(shipped))
            .await?)
    }

    /// Records `app.deleted` on behalf of `actor` — every replica then refuses the app's sessions
    /// and the projector skips its events — and sends `cancel` to each of its unfinished chats;
    /// answers how many were sent. The read models are archived, then removed, by the projector
    /// replica that holds the `retention` lease (`mozaiks_projector::retention`). Idempotent:
    /// deleting a deleted app cancels its unfinished chats again.
    pub async fn delete_app(&self, app_id: &str, actor: &str) -> Result<u64, Error> {
        let existing = self
            .registry
            .read_through(app_id)
            .await?
            .ok_or(Error::AppNotFound)?;
        if !existing.is_deleted() {
            self.registry
                .execute(app_id, &AppCommand::Delete, actor, None)
                .await?;
        }
        self.cancel_runs(app_id).await
    }

    /// Sends `cancel` to each of the app's unfinished chats (one command id per chat: the stream
    /// drops a repeat within its duplicate window).
    async fn cancel_runs(&self, app_id: &str) -> Result<u64, Error> {
        let mut cancelled = 0;
        for chat in self.store.unfinished_chats(app_id).await? {
            let cmd = CommandEnvelope::new(
                app_id,
                &chat.chat_id,
                &chat.user_id,
                &chat.workflow_name,
                Command::Cancel {
                    reason: "app deleted".into(),
                },
            );
            let dedup = format!("app-deleted:{app_id}:{}", chat.chat_id);
            match self.bus.send_command(&cmd, Some(&dedup)).await {
                Ok(()) => cancelled += 1,
                Err(e) => {
                    warn!(app_id, chat_id = %chat.chat_id, error = %e, "Could not cancel a chat of a deleted app.")
                }
            }
        }
        Ok(cancelled)
    }
}
