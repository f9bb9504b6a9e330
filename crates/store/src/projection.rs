//! Writes of the chat projections, batched: messages are inserted (duplicates ignored, so a
//! redelivered event changes nothing), sessions are coalesced to one conditional upsert per chat
//! per batch, sent in one `update` command. Every write filters on indexed fields.

use std::collections::HashMap;
use std::time::Instant;

use mongodb::Database;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::InsertManyOptions;
use mozaiks_events::{Envelope, Event};

use crate::{Error, MESSAGES, SESSIONS, Store, is_duplicate_key, metrics as m};

/// The `status` of a chat in `chat_sessions`, as the projection writes it.
pub mod status {
    /// Started, no run yet.
    pub const ACTIVE: &str = "active";
    pub const RUNNING: &str = "running";
    pub const WAITING_INPUT: &str = "waiting_input";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    /// The statuses of a chat whose run may still go on (a deleted app's chats get `cancel`).
    pub const UNFINISHED: [&str; 3] = [ACTIVE, RUNNING, WAITING_INPUT];
}

/// The status a chat has after an event, if the event changes it.
pub fn status_after(event: &Event) -> Option<&'static str> {
    Some(match event {
        Event::SessionStarted(_) => status::ACTIVE,
        Event::RunStarted(_) | Event::MessageUser(_) => status::RUNNING,
        Event::InputRequested(_) => status::WAITING_INPUT,
        Event::RunCompleted(_) => status::COMPLETED,
        Event::RunFailed(_) => status::FAILED,
        Event::RunCancelled(_) => status::CANCELLED,
        _ => return None,
    })
}

/// The transcript document of an event, for message-like events.
pub fn message_doc(env: &Envelope) -> Option<Document> {
    let (role, agent, text) = match &env.event {
        Event::MessageUser(m) => ("user", None, m.text.clone()),
        Event::AgentMessage(m) => ("agent", Some(m.agent.clone()), m.text.clone()),
        Event::ToolCall(t) => ("tool", None, format!("{}({})", t.tool, t.arguments)),
        Event::ToolResult(t) => (
            "tool",
            None,
            t.error.clone().unwrap_or_else(|| t.result.to_string()),
        ),
        Event::InputRequested(i) => ("system", None, i.prompt.clone()),
        _ => return None,
    };
    let frame = mozaiks_events::Frame::from_envelope(env);
    let data = bson::to_bson(&frame.data).unwrap_or(Bson::Null);
    Some(doc! {
        "app_id": &env.app_id,
        "chat_id": &env.chat_id,
        "seq": env.seq as i64,
        "event_id": env.event_id.to_string(),
        "type": env.event.type_name(),
        "role": role,
        "agent": agent,
        "user_id": &env.user_id,
        "text": text,
        "data": data,
        "ts": bson::DateTime::from_chrono(env.ts),
    })
}

/// What a batch changes in one chat's session document.
struct SessionChange<'a> {
    first: &'a Envelope,
    last: &'a Envelope,
    status: Option<&'static str>,
}

impl Store {
    /// Projects a batch of events (in log order) into `chat_sessions` and `chat_messages` of each
    /// app's database ([`Store::resolve_storage`]). Events of a deleted app are skipped, so a run
    /// finishing after the app's deletion does not re-create its read models.
    /// Idempotent: projecting the same events again changes nothing.
    pub async fn project(&self, events: &[Envelope]) -> Result<(), Error> {
        // Group by app, because each app may live in its own database.
        let mut by_app: HashMap<&str, Vec<&Envelope>> = HashMap::new();
        for e in events {
            by_app.entry(e.app_id.as_str()).or_default().push(e);
        }
        for (app_id, evs) in by_app {
            let route = self.route(app_id);
            if route.deleted {
                ::metrics::counter!(m::SKIPPED_DELETED, "app_id" => app_id.to_string())
                    .increment(evs.len() as u64);
                tracing::debug!(
                    app_id,
                    events = evs.len(),
                    "Events of a deleted app skipped."
                );
                continue;
            }
            let db = self.database(route.placement.as_ref()).await?;
            project_app(&db, &evs).await?;
        }
        Ok(())
    }

