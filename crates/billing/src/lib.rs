//! Billing: the per-app usage ledger.
//!
//! Reads `MZ_USAGE` (the `usage.charged` events, sourced from the log by the server) through the
//! durable consumer `billing`. Each charge is applied in one MongoDB transaction of the app's
//! database ([`mozaiks_store::ledger`]): insert the charge into `usage_events` (unique on
//! `(app_id, event_id)`), count its run once in `usage_runs`, and `$inc` the app's `usage_ledger`
//! totals. A redelivered charge hits the unique index and changes
//! nothing, so the ledger equals the sum of the `usage.charged` events exactly once each, even
//! with several billing replicas.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{Envelope, Event, codec};
use mozaiks_store::Store;
use mozaiks_store::ledger::Charged;
use tracing::{info, warn};

/// Errors of billing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    #[error(transparent)]
    Store(#[from] mozaiks_store::Error),
    #[error(transparent)]
    Mongo(#[from] mozaiks_store::mongodb::error::Error),
    #[error("consumer failed: {0}")]
    Consumer(String),
}

pub const CHARGES: &str = "mozaiks_billing_charges_total";
pub const DUPLICATES: &str = "mozaiks_billing_duplicates_total";
pub const TOKENS: &str = "mozaiks_billing_tokens_total";

pub fn describe() {
    metrics::describe_counter!(
        CHARGES,
        "usage.charged events applied to the ledger, by app_id."
    );
    metrics::describe_counter!(DUPLICATES, "Redelivered charges ignored.");
    metrics::describe_counter!(TOKENS, "Tokens billed, by app_id.");
}

/// The billing service.
pub struct Billing {
    bus: Bus,
    store: Store,
}

/// What applying a charge did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Charged,
    Duplicate,
}

impl Billing {
    pub fn new(bus: Bus, store: Store) -> Billing {
        describe();
        Billing { bus, store }
    }

    /// Applies charges until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.store.ensure_indexes(self.store.shared()).await?;
        let consumer = self.bus.durable("MZ_USAGE", "billing").await?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        info!("Billing started.");
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                m = messages.next() => m,
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    warn!(error = %e, "Usage consumer error.");
                    continue;
                }
                None => return Err(Error::Consumer("usage stream ended".into())),
            };
            let env = match codec::decode_event(&msg.payload) {
                Ok(env) => env,
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "Charge does not decode; skipping it.");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            match self.apply(&env).await {
                Ok(_) => {
                    let _ = msg.ack().await;
                }
                Err(e) => {
                    warn!(app_id = %env.app_id, chat_id = %env.chat_id, error = %e, "Charge not applied; it will be redelivered.");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
        info!("Billing stopped.");
        Ok(())
    }

    /// Applies one charge exactly once, to the ledger in the app's database
    /// ([`Store::resolve_storage`]; see [`Store::charge`]).
    pub async fn apply(&self, env: &Envelope) -> Result<Applied, Error> {
        let Event::UsageCharged(u) = &env.event else {
            return Ok(Applied::Duplicate);
        };
        let db = self.store.resolve_storage(&env.app_id).await?;
        match self.store.charge(&db, env).await? {
            Charged::Duplicate => {
                metrics::counter!(DUPLICATES).increment(1);
                Ok(Applied::Duplicate)
            }
            Charged::Counted => {
                metrics::counter!(CHARGES, "app_id" => env.app_id.clone()).increment(1);
                metrics::counter!(TOKENS, "app_id" => env.app_id.clone()).increment(u.total_tokens);
                Ok(Applied::Charged)
            }
        }
    }
}
