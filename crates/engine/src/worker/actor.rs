//! One chat's actor on one worker: claims the chat's ownership lease, handles its commands in
//! order and drives its run; or, while another worker owns the chat, forwards the commands to
//! that worker (see [`super::forward`]).
//!
//! - The lease is held while the chat has work: commands to handle, a run in progress (also one
//!   waiting for input or for children), a `cancel` waiting for the session to start. When the
//!   chat settles (no run), the lease is released; the actor keeps the chat's state in memory for
//!   `idle_evict` and catches it up from the log if it claims the chat again later.
//! - A run in progress has a timer: when `run_timeout` passes, the run fails with `timeout` even
//!   if nothing else happens (a run waiting for input, or for children).
//! - A command that starts or continues a run stays unacknowledged (progress acks) until the run
//!   settles, so a worker that dies mid-run leaves its commands to be redelivered and taken over.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use mozaiks_events::{Command, Event, RunFailed};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::forward::{self, Acker, Forwarded};
use super::lease::{Claim, Owners};
use super::order::Order;
use super::{Job, Owned, Shared, effects, step};
use crate::chat::Next;
use crate::{Error, metrics as m};

pub(super) const MAX_CONFLICT_RETRIES: usize = 5;

/// An actor's queue, counting what it took (for the eviction handshake).
pub(super) struct Inbox {
    rx: mpsc::UnboundedReceiver<Job>,
    received: u64,
    open: bool,
}

impl Inbox {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<Job>) -> Inbox {
        Inbox {
            rx,
            received: 0,
            open: true,
        }
    }

    async fn recv(&mut self) -> Option<Job> {
        let job = self.rx.recv().await;
        match &job {
            Some(_) => self.received += 1,
            None => self.open = false,
        }
        job
    }

    fn try_recv(&mut self) -> Option<Job> {
        let job = self.rx.try_recv().ok()?;
        self.received += 1;
        Some(job)
    }
}

/// An actor with nothing to do asks the worker's loop to drop it; the loop does so only if it
/// has sent the actor no command the actor has not taken (`received`).
pub(super) struct Idle {
    pub key: (String, String),
    pub actor: u64,
    pub received: u64,
}

/// What driving a run left.
#[derive(Debug, PartialEq, Eq)]
enum Drive {
    /// No run in progress.
    Settled,
    /// A run in progress waits (for input, children, or its timer).
    Waiting,
    /// The run could not go on here now; its commands are handed back for redelivery.
    GaveUp,
}

/// Sends progress acks for `ack` every `interval` until aborted.
pub(super) fn ticker(ack: Acker, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            ack.send(AckKind::Progress).await;
        }
    })
}

/// Commands held unacknowledged while their run is driven (or, for `deferred`, until the
/// session starts), each with a task sending progress acks so that JetStream does not redeliver
/// them while this worker is alive.
pub(super) struct Held {
    interval: Duration,
    acks: Vec<(Acker, tokio::task::JoinHandle<()>)>,
    /// `cancel`s that reached the chat before its session started.
    deferred: Vec<(Job, tokio::task::JoinHandle<()>)>,
    deferred_since: Option<Instant>,
}

impl Held {
    fn new(interval: Duration) -> Held {
        Held {
            interval,
            acks: Vec::new(),
            deferred: Vec::new(),
            deferred_since: None,
        }
    }

    pub(super) fn keep(&mut self, ack: Acker) {
        let t = ticker(ack.clone(), self.interval);
        self.acks.push((ack, t));
    }

    fn defer(&mut self, job: Job) {
        let t = ticker(job.ack.clone(), self.interval);
        self.deferred.push((job, t));
        self.deferred_since.get_or_insert_with(Instant::now);
    }

    fn take_deferred(&mut self) -> Vec<Job> {
        self.deferred_since = None;
        self.deferred
            .drain(..)
            .map(|(job, t)| {
                t.abort();
                job
            })
            .collect()
    }