    /// Projects events into `db` whatever the app's current placement (a storage move rebuilds
    /// the target database with it before switching the app over). Idempotent.
    pub async fn project_into(&self, db: &Database, events: &[Envelope]) -> Result<(), Error> {
        let mut by_app: HashMap<&str, Vec<&Envelope>> = HashMap::new();
        for e in events {
            by_app.entry(e.app_id.as_str()).or_default().push(e);
        }
        for evs in by_app.values() {
            project_app(db, evs).await?;
        }
        Ok(())
    }
}

/// One app's events into its database.
async fn project_app(db: &Database, evs: &[&Envelope]) -> Result<(), Error> {
    let messages: Vec<Document> = evs.iter().filter_map(|e| message_doc(e)).collect();
    if !messages.is_empty() {
        let started = Instant::now();
        let res = db
            .collection::<Document>(MESSAGES)
            .insert_many(messages)
            .with_options(InsertManyOptions::builder().ordered(false).build())
            .await;
        match res {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(e.into()),
        }
        ::metrics::histogram!(m::WRITE_SECONDS, "op" => "insert_messages")
            .record(started.elapsed().as_secs_f64());
    }

    let mut changes: Vec<(&str, SessionChange)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for e in evs {
        let i = *index.entry(e.chat_id.as_str()).or_insert_with(|| {
            changes.push((
                e.chat_id.as_str(),
                SessionChange {
                    first: e,
                    last: e,
                    status: None,
                },
            ));
            changes.len() - 1
        });
        let c = &mut changes[i].1;
        if e.seq >= c.last.seq {
            c.last = e;
            if let Some(s) = status_after(&e.event) {
                c.status = Some(s);
            }
        }
        if e.seq < c.first.seq {
            c.first = e;
        }
    }
    let updates: Vec<Document> = changes.iter().map(|(_, c)| session_update(c)).collect();
    let started = Instant::now();
    let reply = db
        .run_command(doc! { "update": SESSIONS, "updates": updates, "ordered": false })
        .await?;
    if let Ok(errors) = reply.get_array("writeErrors") {
        for err in errors {
            let code = err
                .as_document()
                .and_then(|d| d.get("code"))
                .and_then(|c| c.as_i32().or_else(|| c.as_i64().map(|x| x as i32)))
                .unwrap_or(0);
            // A duplicate key means the session is already at or past this seq.
            if code != crate::DUPLICATE_KEY {
                return Err(Error::Document(format!("session update failed: {err}")));
            }
        }
    }
    ::metrics::histogram!(m::WRITE_SECONDS, "op" => "update_sessions")
        .record(started.elapsed().as_secs_f64());
    Ok(())
}

fn session_update(c: &SessionChange) -> Document {
    let last = c.last;
    let mut set = doc! {
        "last_seq": last.seq as i64,
        "last_event_type": last.event.type_name(),
        "updated_at": bson::DateTime::from_chrono(last.ts),
    };
    if let Some(s) = c.status {
        set.insert("status", s);
    }
    let mut on_insert = doc! {
        "user_id": &last.user_id,
        "workflow_name": &last.workflow,
        "parent_chat_id": last.parent_chat_id.clone(),
        "created_at": bson::DateTime::from_chrono(c.first.ts),
    };
    if c.status.is_none() {
        on_insert.insert("status", status::ACTIVE);
    }
    doc! {
        // Only move forward: a document already at or past this seq does not match, and the
        // upsert then fails on the unique (app_id, chat_id) index, which is ignored.
        "q": { "app_id": &last.app_id, "chat_id": &last.chat_id, "last_seq": { "$lt": last.seq as i64 } },
        "u": { "$set": set, "$setOnInsert": on_insert },
        "upsert": true,
    }
}
