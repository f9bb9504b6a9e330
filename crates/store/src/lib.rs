//! MongoDB read models.
//!
//! Mongo holds projections of the event log, never the truth: every collection can be dropped and
//! rebuilt from JetStream. Every document carries `app_id` and every query filters on it.
//! [`Store::resolve_storage`] picks the database of an app ([`storage`]: the shared one unless the
//! control plane gave the app its own).
//!
//! Collections and indexes (from the seeds):
//! - `chat_sessions`: unique `(app_id, chat_id)`, `(app_id, user_id, updated_at)`,
//!   `(app_id, workflow_name, status, updated_at)`
//! - `chat_messages`: unique `(app_id, chat_id, seq)`
//! - `usage_ledger`: unique `(app_id)`; `usage_events` (`_id` the event id) and `usage_runs`
//!   (`_id` the run id): `(app_id, mark)` (see [`ledger`]); `usage_events` also `(app_id, ts)`
//!   ([`credits`])

pub mod credits;
pub mod ledger;
pub mod metrics;
mod model;
pub mod projection;
pub mod retention;
pub mod storage;
pub mod storage_size;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
pub use model::{ChatRef, MessageDoc, SessionDoc, UsageDoc};
use mongodb::bson::{Document, doc};
use mongodb::options::{ClientOptions, FindOptions, IndexOptions};
use mongodb::{Client, Database, IndexModel};
pub use storage::{Placement, Resolver, Route};

pub use mongodb;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to MongoDB: {0}")]
    Connect(String),
    #[error("MongoDB operation failed: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("invalid document: {0}")]
    Document(String),
    #[error("cannot write the archive: {0}")]
    Archive(String),
    /// Concurrent writers got in the way (a usage read overtaken by compactions, a compaction
    /// by another one); trying again later is safe.
    #[error("contended: {0}")]
    Contended(String),
}

/// Mongo error code of a duplicate key.
pub const DUPLICATE_KEY: i32 = 11000;

pub const SESSIONS: &str = "chat_sessions";
pub const MESSAGES: &str = "chat_messages";
pub const LEDGER: &str = "usage_ledger";
pub const USAGE_EVENTS: &str = "usage_events";
pub const RUNS: &str = "usage_runs";

/// The read-model store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    db: Database,
    resolver: Option<Resolver>,
    cache: Arc<storage::Cache>,
    compactions: Arc<ledger::Compactions>,
}

impl Store {
    /// Connects to `uri`; `db_name` is the shared database (the URI's default database wins when the
    /// URI names one and `db_name` is empty).
    pub async fn connect(uri: &str, db_name: &str) -> Result<Store, Error> {
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        opts.app_name = Some("mozaiks".into());
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        opts.connect_timeout = Some(Duration::from_secs(5));
        let name = if db_name.is_empty() {
            opts.default_database
                .clone()
                .unwrap_or_else(|| "mozaiks".into())
        } else {
            db_name.to_string()
        };
        let client = Client::with_options(opts).map_err(|e| Error::Connect(e.to_string()))?;
        let db = client.database(&name);
        let store = Store {
            client,
            db,
            resolver: None,
            cache: Arc::default(),
            compactions: Arc::default(),
        };
        store
            .ping()
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        Ok(store)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The shared database.
    pub fn shared(&self) -> &Database {
        &self.db
    }

    /// Round-trips to the server (for readiness).
    pub async fn ping(&self) -> Result<(), Error> {
        let started = Instant::now();
        self.db.run_command(doc! { "ping": 1 }).await?;
        ::metrics::histogram!(metrics::QUERY_SECONDS, "op" => "ping")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Creates the indexes of every collection in `db` (idempotent).
    pub async fn ensure_indexes(&self, db: &Database) -> Result<(), Error> {
        let idx = |keys: Document, unique: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(unique).build())
                .build()
        };
        db.collection::<Document>(SESSIONS)
            .create_indexes([
                idx(doc! { "app_id": 1, "chat_id": 1 }, true),
                idx(doc! { "app_id": 1, "user_id": 1, "updated_at": -1 }, false),
                idx(
                    doc! { "app_id": 1, "workflow_name": 1, "status": 1, "updated_at": -1 },
                    false,
                ),
            ])
            .await?;
        db.collection::<Document>(MESSAGES)
            .create_index(idx(doc! { "app_id": 1, "chat_id": 1, "seq": 1 }, true))
            .await?;
        db.collection::<Document>(LEDGER)
            .create_index(idx(doc! { "app_id": 1 }, true))
            .await?;
        // Charges and runs are unique by `_id` (event id, run id); every index is written by
        // every charge, so there is one more only (`mark`: reads and rolls; see `ledger`).
        // Databases of the previous shape keep their `(app_id, event_id)`, `(app_id, run_id)`
        // and `(app_id, rolled)` indexes.
        for coll in [USAGE_EVENTS, RUNS] {
            db.collection::<Document>(coll)
                .create_index(idx(doc! { "app_id": 1, "mark": 1 }, false))
                .await?;
        }
        Ok(())
    }

