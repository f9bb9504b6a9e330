//! The chat aggregate: pure, no I/O.
//!
//! `Chat::apply(event)` folds the log into state; `Chat::handle(command)` decides which events a
//! command produces; `Chat::next(pack)` says what the run needs next: events to append, a model
//! call to make, or nothing. The worker only drives this over the bus, so a chat's state is always
//! what its log says, and a worker that takes a chat over continues exactly where the log ends.

use std::collections::{HashSet, VecDeque};

use mozaiks_events::{
    AgentMessage, Command, Event, MessageUser, RunCancelled, RunCompleted, RunStarted,
    SessionStarted, StepCompleted, StepStarted, UsageCharged,
};
use mozaiks_packs::{Pack, TERMINATE};
use uuid::Uuid;

/// How many transcript entries the aggregate keeps for model context.
const TRANSCRIPT_WINDOW: usize = 64;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the session has not been started")]
    NotStarted,
    #[error("no run is waiting for input")]
    NotWaitingForInput,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotStarted => "not_started",
            Refusal::NotWaitingForInput => "not_waiting_for_input",
        }
    }
}

/// The run in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub run_id: Uuid,
    pub trigger_seq: u64,
    /// The current turn (0 before the first step starts).
    pub step: u32,
    /// The agent whose turn it is.
    pub agent: String,
    /// Whether the current step's agent has spoken (and been charged).
    pub spoken: bool,
    /// Whether the current step completed, and who is next.
    pub completed_next: Option<Option<String>>,
    pub last_output: String,
}

/// One transcript entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// `user` or the agent's name.
    pub speaker: String,
    pub text: String,
}

/// A chat's state, as its log says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chat {
    pub started: bool,
    /// Last per-chat seq applied.
    pub seq: u64,
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Commands already applied (causation ids), for idempotency.
    seen_commands: HashSet<Uuid>,
    seen_client_msg_ids: HashSet<String>,
    /// User messages not yet answered by a run, by seq.
    pub pending: VecDeque<(u64, String)>,
    pub run: Option<Run>,
    pub transcript: VecDeque<Turn>,
    pub runs_completed: u64,
}

/// What the run needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing to do until a command arrives.
    Idle,
    /// Append these events.
    Emit(Vec<Event>),
    /// Ask the model for `agent`'s turn.
    CallModel {
        run_id: Uuid,
        step: u32,
        agent: String,
    },
}

