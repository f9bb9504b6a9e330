//! The usage ledger: each `usage.charged` applied exactly once, in one transaction.
//!
//! Insert the charge into `usage_events` (unique on `(app_id, event_id)`), count its run once in
//! `usage_runs`, and `$inc` the app's `usage_ledger` totals. A charge seen again hits the unique
//! index and changes nothing, so replaying the usage log into a database (billing's redeliveries,
//! or a storage move rebuilding an app's ledger) converges on the same totals.

use mongodb::Database;
use mongodb::bson::{self, Document, doc};
use mongodb::options::UpdateOptions;
use mozaiks_events::{Envelope, Event};

use crate::{Error, LEDGER, RUNS, Store, USAGE_EVENTS, is_duplicate_key};

/// What applying a charge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charged {
    /// Counted now.
    Counted,
    /// Already counted (or not a charge): nothing changed.
    Duplicate,
}

impl Store {
    /// Applies one `usage.charged` to the ledger in `db`, exactly once.
    pub async fn charge(&self, db: &Database, env: &Envelope) -> Result<Charged, Error> {
        let Event::UsageCharged(u) = &env.event else {
            return Ok(Charged::Duplicate);
        };
        let mut session = db.client().start_session().await?;
        session.start_transaction().await?;
        let row = doc! {
            "app_id": &env.app_id,
            "event_id": env.event_id.to_string(),
            "chat_id": &env.chat_id,
            "user_id": &env.user_id,
            "run_id": u.run_id.to_string(),
            "agent": &u.agent,
            "model": &u.model,
            "prompt_tokens": u.prompt_tokens as i64,
            "completion_tokens": u.completion_tokens as i64,
            "total_tokens": u.total_tokens as i64,
            "ts": bson::DateTime::from_chrono(env.ts),
        };
        match db
            .collection::<Document>(USAGE_EVENTS)
            .insert_one(row)
            .session(&mut session)
            .await
        {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {
                let _ = session.abort_transaction().await;
                return Ok(Charged::Duplicate);
            }
            Err(e) => {
                let _ = session.abort_transaction().await;
                return Err(e.into());
            }
        }
        let new_run = db
            .collection::<Document>(RUNS)
            .update_one(
                doc! { "app_id": &env.app_id, "run_id": u.run_id.to_string() },
                doc! { "$setOnInsert": { "chat_id": &env.chat_id } },
            )
            .with_options(UpdateOptions::builder().upsert(true).build())
            .session(&mut session)
            .await?
            .upserted_id
            .is_some();
        db.collection::<Document>(LEDGER)
            .update_one(
                doc! { "app_id": &env.app_id },
                doc! { "$inc": {
                    "prompt_tokens": u.prompt_tokens as i64,
                    "completion_tokens": u.completion_tokens as i64,
                    "total_tokens": u.total_tokens as i64,
                    "charges": 1_i64,
                    "runs": if new_run { 1_i64 } else { 0_i64 },
                }},
            )
            .with_options(UpdateOptions::builder().upsert(true).build())
            .session(&mut session)
            .await?;
        session.commit_transaction().await?;
        Ok(Charged::Counted)
    }
}
