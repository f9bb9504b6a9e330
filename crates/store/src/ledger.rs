//! The usage ledger: each `usage.charged` counted exactly once, with one document written per
//! charge and one per run, and no document that every charge of an app must write.
//!
//! Three collections in the app's database:
//!
//! - `usage_events`: one document per charge, `_id` its event id (charges written before this
//!   shape have an object id and the unique index `(app_id, event_id)`): the charge's tokens,
//!   run, step, chat, user, workflow, agent, model, purpose, `ts` (the event's time),
//!   `billed_at`, its cost, and `mark`, its position in `MZ_USAGE` ([`mark`]);
//! - `usage_runs`: one document per run charged, `_id` its run id, with the `mark` of the charge
//!   that wrote it;
//! - `usage_ledger`: one per app: the totals of every charge and run whose mark is at most the
//!   ledger's `mark` (the watermark), and `version`, bumped by every write.
//!
//! **Charging** is two idempotent inserts outside any transaction: the charges, then the runs
//! this process has not written yet. A duplicate key means "already there", so a redelivered
//! charge changes nothing, also when the process died between the write and the ack (the
//! redelivery, in a new process, inserts the run if the first attempt did not get that far).
//!
//! **Marks.** A charge's mark is `{epoch}.{seq}` (both zero-padded, so marks sort as strings the
//! way positions sort): `seq` is its `MZ_USAGE` stream sequence and `epoch` the creation time of
//! billing's durable consumer, so a stream or consumer created again (sequences from 1 again)
//! sorts after everything before it. A charge written without a position in the log (a storage
//! move's copy) gets [`UNPLACED`], which sorts after every mark: it is always read from the
//! documents and never rolled, so it counts exactly once wherever it lands.
//!
//! **Rolling** ([`Store::compact_usage`]) moves the watermark from `w` to a `floor`, adding the
//! charges and runs with `w < mark <= floor` to the totals, in one compare-and-set on the
//! ledger's `version` (no transaction, no update of any charge). Billing passes its durable
//! consumer's acknowledgement floor: every charge at or below it was acknowledged, and billing
//! acknowledges a charge only once it is written (with its run), so no charge at or below the
//! floor can be written later — two replicas interleaving sequences included: the floor only
//! passes a sequence once every one before it is acknowledged. A charge at or below the watermark
//! that arrives again is already stored: a duplicate, counted nothing. A roll that loses the race
//! to another one (or to a hold) changes nothing.
//!
//! **Reading** an app's usage adds the charges and runs above the watermark (by aggregation over
//! the `(app_id, mark)` indexes) to the ledger's totals. The ledger is read before and after;
//! when its `version` moved, a roll committed in between and the read is repeated, so every
//! charge is counted exactly once in every answer.
//!
//! **Holding** ([`Store::hold_usage`], for `mozaiks rebuild`): the totals are zeroed and the
//! watermark removed in one write, and no roll happens until [`Store::release_usage`]; meanwhile
//! reads count every document. A rebuild holds the ledger, deletes the app's documents, writes
//! them again from the log and releases it.
//!
//! **The previous shape** (`rolled: false` until a transaction rolled the charge): such charges
//! and runs are read and rolled as before, by a short transaction (aborted on every error path,
//! the session killed when the abort cannot reach a stalled server), in databases that have the
//! `(app_id, rolled)` index only; a new database has none. Charges written before that shape (no
//! `rolled`, no `mark`) were counted in `usage_ledger` by the transaction that wrote them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{ClientSession, Collection, Database};
use mozaiks_events::{Envelope, Event, UsageCharged};
use tracing::{info, warn};

use crate::metrics as m;
use crate::{DUPLICATE_KEY, Error, LEDGER, RUNS, Store, USAGE_EVENTS, UsageDoc};