/// A model's answer for one turn.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub text: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Chat {
    /// Folds a chat's events.
    pub fn from_events<'a>(events: impl IntoIterator<Item = (&'a Event, Option<Uuid>)>) -> Chat {
        let mut chat = Chat::default();
        for (e, cause) in events {
            chat.apply(e, cause);
        }
        chat
    }

    /// The user's latest message, the model's input.
    pub fn last_user_text(&self) -> &str {
        self.transcript
            .iter()
            .rev()
            .find(|t| t.speaker == "user")
            .map(|t| t.text.as_str())
            .unwrap_or("")
    }

    fn remember(&mut self, speaker: &str, text: &str) {
        if self.transcript.len() == TRANSCRIPT_WINDOW {
            self.transcript.pop_front();
        }
        self.transcript.push_back(Turn {
            speaker: speaker.to_string(),
            text: text.to_string(),
        });
    }

    /// Applies one event (with the id of the command that caused it).
    pub fn apply(&mut self, event: &Event, causation: Option<Uuid>) {
        self.seq += 1;
        if let Some(c) = causation {
            self.seen_commands.insert(c);
        }
        match event {
            Event::SessionStarted(s) => {
                self.started = true;
                self.context = s.context.clone();
            }
            Event::MessageUser(m) => {
                if let Some(id) = &m.client_msg_id {
                    self.seen_client_msg_ids.insert(id.clone());
                }
                self.pending.push_back((self.seq, m.text.clone()));
                self.remember("user", &m.text);
            }
            Event::RunStarted(r) => {
                self.pending.retain(|(s, _)| *s > r.trigger_seq);
                self.run = Some(Run {
                    run_id: r.run_id,
                    trigger_seq: r.trigger_seq,
                    step: 0,
                    agent: String::new(),
                    spoken: false,
                    completed_next: None,
                    last_output: String::new(),
                });
            }
            Event::StepStarted(s) => {
                if let Some(run) = self.run.as_mut() {
                    run.step = s.step;
                    run.agent = s.agent.clone();
                    run.spoken = false;
                    run.completed_next = None;
                }
            }
            Event::AgentMessage(m) => {
                if let Some(run) = self.run.as_mut() {
                    run.last_output = m.text.clone();
                }
                self.remember(&m.agent, &m.text);
            }
            Event::UsageCharged(_) => {
                if let Some(run) = self.run.as_mut() {
                    run.spoken = true;
                }
            }
            Event::StepCompleted(s) => {
                if let Some(run) = self.run.as_mut() {
                    run.completed_next = Some(s.next.clone());
                }
            }
            Event::RunCompleted(_) => {
                self.run = None;
                self.runs_completed += 1;
            }
            Event::RunFailed(_) | Event::RunCancelled(_) => self.run = None,
            Event::ToolCall(_)
            | Event::ToolResult(_)
            | Event::ChildSpawned(_)
            | Event::ChildCompleted(_)
            | Event::InputRequested(_) => {}
        }
    }

    /// Decides the events a command produces. An already-applied command produces none.
    pub fn handle(
        &self,
        command_id: Uuid,
        command: &Command,
        pack: &Pack,
        app_context: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<Event>, Refusal> {
        if self.seen_commands.contains(&command_id) {
            return Ok(Vec::new());
        }
        match command {
            Command::StartSession {
                context, message, ..
            } => {
                if self.started {
                    return Ok(Vec::new());
                }
                // Pack defaults, then the app's, then the request's.
                let mut ctx = pack.context.clone();
                ctx.extend(app_context.clone());
                ctx.extend(context.clone());
                let mut events = vec![Event::SessionStarted(SessionStarted { context: ctx })];
                if let Some(text) = message {
                    events.push(Event::MessageUser(MessageUser {
                        text: text.clone(),
                        client_msg_id: None,
                    }));
                }
                Ok(events)
            }
            Command::UserMessage {
                text,
                client_msg_id,
            } => {
                if !self.started {
                    return Err(Refusal::NotStarted);
                }
                if client_msg_id
                    .as_ref()
                    .is_some_and(|id| self.seen_client_msg_ids.contains(id))
                {
                    return Ok(Vec::new());
                }
                Ok(vec![Event::MessageUser(MessageUser {
                    text: text.clone(),
                    client_msg_id: client_msg_id.clone(),
                })])
            }
            Command::Cancel { reason } => match &self.run {
                Some(run) => Ok(vec![Event::RunCancelled(RunCancelled {
                    run_id: run.run_id,
                    reason: if reason.is_empty() {
                        "cancelled by the user".into()
                    } else {
                        reason.clone()
                    },
                })]),
                None => Ok(Vec::new()),
            },
            Command::InputResponse { .. } => Err(Refusal::NotWaitingForInput),
        }
    }

    /// What the run needs next. `new_run_id` is used if a run starts.
    pub fn next(&self, pack: &Pack, new_run_id: Uuid) -> Next {
        let Some(run) = &self.run else {
            return match self.pending.front() {
                Some((trigger_seq, _)) if self.started => Next::Emit(vec![
                    Event::RunStarted(RunStarted {
                        run_id: new_run_id,
                        trigger_seq: *trigger_seq,
                    }),
                    Event::StepStarted(StepStarted {
                        run_id: new_run_id,
                        step: 1,
                        agent: pack.start_agent.clone(),
                    }),
                ]),
                _ => Next::Idle,
            };
        };
        if run.step == 0 {
            return Next::Emit(vec![Event::StepStarted(StepStarted {
                run_id: run.run_id,
                step: 1,
                agent: pack.start_agent.clone(),
            })]);
        }
        match &run.completed_next {
            None if !run.spoken => Next::CallModel {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
            },
            None => {
                // Spoke and was charged, but the step did not complete (e.g. the worker died).
                Next::Emit(vec![step_completed(pack, run)])
            }
            Some(Some(next)) if run.step < pack.max_turns => {
                Next::Emit(vec![Event::StepStarted(StepStarted {
                    run_id: run.run_id,
                    step: run.step + 1,
                    agent: next.clone(),
                })])
            }
            Some(_) => Next::Emit(vec![Event::RunCompleted(RunCompleted {
                run_id: run.run_id,
                steps: run.step,
                output: run.last_output.clone(),
            })]),
        }
    }

    /// The events of a model's reply for the current step.
    pub fn on_reply(&self, pack: &Pack, reply: &Reply) -> Vec<Event> {
        let Some(run) = &self.run else {
            return Vec::new();
        };
        let mut after = run.clone();
        after.spoken = true;
        vec![
            Event::AgentMessage(AgentMessage {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                text: reply.text.clone(),
            }),
            Event::UsageCharged(UsageCharged {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                model: reply.model.clone(),
                prompt_tokens: reply.prompt_tokens,
                completion_tokens: reply.completion_tokens,
                total_tokens: reply.prompt_tokens + reply.completion_tokens,
            }),
            step_completed(pack, &after),
        ]
    }
}

