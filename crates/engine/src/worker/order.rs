//! A chat's commands take effect in the order the gateways accepted them.
//!
//! Workers share one consumer, so two commands of a chat can reach two workers, and the second
//! can reach the chat's owner first (its own pull, or forwarded, overtaking the first's
//! forwarding). `MZ_CMD` is a work queue: it holds exactly the commands not yet acknowledged, in
//! the order they were accepted. So before the owner applies a command, it asks the stream for the
//! chat's pending commands before it ([`mozaiks_bus::Bus::pending_command_from`]): one it has not
//! applied itself (not in [`Order::handled`]) is still on its way (in another worker's hands, being
//! forwarded, or waiting for redelivery), and the command waits for it, kept alive with progress
//! acks. The common case, a command with nothing before it, costs one request to the stream.
//!
//! A command that waited longer than [`MAX_WAIT`] (more than two redelivery periods: the earlier
//! one is stuck somewhere unexpected) is applied anyway, with a warning and a metric: late order
//! beats a chat that never moves again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use tracing::{info, warn};

use super::{Job, Shared};
use crate::metrics as m;

/// The longest a command waits for an earlier one.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(75);
/// How many applied commands' sequences are remembered.
const HANDLED_CAP: usize = 4096;

struct Waiting {
    job: Job,
    /// Progress acks while the command waits.
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Waiting {
    fn into_job(self) -> Job {
        if let Some(t) = self.ticker {
            t.abort();
        }
        self.job
    }
}

impl Drop for Order {
    fn drop(&mut self) {
        for w in self.pending.values() {
            if let Some(t) = &w.ticker {
                t.abort();
            }
        }
    }
}

/// The commands a chat's actor has in hand but has not applied yet, in stream order.
pub(super) struct Order {
    app_id: String,
    chat_id: String,
    /// (stream sequence, arrival) → command; commands without a sequence sort first.
    pending: BTreeMap<(u64, u64), Waiting>,
    arrivals: u64,
    /// Stream sequences of the commands this actor applied (acknowledged, or held while their run
    /// goes on): not a reason to wait.
    handled: BTreeSet<u64>,
    /// Since when the first pending command waits for an earlier one.
    blocked_since: Option<Instant>,
    /// When to ask the stream again.
    retry: Option<tokio::time::Instant>,
    backoff: Duration,
    progress: Duration,
}

impl Order {
    pub(super) fn new(app_id: &str, chat_id: &str, progress: Duration) -> Order {
        Order {
            app_id: app_id.to_string(),
            chat_id: chat_id.to_string(),
            pending: BTreeMap::new(),
            arrivals: 0,
            handled: BTreeSet::new(),
            blocked_since: None,
            retry: None,
            backoff: Duration::from_millis(20),
            progress,
        }
    }

    pub(super) fn push(&mut self, job: Job) {
        self.arrivals += 1;
        let key = (job.seq.unwrap_or(0), self.arrivals);
        self.pending.insert(key, Waiting { job, ticker: None });
        // It may be the one the first pending command waits for: look again at once.
        self.retry = None;
    }

    /// The first pending command.
    pub(super) fn first(&self) -> Option<&Job> {
        self.pending.values().next().map(|w| &w.job)
    }

    /// Every pending command, in order.
    pub(super) fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.pending.values().map(|w| &w.job)
    }

    /// Moves every pending command to the end of `queue`, in order (to forward them to the
    /// chat's owner).
    pub(super) fn drain_into(&mut self, queue: &mut std::collections::VecDeque<Job>) {
        self.blocked_since = None;
        self.retry = None;
        for (_, w) in std::mem::take(&mut self.pending) {
            queue.push_back(w.into_job());
        }
    }

    /// Forgets which commands this actor applied (its held commands were handed back: they are
    /// to be applied again, in order, by whoever owns the chat next).
    pub(super) fn forget_handled(&mut self) {
        self.handled.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the actor should look at its pending commands: at once when one was not looked at
    /// yet, when its retry is due when one waits for an earlier command, `None` when none is
    /// pending.
    pub(super) fn retry_at(&self) -> Option<tokio::time::Instant> {
        if self.pending.is_empty() {
            return None;
        }
        Some(self.retry.unwrap_or_else(tokio::time::Instant::now))
    }

    /// Records that the command with stream sequence `seq` was applied (or refused, or dropped).
    pub(super) fn handled(&mut self, seq: Option<u64>) {
        let Some(seq) = seq else { return };
        self.handled.insert(seq);
        while self.handled.len() > HANDLED_CAP {
            self.handled.pop_first();
        }
    }

    /// Records that the command with stream sequence `seq` was handed back for redelivery: later
    /// commands wait for it again.
    pub(super) fn unhandled(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.handled.remove(&seq);
        }
    }

    /// The next command to apply, if nothing earlier of the chat is still on its way; else `None`
    /// (and [`Order::retry_at`] says when to look again).
    pub(super) async fn next(&mut self, sh: &Shared) -> Option<Job> {
        let (&key, _) = self.pending.first_key_value()?;
        if self.retry.is_some_and(|r| tokio::time::Instant::now() < r) {
            return None;
        }
        let (seq, _) = key;
        let ready = if seq == 0 {
            true
        } else if self.blocked_since.is_some_and(|t| t.elapsed() >= MAX_WAIT) {
            warn!(
                seq,
                waited_s = MAX_WAIT.as_secs(),
                "A command waited too long for an earlier one of its chat; applying it now."
            );
            metrics::counter!(m::COMMAND_ORDER, "outcome" => "gave_up_waiting").increment(1);
            true
        } else {
            match self.earlier_pending(sh, seq).await {
                Ok(None) => true,
                Ok(Some(earlier)) => {
                    if self.blocked_since.is_none() {
                        info!(
                            seq,
                            earlier, "A command waits for an earlier one of its chat."
                        );
                        metrics::counter!(m::COMMAND_ORDER, "outcome" => "waited").increment(1);
                    }
                    false
                }
                Err(e) => {
                    warn!(error = %e, "Cannot read the chat's pending commands; retrying.");
                    if mozaiks_bus::keeper::is_missing(&e) {
                        sh.bus.heal();
                    }
                    false
                }
            }
        };
        if ready {
            self.blocked_since = None;
            self.retry = None;
            self.backoff = Duration::from_millis(20);
            return self.pending.remove(&key).map(Waiting::into_job);
        }
        self.blocked_since.get_or_insert_with(Instant::now);
        self.retry = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        // Keep every waiting command alive: JetStream must not redeliver them meanwhile.
        let interval = self.progress;
        for w in self.pending.values_mut() {
            if w.ticker.is_none() {
                w.ticker = Some(super::actor::ticker(w.job.ack.clone(), interval));
            }
        }
        None
    }

    /// The first command of the chat still in `MZ_CMD` before `seq` that this actor has not
    /// applied.
    async fn earlier_pending(&self, sh: &Shared, seq: u64) -> Result<Option<u64>, crate::Error> {
        let mut from = 1;
        loop {
            match sh
                .bus
                .pending_command_from(&self.app_id, &self.chat_id, from)
                .await?
            {
                Some(p) if p < seq && self.handled.contains(&p) => from = p + 1,
                Some(p) if p < seq => return Ok(Some(p)),
                _ => return Ok(None),
            }
        }
    }

    /// Hands every pending command back (the actor stops).
    pub(super) async fn hand_back(&mut self, kind: AckKind) {
        for (_, w) in std::mem::take(&mut self.pending) {
            w.into_job().ack.send(kind).await;
        }
        self.blocked_since = None;
        self.retry = None;
    }
}