/// Charges of an app after which billing rolls its ledger.
pub const COMPACT_EVERY: u64 = 512;
/// Charges (and runs) of the previous shape rolled by one transaction.
pub const COMPACT_BATCH: usize = 1000;
/// The mark of a charge written without a position in the log: after every mark, never rolled.
pub const UNPLACED: &str = "~";
/// The previous shape's index; a database without it has no charge of that shape.
const LEGACY_INDEX: &str = "app_id_1_rolled_1";
/// How long a transaction of the previous shape may take before it is aborted.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `abortTransaction` may take before the session is killed instead.
const ABORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a session whose abort failed is retried with `killSessions` (the server expires
/// an idle transaction itself after 60 s; this only makes it faster).
const KILL_FOR: Duration = Duration::from_secs(120);
/// Reads repeated when a roll commits during them.
const READ_ATTEMPTS: usize = 5;
/// Runs remembered as written, per process (forgotten all at once beyond that).
const KNOWN_RUNS: usize = 100_000;

/// A charge's mark: its position in `MZ_USAGE` (see the module's documentation). `epoch` is the
/// creation time of billing's durable consumer, in nanoseconds since the Unix epoch.
pub fn mark(epoch: i128, seq: u64) -> String {
    format!("{:020}.{seq:020}", epoch.max(0))
}

/// What applying a charge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charged {
    /// Counted now.
    Counted,
    /// Already counted (or not a charge): nothing changed.
    Duplicate,
}

/// What a roll added to the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub charges: u64,
    pub runs: u64,
}

/// What a store's clones remember about the ledgers: the runs written, and which databases hold
/// charges of the previous shape.
#[derive(Default)]
pub(crate) struct Compactions {
    runs: Mutex<HashSet<(String, String)>>,
    legacy: Mutex<HashMap<String, bool>>,
}

impl Compactions {
    fn known(&self, db: &str, run: &str) -> bool {
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        runs.contains(&(db.to_string(), run.to_string()))
    }

    fn remember(&self, db: &str, written: impl IntoIterator<Item = String>) {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        for run in written {
            if runs.len() >= KNOWN_RUNS {
                runs.clear();
            }
            runs.insert((db.to_string(), run));
        }
    }
}

impl Store {
    /// Applies one `usage.charged` to the ledger in `db`, exactly once, without a position in
    /// the log ([`UNPLACED`]; see [`Store::charge_marked`]).
    pub async fn charge(&self, db: &Database, env: &Envelope) -> Result<Charged, Error> {
        Ok(self
            .charge_many(db, std::slice::from_ref(env))
            .await?
            .pop()
            .unwrap_or(Charged::Duplicate))
    }

    /// [`Store::charge_marked`] for charges without a position in the log ([`UNPLACED`]).
    pub async fn charge_many(
        &self,
        db: &Database,
        envs: &[Envelope],
    ) -> Result<Vec<Charged>, Error> {
        self.charge_marked(db, envs, &[]).await
    }

    /// Applies `usage.charged` events to the ledger in `db`, each exactly once: one unordered
    /// insert of the charges, one of the runs not known to be written, no transaction. `marks`
    /// holds each envelope's [`mark`] (missing ones are [`UNPLACED`]). Answers what happened to
    /// each envelope, in order (anything else than a charge is [`Charged::Duplicate`]). On an
    /// error some of them may be written: applying them again is safe.
    pub async fn charge_marked(
        &self,
        db: &Database,
        envs: &[Envelope],
        marks: &[String],
    ) -> Result<Vec<Charged>, Error> {
        let started = Instant::now();
        let mut out = vec![Charged::Duplicate; envs.len()];
        let now = bson::DateTime::now();
        let mut charges = Vec::new();
        let mut at = Vec::new();
        let mut runs = BTreeMap::new();
        for (i, env) in envs.iter().enumerate() {
            let Event::UsageCharged(u) = &env.event else {
                continue;
            };
            let mark = marks.get(i).map_or(UNPLACED, String::as_str);
            charges.push(charge_doc(env, u, mark, now));
            at.push(i);
            let run = u.run_id.to_string();
            // Every charge's run, a duplicate's too (a charge written by an attempt that died
            // before its run was gets it now), unless this process wrote it already.
            if !self.compactions.known(db.name(), &run) {
                runs.entry(run.clone()).or_insert_with(|| {
                    doc! {
                        "_id": &run,
                        "app_id": &env.app_id,
                        "run_id": &run,
                        "chat_id": &env.chat_id,
                        "billed_at": now,
                        "mark": mark,
                    }
                });
            }
        }
        if charges.is_empty() {
            return Ok(out);
        }
        let present = insert_new(&db.collection(USAGE_EVENTS), charges).await?;
        let written: Vec<String> = runs.keys().cloned().collect();
        insert_new(&db.collection(RUNS), runs.into_values().collect()).await?;
        self.compactions.remember(db.name(), written);
        for (k, i) in at.into_iter().enumerate() {
            if !present.contains(&k) {
                out[i] = Charged::Counted;
            }
        }
        ::metrics::histogram!(m::WRITE_SECONDS, "op" => "charge")
            .record(started.elapsed().as_secs_f64());
        Ok(out)
    }

