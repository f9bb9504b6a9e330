//! The projector: keeps `chat_sessions` and `chat_messages` from the event log.
//!
//! It reads `MZ_EVT` through the durable consumer `projector` in batches, writes each batch with
//! [`mozaiks_store::Store::project`] (idempotent), then acknowledges. A crash redelivers the
//! unacknowledged batch, which projects to the same documents. Several projector replicas may share
//! the consumer: session updates only move forward (`last_seq` guard), messages are keyed by seq.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::codec;
use mozaiks_store::Store;
use tracing::{info, warn};

pub mod retention;

/// Errors of the projector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    #[error(transparent)]
    Store(#[from] mozaiks_store::Error),
    #[error("consumer failed: {0}")]
    Consumer(String),
}

pub const EVENTS: &str = "mozaiks_projector_events_total";
pub const BATCH_SECONDS: &str = "mozaiks_projector_batch_seconds";
pub const LAG: &str = "mozaiks_projector_lag_events";

pub fn describe() {
    metrics::describe_counter!(EVENTS, "Events projected into MongoDB.");
    metrics::describe_histogram!(
        BATCH_SECONDS,
        metrics::Unit::Seconds,
        "Time to project one batch."
    );
    metrics::describe_gauge!(LAG, "Events in MZ_EVT not yet projected.");
}

/// Largest batch projected at once.
pub const BATCH: usize = 500;

/// The projector service.
pub struct Projector {
    bus: Bus,
    store: Store,
}

impl Projector {
    pub fn new(bus: Bus, store: Store) -> Projector {
        describe();
        Projector { bus, store }
    }

    /// Projects until `shutdown` resolves. Stopping never waits for NATS or Mongo: a batch in
    /// flight is dropped unacknowledged and redelivered to the next projector (writes are
    /// idempotent).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let result = tokio::select! {
            _ = shutdown => Ok(()),
            r = self.work() => r,
        };
        info!("Projector stopped.");
        result
    }

    async fn work(&self) -> Result<(), Error> {
        // Mongo or NATS down at start is a wait, not a failure of the process.
        let mut backoff = Duration::from_millis(200);
        let consumer = loop {
            let ready = async {
                self.store.ensure_indexes(self.store.shared()).await?;
                Ok::<_, Error>(self.bus.durable("MZ_EVT", "projector").await?)
            };
            match ready.await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %e, "Projector cannot start yet; retrying.");
                    self.bus.report(FETCH, Err(format!("cannot start: {e}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.bus.report(FETCH, Ok(()));
        info!("Projector started.");
        loop {
            let batch = consumer
                .batch()
                .max_messages(BATCH)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Cannot fetch events; retrying.");
                    self.bus
                        .report(FETCH, Err(format!("cannot fetch events: {e}")));
                    if mozaiks_bus::keeper::is_missing(&e) {
                        self.bus.heal();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut msgs = Vec::new();
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => warn!(error = %e, "Event fetch error."),
                }
            }
            self.bus.report(FETCH, Ok(()));
            if msgs.is_empty() {
                continue;
            }
            let mut events = Vec::with_capacity(msgs.len());
            let mut keep = Vec::with_capacity(msgs.len());
            for m in msgs {
                match codec::decode_event(&m.payload) {
                    Ok(e) => {
                        events.push(e);
                        keep.push(m);
                    }
                    Err(e) => {
                        warn!(subject = %m.subject, error = %e, "Event does not decode; skipping it.");
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                }
            }
            let started = Instant::now();
            match self.store.project(&events).await {
                Ok(()) => {
                    self.bus.report(PROJECT, Ok(()));
                    for m in &keep {
                        let _ = m.ack().await;
                    }
                    metrics::counter!(EVENTS).increment(events.len() as u64);
                    metrics::histogram!(BATCH_SECONDS).record(started.elapsed().as_secs_f64());
                    if let Some(last) = keep.last().and_then(|m| m.info().ok()) {
                        metrics::gauge!(LAG).set(last.pending as f64);
                    }
                }
                Err(e) => {
                    warn!(error = %e, events = events.len(), "Projection failed; the batch will be redelivered.");
                    self.bus
                        .report(PROJECT, Err(format!("projection failed: {e}")));
                    for m in &keep {
                        let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                }
            }
        }
    }
}

/// The projector's components in the process's readiness: fetching events, writing them.
const FETCH: &str = "projector.events";
const PROJECT: &str = "projector.mongo";
