//! What billing reads to compute wallets: credit periods, the credits consumed per period (from
//! the usage ledger, every charge counted once) and per user per day, and the grants billing
//! recorded from the log.
//!
//! - A **period** is a calendar month in UTC, or, when the process sets it with
//!   [`set_period_seconds`] (`MOZAIKS_CREDITS_PERIOD_SECONDS`, for tests and demos), consecutive
//!   windows of that many seconds from the Unix epoch. Its key is its
//!   start, `YYYYMMDDTHHMMSSZ`, so keys sort like periods.
//! - Each charge document in `usage_events` carries its `credits`, its `period` key and its UTC
//!   `day` (see [`crate::ledger`]); rolls add the credits to the app's `usage_ledger` under
//!   `periods.{key}`. [`Store::consumption`] adds the charges above the ledger's watermark to
//!   those totals, re-reading when a roll committed meanwhile, exactly like [`Store::usage_in`].
//! - `credit_grants` (shared database): one document per grant, unique on `(app_id, grant_id)`,
//!   written by billing from `MZ_BILLING` (a redelivered grant is a duplicate key: nothing
//!   changes).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures::TryStreamExt;
use mongodb::Database;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::IndexOptions;
use mongodb::{IndexModel, error::ErrorKind};
use mozaiks_events::credits::CreditGrant;

use crate::metrics as m;
use crate::{DUPLICATE_KEY, Error, LEDGER, Store, USAGE_EVENTS, ledger};

/// Grants recorded by billing (shared database).
pub const GRANTS: &str = "credit_grants";

/// Reads repeated when a compaction commits during them.
const READ_ATTEMPTS: usize = 5;

/// A credit period: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// The process's period length in seconds; 0: calendar months.
static PERIOD_SECONDS: AtomicI64 = AtomicI64::new(0);

/// Makes periods `seconds` long for the whole process (`None` or 0: calendar months, the
/// default). Set once at start, from configuration, by every role of a fleet alike.
pub fn set_period_seconds(seconds: Option<u64>) {
    let s = seconds
        .and_then(|s| i64::try_from(s).ok())
        .filter(|s| *s > 0)
        .unwrap_or(0);
    PERIOD_SECONDS.store(s, Ordering::Relaxed);
}

/// How long periods are: `None` for calendar months.
fn period_seconds() -> Option<i64> {
    Some(PERIOD_SECONDS.load(Ordering::Relaxed)).filter(|s| *s > 0)
}

impl Period {
    /// The period containing `ts`.
    pub fn containing(ts: DateTime<Utc>) -> Period {
        Period::containing_with(ts, period_seconds())
    }

    /// The period containing `ts` for periods of `seconds` (`None`: calendar months).
    pub fn containing_with(ts: DateTime<Utc>, seconds: Option<i64>) -> Period {
        match seconds {
            Some(len) => {
                let start = ts.timestamp().div_euclid(len) * len;
                let at = |s: i64| Utc.timestamp_opt(s, 0).single().unwrap_or(ts);
                Period {
                    start: at(start),
                    end: at(start + len),
                }
            }
            None => {
                let month = |y: i32, m: u32| {
                    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                        .single()
                        .unwrap_or(ts)
                };
                let (y, m) = (ts.year(), ts.month());
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Period {
                    start: month(y, m),
                    end: month(ny, nm),
                }
            }
        }
    }

    /// The period a key names (its start), if it is one.
    pub fn of_key(key: &str) -> Option<Period> {
        let start = chrono::NaiveDateTime::parse_from_str(key, "%Y%m%dT%H%M%SZ")
            .ok()?
            .and_utc();
        Some(Period::containing(start))
    }

    /// The period's key: its start, `YYYYMMDDTHHMMSSZ`.
    pub fn key(&self) -> String {
        self.start.format("%Y%m%dT%H%M%SZ").to_string()
    }
}

/// The UTC day of `ts`, `YYYYMMDD` (per-user daily budgets).
pub fn day_key(ts: DateTime<Utc>) -> String {
    ts.format("%Y%m%d").to_string()
}

/// A number field (0 when absent).
fn int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(f)) => *f as i64,
        _ => 0,
    }
}