    /// An app's metered usage (zeros when nothing was charged yet), exact: every charge of the
    /// app's database counted once.
    pub async fn usage(&self, app_id: &str) -> Result<UsageDoc, Error> {
        let started = Instant::now();
        let db = self.resolve_storage(app_id).await?;
        let usage = self.usage_in(&db, app_id).await?;
        crate::record("usage", started);
        Ok(usage)
    }

    /// An app's metered usage in `db`.
    pub async fn usage_in(&self, db: &Database, app_id: &str) -> Result<UsageDoc, Error> {
        let ledger = db.collection::<Document>(LEDGER);
        let legacy = self.has_legacy(db).await?;
        for _ in 0..READ_ATTEMPTS {
            let before = ledger.find_one(doc! { "app_id": app_id }).await?;
            let tail = unrolled(db, app_id, &watermark(before.as_ref()), legacy).await?;
            let after = ledger.find_one(doc! { "app_id": app_id }).await?;
            if version(before.as_ref()) != version(after.as_ref()) {
                ::metrics::counter!(m::LEDGER_READ_RETRIES).increment(1);
                continue;
            }
            let base = before.unwrap_or_default();
            return Ok(UsageDoc {
                app_id: app_id.to_string(),
                prompt_tokens: int(&base, "prompt_tokens") + tail.prompt_tokens,
                completion_tokens: int(&base, "completion_tokens") + tail.completion_tokens,
                total_tokens: int(&base, "total_tokens") + tail.total_tokens,
                charges: int(&base, "charges") + tail.charges,
                runs: int(&base, "runs") + tail.runs,
            });
        }
        Err(Error::Contended(format!(
            "the usage ledger of {app_id} changed during {READ_ATTEMPTS} reads"
        )))
    }