    /// Acknowledges (`None`) or answers `kind` to every held command.
    async fn release(&mut self, kind: Option<AckKind>) {
        for (ack, ticker) in self.acks.drain(..) {
            ticker.abort();
            ack.send(kind.unwrap_or(AckKind::Ack)).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (_, t) in &self.acks {
            t.abort();
        }
        for (_, t) in &self.deferred {
            t.abort();
        }
    }
}

/// Retries after an infrastructure failure: waits (doubling up to 2 s) while keeping the commands
/// in hand alive with progress acks, and asks the bus to check its definitions when the failure
/// says something is missing on the server.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    async fn wait(&mut self, sh: &Shared, error: &Error, queue: &VecDeque<Job>, order: &Order) {
        if mozaiks_bus::keeper::is_missing(error) {
            sh.bus.heal();
        }
        let d = self.next.unwrap_or(Duration::from_millis(100));
        self.next = Some((d * 2).min(Duration::from_secs(2)));
        for job in queue.iter().chain(order.jobs()) {
            job.ack.send(AckKind::Progress).await;
        }
        tokio::time::sleep(d).await;
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

/// One chat's actor: see the module docs.
pub(super) async fn actor(
    sh: Arc<Shared>,
    (app_id, chat_id): (String, String),
    id: u64,
    mut inbox: Inbox,
    progress: Duration,
    idle: mpsc::UnboundedSender<Idle>,
) {
    let key = Owners::key(&app_id, &chat_id);
    // Commands not yet in the hands of the chat's owner (this actor once it holds the lease).
    let mut queue: VecDeque<Job> = VecDeque::new();
    // Commands this actor owns but has not applied: they go in the chat's order.
    let mut order = Order::new(&app_id, &chat_id, progress);
    let mut held = Held::new(progress);
    let mut owned: Option<Owned> = None;
    let mut leased = false;
    let mut takeover = false;
    // Backoff of retries after an infrastructure failure (the commands are kept meanwhile).
    let mut backoff = Backoff::default();
    loop {
        if queue.is_empty() {
            let deadline = owned
                .as_ref()
                .filter(|_| leased)
                .and_then(|o| o.deadline(&sh));
            let retry = order.retry_at();
            tokio::select! {
                job = inbox.recv() => match job {
                    Some(job) => {
                        debug!(seq = job.seq, command = job.cmd.command.type_name(), leased, "Command taken.");
                        queue.push_back(job)
                    }
                    None => break,
                },
                // The run's time is up: drive it (it fails with `timeout`).
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far)), if deadline.is_some() => {}
                // A command waits for an earlier one of the chat: look again.
                _ = tokio::time::sleep_until(retry.unwrap_or_else(far)), if retry.is_some() => {}
                _ = tokio::time::sleep(sh.opts.idle_evict) => {
                    if leased {
                        // A cancel whose session never started: give up on it.
                        let waiting_run = owned.as_ref().is_some_and(|o| o.chat.run.is_some());
                        if !waiting_run && held.deferred_since.is_some_and(|t| t.elapsed() >= sh.opts.idle_evict) {
                            for job in held.take_deferred() {
                                job.ack.ack().await;
                            }
                            sh.owners.release(&key).await;
                            leased = false;
                        }
                        continue;
                    }
                    if order.is_empty() {
                        let _ = idle.send(Idle { key: (app_id.clone(), chat_id.clone()), actor: id, received: inbox.received });
                    }
                    continue;
                }
            }
        }
        if !leased {
            match sh.owners.claim(&key, takeover).await {
                Ok(Claim::Mine) => {
                    if takeover {
                        info!("Took the chat over from a worker that stopped renewing its lease.");
                        sh.perf.ownership(|o| o.leases_taken_over += 1);
                    } else {
                        sh.perf.ownership(|o| o.leases_acquired += 1);
                    }
                    takeover = false;
                    leased = true;
                    let first = queue.front().or(order.first()).map(|j| j.cmd.clone());
                    let ready = match owned.as_mut() {
                        // Another worker may have owned the chat meanwhile.
                        Some(o) => reload(&sh, o).await,
                        None => match first {
                            Some(first) => Owned::load(&sh, &app_id, &chat_id, &first)
                                .await
                                .map(|o| owned = Some(o)),
                            None => Ok(()),
                        },
                    };
                    if let Err(e) = ready {
                        // The commands stay here (kept alive) and the load is tried again: an
                        // infrastructure failure never hands a command back or reorders it.
                        warn!(error = %e, "Cannot load the chat; retrying.");
                        sh.owners.release(&key).await;
                        leased = false;
                        backoff.wait(&sh, &e, &queue, &order).await;
                        continue;
                    }
                    backoff.reset();
                }
                Ok(Claim::Theirs(owner)) => {
                    // The owner orders the chat's commands; forward them in the order they came.
                    order.drain_into(&mut queue);
                    takeover = relay(&sh, &key, &owner, &mut queue, &mut inbox, progress).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "Cannot claim the chat; retrying.");
                    backoff.wait(&sh, &e, &queue, &order).await;
                    continue;
                }
            }
        }
        let Some(o) = owned.as_mut() else {
            sh.owners.release(&key).await;
            leased = false;
            continue;
        };
        for job in queue.drain(..) {
            order.push(job);
        }
        process(&sh, o, &mut order, &mut held).await;
        // Drive the run, taking commands in between steps so that cancel and new messages are
        // handled mid-run.
        match drive(&sh, o, &mut inbox, &mut order, &mut held).await {
            Drive::Settled => {
                held.release(None).await;
                while let Some(job) = inbox.try_recv() {
                    queue.push_back(job);
                }
                if queue.is_empty() && held.deferred.is_empty() && order.is_empty() {
                    sh.owners.release(&key).await;
                    leased = false;
                }
            }
            Drive::Waiting => {
                debug!(pending = !order.is_empty(), "The run waits.");
            }
            Drive::GaveUp => {
                // Redelivered later, to this worker or another, which retries the run from the log.
                held.release(Some(AckKind::Nak(Some(Duration::from_secs(5)))))
                    .await;
                order.forget_handled();
                sh.owners.release(&key).await;
                leased = false;
            }
        }
        if leased && !sh.owners.holds(&key) {
            warn!("Lost the chat's lease; handing its commands back.");
            sh.perf.ownership(|o| o.leases_lost += 1);
            held.release(Some(AckKind::Nak(None))).await;
            order.forget_handled();
            order.hand_back(AckKind::Nak(None)).await;
            leased = false;
        }
    }
    // The worker is stopping (or dropped this idle actor): whatever is held goes back now.
    held.release(Some(AckKind::Nak(None))).await;
    order.hand_back(AckKind::Nak(None)).await;
    for job in held.take_deferred() {
        job.ack.send(AckKind::Nak(None)).await;
    }
    sh.owners.release(&key).await;
    sh.perf.forget(&app_id, &chat_id);
    debug!("Chat actor stopping.");
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Forwards the queued commands, in order, to `owner`, with the ones that arrive meanwhile.
/// Returns whether the owner turned out to be gone and its lease expired (the caller then takes
/// the chat over).
async fn relay(
    sh: &Shared,
    key: &str,
    owner: &str,
    queue: &mut VecDeque<Job>,
    inbox: &mut Inbox,
    progress: Duration,
) -> bool {
    loop {
        while let Some(job) = inbox.try_recv() {
            queue.push_back(job);
        }
        let Some(job) = queue.front() else {
            return false;
        };
        match forward::forward(&sh.bus, owner, &job.payload, &job.ack).await {
            Forwarded::Accepted => {
                debug!(
                    owner,
                    command = job.cmd.command.type_name(),
                    "Command forwarded to the chat's owner."
                );
                sh.perf.ownership(|o| o.forwarded += 1);
                queue.pop_front();
            }
            Forwarded::NotOwner => {
                // It let the chat go a moment ago; claim it again.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return false;
            }
            Forwarded::NoAnswer => {
                info!(
                    owner,
                    "The chat's owner does not answer; waiting for its lease to expire."
                );
                return wait_out(sh, key, owner, queue, inbox, progress).await;
            }
        }
    }
}

