//! What a worker does besides appending to the chat it owns: commands to other chats (child
//! workflows) and refusals to the user's sockets.
//!
//! - `child.spawned` in a parent → `session.start` of the child chat (deduplicated on the child's
//!   id, so a repeated spawn is one chat).
//! - a run's end in a child → `child.finished` to the parent (deduplicated on the child's id, and
//!   idempotent in the parent's aggregate), sent again whenever the child chat is loaded, so a
//!   worker dying between the two leaves nothing lost.
//! - `run.cancelled`/`run.failed` in a parent with running children, or a satisfied `wait: any`
//!   → `cancel` to each running child.
//! - a refused client command → an `error` frame to the user's sockets (core NATS
//!   `mz.ntf.{app_id}`, as the gateway's notifications travel).

use std::time::Duration;

use mozaiks_events::{Command, CommandEnvelope, Envelope, Event};
use serde_json::json;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{Owned, Shared};
use crate::Error;
use crate::chat::{CHILDREN_SOURCE, PendingChild, Refusal};
use crate::metrics as m;

/// A command to another chat that an event calls for.
#[derive(Debug)]
pub(super) enum Effect {
    Spawn(PendingChild),
    Finished { status: String, output: String },
    Cancel(Vec<PendingChild>),
}

impl Owned {
    /// The effects of `event`, decided on the state before it is applied.
    pub(super) fn effects_of(&self, event: &Event) -> Vec<Effect> {
        let mut out = Vec::new();
        match event {
            Event::ChildSpawned(c) => out.push(Effect::Spawn(PendingChild {
                chat_id: c.child_chat_id.clone(),
                workflow: c.workflow.clone(),
                input: c.input.clone(),
            })),
            Event::ContextUpdated(u) if u.call_id.is_none() && u.source == CHILDREN_SOURCE => {
                // `wait: any` is satisfied: the others are not needed any more.
                let step = self.chat.run.as_ref().map(|r| r.step).unwrap_or(0);
                let running: Vec<_> = self
                    .chat
                    .run
                    .iter()
                    .flat_map(|r| &r.children)
                    .filter(|c| c.step == step && c.status.is_none())
                    .map(|c| PendingChild {
                        chat_id: c.chat_id.clone(),
                        workflow: c.workflow.clone(),
                        input: c.input.clone(),
                    })
                    .collect();
                if !running.is_empty() {
                    out.push(Effect::Cancel(running));
                }
            }
            _ => {}
        }
        if event.ends_run() {
            if !matches!(event, Event::RunCompleted(_)) {
                let running = self.chat.running_children();
                if !running.is_empty() {
                    out.push(Effect::Cancel(running));
                }
            }
            if self.parent_chat_id.is_some() {
                out.push(finished(event));
            }
        }
        out
    }

    pub(super) async fn perform(&mut self, sh: &Shared, effect: Effect) -> Result<(), Error> {
        match effect {
            Effect::Spawn(child) => {
                self.start_child(sh, &child).await?;
                info!(child_chat_id = %child.chat_id, workflow = %child.workflow, "Child workflow spawned.");
            }
            Effect::Finished { status, output } => {
                let Some(parent) = self.parent_chat_id.clone() else {
                    return Ok(());
                };
                let cmd = self.command(
                    &parent,
                    &self.workflow,
                    Command::ChildFinished {
                        child_chat_id: self.chat_id.clone(),
                        status: status.clone(),
                        output,
                    },
                );
                let id = format!("child-finished:{}:{}", self.app_id, self.chat_id);
                send_retrying(sh, &cmd, Some(&id)).await?;
                info!(parent_chat_id = %parent, status = %status, "Told the parent chat that this child ended.");
            }
            Effect::Cancel(children) => {
                for child in children {
                    let cmd = self.command(
                        &child.chat_id,
                        &child.workflow,
                        Command::Cancel {
                            reason: "the parent run ended".into(),
                        },
                    );
                    if let Err(e) = send_retrying(sh, &cmd, None).await {
                        warn!(child_chat_id = %child.chat_id, error = %e, "Cannot cancel a child chat.");
                    }
                    metrics::counter!(m::CHILDREN, "app_id" => self.app_id.clone(), "event" => "cancelled")
                        .increment(1);
                }
            }
        }
        Ok(())
    }