    /// Whether `db` may hold charges of the previous shape (it has that shape's index; checked
    /// once per database and process).
    pub(crate) async fn has_legacy(&self, db: &Database) -> Result<bool, Error> {
        if let Some(known) = self
            .compactions
            .legacy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(db.name())
        {
            return Ok(*known);
        }
        let names = match db
            .collection::<Document>(USAGE_EVENTS)
            .list_index_names()
            .await
        {
            Ok(n) => n,
            // No collection yet: nothing of any shape.
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 26) => {
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let legacy = names.iter().any(|n| n == LEGACY_INDEX);
        self.compactions
            .legacy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(db.name().to_string(), legacy);
        Ok(legacy)
    }

    /// Rolls `app_id`'s charges and runs in `db` with a mark above the ledger's watermark and at
    /// most `floor` into its totals, in one compare-and-set (and those of the previous shape, by
    /// transactions). `floor` must be a mark at or below which no charge of the app can be written
    /// any more (billing's acknowledgement floor; see the module's documentation). Safe to run
    /// anywhere, at any time, concurrently: a roll that loses a race answers
    /// [`Error::Contended`] and changed nothing. Nothing is rolled while the ledger is held.
    pub async fn compact_usage(
        &self,
        db: &Database,
        app_id: &str,
        floor: &str,
    ) -> Result<Compacted, Error> {
        let mut total = Compacted::default();
        if self.has_legacy(db).await? {
            loop {
                let c = compact_legacy(db, app_id, COMPACT_BATCH).await?;
                total.charges += c.charges;
                total.runs += c.runs;
                if (c.charges as usize) < COMPACT_BATCH && (c.runs as usize) < COMPACT_BATCH {
                    break;
                }
            }
        }
        let c = roll(db, app_id, floor).await?;
        total.charges += c.charges;
        total.runs += c.runs;
        Ok(total)
    }

    /// Zeroes `app_id`'s ledger totals in `db` and stops rolls until [`Store::release_usage`]
    /// (for a rebuild: see the module's documentation). Rolls that were under way fail.
    pub async fn hold_usage(&self, db: &Database, app_id: &str) -> Result<(), Error> {
        db.collection::<Document>(LEDGER)
            .update_one(
                doc! { "app_id": app_id },
                doc! {
                    "$set": {
                        "held": true,
                        "prompt_tokens": 0_i64, "completion_tokens": 0_i64, "total_tokens": 0_i64,
                        "credits": 0_i64, "charges": 0_i64, "runs": 0_i64, "periods": {},
                    },
                    "$unset": { "mark": "" },
                    "$inc": { "version": 1_i64 },
                },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Lets `app_id`'s ledger in `db` roll again after [`Store::hold_usage`].
    pub async fn release_usage(&self, db: &Database, app_id: &str) -> Result<(), Error> {
        db.collection::<Document>(LEDGER)
            .update_one(
                doc! { "app_id": app_id },
                doc! { "$unset": { "held": "" }, "$inc": { "version": 1_i64 } },
            )
            .await?;
        Ok(())
    }
}

fn charge_doc(env: &Envelope, u: &UsageCharged, mark: &str, now: bson::DateTime) -> Document {
    let credits = u
        .credits
        .map(|c| i64::try_from(c).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let id = env.event_id.to_string();
    let mut d = doc! {
        "_id": &id,
        "app_id": &env.app_id,
        "event_id": &id,
        "chat_id": &env.chat_id,
        "user_id": &env.user_id,
        "workflow": &env.workflow,
        "run_id": u.run_id.to_string(),
        "step": i64::from(u.step),
        "agent": &u.agent,
        "model": &u.model,
        "prompt_tokens": u.prompt_tokens as i64,
        "completion_tokens": u.completion_tokens as i64,
        "total_tokens": u.total_tokens as i64,
        "ts": bson::DateTime::from_chrono(env.ts),
        "billed_at": now,
        "mark": mark,
        // Credits (see crate::credits): the charge's cost, its period and its UTC day.
        "credits": credits,
        "period": crate::credits::Period::containing(env.ts).key(),
        "day": crate::credits::day_key(env.ts),
    };
    if let Some(p) = &u.purpose {
        d.insert("purpose", p);
    }
    d
}

/// Inserts `docs` (unordered: each on its own); answers the indexes of those already there.
async fn insert_new(
    coll: &Collection<Document>,
    docs: Vec<Document>,
) -> Result<HashSet<usize>, Error> {
    if docs.is_empty() {
        return Ok(HashSet::new());
    }
    match coll.insert_many(docs).ordered(false).await {
        Ok(_) => Ok(HashSet::new()),
        Err(e) => {
            if let ErrorKind::InsertMany(im) = e.kind.as_ref()
                && im.write_concern_error.is_none()
                && let Some(errs) = &im.write_errors
                && errs.iter().all(|w| w.code == DUPLICATE_KEY)
            {
                return Ok(errs.iter().map(|w| w.index).collect());
            }
            Err(e.into())
        }
    }
}

/// A number field of a ledger or aggregation document (0 when absent).
fn int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(f)) => *f as i64,
        _ => 0,
    }
}

/// The ledger's watermark ("" when nothing was rolled by mark, or the ledger is held).
pub(crate) fn watermark(ledger: Option<&Document>) -> String {
    ledger
        .and_then(|d| d.get_str("mark").ok())
        .unwrap_or_default()
        .to_string()
}

/// The ledger's version (`None`: no ledger document).
pub(crate) fn version(ledger: Option<&Document>) -> Option<i64> {
    ledger.map(|d| int(d, "version"))
}

/// The filters of an app's charges (and runs) not in its ledger's totals: above the watermark,
/// and of the previous shape and unrolled when `legacy`.
pub(crate) fn unrolled_filters(app_id: &str, watermark: &str, legacy: bool) -> Vec<Document> {
    let mut out = vec![doc! { "app_id": app_id, "mark": { "$gt": watermark } }];
    if legacy {
        out.push(doc! { "app_id": app_id, "rolled": false });
    }
    out
}

/// The app's charges and runs not yet rolled into its ledger.
async fn unrolled(
    db: &Database,
    app_id: &str,
    watermark: &str,
    legacy: bool,
) -> Result<UsageDoc, Error> {
    let mut u = UsageDoc::empty(app_id);
    for filter in unrolled_filters(app_id, watermark, legacy) {
        let sums: Vec<Document> = db
            .collection::<Document>(USAGE_EVENTS)
            .aggregate([
                doc! { "$match": filter.clone() },
                doc! { "$group": {
                    "_id": Bson::Null,
                    "prompt_tokens": { "$sum": "$prompt_tokens" },
                    "completion_tokens": { "$sum": "$completion_tokens" },
                    "total_tokens": { "$sum": "$total_tokens" },
                    "charges": { "$sum": 1 },
                }},
            ])
            .await?
            .try_collect()
            .await?;
        let runs = db
            .collection::<Document>(RUNS)
            .count_documents(filter)
            .await?;
        let s = sums.into_iter().next().unwrap_or_default();
        u.prompt_tokens += int(&s, "prompt_tokens");
        u.completion_tokens += int(&s, "completion_tokens");
        u.total_tokens += int(&s, "total_tokens");
        u.charges += int(&s, "charges");
        u.runs += runs as i64;
    }
    Ok(u)
}

/// Moves `app_id`'s watermark up to `floor` (see [`Store::compact_usage`]).
async fn roll(db: &Database, app_id: &str, floor: &str) -> Result<Compacted, Error> {
    let started = Instant::now();
    let ledger = db.collection::<Document>(LEDGER);
    let current = ledger.find_one(doc! { "app_id": app_id }).await?;
    if current
        .as_ref()
        .is_some_and(|d| d.get_bool("held").unwrap_or(false))
    {
        return Ok(Compacted::default());
    }
    let from = watermark(current.as_ref());
    if floor <= from.as_str() || floor >= UNPLACED {
        return Ok(Compacted::default());
    }
    let range = doc! { "app_id": app_id, "mark": { "$gt": &from, "$lte": floor } };
    let by_period: Vec<Document> = db
        .collection::<Document>(USAGE_EVENTS)
        .aggregate([
            doc! { "$match": range.clone() },
            doc! { "$group": {
                "_id": "$period",
                "prompt_tokens": { "$sum": "$prompt_tokens" },
                "completion_tokens": { "$sum": "$completion_tokens" },
                "total_tokens": { "$sum": "$total_tokens" },
                "credits": { "$sum": "$credits" },
                "charges": { "$sum": 1 },
            }},
        ])
        .await?
        .try_collect()
        .await?;
    let runs = db
        .collection::<Document>(RUNS)
        .count_documents(range)
        .await?;
    let sum = |key: &str| by_period.iter().map(|d| int(d, key)).sum::<i64>();
    let charges = sum("charges");
    if charges == 0 && runs == 0 {
        return Ok(Compacted::default());
    }
    let mut inc = doc! {
        "prompt_tokens": sum("prompt_tokens"),
        "completion_tokens": sum("completion_tokens"),
        "total_tokens": sum("total_tokens"),
        "credits": sum("credits"),
        "charges": charges,
        "runs": runs as i64,
        "version": 1_i64,
    };
    for d in &by_period {
        if let Ok(p) = d.get_str("_id") {
            inc.insert(format!("periods.{p}"), int(d, "credits"));
        }
    }
    let lost = || {
        ::metrics::counter!(m::LEDGER_COMPACTIONS, "outcome" => "conflict").increment(1);
        Error::Contended(format!("another write moved {app_id}'s ledger first"))
    };
    let update = doc! { "$set": { "mark": floor }, "$inc": inc };
    match &current {
        Some(d) => {
            let filter = match d.get("version") {
                Some(v) => doc! { "app_id": app_id, "version": v.clone() },
                None => doc! { "app_id": app_id, "version": { "$exists": false } },
            };
            let r = ledger.update_one(filter, update).await?;
            if r.matched_count == 0 {
                return Err(lost());
            }
        }
        None => {
            // The first roll creates the ledger; a concurrent creation is a duplicate key.
            let r = ledger
                .update_one(
                    doc! { "app_id": app_id, "version": { "$exists": false } },
                    update,
                )
                .upsert(true)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if crate::is_duplicate_key(&e) => return Err(lost()),
                Err(e) => return Err(e.into()),
            }
        }
    }
    ::metrics::counter!(m::LEDGER_COMPACTIONS, "outcome" => "ok").increment(1);
    ::metrics::counter!(m::LEDGER_COMPACTED).increment(charges as u64);
    ::metrics::histogram!(m::WRITE_SECONDS, "op" => "roll").record(started.elapsed().as_secs_f64());
    Ok(Compacted {
        charges: charges as u64,
        runs,
    })
}