    /// One session of an app.
    pub async fn session(&self, app_id: &str, chat_id: &str) -> Result<Option<SessionDoc>, Error> {
        let started = Instant::now();
        let found = self
            .resolve_storage(app_id)
            .await?
            .collection::<SessionDoc>(SESSIONS)
            .find_one(doc! { "app_id": app_id, "chat_id": chat_id })
            .await?;
        record("session", started);
        Ok(found)
    }

    /// A user's sessions in an app, newest first.
    pub async fn sessions_of_user(
        &self,
        app_id: &str,
        user_id: &str,
        limit: i64,
    ) -> Result<Vec<SessionDoc>, Error> {
        let started = Instant::now();
        let opts = FindOptions::builder()
            .sort(doc! { "updated_at": -1 })
            .limit(limit)
            .build();
        let found: Vec<SessionDoc> = self
            .resolve_storage(app_id)
            .await?
            .collection::<SessionDoc>(SESSIONS)
            .find(doc! { "app_id": app_id, "user_id": user_id })
            .with_options(opts)
            .await?
            .try_collect()
            .await?;
        record("sessions_of_user", started);
        Ok(found)
    }

    /// A chat's transcript with `seq > after`, in order.
    pub async fn messages(
        &self,
        app_id: &str,
        chat_id: &str,
        after: u64,
        limit: i64,
    ) -> Result<Vec<MessageDoc>, Error> {
        let started = Instant::now();
        let opts = FindOptions::builder()
            .sort(doc! { "seq": 1 })
            .limit(limit)
            .build();
        let found: Vec<MessageDoc> = self
            .resolve_storage(app_id)
            .await?
            .collection::<MessageDoc>(MESSAGES)
            .find(doc! { "app_id": app_id, "chat_id": chat_id, "seq": { "$gt": after as i64 } })
            .with_options(opts)
            .await?
            .try_collect()
            .await?;
        record("messages", started);
        Ok(found)
    }

    /// The app's chats whose run may still go on ([`projection::status::UNFINISHED`]); session
    /// documents without a chat, user or workflow are left out.
    pub async fn unfinished_chats(&self, app_id: &str) -> Result<Vec<ChatRef>, Error> {
        let started = Instant::now();
        let mut open = self
            .resolve_storage(app_id)
            .await?
            .collection::<Document>(SESSIONS)
            .find(doc! { "app_id": app_id, "status": { "$in": projection::status::UNFINISHED.as_slice() } })
            .projection(doc! { "chat_id": 1, "user_id": 1, "workflow_name": 1 })
            .await?;
        let mut found = Vec::new();
        while open.advance().await? {
            let d = open.deserialize_current()?;
            if let (Ok(chat_id), Ok(user_id), Ok(workflow_name)) = (
                d.get_str("chat_id"),
                d.get_str("user_id"),
                d.get_str("workflow_name"),
            ) {
                found.push(ChatRef {
                    chat_id: chat_id.to_string(),
                    user_id: user_id.to_string(),
                    workflow_name: workflow_name.to_string(),
                });
            }
        }
        record("unfinished_chats", started);
        Ok(found)
    }
}

fn record(op: &'static str, started: Instant) {
    ::metrics::histogram!(metrics::QUERY_SECONDS, "op" => op)
        .record(started.elapsed().as_secs_f64());
}

/// Whether a Mongo error is (only) a duplicate key.
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(im) => {
            im.write_concern_error.is_none()
                && im
                    .write_errors
                    .as_ref()
                    .is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}