/// Waits until `owner`'s lease of `key` is gone (`true`), or changed hands, or outlived twice
/// its TTL (the owner lives after all: forward again), keeping the queued commands alive.
async fn wait_out(
    sh: &Shared,
    key: &str,
    owner: &str,
    queue: &mut VecDeque<Job>,
    inbox: &mut Inbox,
    progress: Duration,
) -> bool {
    let until = Instant::now() + sh.owners.ttl() * 2 + Duration::from_secs(1);
    let mut acked = Instant::now();
    loop {
        match sh.owners.owner(key).await {
            Ok(None) => return true,
            Ok(Some(o)) if o != owner => return false,
            Ok(Some(_)) => {}
            Err(e) => debug!(error = %e, "Cannot read the chat's lease."),
        }
        if Instant::now() > until {
            return false;
        }
        while let Some(job) = inbox.try_recv() {
            queue.push_back(job);
        }
        if acked.elapsed() >= progress {
            for job in queue.iter() {
                job.ack.send(AckKind::Progress).await;
            }
            acked = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes one command into the chat's order and applies every command that is ready.
async fn take(sh: &Shared, owned: &mut Owned, job: Job, order: &mut Order, held: &mut Held) {
    order.push(job);
    process(sh, owned, order, held).await;
}

/// Applies the chat's commands that are ready, in order (see [`Order`]).
async fn process(sh: &Shared, owned: &mut Owned, order: &mut Order, held: &mut Held) {
    while let Some(job) = order.next(sh).await {
        let seq = job.seq;
        debug!(
            seq,
            command = job.cmd.command.type_name(),
            "Applying a command."
        );
        if apply(sh, owned, job, held).await {
            order.handled(seq);
        } else {
            order.unhandled(seq);
        }
    }
}

/// Handles one command, except a `cancel` that reaches a chat whose session has not started:
/// that one waits for the session. Returns `false` when the command was handed back for
/// redelivery.
async fn apply(sh: &Shared, owned: &mut Owned, job: Job, held: &mut Held) -> bool {
    if matches!(job.cmd.command, Command::Cancel { .. }) && !owned.chat.started {
        info!("Cancel before the session started; it waits for the session.");
        held.defer(job);
        return true;
    }
    let applied = handle(sh, owned, job, held).await;
    if owned.chat.started && !held.deferred.is_empty() {
        for job in held.take_deferred() {
            handle(sh, owned, job, held).await;
        }
    }
    applied
}

/// Handles one command; `false` when it was handed back for redelivery.
pub(super) async fn handle(sh: &Shared, owned: &mut Owned, job: Job, held: &mut Held) -> bool {
    let Job {
        cmd,
        ack,
        payload,
        seq,
    } = job;
    let kind = cmd.command.type_name();
    // The session's start says whose chat it is, even if another command reached the chat first
    // (and was loaded as its first).
    if !owned.chat.started
        && let Command::StartSession { parent_chat_id, .. } = &cmd.command
    {
        owned.parent_chat_id = parent_chat_id.clone();
        owned.user_id = cmd.user_id.clone();
        owned.workflow = cmd.workflow.clone();
    }
    let Some(pack) = sh.catalog.get(&owned.workflow) else {
        // It can never apply here: it goes to the dead letters and its user is told.
        warn!(workflow = %owned.workflow, "Command for a workflow this worker does not have; moving it to the dead letters.");
        let reason = format!(
            "workflow {:?} is not installed on the worker",
            owned.workflow
        );
        let subject = sh.bus.subjects().command(&cmd.app_id, &cmd.chat_id);
        let origin = seq.map(|s| (subject.as_str(), s));
        if let Err(e) = sh
            .bus
            .dead_letter(Some((&cmd.app_id, &cmd.chat_id)), payload, &reason, origin)
            .await
        {
            warn!(error = %e, "Cannot store the dead letter; the command is redelivered.");
            ack.send(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            return false;
        }
        metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "unknown_workflow")
            .increment(1);
        if !matches!(cmd.command, Command::ChildFinished { .. }) {
            effects::notify_error(sh, &cmd, "unknown_workflow", &reason).await;
        }
        ack.send(AckKind::Term).await;
        return true;
    };
    let app_ctx = sh
        .registry
        .get(&owned.app_id)
        .map(|a| a.context.clone())
        .unwrap_or_default();
    for attempt in 0..=MAX_CONFLICT_RETRIES {
        let outcome = match owned
            .chat
            .handle(cmd.command_id, &cmd.command, &pack, &app_ctx)
        {
            Err(refusal) => {
                info!(code = refusal.code(), command = kind, "Command refused.");
                metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => refusal.code())
                    .increment(1);
                // Workers' own commands (child.finished) have no user waiting for an answer.
                if !matches!(cmd.command, Command::ChildFinished { .. }) {
                    effects::notify_refusal(sh, &cmd, &refusal).await;
                    metrics::counter!(m::REFUSALS_NOTIFIED, "code" => refusal.code()).increment(1);
                }
                ack.ack().await;
                return true;
            }
            Ok(events) => owned.append(sh, events, Some(cmd.command_id)).await,
        };
        match outcome {
            Ok(()) => {
                metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "ok").increment(1);
                if owned.chat.next(&pack, Uuid::nil()).is_idle() && owned.chat.run.is_none() {
                    ack.ack().await;
                } else {
                    held.keep(ack);
                }
                return true;
            }
            Err(Error::Bus(mozaiks_bus::Error::Conflict { .. }))
                if attempt < MAX_CONFLICT_RETRIES =>
            {
                warn!(attempt, "Chat written concurrently; reloading it.");
                sh.perf.ownership(|o| o.conflicts += 1);
                if let Err(e) = reload(sh, owned).await {
                    warn!(error = %e, "Reload failed.");
                }
            }
            Err(e) => {
                warn!(error = %e, command = kind, "Command failed; it will be redelivered.");
                metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "error").increment(1);
                if mozaiks_bus::keeper::is_missing(&e) {
                    sh.bus.heal();
                }
                ack.send(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return false;
            }
        }
    }
    // Written concurrently on every attempt: redelivered in a second (not after `ack_wait`), and
    // the chat's later commands wait for it.
    warn!(
        command = kind,
        "Command kept conflicting; it will be redelivered."
    );
    ack.send(AckKind::Nak(Some(Duration::from_secs(1)))).await;
    false
}

/// Catches the chat up with what another writer appended: the aggregate already holds every event
/// up to `stream_seq`, so only the later ones are read and applied.
pub(super) async fn reload(sh: &Shared, owned: &mut Owned) -> Result<(), Error> {
    let events = sh
        .bus
        .read_chat_since(&owned.app_id, &owned.chat_id, owned.stream_seq)
        .await?;
    for (env, stream_seq) in &events {
        if env.seq != owned.chat.seq + 1 {
            // Not the continuation of what we hold (e.g. the log was purged): read it all again.
            let all = sh.bus.read_chat(&owned.app_id, &owned.chat_id, 0).await?;
            owned.replace_with(&all);
            return Ok(());
        }
        owned.chat.apply(&env.event, env.causation_id);
        owned.stream_seq = *stream_seq;
        owned.track_run(env);
    }
    Ok(())
}

/// Fails the run in progress with `timeout` if its time is up. Returns whether it did.
async fn fail_if_late(sh: &Shared, owned: &mut Owned) -> Result<bool, Error> {
    let (Some(run), Some(since)) = (&owned.chat.run, owned.run_since) else {
        return Ok(false);
    };
    if since.elapsed() < sh.opts.run_timeout {
        return Ok(false);
    }
    warn!(run_id = %run.run_id, timeout_s = sh.opts.run_timeout.as_secs(), "The run's time is up; it fails with timeout.");
    metrics::counter!(m::RUN_TIMEOUTS, "app_id" => owned.app_id.clone()).increment(1);
    let ev = Event::RunFailed(RunFailed {
        run_id: run.run_id,
        code: "timeout".into(),
        reason: format!("the run exceeded {} s", sh.opts.run_timeout.as_secs()),
    });
    owned.append(sh, vec![ev], None).await?;
    Ok(true)
}

fn settled_or_waiting(owned: &Owned) -> Drive {
    if owned.chat.run.is_some() {
        Drive::Waiting
    } else {
        Drive::Settled
    }
}

/// Drives the run until it settles or waits, or gives up for now.
async fn drive(
    sh: &Shared,
    owned: &mut Owned,
    inbox: &mut Inbox,
    order: &mut Order,
    held: &mut Held,
) -> Drive {
    let Some(pack) = sh.catalog.get(&owned.workflow) else {
        return Drive::Settled;
    };
    owned.chat.max_parallel_children = sh
        .registry
        .get(&owned.app_id)
        .map(|a| sh.registry.effective_limits(&a).max_parallel_children as usize)
        .unwrap_or(0);
    if let Err(e) = fail_if_late(sh, owned).await {
        warn!(error = %e, "Cannot fail the late run now.");
        return Drive::GaveUp;
    }
    if owned.chat.next(&pack, Uuid::nil()) == Next::Idle {
        return settled_or_waiting(owned);
    }
    // A run waits for a slot (MAX_CONCURRENT_WORKFLOWS), shared fairly across apps
    // (super::fair); a cancel meanwhile is handled at once.
    // One place in the queue, kept while commands arrive.
    let app_id = owned.app_id.clone();
    let acquire = sh.runs.acquire(&app_id, sh.fair_weight(&app_id));
    tokio::pin!(acquire);
    let _permit = loop {
        tokio::select! {
            permit = &mut acquire => break permit,
            job = inbox.recv(), if inbox.open => {
                if let Some(job) = job {
                    take(sh, owned, job, order, held).await;
                    if owned.chat.next(&pack, Uuid::nil()) == Next::Idle {
                        return settled_or_waiting(owned);
                    }
                }
            }
        }
    };
    let mut conflicts = 0;
    loop {
        // Commands that arrived meanwhile (cancel, more messages) go first.
        while let Some(job) = inbox.try_recv() {
            order.push(job);
        }
        if !order.is_empty() {
            process(sh, owned, order, held).await;
        }
        match fail_if_late(sh, owned).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "Cannot fail the late run now.");
                return Drive::GaveUp;
            }
        }
        // A step (a model or tool call) is interrupted by a `cancel` or by the run's timeout:
        // the step's future is dropped, and what it may have appended is found by the next
        // append's concurrency check. Other commands wait for the step to end.
        let deadline = owned.deadline(sh).unwrap_or_else(far);
        let result = {
            let fut = step(sh, owned, &pack);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => break Some(r),
                    job = inbox.recv(), if inbox.open => {
                        if let Some(job) = job {
                            // Into the chat's order at once: whatever this step leaves, the
                            // command is applied (before the next step, or by the actor's loop).
                            let cancel = matches!(job.cmd.command, Command::Cancel { .. });
                            order.push(job);
                            if cancel {
                                info!("Cancel arrived mid-step; interrupting the step.");
                                break None;
                            }
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        info!("The run's time is up mid-step; interrupting the step.");
                        break None;
                    }
                }
            }
        };
        let Some(result) = result else { continue };
        match result {
            Ok(true) => conflicts = 0,
            Ok(false) => return settled_or_waiting(owned),
            Err(Error::Bus(mozaiks_bus::Error::Conflict { .. }))
                if conflicts < MAX_CONFLICT_RETRIES =>
            {
                conflicts += 1;
                sh.perf.ownership(|o| o.conflicts += 1);
                let _ = reload(sh, owned).await;
            }
            Err(e) => {
                warn!(error = %e, "Run step failed; retrying shortly.");
                tokio::time::sleep(Duration::from_millis(500)).await;
                conflicts += 1;
                if conflicts > MAX_CONFLICT_RETRIES {
                    warn!("Giving up on the run for now; its command is redelivered to resume it.");
                    return Drive::GaveUp;
                }
            }
        }
    }
}