/// Rolls up to `max` unrolled charges and `max` unrolled runs of the previous shape of `app_id`
/// into its ledger, in one transaction (a compare-and-set on the ledger's version, like a roll).
async fn compact_legacy(db: &Database, app_id: &str, max: usize) -> Result<Compacted, Error> {
    let started = Instant::now();
    let unrolled = doc! { "app_id": app_id, "rolled": false };
    let current = db
        .collection::<Document>(LEDGER)
        .find_one(doc! { "app_id": app_id })
        .await?;
    if current
        .as_ref()
        .is_some_and(|d| d.get_bool("held").unwrap_or(false))
    {
        return Ok(Compacted::default());
    }
    // The candidates are read outside the transaction: a charge's tokens never change, and the
    // transaction rolls them only if they are still unrolled.
    let charges: Vec<Document> = db
        .collection::<Document>(USAGE_EVENTS)
        .find(unrolled.clone())
        .projection(doc! {
            "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 1, "credits": 1, "period": 1,
        })
        .limit(max as i64)
        .await?
        .try_collect()
        .await?;
    let runs: Vec<Document> = db
        .collection::<Document>(RUNS)
        .find(unrolled)
        .projection(doc! { "_id": 1 })
        .limit(max as i64)
        .await?
        .try_collect()
        .await?;
    if charges.is_empty() && runs.is_empty() {
        return Ok(Compacted::default());
    }
    let ids = |docs: &[Document]| -> Vec<Bson> {
        docs.iter().filter_map(|d| d.get("_id").cloned()).collect()
    };
    let sum = |key: &str| charges.iter().map(|d| int(d, key)).sum::<i64>();
    let mut inc = doc! {
        "prompt_tokens": sum("prompt_tokens"),
        "completion_tokens": sum("completion_tokens"),
        "total_tokens": sum("total_tokens"),
        "credits": sum("credits"),
        "charges": charges.len() as i64,
        "runs": runs.len() as i64,
        "version": 1_i64,
    };
    // Credits per period (charges written before credits existed have no period).
    let mut periods: BTreeMap<&str, i64> = BTreeMap::new();
    for d in &charges {
        if let Ok(p) = d.get_str("period") {
            *periods.entry(p).or_default() += int(d, "credits");
        }
    }
    for (p, credits) in periods {
        inc.insert(format!("periods.{p}"), credits);
    }
    let batch = Batch {
        app_id,
        charge_ids: ids(&charges),
        run_ids: ids(&runs),
        inc,
        version: current.as_ref().map(|d| d.get("version").cloned()),
    };
    let mut session = db.client().start_session().await?;
    session.start_transaction().await?;
    let (result, outcome) =
        match tokio::time::timeout(TXN_TIMEOUT, batch.roll(db, &mut session)).await {
            Ok(Ok(())) => (Ok(()), "ok"),
            Ok(Err(e @ Error::Contended(_))) => (Err(e), "conflict"),
            Ok(Err(e)) => (Err(e), "error"),
            Err(_) => (
                Err(Error::Contended(format!(
                    "the compaction transaction took over {} s",
                    TXN_TIMEOUT.as_secs()
                ))),
                "timeout",
            ),
        };
    ::metrics::counter!(m::LEDGER_COMPACTIONS, "outcome" => outcome).increment(1);
    if result.is_err() {
        abort(session).await;
    }
    result?;
    ::metrics::counter!(m::LEDGER_COMPACTED).increment(charges.len() as u64);
    ::metrics::histogram!(m::WRITE_SECONDS, "op" => "compact")
        .record(started.elapsed().as_secs_f64());
    Ok(Compacted {
        charges: charges.len() as u64,
        runs: runs.len() as u64,
    })
}