impl Store {
    /// Creates the indexes billing's credit reads use in `db` (idempotent).
    pub async fn ensure_credit_indexes(&self, db: &Database) -> Result<(), Error> {
        let idx = |keys: Document, unique: bool| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(unique).build())
                .build()
        };
        // `(app_id, ts)` serves exports, groups and a day's consumption per user alike: every
        // index is written by every charge.
        db.collection::<Document>(USAGE_EVENTS)
            .create_index(idx(doc! { "app_id": 1, "ts": 1 }, false))
            .await?;
        self.shared()
            .collection::<Document>(GRANTS)
            .create_index(idx(doc! { "app_id": 1, "grant_id": 1 }, true))
            .await?;
        Ok(())
    }

    /// Credits consumed by `app_id` in `db`, per period key, each charge counted once.
    pub async fn consumption(
        &self,
        db: &Database,
        app_id: &str,
    ) -> Result<BTreeMap<String, u64>, Error> {
        let started = Instant::now();
        let ledger = db.collection::<Document>(LEDGER);
        let legacy = self.has_legacy(db).await?;
        for _ in 0..READ_ATTEMPTS {
            let before = ledger.find_one(doc! { "app_id": app_id }).await?;
            let mut tail: Vec<Document> = Vec::new();
            let w = ledger::watermark(before.as_ref());
            for filter in ledger::unrolled_filters(app_id, &w, legacy) {
                let rows: Vec<Document> = db
                    .collection::<Document>(USAGE_EVENTS)
                    .aggregate([
                        doc! { "$match": filter },
                        doc! { "$group": { "_id": "$period", "credits": { "$sum": "$credits" } } },
                    ])
                    .await?
                    .try_collect()
                    .await?;
                tail.extend(rows);
            }
            let after = ledger.find_one(doc! { "app_id": app_id }).await?;
            if ledger::version(before.as_ref()) != ledger::version(after.as_ref()) {
                ::metrics::counter!(m::LEDGER_READ_RETRIES).increment(1);
                continue;
            }
            let mut out: BTreeMap<String, u64> = BTreeMap::new();
            if let Some(Ok(periods)) = before.as_ref().map(|d| d.get_document("periods")) {
                for (k, _) in periods {
                    *out.entry(k.clone()).or_default() += int(periods, k).max(0) as u64;
                }
            }
            for d in &tail {
                if let Ok(k) = d.get_str("_id") {
                    *out.entry(k.to_string()).or_default() += int(d, "credits").max(0) as u64;
                }
            }
            crate::record("consumption", started);
            return Ok(out);
        }
        Err(Error::Contended(format!(
            "the usage ledger of {app_id} changed during {READ_ATTEMPTS} reads"
        )))
    }

    /// Credits consumed by each user of `app_id` in `db` on `day` (`YYYYMMDD`, a UTC day: the
    /// charges with `ts` in it).
    pub async fn consumption_by_user(
        &self,
        db: &Database,
        app_id: &str,
        day: &str,
    ) -> Result<BTreeMap<String, u64>, Error> {
        let started = Instant::now();
        let start = chrono::NaiveDate::parse_from_str(day, "%Y%m%d")
            .map_err(|e| Error::Document(format!("not a day: {day}: {e}")))?
            .and_time(chrono::NaiveTime::MIN)
            .and_utc();
        let filter = charges_filter(app_id, Some(start), Some(start + chrono::Duration::days(1)));
        let rows: Vec<Document> = db
            .collection::<Document>(USAGE_EVENTS)
            .aggregate([
                doc! { "$match": filter },
                doc! { "$group": { "_id": "$user_id", "credits": { "$sum": "$credits" } } },
            ])
            .await?
            .try_collect()
            .await?;
        crate::record("consumption_by_user", started);
        Ok(rows
            .iter()
            .filter_map(|d| {
                Some((
                    d.get_str("_id").ok()?.to_string(),
                    int(d, "credits").max(0) as u64,
                ))
            })
            .collect())
    }

    /// Records a grant; `false` when it was recorded before (nothing changed).
    pub async fn record_grant(&self, g: &CreditGrant) -> Result<bool, Error> {
        let mut d = doc! {
            "app_id": &g.app_id,
            "grant_id": &g.grant_id,
            "amount": i64::try_from(g.amount).unwrap_or(i64::MAX),
            "reason": &g.reason,
            "idempotency_key": &g.idempotency_key,
            "granted_at": bson::DateTime::from_chrono(g.granted_at),
            "granted_by": &g.granted_by,
        };
        if let Some(e) = g.expires_at {
            d.insert("expires_at", bson::DateTime::from_chrono(e));
        }
        match self
            .shared()
            .collection::<Document>(GRANTS)
            .insert_one(d)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every grant of `app_id`, oldest first.
    pub async fn grants(&self, app_id: &str) -> Result<Vec<CreditGrant>, Error> {
        let started = Instant::now();
        let docs: Vec<Document> = self
            .shared()
            .collection::<Document>(GRANTS)
            .find(doc! { "app_id": app_id })
            .sort(doc! { "granted_at": 1 })
            .await?
            .try_collect()
            .await?;
        crate::record("grants", started);
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let date = |k: &str| d.get_datetime(k).ok().map(|t| t.to_chrono());
                Some(CreditGrant {
                    grant_id: d.get_str("grant_id").ok()?.to_string(),
                    app_id: d.get_str("app_id").ok()?.to_string(),
                    amount: int(&d, "amount").max(0) as u64,
                    reason: d.get_str("reason").unwrap_or_default().to_string(),
                    expires_at: date("expires_at"),
                    idempotency_key: d.get_str("idempotency_key").unwrap_or_default().to_string(),
                    granted_at: date("granted_at")?,
                    granted_by: d.get_str("granted_by").unwrap_or_default().to_string(),
                })
            })
            .collect())
    }
}