fn step_completed(pack: &Pack, run: &Run) -> Event {
    let next = pack
        .agent(&run.agent)
        .and_then(|a| a.handoff.after_work.clone())
        .filter(|t| t != TERMINATE);
    Event::StepCompleted(StepCompleted {
        run_id: run.run_id,
        step: run.step,
        agent: run.agent.clone(),
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pack(yaml: &str) -> Pack {
        Pack::parse(Path::new("p/workflow.yaml"), "p", yaml).unwrap()
    }

    fn two_agents() -> Pack {
        pack(
            "name: p\nstart_agent: a\nmax_turns: 4\nagents:\n  - name: a\n    handoff: {after_work: b}\n  - name: b\n",
        )
    }

    fn reply(text: &str) -> Reply {
        Reply {
            text: text.into(),
            model: "offline".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
        }
    }

    /// given events, when command, then events
    fn given(events: &[Event]) -> Chat {
        Chat::from_events(events.iter().map(|e| (e, None)))
    }

    fn start() -> Command {
        Command::StartSession {
            context: Default::default(),
            parent_chat_id: None,
            message: None,
        }
    }

    fn names(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.type_name()).collect()
    }

    #[test]
    fn start_opens_the_session_once() {
        let p = two_agents();
        let chat = given(&[]);
        let events = chat
            .handle(Uuid::now_v7(), &start(), &p, &Default::default())
            .unwrap();
        assert_eq!(names(&events), ["session.started"]);
        let chat = given(&events);
        assert!(
            chat.handle(Uuid::now_v7(), &start(), &p, &Default::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn context_layers_pack_then_app_then_request() {
        let p =
            pack("name: p\nstart_agent: a\ncontext: {x: 1, y: 1, z: 1}\nagents:\n  - name: a\n");
        let app: serde_json::Map<_, _> = serde_json::from_str(r#"{"y": 2, "z": 2}"#).unwrap();
        let cmd = Command::StartSession {
            context: serde_json::from_str(r#"{"z": 3}"#).unwrap(),
            parent_chat_id: None,
            message: None,
        };
        let events = given(&[]).handle(Uuid::now_v7(), &cmd, &p, &app).unwrap();
        let Event::SessionStarted(s) = &events[0] else {
            panic!()
        };
        assert_eq!(
            serde_json::Value::Object(s.context.clone()),
            serde_json::json!({"x":1,"y":2,"z":3})
        );
    }

    #[test]
    fn messages_before_start_are_refused() {
        let cmd = Command::UserMessage {
            text: "hi".into(),
            client_msg_id: None,
        };
        assert_eq!(
            given(&[]).handle(Uuid::now_v7(), &cmd, &two_agents(), &Default::default()),
            Err(Refusal::NotStarted)
        );
    }

    #[test]
    fn client_msg_id_and_command_id_make_messages_idempotent() {
        let p = two_agents();
        let started = Event::SessionStarted(SessionStarted::default());
        let msg = Command::UserMessage {
            text: "hi".into(),
            client_msg_id: Some("m1".into()),
        };
        let id = Uuid::now_v7();
        let events = given(std::slice::from_ref(&started))
            .handle(id, &msg, &p, &Default::default())
            .unwrap();
        assert_eq!(names(&events), ["message.user"]);
        let mut chat = given(&[started]);
        chat.apply(&events[0], Some(id));
        // same client_msg_id, new command id
        assert!(
            chat.handle(Uuid::now_v7(), &msg, &p, &Default::default())
                .unwrap()
                .is_empty()
        );
        // same command redelivered, without client_msg_id
        let bare = Command::UserMessage {
            text: "x".into(),
            client_msg_id: None,
        };
        assert!(
            chat.handle(id, &bare, &p, &Default::default())
                .unwrap()
                .is_empty()
        );
    }

    /// Drives a chat to the end with a fixed reply, collecting every event.
    fn drive(mut chat: Chat, p: &Pack) -> Vec<Event> {
        let mut all = Vec::new();
        for _ in 0..100 {
            let events = match chat.next(p, Uuid::now_v7()) {
                Next::Idle => return all,
                Next::Emit(ev) => ev,
                Next::CallModel { agent, .. } => chat.on_reply(p, &reply(&format!("from {agent}"))),
            };
            for e in &events {
                chat.apply(e, None);
            }
            all.extend(events);
        }
        panic!("run did not end");
    }

    #[test]
    fn a_message_runs_the_handoff_chain() {
        let p = two_agents();
        let chat = given(&[
            Event::SessionStarted(SessionStarted::default()),
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
        ]);
        let events = drive(chat, &p);
        assert_eq!(
            names(&events),
            [
                "run.started",
                "step.started",
                "agent.message",
                "usage.charged",
                "step.completed",
                "step.started",
                "agent.message",
                "usage.charged",
                "step.completed",
                "run.completed"
            ]
        );
        let Event::RunCompleted(done) = events.last().unwrap() else {
            panic!()
        };
        assert_eq!(done.steps, 2);
        assert_eq!(done.output, "from b");
    }

    #[test]
    fn max_turns_bounds_a_loop() {
        let p = pack(
            "name: p\nstart_agent: a\nmax_turns: 3\nagents:\n  - name: a\n    handoff: {after_work: b}\n  - name: b\n    handoff: {after_work: a}\n",
        );
        let chat = given(&[
            Event::SessionStarted(SessionStarted::default()),
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
        ]);
        let events = drive(chat, &p);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.type_name() == "agent.message")
                .count(),
            3
        );
        assert_eq!(events.last().unwrap().type_name(), "run.completed");
    }

    #[test]
    fn a_taken_over_chat_continues_without_repeating_a_charged_turn() {
        let p = two_agents();
        let run_id = Uuid::now_v7();
        // The worker died after the first agent spoke and was charged.
        let chat = given(&[
            Event::SessionStarted(SessionStarted::default()),
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
            Event::RunStarted(RunStarted {
                run_id,
                trigger_seq: 2,
            }),
            Event::StepStarted(StepStarted {
                run_id,
                step: 1,
                agent: "a".into(),
            }),
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "a".into(),
                text: "x".into(),
            }),
            Event::UsageCharged(UsageCharged {
                run_id,
                step: 1,
                agent: "a".into(),
                model: "m".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                total_tokens: 2,
            }),
        ]);
        let events = drive(chat, &p);
        assert_eq!(
            names(&events),
            [
                "step.completed",
                "step.started",
                "agent.message",
                "usage.charged",
                "step.completed",
                "run.completed"
            ]
        );
    }

    #[test]
    fn messages_during_a_run_queue_in_order() {
        let p = two_agents();
        let mut chat = given(&[
            Event::SessionStarted(SessionStarted::default()),
            Event::MessageUser(MessageUser {
                text: "one".into(),
                client_msg_id: None,
            }),
        ]);
        let Next::Emit(start) = chat.next(&p, Uuid::now_v7()) else {
            panic!()
        };
        for e in &start {
            chat.apply(e, None);
        }
        chat.apply(
            &Event::MessageUser(MessageUser {
                text: "two".into(),
                client_msg_id: None,
            }),
            None,
        );
        assert_eq!(chat.pending.len(), 1);
        let events = drive(chat, &p);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.type_name() == "run.completed")
                .count(),
            2
        );
    }

    #[test]
    fn cancel_ends_the_run() {
        let p = two_agents();
        let run_id = Uuid::now_v7();
        let chat = given(&[
            Event::SessionStarted(SessionStarted::default()),
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
            Event::RunStarted(RunStarted {
                run_id,
                trigger_seq: 2,
            }),
        ]);
        let events = chat
            .handle(
                Uuid::now_v7(),
                &Command::Cancel {
                    reason: String::new(),
                },
                &p,
                &Default::default(),
            )
            .unwrap();
        assert_eq!(names(&events), ["run.cancelled"]);
        let mut chat = chat;
        chat.apply(&events[0], None);
        assert_eq!(chat.next(&p, Uuid::now_v7()), Next::Idle);
        // nothing to cancel
        assert!(
            chat.handle(
                Uuid::now_v7(),
                &Command::Cancel {
                    reason: String::new()
                },
                &p,
                &Default::default()
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn input_response_without_a_waiting_run_is_refused() {
        let chat = given(&[Event::SessionStarted(SessionStarted::default())]);
        let cmd = Command::InputResponse {
            request_id: None,
            text: "yes".into(),
        };
        assert_eq!(
            chat.handle(Uuid::now_v7(), &cmd, &two_agents(), &Default::default()),
            Err(Refusal::NotWaitingForInput)
        );
    }
}