/// One transaction's batch of the previous shape.
struct Batch<'a> {
    app_id: &'a str,
    charge_ids: Vec<Bson>,
    run_ids: Vec<Bson>,
    inc: Document,
    /// The ledger's version read before (`None`: no ledger; `Some(None)`: one without a version).
    version: Option<Option<Bson>>,
}

impl Batch<'_> {
    /// The transaction's statements and its commit.
    async fn roll(&self, db: &Database, session: &mut ClientSession) -> Result<(), Error> {
        for (coll, ids) in [(USAGE_EVENTS, &self.charge_ids), (RUNS, &self.run_ids)] {
            if ids.is_empty() {
                continue;
            }
            let r = db
                .collection::<Document>(coll)
                .update_many(
                    doc! { "_id": { "$in": ids.clone() }, "rolled": false },
                    doc! { "$set": { "rolled": true } },
                )
                .session(&mut *session)
                .await
                .map_err(conflict)?;
            if r.modified_count != ids.len() as u64 {
                return Err(Error::Contended(format!(
                    "another compaction rolled part of {}'s batch",
                    self.app_id
                )));
            }
        }
        let filter = match &self.version {
            Some(Some(v)) => doc! { "app_id": self.app_id, "version": v.clone() },
            _ => doc! { "app_id": self.app_id, "version": { "$exists": false } },
        };
        let r = db
            .collection::<Document>(LEDGER)
            .update_one(filter, doc! { "$inc": self.inc.clone() })
            .upsert(self.version.is_none())
            .session(&mut *session)
            .await
            .map_err(conflict)?;
        if r.matched_count == 0 && r.upserted_id.is_none() {
            return Err(Error::Contended(format!(
                "another write moved {}'s ledger first",
                self.app_id
            )));
        }
        session.commit_transaction().await.map_err(conflict)
    }
}

