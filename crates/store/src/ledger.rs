//! The usage ledger: each `usage.charged` counted exactly once, with no document that every
//! charge of an app must write.
//!
//! Three collections in the app's database:
//!
//! - `usage_events`: one document per charge, unique on `(app_id, event_id)`: the charge's
//!   tokens, run, step, chat, user, workflow, agent, model, purpose, `ts` (the event's time),
//!   `billed_at`, and `rolled` (false until a compaction has added it to `usage_ledger`);
//! - `usage_runs`: one document per `(app_id, run_id)` charged (unique), with `rolled` likewise;
//! - `usage_ledger`: one per app: the totals of the charges and runs rolled into it, and
//!   `version`, bumped by every compaction.
//!
//! **Charging** is two idempotent inserts outside any transaction: the charge, then its run. A
//! duplicate key means "already there", so a redelivered charge changes nothing, also when the
//! process died between the write and the ack (the redelivery inserts the run if the first
//! attempt did not get that far). No charge waits for another one, and nothing is left holding
//! a lock when the server stalls in the middle of a charge.
//!
//! **Reading** an app's usage adds the unrolled charges and runs (by aggregation, over the
//! `(app_id, rolled)` indexes) to the ledger's totals. The ledger is read before and after; when
//! its `version` moved, a compaction committed in between and the read is repeated, so every
//! charge is counted exactly once in every answer.
//!
//! **Compaction** keeps reads short: after [`COMPACT_EVERY`] charges of an app, or when a read
//! finds that many unrolled, a background task marks a batch of unrolled charges and runs
//! `rolled` and adds their sums to `usage_ledger`, in one short transaction. Only compactions
//! write `usage_ledger`, so only compactions can conflict (the loser aborts and the next one
//! picks the batch up). Every error path aborts the transaction; when the abort cannot reach the
//! server (it stalled), the session is killed (`killSessions`) as soon as the server answers, so
//! a transaction cut off by a stall holds nothing for longer than that.
//!
//! Charges written before this shape (no `rolled` field) were counted in `usage_ledger` by the
//! transaction that wrote them, and count as rolled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{ClientSession, Collection, Database};
use mozaiks_events::{Envelope, Event, UsageCharged};
use tracing::{debug, info, warn};

use crate::metrics as m;
use crate::{DUPLICATE_KEY, Error, LEDGER, RUNS, Store, USAGE_EVENTS, UsageDoc};

/// Charges of an app (counted by this process, or found unrolled by a read) after which a
/// compaction starts.
pub const COMPACT_EVERY: u64 = 512;
/// Charges (and runs) rolled up by one compaction transaction.
pub const COMPACT_BATCH: usize = 1000;
/// How long a compaction transaction may take before it is aborted.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `abortTransaction` may take before the session is killed instead.
const ABORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a session whose abort failed is retried with `killSessions` (the server expires
/// an idle transaction itself after 60 s; this only makes it faster).
const KILL_FOR: Duration = Duration::from_secs(120);
/// Reads repeated when a compaction commits during them.
const READ_ATTEMPTS: usize = 5;

/// What applying a charge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charged {
    /// Counted now.
    Counted,
    /// Already counted (or not a charge): nothing changed.
    Duplicate,
}

/// What a compaction rolled into the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    pub charges: u64,
    pub runs: u64,
}

/// Which apps have charges waiting for a compaction, per database (shared by a store's clones).
#[derive(Default)]
pub(crate) struct Compactions {
    apps: Mutex<HashMap<(String, String), Pending>>,
}

#[derive(Default)]
struct Pending {
    counted: u64,
    running: bool,
}

impl Compactions {
    /// Adds `counted` charges of `app_id` in `db`; whether a compaction should start now.
    fn note(&self, db: &str, app_id: &str, counted: u64, force: bool) -> bool {
        let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        let p = apps
            .entry((db.to_string(), app_id.to_string()))
            .or_default();
        p.counted += counted;
        if p.running || (!force && p.counted < COMPACT_EVERY) {
            return false;
        }
        p.running = true;
        p.counted = 0;
        true
    }

    fn finished(&self, db: &str, app_id: &str) {
        let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = apps.get_mut(&(db.to_string(), app_id.to_string())) {
            p.running = false;
        }
    }
}

impl Store {
    /// Applies one `usage.charged` to the ledger in `db`, exactly once (see
    /// [`Store::charge_many`]).
    pub async fn charge(&self, db: &Database, env: &Envelope) -> Result<Charged, Error> {
        Ok(self
            .charge_many(db, std::slice::from_ref(env))
            .await?
            .pop()
            .unwrap_or(Charged::Duplicate))
    }