    /// Sends the child's `session.start` (a repeated one is deduplicated, and a started chat
    /// ignores it).
    async fn start_child(&mut self, sh: &Shared, child: &PendingChild) -> Result<(), Error> {
        let cmd = self.command(
            &child.chat_id,
            &child.workflow,
            Command::StartSession {
                context: Default::default(),
                parent_chat_id: Some(self.chat_id.clone()),
                message: Some(child.input.clone()),
            },
        );
        let id = format!("start:{}:{}", self.app_id, child.chat_id);
        send_retrying(sh, &cmd, Some(&id)).await?;
        self.known_children.insert(child.chat_id.clone());
        metrics::counter!(m::CHILDREN, "app_id" => self.app_id.clone(), "event" => "spawned")
            .increment(1);
        Ok(())
    }

    fn command(&self, chat_id: &str, workflow: &str, command: Command) -> CommandEnvelope {
        CommandEnvelope::new(&self.app_id, chat_id, &self.user_id, workflow, command)
    }

    /// After a takeover: checks the log of each child the run waits for that this actor has not
    /// seen yet. A child that never started is started; one whose run ended is recorded as if
    /// its `child.finished` had arrived. Returns whether it appended anything.
    pub(super) async fn reconcile_children(
        &mut self,
        sh: &Shared,
        pack: &mozaiks_packs::Pack,
        pending: Vec<PendingChild>,
    ) -> Result<bool, Error> {
        let mut appended = false;
        for child in pending {
            if self.known_children.contains(&child.chat_id) {
                continue;
            }
            let events = sh.bus.read_chat(&self.app_id, &child.chat_id, 0).await?;
            if events.is_empty() {
                debug!(child_chat_id = %child.chat_id, "Child chat never started; starting it.");
                self.start_child(sh, &child).await?;
                continue;
            }
            self.known_children.insert(child.chat_id.clone());
            let Some(Effect::Finished { status, output }) = first_run_end(&events) else {
                continue;
            };
            info!(child_chat_id = %child.chat_id, status = %status, "Child ended while nobody watched; recording it.");
            let cmd = Command::ChildFinished {
                child_chat_id: child.chat_id.clone(),
                status,
                output,
            };
            if let Ok(events) = self
                .chat
                .handle(Uuid::now_v7(), &cmd, pack, &Default::default())
            {
                self.append(sh, events, None).await?;
                appended = true;
            }
        }
        Ok(appended)
    }
}

/// `child.finished` data of a run-ending event.
fn finished(event: &Event) -> Effect {
    let (status, output) = match event {
        Event::RunCompleted(r) => ("completed", r.output.clone()),
        Event::RunFailed(r) => ("failed", format!("{}: {}", r.code, r.reason)),
        _ => ("cancelled", String::new()),
    };
    Effect::Finished {
        status: status.into(),
        output,
    }
}

/// How a child chat's first run ended, if it did.
pub(super) fn first_run_end(events: &[(Envelope, u64)]) -> Option<Effect> {
    events
        .iter()
        .find(|(e, _)| e.event.ends_run())
        .map(|(e, _)| finished(&e.event))
}

/// Sends a command, retrying briefly (these sends are idempotent).
async fn send_retrying(sh: &Shared, cmd: &CommandEnvelope, id: Option<&str>) -> Result<(), Error> {
    let mut attempt = 0;
    loop {
        match sh.bus.send_command(cmd, id).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 => {
                attempt += 1;
                warn!(attempt, error = %e, chat_id = %cmd.chat_id, "Sending a command failed; retrying.");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tells the user's sockets that their command was refused: an `error` frame with the refusal's
/// code and the command's id. Best effort (core NATS; a user with no socket misses it).
pub(super) async fn notify_refusal(sh: &Shared, cmd: &CommandEnvelope, refusal: &Refusal) {
    notify_error(sh, cmd, refusal.code(), &refusal.to_string()).await;
}

/// An `error` frame about `cmd` to its user's sockets.
pub(super) async fn notify_error(sh: &Shared, cmd: &CommandEnvelope, code: &str, message: &str) {
    let wire = json!({
        "id": Uuid::now_v7(),
        "app_id": cmd.app_id,
        "user_id": cmd.user_id,
        "type": "error",
        "data": {
            "code": code,
            "message": message,
            "command": cmd.command.type_name(),
            "command_id": cmd.command_id,
            "chat_id": cmd.chat_id,
        },
    });
    let subject = sh.bus.subjects().notifications(&cmd.app_id);
    if let Err(e) = sh
        .bus
        .client()
        .publish(subject, wire.to_string().into())
        .await
    {
        warn!(error = %e, "Cannot tell the user about a refused command.");
    }
}