/// How old a recorded measure of an app's storage ([`crate::storage_size`]) the usage endpoint
/// answers before it measures again.
pub const STORAGE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// How `GET /api/usage/{app_id}` groups charges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    User,
    Workflow,
    Model,
    /// The charge's UTC day, `YYYYMMDD`.
    Day,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "user" => GroupBy::User,
            "workflow" => GroupBy::Workflow,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            _ => return None,
        })
    }

    fn field(self) -> &'static str {
        match self {
            GroupBy::User => "$user_id",
            GroupBy::Workflow => "$workflow",
            GroupBy::Model => "$model",
            GroupBy::Day => "$day",
        }
    }
}

/// One group of an app's charges.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UsageGroup {
    pub key: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub credits: u64,
    /// Model calls charged.
    pub charges: u64,
    /// Distinct runs charged.
    pub runs: u64,
}

/// The filter of `app_id`'s charges with `ts` in `[from, to)`.
fn charges_filter(
    app_id: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Document {
    let mut f = doc! { "app_id": app_id };
    let mut ts = Document::new();
    if let Some(from) = from {
        ts.insert("$gte", bson::DateTime::from_chrono(from));
    }
    if let Some(to) = to {
        ts.insert("$lt", bson::DateTime::from_chrono(to));
    }
    if !ts.is_empty() {
        f.insert("ts", ts);
    }
    f
}

impl Store {
    /// `app_id`'s charges with `ts` in `[from, to)`, grouped by `by`, each charge once (the
    /// usage ledger keeps one document per event id), sorted by key.
    pub async fn usage_grouped(
        &self,
        app_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        by: GroupBy,
    ) -> Result<Vec<UsageGroup>, Error> {
        let started = Instant::now();
        let db = self.resolve_storage(app_id).await?;
        let rows: Vec<Document> = db
            .collection::<Document>(USAGE_EVENTS)
            .aggregate([
                doc! { "$match": charges_filter(app_id, from, to) },
                doc! { "$group": {
                    "_id": by.field(),
                    "prompt_tokens": { "$sum": "$prompt_tokens" },
                    "completion_tokens": { "$sum": "$completion_tokens" },
                    "total_tokens": { "$sum": "$total_tokens" },
                    "credits": { "$sum": "$credits" },
                    "charges": { "$sum": 1 },
                    "run_ids": { "$addToSet": "$run_id" },
                } },
            ])
            .await?
            .try_collect()
            .await?;
        crate::record("usage_grouped", started);
        let n = |d: &Document, k: &str| int(d, k).max(0) as u64;
        let mut out: Vec<UsageGroup> = rows
            .iter()
            .map(|d| UsageGroup {
                key: match d.get("_id") {
                    Some(Bson::String(s)) => s.clone(),
                    Some(Bson::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                },
                prompt_tokens: n(d, "prompt_tokens"),
                completion_tokens: n(d, "completion_tokens"),
                total_tokens: n(d, "total_tokens"),
                credits: n(d, "credits"),
                charges: n(d, "charges"),
                runs: d.get_array("run_ids").map_or(0, |a| a.len() as u64),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Every charge of `app_id` with `ts` in `[from, to)`, oldest first, as the ledger keeps
    /// them (for exports).
    pub async fn charges(
        &self,
        app_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<mongodb::Cursor<Document>, Error> {
        let db = self.resolve_storage(app_id).await?;
        Ok(db
            .collection::<Document>(USAGE_EVENTS)
            .find(charges_filter(app_id, from, to))
            .sort(doc! { "ts": 1 })
            .projection(doc! { "_id": 0, "rolled": 0, "mark": 0, "billed_at": 0 })
            .await?)
    }

    /// Bytes of `app_id`'s read models (its documents in the sessions, messages and usage
    /// collections of its database; the seeds' storage dashboard): the fleet's shared measure
    /// ([`crate::storage_size`], the one the projectors' storage gauges show) while it is younger
    /// than [`STORAGE_TTL`], else measured now.
    pub async fn storage_bytes(&self, app_id: &str) -> Result<u64, Error> {
        Ok(self.storage_measure(app_id, STORAGE_TTL).await?.bytes())
    }
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_months_or_fixed_windows_and_keys_sort() {
        let ts = Utc.with_ymd_and_hms(2026, 12, 7, 6, 30, 0).unwrap();
        let p = Period::containing_with(ts, None);
        assert_eq!(p.start, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(p.end, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
        assert_eq!(p.key(), "20261201T000000Z");
        let next = Period::containing_with(p.end, None);
        assert!(next.key() > p.key());
        let short = Period::containing_with(ts, Some(60));
        assert_eq!(
            short.start,
            Utc.with_ymd_and_hms(2026, 12, 7, 6, 30, 0).unwrap()
        );
        assert_eq!(short.end - short.start, chrono::Duration::seconds(60));
        assert_eq!(day_key(ts), "20261207");
        assert_eq!(
            Period::of_key("20261201T000000Z").map(|p| p.start),
            Some(p.start)
        );
        assert_eq!(Period::of_key("nonsense"), None);
    }
}