    /// Applies `usage.charged` events to the ledger in `db`, each exactly once: one unordered
    /// insert of the charges, one of their runs, no transaction. Answers what happened to each
    /// envelope, in order (anything else than a charge is [`Charged::Duplicate`]). On an error
    /// some of them may be written: applying them again is safe.
    pub async fn charge_many(
        &self,
        db: &Database,
        envs: &[Envelope],
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
            charges.push(charge_doc(env, u, now));
            at.push(i);
            runs.entry((env.app_id.as_str(), u.run_id))
                .or_insert_with(|| {
                    doc! {
                        "app_id": &env.app_id,
                        "run_id": u.run_id.to_string(),
                        "chat_id": &env.chat_id,
                        "billed_at": now,
                        "rolled": false,
                    }
                });
        }
        if charges.is_empty() {
            return Ok(out);
        }
        let present = insert_new(&db.collection(USAGE_EVENTS), charges).await?;
        // Every charge's run, the duplicates' too: a charge written by an attempt that died
        // before its run was gets it now.
        insert_new(&db.collection(RUNS), runs.into_values().collect()).await?;
        let mut counted: HashMap<&str, u64> = HashMap::new();
        for (k, i) in at.into_iter().enumerate() {
            if !present.contains(&k) {
                out[i] = Charged::Counted;
                *counted.entry(envs[i].app_id.as_str()).or_default() += 1;
            }
        }
        ::metrics::histogram!(m::WRITE_SECONDS, "op" => "charge")
            .record(started.elapsed().as_secs_f64());
        for (app_id, n) in counted {
            self.maybe_compact(db, app_id, n, false);
        }
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
        for _ in 0..READ_ATTEMPTS {
            let before = ledger.find_one(doc! { "app_id": app_id }).await?;
            let tail = unrolled(db, app_id).await?;
            let after = ledger.find_one(doc! { "app_id": app_id }).await?;
            let version = |d: &Option<Document>| d.as_ref().map(|d| int(d, "version"));
            if version(&before) != version(&after) {
                ::metrics::counter!(m::LEDGER_READ_RETRIES).increment(1);
                continue;
            }
            if tail.charges as u64 >= COMPACT_EVERY || tail.runs as u64 >= COMPACT_EVERY {
                self.maybe_compact(db, app_id, 0, true);
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

    /// Rolls every unrolled charge and run of `app_id` in `db` into its `usage_ledger`
    /// document, a batch per transaction. Safe to run anywhere, at any time, concurrently: a
    /// batch is rolled exactly once, and a compaction that loses a race gives up with an
    /// error (nothing changed).
    pub async fn compact_usage(&self, db: &Database, app_id: &str) -> Result<Compacted, Error> {
        let mut total = Compacted::default();
        loop {
            let c = compact_batch(db, app_id, COMPACT_BATCH).await?;
            total.charges += c.charges;
            total.runs += c.runs;
            if (c.charges as usize) < COMPACT_BATCH && (c.runs as usize) < COMPACT_BATCH {
                return Ok(total);
            }
        }
    }

    /// Counts `counted` new charges of `app_id`; starts a background compaction when enough
    /// are waiting (or `force`) and none runs for that app in this process.
    fn maybe_compact(&self, db: &Database, app_id: &str, counted: u64, force: bool) {
        if !self.compactions.note(db.name(), app_id, counted, force) {
            return;
        }
        let (store, db, app_id) = (self.clone(), db.clone(), app_id.to_string());
        tokio::spawn(async move {
            match store.compact_usage(&db, &app_id).await {
                Ok(c) => debug!(
                    app_id,
                    charges = c.charges,
                    runs = c.runs,
                    "Usage ledger compacted."
                ),
                Err(e) => warn!(
                    app_id,
                    error = %e,
                    "Usage ledger not compacted; a later compaction will."
                ),
            }
            store.compactions.finished(db.name(), &app_id);
        });
    }
}

fn charge_doc(env: &Envelope, u: &UsageCharged, now: bson::DateTime) -> Document {
    let credits = u
        .credits
        .map(|c| i64::try_from(c).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut d = doc! {
        "app_id": &env.app_id,
        "event_id": env.event_id.to_string(),
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
        "rolled": false,
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

/// The app's charges and runs not yet rolled into its ledger.
async fn unrolled(db: &Database, app_id: &str) -> Result<UsageDoc, Error> {
    let filter = doc! { "app_id": app_id, "rolled": false };
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
    Ok(UsageDoc {
        app_id: app_id.to_string(),
        prompt_tokens: int(&s, "prompt_tokens"),
        completion_tokens: int(&s, "completion_tokens"),
        total_tokens: int(&s, "total_tokens"),
        charges: int(&s, "charges"),
        runs: runs as i64,
    })
}

/// Rolls up to `max` unrolled charges and `max` unrolled runs of `app_id` into its ledger, in
/// one transaction.
async fn compact_batch(db: &Database, app_id: &str, max: usize) -> Result<Compacted, Error> {
    let started = Instant::now();
    let unrolled = doc! { "app_id": app_id, "rolled": false };
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

/// One compaction's batch.
struct Batch<'a> {
    app_id: &'a str,
    charge_ids: Vec<Bson>,
    run_ids: Vec<Bson>,
    inc: Document,
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
        db.collection::<Document>(LEDGER)
            .update_one(
                doc! { "app_id": self.app_id },
                doc! { "$inc": self.inc.clone() },
            )
            .upsert(true)
            .session(&mut *session)
            .await
            .map_err(conflict)?;
        session.commit_transaction().await.map_err(conflict)
    }
}

/// A transient transaction error (a write conflict with another compaction) is a
/// [`Error::Contended`]; anything else stays what it is.
fn conflict(e: mongodb::error::Error) -> Error {
    if e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR) {
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
