//! Retention: sessions whose last activity is older than their app's retention are archived as
//! JSON lines and removed from the read models; a deleted app's sessions all are.
//!
//! The archive is one file per app and day of last activity: `{dir}/{app_id}/{YYYY-MM-DD}.jsonl`,
//! one line per session, `{"archived_at", "reason", "session": {...}, "messages": [...]}`
//! (`reason`: `retention` or `app_deleted`), appended and synced before the session is removed.
//! A crash between the two archives the session again on the next sweep (a repeated line: readers
//! keep the last line per `chat_id`, which is also the most complete); a session that got new
//! activity meanwhile is not removed (the delete re-checks `updated_at`, or `last_seq` for a
//! deleted app's).

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
        let sessions = oldest_sessions(&db, old, max).await?;
        let mut out = Archived::default();
        let archived_at = Utc::now();
        for s in sessions {
            let (file, _) = archive_session(&db, dir, app_id, &s, "retention", archived_at).await?;
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

/// What one call of [`Store::archive_app`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AppArchived {
    /// Sessions archived and removed.
    pub sessions: u64,
    /// Messages removed (archived with their session, or left without one and archived alone).
    pub messages: u64,
    /// Sessions archived but not removed because they changed meanwhile (archived again later).
    pub changed: u64,
}

impl Store {
    /// Archives into `dir` and removes up to `max` of a **deleted** app's sessions with their
    /// transcripts, then, once no session is left, messages without a session. Call again while
    /// it returns `max` sessions. Idempotent: a second call after a complete one finds nothing.
    pub async fn archive_app(
        &self,
        app_id: &str,
        dir: &Path,
        max: i64,
    ) -> Result<AppArchived, Error> {
        let db = self.resolve_storage(app_id).await?;
        let sessions = oldest_sessions(&db, doc! { "app_id": app_id }, max).await?;
        let mut out = AppArchived::default();
        let archived_at = Utc::now();
        let full = sessions.len() as i64 >= max;
        for s in sessions {
            let (_, top) =
                archive_session(&db, dir, app_id, &s, "app_deleted", archived_at).await?;
            // Only what was archived: a session a late event moved on stays for the next call.
            let gone = db
                .collection::<SessionDoc>(SESSIONS)
                .delete_one(doc! {
                    "app_id": app_id, "chat_id": &s.chat_id, "last_seq": s.last_seq,
                })
                .await?
                .deleted_count;
            if gone == 1 {
                out.sessions += 1;
                out.messages += db
                    .collection::<MessageDoc>(MESSAGES)
                    .delete_many(
                        doc! { "app_id": app_id, "chat_id": &s.chat_id, "seq": { "$lte": top } },
                    )
                    .await?
                    .deleted_count;
            } else {
                out.changed += 1;
            }
        }
        if !full && out.changed == 0 {
            out.messages += self.archive_orphans(&db, app_id, dir, archived_at).await?;
        }
        Ok(out)
    }

    /// Messages of `app_id` left without a session (a projection interrupted between the two
    /// writes): archived per chat with `"session": null`, then removed.
    async fn archive_orphans(
        &self,
        db: &mongodb::Database,
        app_id: &str,
        dir: &Path,
        archived_at: DateTime<Utc>,
    ) -> Result<u64, Error> {
        let left: Vec<MessageDoc> = db
            .collection::<MessageDoc>(MESSAGES)
            .find(doc! { "app_id": app_id })
            .sort(doc! { "chat_id": 1, "seq": 1 })
            .limit(10_000)
            .await?
            .try_collect()
            .await?;
        let mut removed = 0;
        for chat in left.chunk_by(|a, b| a.chat_id == b.chat_id) {
            let (first, last) = (&chat[0], &chat[chat.len() - 1]);
            let has_session = db
                .collection::<SessionDoc>(SESSIONS)
                .find_one(doc! { "app_id": app_id, "chat_id": &first.chat_id })
                .await?
                .is_some();
            if has_session {
                // Projected after this call's read of the sessions: the next call archives it.
                continue;
            }
            let line = json!({
                "archived_at": archived_at,
                "reason": "app_deleted",
                "session": null,
                "chat_id": first.chat_id,
                "messages": chat.iter().map(message_json).collect::<Vec<_>>(),
            });
            let file = dir
                .join(app_id)
                .join(format!("{}.jsonl", last.ts.format("%Y-%m-%d")));
            append_line(&file, &line).await?;
            removed += db
                .collection::<MessageDoc>(MESSAGES)
                .delete_many(doc! { "app_id": app_id, "chat_id": &first.chat_id, "seq": { "$lte": last.seq } })
                .await?
                .deleted_count;
        }
        Ok(removed)
    }
}

/// At most `max` sessions of `db` matching `filter` (which carries `app_id`), least recently
/// updated first.
async fn oldest_sessions(
    db: &mongodb::Database,
    filter: bson::Document,
    max: i64,
) -> Result<Vec<SessionDoc>, Error> {
    Ok(db
        .collection::<SessionDoc>(SESSIONS)
        .find(filter)
        .with_options(
            FindOptions::builder()
                .sort(doc! { "updated_at": 1 })
                .limit(max)
                .build(),
        )
        .await?
        .try_collect()
        .await?)
}

/// Appends one session of `db` with its transcript, as one JSON line, to the app's archive file
/// of the session's last day; returns the file and the last message seq archived (0: none).
async fn archive_session(
    db: &mongodb::Database,
    dir: &Path,
    app_id: &str,
    s: &SessionDoc,
    reason: &str,
    archived_at: DateTime<Utc>,
) -> Result<(PathBuf, i64), Error> {
    let messages: Vec<MessageDoc> = db
        .collection::<MessageDoc>(MESSAGES)
        .find(doc! { "app_id": app_id, "chat_id": &s.chat_id })
        .sort(doc! { "seq": 1 })
        .await?
        .try_collect()
        .await?;
    let line = json!({
        "archived_at": archived_at,
        "reason": reason,
        "session": session_json(s),
        "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
    });
    let file = dir
        .join(app_id)
        .join(format!("{}.jsonl", s.updated_at.format("%Y-%m-%d")));
    append_line(&file, &line).await?;
    Ok((file, messages.last().map(|m| m.seq).unwrap_or(0)))
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
