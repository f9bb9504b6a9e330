//! Retention: sessions whose last activity is older than their app's retention are archived as
//! JSON lines and removed from the read models.
//!
//! The archive is one file per app and day of last activity: `{dir}/{app_id}/{YYYY-MM-DD}.jsonl`,
//! one line per session, `{"archived_at", "session": {...}, "messages": [...]}`, appended and
//! synced before the session is removed. A crash between the two archives the session again on
//! the next sweep (a repeated line: readers keep the last line per `chat_id`); a session that got
//! new activity meanwhile is not removed (the delete re-checks `updated_at`).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, doc};
use mongodb::options::FindOptions;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{Error, MESSAGES, MessageDoc, SESSIONS, SessionDoc, Store};

/// What one call of [`Store::archive_expired`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Chats archived and removed.
    pub chats: Vec<String>,
    pub messages: u64,
    /// Files appended to.
    pub files: Vec<PathBuf>,
}

fn session_json(s: &SessionDoc) -> Value {
    json!({
        "app_id": s.app_id, "chat_id": s.chat_id, "user_id": s.user_id,
        "workflow_name": s.workflow_name, "status": s.status, "parent_chat_id": s.parent_chat_id,
        "last_seq": s.last_seq, "last_event_type": s.last_event_type,
        "created_at": s.created_at, "updated_at": s.updated_at,
    })
}

fn message_json(m: &MessageDoc) -> Value {
    json!({
        "seq": m.seq, "id": m.event_id, "type": m.kind, "role": m.role, "agent": m.agent,
        "user_id": m.user_id, "text": m.text, "data": m.data, "ts": m.ts,
    })
}

impl Store {
    /// Archives into `dir` and removes up to `max` of `app_id`'s sessions (oldest first) whose
    /// last activity is before `cutoff`, with their transcripts. Call again while it returns
    /// `max` chats.
    pub async fn archive_expired(
        &self,
        app_id: &str,
        cutoff: DateTime<Utc>,
        dir: &Path,
        max: i64,
    ) -> Result<Archived, Error> {
        let db = self.resolve_storage(app_id).await?;
        let old =
            doc! { "app_id": app_id, "updated_at": { "$lt": bson::DateTime::from_chrono(cutoff) } };
        let sessions: Vec<SessionDoc> = db
            .collection::<SessionDoc>(SESSIONS)
            .find(old)
            .with_options(
                FindOptions::builder()
                    .sort(doc! { "updated_at": 1 })
                    .limit(max)
                    .build(),
            )
            .await?
            .try_collect()
            .await?;
        let mut out = Archived::default();
        let archived_at = Utc::now();
        for s in sessions {
            let messages: Vec<MessageDoc> = db
                .collection::<MessageDoc>(MESSAGES)
                .find(doc! { "app_id": app_id, "chat_id": &s.chat_id })
                .sort(doc! { "seq": 1 })
                .await?
                .try_collect()
                .await?;
            let line = json!({
                "archived_at": archived_at,
                "session": session_json(&s),
                "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
            });
            let file = dir
                .join(app_id)
                .join(format!("{}.jsonl", s.updated_at.format("%Y-%m-%d")));
            append_line(&file, &line).await?;
            if !out.files.contains(&file) {
                out.files.push(file);
            }
            // Only if it is still expired: a chat with new activity stays.
            let gone = db
                .collection::<SessionDoc>(SESSIONS)
                .delete_one(doc! {
                    "app_id": app_id, "chat_id": &s.chat_id,
                    "updated_at": { "$lt": bson::DateTime::from_chrono(cutoff) },
                })
                .await?
                .deleted_count;
            if gone == 1 {
                out.messages += db
                    .collection::<MessageDoc>(MESSAGES)
                    .delete_many(doc! { "app_id": app_id, "chat_id": &s.chat_id })
                    .await?
                    .deleted_count;
                out.chats.push(s.chat_id.clone());
            }
        }
        Ok(out)
    }
}

async fn append_line(file: &Path, line: &Value) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Archive(format!("{}: {e}", file.display()));
    if let Some(parent) = file.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .await
        .map_err(io)?;
    let mut bytes = serde_json::to_vec(line).map_err(|e| Error::Archive(e.to_string()))?;
    bytes.push(b'\n');
    f.write_all(&bytes).await.map_err(io)?;
    f.sync_all().await.map_err(io)?;
    Ok(())
}