/// A transient transaction error (a write conflict with another compaction) or a duplicate key
/// (a concurrent first write of the ledger) is a [`Error::Contended`]; anything else stays what
/// it is.
fn conflict(e: mongodb::error::Error) -> Error {
    if e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR) || crate::is_duplicate_key(&e)
    {
        Error::Contended(e.to_string())
    } else {
        e.into()
    }
}

/// Aborts `session`'s transaction. When the server cannot be told (it is stalled or gone), the
/// session is killed in the background as soon as it answers, so the transaction's writes hold
/// nothing until the server would expire it.
async fn abort(mut session: ClientSession) {
    if let Ok(Ok(())) = tokio::time::timeout(ABORT_TIMEOUT, session.abort_transaction()).await {
        return;
    }
    let lsid = session.id().clone();
    let admin = session.client().database("admin");
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let kill = admin.run_command(doc! { "killSessions": [lsid.clone()] });
            if let Ok(Ok(_)) = tokio::time::timeout(ABORT_TIMEOUT, kill).await {
                ::metrics::counter!(m::LEDGER_SESSIONS_KILLED).increment(1);
                info!("Ledger transaction whose abort failed was ended by killing its session.");
                // Dropped only now, so the pool cannot hand the session out before.
                drop(session);
                return;
            }
            if started.elapsed() > KILL_FOR {
                warn!(
                    "Cannot kill the session of an aborted ledger transaction; the server will \
                     expire it."
                );
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
