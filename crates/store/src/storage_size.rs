//! How much an app stores: one measurement, shared by the fleet.
//!
//! A measure reads the app's documents once per read-model collection of its database
//! (`chat_sessions`, `chat_messages`, `usage_events`, `usage_runs`, `usage_ledger`, filtered on
//! `app_id`, the first field of their indexes) and counts their documents and bytes. It is
//! recorded in `storage_measures` (shared database, one document per app, unique on `app_id`).
//! Its two readers share it: the projectors' periodic gauges (`mozaiks_storage_documents`,
//! `mozaiks_storage_bytes`, every `MOZAIKS_METRICS_STORAGE_SECONDS`) and the usage endpoint's
//! `storage_bytes` (at most [`crate::credits::STORAGE_TTL`] old) both ask
//! [`Store::storage_measure`] for a measure no older than they need, which answers the recorded
//! one when it is, and measures (and records) only when there is none, it is older, or the app
//! moved to another database since. Whichever reader needs a new measure first takes it, for
//! every replica of both.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Document, RawDocumentBuf, doc};
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};

use crate::{Error, LEDGER, MESSAGES, RUNS, SESSIONS, Store, USAGE_EVENTS};

/// The latest measure of each app (shared database).
pub const MEASURES: &str = "storage_measures";

/// The collections measured.
pub const COLLECTIONS: [&str; 5] = [SESSIONS, MESSAGES, USAGE_EVENTS, RUNS, LEDGER];

/// What an app stores in one collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionSize {
    pub collection: String,
    pub documents: u64,
    pub bytes: u64,
}

/// One measure of an app's read models.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measure {
    pub app_id: String,
    /// The database measured (the app's placement then).
    pub db: String,
    pub collections: Vec<CollectionSize>,
    pub measured_at: DateTime<Utc>,
}

impl Measure {
    /// Bytes of every collection.
    pub fn bytes(&self) -> u64 {
        self.collections.iter().map(|c| c.bytes).sum()
    }

    fn to_doc(&self) -> Document {
        let mut colls = Document::new();
        for c in &self.collections {
            colls.insert(
                &c.collection,
                doc! { "documents": clamp(c.documents), "bytes": clamp(c.bytes) },
            );
        }
        doc! {
            "app_id": &self.app_id,
            "db": &self.db,
            "collections": colls,
            "bytes": clamp(self.bytes()),
            "measured_at": bson::DateTime::from_chrono(self.measured_at),
        }
    }

    fn from_doc(d: &Document) -> Option<Measure> {
        let colls = d.get_document("collections").ok()?;
        let n = |d: &Document, k: &str| d.get_i64(k).map_or(0, |v| v.max(0) as u64);
        Some(Measure {
            app_id: d.get_str("app_id").ok()?.to_string(),
            db: d.get_str("db").ok()?.to_string(),
            collections: colls
                .iter()
                .filter_map(|(k, v)| {
                    let v = v.as_document()?;
                    Some(CollectionSize {
                        collection: k.clone(),
                        documents: n(v, "documents"),
                        bytes: n(v, "bytes"),
                    })
                })
                .collect(),
            measured_at: d.get_datetime("measured_at").ok()?.to_chrono(),
        })
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The shared databases whose [`MEASURES`] index this process has ensured.
fn indexed() -> &'static Mutex<HashSet<String>> {
    static INDEXED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    INDEXED.get_or_init(Default::default)
}

impl Store {
    /// Measures `app_id`'s read models now and records the measure.
    pub async fn measure_storage_now(&self, app_id: &str) -> Result<Measure, Error> {
        let db = self.resolve_storage(app_id).await?;
        let measure = measure(&db, app_id).await?;
        self.record_measure(&measure).await?;
        Ok(measure)
    }

    /// The recorded measure of `app_id` when it is younger than `max_age` and of the database the
    /// app lives in now; otherwise a new one (recorded).
    pub async fn storage_measure(&self, app_id: &str, max_age: Duration) -> Result<Measure, Error> {
        let db = self.resolve_storage(app_id).await?;
        let recorded = self
            .shared()
            .collection::<Document>(MEASURES)
            .find_one(doc! { "app_id": app_id })
            .await?
            .as_ref()
            .and_then(Measure::from_doc);
        let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if let Some(m) = recorded
            && m.db == db.name()
            && Utc::now() - m.measured_at < max_age
        {
            return Ok(m);
        }
        let m = measure(&db, app_id).await?;
        self.record_measure(&m).await?;
        Ok(m)
    }

    async fn record_measure(&self, m: &Measure) -> Result<(), Error> {
        let coll = self.shared().collection::<Document>(MEASURES);
        let db = self.shared().name().to_string();
        if !indexed()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&db)
        {
            coll.create_index(
                IndexModel::builder()
                    .keys(doc! { "app_id": 1 })
                    .options(IndexOptions::builder().unique(true).build())
                    .build(),
            )
            .await?;
            indexed()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(db);
        }
        // Two measures at once: either may land, both are true.
        match coll
            .replace_one(doc! { "app_id": &m.app_id }, m.to_doc())
            .upsert(true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if crate::is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reads `app_id`'s documents in each collection of `db` once, counting documents and bytes.
async fn measure(db: &Database, app_id: &str) -> Result<Measure, Error> {
    let started = Instant::now();
    let mut collections = Vec::new();
    for coll in COLLECTIONS {
        let (mut documents, mut bytes) = (0u64, 0u64);
        let mut cursor = db
            .collection::<RawDocumentBuf>(coll)
            .find(doc! { "app_id": app_id })
            .await?;
        while cursor.advance().await? {
            documents += 1;
            bytes += cursor.current().as_bytes().len() as u64;
        }
        collections.push(CollectionSize {
            collection: coll.to_string(),
            documents,
            bytes,
        });
    }
    crate::record("storage_measure", started);
    Ok(Measure {
        app_id: app_id.to_string(),
        db: db.name().to_string(),
        collections,
        // Milliseconds, as recorded: a measure read back equals the one taken.
        measured_at: bson::DateTime::now().to_chrono(),
    })
}
