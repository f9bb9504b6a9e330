//! The worker service.

mod actor;
mod effects;
pub mod fair;
pub mod forward;
pub mod lease;
mod order;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::Registry;
use mozaiks_events::{CommandEnvelope, ENVELOPE_VERSION, Envelope, Event, RunFailed, codec};
use mozaiks_packs::{Catalog, Pack};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::chat::{Chat, Next};
use crate::model::Model;
use crate::perf::{ActiveRun, Perf};
use crate::{Error, metrics as m};
use forward::Acker;
use lease::Owners;

/// Worker settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs in progress at once on this worker (`MAX_CONCURRENT_WORKFLOWS`).
    pub max_concurrent_runs: usize,
    /// A run that lasts longer fails with `timeout` (`WORKFLOW_TIMEOUT_SECONDS`).
    pub run_timeout: Duration,
    /// A chat actor with nothing to do for this long is dropped (its state is in the log).
    pub idle_evict: Duration,
    /// No model call for an app whose credits (or a user whose daily budget) are spent
    /// (`MONETIZATION_ENABLED`); when false, usage is metered and nothing is refused.
    pub enforce_credits: bool,
    /// Hand run slots out fairly across apps ([`fair`]); false: first come, first served
    /// (`MOZAIKS_FAIR_SLOTS=false`, to measure against).
    pub fair_slots: bool,
    /// Slots at most kept free for apps that ran a moment ago while another app holds the
    /// others ([`fair`]'s reserve; 0: none) (`MOZAIKS_RESERVE_SLOTS`).
    pub reserve_slots: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_concurrent_runs: 50,
            run_timeout: Duration::from_secs(300),
            idle_evict: Duration::from_secs(60),
            enforce_credits: false,
            fair_slots: true,
            reserve_slots: 1,
        }
    }
}

/// A command with the bus message to acknowledge once its events are durable (pulled by this
/// worker, or forwarded by another: see [`forward`]).
struct Job {
    cmd: CommandEnvelope,
    /// The command as encoded on the bus (to forward it).
    payload: bytes::Bytes,
    ack: Acker,
    /// Its sequence on `MZ_CMD` (from its ack subject), which orders a chat's commands.
    seq: Option<u64>,
}

/// A chat's actor, as the worker's loop knows it.
struct Entry {
    tx: mpsc::UnboundedSender<Job>,
    id: u64,
    /// Commands sent to it so far.
    sent: u64,
}

/// Shared by every chat actor of a worker.
struct Shared {
    bus: Bus,
    registry: Registry,
    catalog: Catalog,
    model: Model,
    /// HTTP tools' client.
    http: reqwest::Client,
    /// `MAX_CONCURRENT_WORKFLOWS` slots, shared fairly across apps ([`fair`]).
    runs: fair::FairSlots,
    opts: Options,
    /// Live numbers for `MZ_PERF`.
    perf: Perf,
    /// The chats this worker owns.
    owners: Owners,
    /// Model prices: each `usage.charged` is costed once, when appended.
    prices: Arc<mozaiks_control::prices::Prices>,
    /// Every app's wallet (followed in memory): checked before every model call.
    wallets: mozaiks_control::credits::Wallets,
    /// Plugins for pack tools with `plugin:` (`None`: such a tool answers an error).
    plugins: Option<mozaiks_plugins::Plugins>,
}

impl Shared {
    /// The app's weight in the fair share of run slots: its tier's default `max_concurrent_runs`
    /// against the smallest tier's ([`fair::weight_for`]; an unknown app weighs 1).
    fn fair_weight(&self, app_id: &str) -> u32 {
        let tiers = self.registry.tiers();
        let smallest = tiers
            .tiers
            .values()
            .map(|t| t.limits.max_concurrent_runs)
            .min()
            .unwrap_or(1);
        self.registry
            .get(app_id)
            .map(|a| fair::weight_for(tiers.tier_of(&a).limits.max_concurrent_runs, smallest))
            .unwrap_or(1)
    }
}

/// The worker service. See the crate docs.
pub struct Worker {
    bus: Bus,
    registry: Registry,
    catalog: Catalog,
    model: Model,
    opts: Options,
    /// The process's id: this worker's `MZ_PERF` key, chat leases and forwarding inbox.
    instance: InstanceId,
    prices: Arc<mozaiks_control::prices::Prices>,
    plugins: Option<mozaiks_plugins::Plugins>,
}

impl Worker {
    pub fn new(
        bus: Bus,
        registry: Registry,
        catalog: Catalog,
        model: Model,
        opts: Options,
        instance: InstanceId,
    ) -> Worker {
        m::describe();
        Worker {
            bus,
            registry,
            catalog,
            model,
            opts,
            instance,
            prices: Arc::default(),
            plugins: None,
        }
    }

    /// Runs pack tools declared `plugin: <name>` with these plugins.
    pub fn with_plugins(mut self, plugins: mozaiks_plugins::Plugins) -> Worker {
        self.plugins = Some(plugins);
        self
    }

    /// Costs charges with `prices` (else the embedded `config/prices.yaml`).
    pub fn with_prices(mut self, prices: mozaiks_control::prices::Prices) -> Worker {
        self.prices = Arc::new(prices);
        self
    }

    /// Pulls commands until `shutdown` resolves, then lets chat actors finish what they hold.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let perf = Perf::new(self.instance.as_str());
        let owners = Owners::open(&self.bus, self.instance.as_str()).await?;
        let wallets = mozaiks_control::credits::Wallets::open(&self.bus, self.opts.enforce_credits)
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let sh = Arc::new(Shared {
            runs: fair::FairSlots::with_policy(
                self.opts.max_concurrent_runs.max(1),
                self.opts.fair_slots,
                self.opts.reserve_slots,
            ),
            bus: self.bus,
            registry: self.registry,
            catalog: self.catalog,
            model: self.model,
            http: reqwest::Client::new(),
            opts: self.opts,
            perf,
            owners,
            prices: self.prices,
            wallets,
            plugins: self.plugins,
        });
        let consumer = sh.bus.durable("MZ_CMD", "workers").await?;
        // A command that starts or continues a run stays unacknowledged (with progress acks)
        // until the run settles: if this worker dies, JetStream redelivers it after `ack_wait`
        // and the worker that gets it resumes the run from the log.
        let progress = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(100));
        let mut messages = Some(pull_commands(&consumer).await?);
        let mut consumer_health = ConsumerHealth::default();
        // Commands other workers pulled for chats this worker owns.
        let mut forwarded = sh
            .bus
            .client()
            .subscribe(forward::inbox(&sh.bus, sh.owners.me()))
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let stop_perf = Arc::new(tokio::sync::Notify::new());
        let perf_task = tokio::spawn(sh.perf.clone().publish(sh.bus.clone(), stop_perf.clone()));
        let stop_leases = Arc::new(tokio::sync::Notify::new());
        let lease_task = {
            let (sh, stop) = (sh.clone(), stop_leases.clone());
            tokio::spawn(async move { sh.owners.keep_renewing(&stop).await })
        };
        info!(
            max_concurrent_runs = sh.opts.max_concurrent_runs,
            worker = %sh.perf.key(),
            lease_ttl_ms = sh.owners.ttl().as_millis() as u64,
            "Worker started."
        );
        let mut actors: HashMap<(String, String), Entry> = HashMap::new();
        let mut next_actor = 0u64;
        let (idle_tx, mut idle_rx) = mpsc::unbounded_channel::<actor::Idle>();
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                Some(idle) = idle_rx.recv() => {
                    if actors.get(&idle.key).is_some_and(|e| e.id == idle.actor && e.sent == idle.received) {
                        // Dropping its sender lets the actor stop once it has taken what it has.
                        actors.remove(&idle.key);
                        metrics::gauge!(m::ACTIVE_CHATS).set(actors.len() as f64);
                    }
                    continue;
                }
                Some(req) = forwarded.next() => {
                    let answer = accept_forwarded(&sh, &mut actors, &req);
                    debug!(answer, "Forwarded command.");
                    metrics::counter!(m::FORWARDS_RECEIVED, "outcome" => answer).increment(1);
                    if answer == forward::ACCEPTED {
                        sh.perf.ownership(|o| o.forwards_received += 1);
                    }
                    if let Some(reply) = req.reply {
                        let _ = sh.bus.client().publish(reply, answer.into()).await;
                    }
                    continue;
                }
                _ = tokio::time::sleep(consumer_health.probe_in()) => {
                    consumer_health.probe(&sh.bus, &mut messages).await;
                    continue;
                }
                msg = next_command(&mut messages) => msg,
            };
            let msg = match msg {
                Some(Ok(msg)) => {
                    consumer_health.ok(&sh.bus);
                    msg
                }
                Some(Err(e)) => {
                    let reopen = matches!(
                        e.kind(),
                        pull::MessagesErrorKind::ConsumerDeleted
                            | pull::MessagesErrorKind::PushBasedConsumer
                            | pull::MessagesErrorKind::RequestLimitExceeded
                    );
                    consumer_health.failed(&sh.bus, &e.to_string());
                    if reopen {
                        messages = None;
                    }
                    continue;
                }
                None => {
                    consumer_health.failed(&sh.bus, "the command stream ended");
                    messages = None;
                    continue;
                }
            };
            let seq = msg.info().ok().map(|i| i.stream_sequence);
            let cmd = match codec::decode_command(&msg.payload) {
                Ok(cmd) => cmd,
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "A command that does not decode; moving it to the dead letters.");
                    let origin = seq.map(|s| (msg.subject.as_str(), s));
                    let reason = format!("does not decode: {e}");
                    match sh
                        .bus
                        .dead_letter(None, msg.payload.clone(), &reason, origin)
                        .await
                    {
                        Ok(()) => {
                            let _ = msg.ack_with(AckKind::Term).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "Cannot store the dead letter; the command is redelivered.");
                            let _ = msg
                                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                                .await;
                        }
                    }
                    continue;
                }
            };
            let key = (cmd.app_id.clone(), cmd.chat_id.clone());
            let mut job = Job {
                cmd,
                payload: msg.payload.clone(),
                ack: Acker::of(sh.bus.client(), &msg),
                seq,
            };
            loop {
                let entry = actors.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    next_actor += 1;
                    let span = info_span!("chat", app_id = %key.0, chat_id = %key.1);
                    tasks.spawn(
                        actor::actor(
                            sh.clone(),
                            key.clone(),
                            next_actor,
                            actor::Inbox::new(rx),
                            progress,
                            idle_tx.clone(),
                        )
                        .instrument(span),
                    );
                    Entry {
                        tx,
                        id: next_actor,
                        sent: 0,
                    }
                });
                match entry.tx.send(job) {
                    Ok(()) => {
                        entry.sent += 1;
                        break;
                    }
                    // The actor stopped: start a fresh one.
                    Err(mpsc::error::SendError(back)) => {
                        actors.remove(&key);
                        job = back;
                    }
                }
            }
            metrics::gauge!(m::ACTIVE_CHATS).set(actors.len() as f64);
        }
        info!(
            chats = actors.len(),
            "Worker stopping; finishing chats in hand."
        );
        drop(actors);
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    warn!(left = tasks.len(), "Chats still busy at the shutdown deadline; their commands will be redelivered.");
                    break;
                }
            }
        }
        stop_leases.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), lease_task).await;
        stop_perf.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), perf_task).await;
        Ok(())
    }
}

/// Pulls the shared command consumer, with idle heartbeats so that a server that lost the pull
/// request (a restart) is noticed.
async fn pull_commands(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
) -> Result<pull::Stream, Error> {
    consumer
        .stream()
        .expires(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| Error::Consumer(e.to_string()))
}

/// The next command, or never while the consumer is being reopened.
async fn next_command(
    messages: &mut Option<pull::Stream>,
) -> Option<Result<jetstream::Message, pull::MessagesError>> {
    match messages {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

/// Whether the command consumer works, for readiness (`worker.commands`): an error makes the
/// worker not ready; a message, or a probe of the consumer after a quiet while, makes it ready
/// again. A consumer that is gone is reopened (after the bus applied its definitions again).
#[derive(Default)]
struct ConsumerHealth {
    failing: Option<Instant>,
}

impl ConsumerHealth {
    const COMPONENT: &'static str = "worker.commands";

    fn ok(&mut self, bus: &Bus) {
        if self.failing.take().is_some() {
            info!("Command consumer works again.");
            bus.report(Self::COMPONENT, Ok(()));
        }
    }

    fn failed(&mut self, bus: &Bus, error: &str) {
        warn!(error, "Command consumer error.");
        metrics::counter!(m::CONSUMER_ERRORS).increment(1);
        self.failing = Some(Instant::now());
        bus.report(Self::COMPONENT, Err(error.to_string()));
        bus.heal();
    }

    /// How long until the next probe (far while healthy).
    fn probe_in(&self) -> Duration {
        match self.failing {
            Some(t) => Duration::from_secs(1).saturating_sub(t.elapsed()),
            None => Duration::from_secs(3600),
        }
    }

    async fn probe(&mut self, bus: &Bus, messages: &mut Option<pull::Stream>) {
        match bus.durable("MZ_CMD", "workers").await {
            Ok(consumer) => {
                if messages.is_none() {
                    match pull_commands(&consumer).await {
                        Ok(m) => {
                            info!("Command consumer reopened.");
                            *messages = Some(m);
                        }
                        Err(e) => {
                            self.failed(bus, &e.to_string());
                            return;
                        }
                    }
                }
                self.ok(bus);
            }
            Err(e) => self.failed(bus, &e.to_string()),
        }
    }
}

/// Takes a command another worker forwarded (see [`forward`]) if this worker owns its chat;
/// returns the answer.
fn accept_forwarded(
    sh: &Shared,
    actors: &mut HashMap<(String, String), Entry>,
    req: &async_nats::Message,
) -> &'static str {
    let ack = req
        .headers
        .as_ref()
        .and_then(|h| h.get(forward::ACK_HEADER))
        .map(|v| v.as_str().to_string());
    let (Some(ack), Ok(cmd)) = (ack, codec::decode_command(&req.payload)) else {
        return "invalid";
    };
    if !sh.owners.holds(&Owners::key(&cmd.app_id, &cmd.chat_id)) {
        return forward::NOT_OWNER;
    }
    let key = (cmd.app_id.clone(), cmd.chat_id.clone());
    let Some(entry) = actors.get_mut(&key) else {
        return forward::NOT_OWNER;
    };
    let job = Job {
        cmd,
        payload: req.payload.clone(),
        ack: Acker::remote(sh.bus.client(), &ack),
        seq: mozaiks_bus::commands::ack_subject_info(&ack).map(|(seq, _)| seq),
    };
    match entry.tx.send(job) {
        Ok(()) => {
            entry.sent += 1;
            forward::ACCEPTED
        }
        Err(_) => forward::NOT_OWNER,
    }
}

/// The moment `ts` (another machine's clock, maybe) on this machine's monotonic clock.
fn since(ts: DateTime<Utc>) -> Instant {
    let age = (Utc::now() - ts).to_std().unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// The state an actor keeps for its chat.
struct Owned {
    app_id: String,
    chat_id: String,
    user_id: String,
    workflow: String,
    parent_chat_id: Option<String>,
    chat: Chat,
    /// Stream sequence of the chat's last event (0: none).
    stream_seq: u64,
    run_started: Option<Instant>,
    /// When the run in progress started, from its `run.started`'s time (so a run taken over
    /// keeps its deadline): the run's timeout counts from here.
    run_since: Option<Instant>,
    /// Child chats this actor started or whose log it checked (see `reconcile_children`).
    known_children: HashSet<String>,
    step_started: Option<Instant>,
}

impl Owned {
    /// Sets the chat to the fold of `events`, the whole log as read from the stream.
    fn replace_with(&mut self, events: &[(Envelope, u64)]) {
        self.chat = Chat::from_events(events.iter().map(|(e, _)| (&e.event, e.causation_id)));
        self.stream_seq = events.last().map(|(_, s)| *s).unwrap_or(0);
        self.run_since = None;
        for (env, _) in events {
            self.track_run(env);
        }
    }

    /// Follows the run's start and end in events read from the log.
    fn track_run(&mut self, env: &Envelope) {
        match &env.event {
            Event::RunStarted(_) => self.run_since = Some(since(env.ts)),
            e if e.ends_run() => self.run_since = None,
            _ => {}
        }
    }

    /// When the run in progress times out.
    fn deadline(&self, sh: &Shared) -> Option<tokio::time::Instant> {
        self.chat.run.as_ref()?;
        let since = self.run_since?;
        Some(tokio::time::Instant::from_std(since + sh.opts.run_timeout))
    }

    async fn load(
        sh: &Shared,
        app_id: &str,
        chat_id: &str,
        first: &CommandEnvelope,
    ) -> Result<Owned, Error> {
        let events = sh.bus.read_chat(app_id, chat_id, 0).await?;
        let mut o = Owned {
            app_id: app_id.to_string(),
            chat_id: chat_id.to_string(),
            user_id: first.user_id.clone(),
            workflow: first.workflow.clone(),
            parent_chat_id: None,
            chat: Chat::default(),
            stream_seq: 0,
            run_started: None,
            run_since: None,
            known_children: HashSet::new(),
            step_started: None,
        };
        if let mozaiks_events::Command::StartSession { parent_chat_id, .. } = &first.command {
            o.parent_chat_id = parent_chat_id.clone();
        }
        if let Some((head, _)) = events.first() {
            o.user_id = head.user_id.clone();
            o.workflow = head.workflow.clone();
            o.parent_chat_id = head.parent_chat_id.clone();
        }
        o.replace_with(&events);
        if let Some(run) = &o.chat.run {
            o.run_started = Some(Instant::now());
            sh.perf.run_started(
                ActiveRun {
                    app_id: o.app_id.clone(),
                    chat_id: o.chat_id.clone(),
                    workflow: o.workflow.clone(),
                    run_id: run.run_id,
                    started_at: Utc::now(),
                    step: run.step,
                    agent: run.agent.clone(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    turns: 0,
                },
                false,
            );
        }
        // A child chat whose run ended: tell the parent again, in case the worker that ended it
        // died before it could (the parent ignores a repeat).
        if o.parent_chat_id.is_some()
            && o.chat.run.is_none()
            && let Some(effect) = effects::first_run_end(&events)
        {
            o.perform(sh, effect).await?;
        }
        Ok(o)
    }

    /// Appends events in order; the aggregate applies each once it is durable.
    async fn append(
        &mut self,
        sh: &Shared,
        events: Vec<Event>,
        causation: Option<Uuid>,
    ) -> Result<(), Error> {
        for mut event in events {
            if let Event::UsageCharged(u) = &mut event {
                sh.prices.cost_charge(u);
            }
            let env = Envelope {
                v: ENVELOPE_VERSION,
                event_id: Uuid::now_v7(),
                app_id: self.app_id.clone(),
                chat_id: self.chat_id.clone(),
                user_id: self.user_id.clone(),
                workflow: self.workflow.clone(),
                seq: self.chat.seq + 1,
                ts: Utc::now(),
                parent_chat_id: self.parent_chat_id.clone(),
                causation_id: causation,
                event,
            };
            let effects = self.effects_of(&env.event);
            let ack = sh.bus.append(&env, self.stream_seq).await?;
            self.stream_seq = ack.stream_seq;
            self.observe(sh, &env.event);
            self.chat.apply(&env.event, causation);
            for effect in effects {
                self.perform(sh, effect).await?;
            }
            debug!(
                seq = env.seq,
                r#type = env.event.type_name(),
                "Event appended."
            );
        }
        Ok(())
    }

    fn observe(&mut self, sh: &Shared, event: &Event) {
        let app = self.app_id.clone();
        let perf = &sh.perf;
        match event {
            Event::RunStarted(r) => {
                self.run_started = Some(Instant::now());
                self.run_since = Some(Instant::now());
                perf.run_started(
                    ActiveRun {
                        app_id: app.clone(),
                        chat_id: self.chat_id.clone(),
                        workflow: self.workflow.clone(),
                        run_id: r.run_id,
                        started_at: Utc::now(),
                        step: 0,
                        agent: String::new(),
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        turns: 0,
                    },
                    true,
                );
                metrics::counter!(m::RUNS_STARTED, "app_id" => app.clone()).increment(1);
                metrics::gauge!(m::ACTIVE_RUNS, "app_id" => app).increment(1.0);
            }
            Event::RunCompleted(_) | Event::RunFailed(_) | Event::RunCancelled(_) => {
                self.run_since = None;
                let outcome = match event {
                    Event::RunCompleted(_) => "completed",
                    Event::RunFailed(_) => "failed",
                    _ => "cancelled",
                };
                if let Some(t) = self.run_started.take() {
                    metrics::histogram!(m::RUN_SECONDS).record(t.elapsed().as_secs_f64());
                    metrics::gauge!(m::ACTIVE_RUNS, "app_id" => app.clone()).decrement(1.0);
                }
                perf.run_ended(&app, &self.chat_id, outcome);
                metrics::counter!(m::RUNS_ENDED, "app_id" => app, "outcome" => outcome)
                    .increment(1);
                info!(outcome, "Run ended.");
            }
            Event::StepStarted(s) => {
                self.step_started = Some(Instant::now());
                perf.step_started(&app, &self.chat_id, s.step, &s.agent);
            }
            Event::StepCompleted(_) => {
                let took = self.step_started.take().map(|t| t.elapsed());
                perf.turn_completed(&app, &self.chat_id, took);
            }
            Event::ToolResult(t) if t.error.is_some() => perf.tool_error(&app),
            Event::UsageCharged(u) => {
                perf.charged(&app, &self.chat_id, u.prompt_tokens, u.completion_tokens);
                metrics::counter!(m::TOKENS, "app_id" => app.clone(), "kind" => "prompt")
                    .increment(u.prompt_tokens);
                metrics::counter!(m::TOKENS, "app_id" => app, "kind" => "completion")
                    .increment(u.completion_tokens);
            }
            _ => {}
        }
    }
}

/// Takes one step of the run. `Ok(false)` when there is nothing left to do.
async fn step(sh: &Shared, owned: &mut Owned, pack: &Pack) -> Result<bool, Error> {
    match owned.chat.next(pack, Uuid::now_v7()) {
        Next::Idle => Ok(false),
        Next::AwaitChildren { pending, .. } => owned.reconcile_children(sh, pack, pending).await,
        Next::Emit(events) => {
            owned.append(sh, events, None).await?;
            Ok(true)
        }
        Next::CallModel {
            agent, step, round, ..
        } => {
            let run_id = owned
                .chat
                .run
                .as_ref()
                .map(|r| r.run_id)
                .unwrap_or_default();
            // Credits (MONETIZATION_ENABLED): no model call once the app's credits or the
            // user's daily budget are spent; the run ends with the refusal's code.
            if let Err(refusal) = sh.wallets.check(&owned.app_id, &owned.user_id) {
                info!(step, round, agent = %agent, code = refusal.code(), "No model call: credits spent; the run fails.");
                metrics::counter!(m::CREDIT_REFUSALS, "app_id" => owned.app_id.clone(), "code" => refusal.code())
                    .increment(1);
                let ev = Event::RunFailed(RunFailed {
                    run_id,
                    code: refusal.code().into(),
                    reason: refusal.to_string(),
                });
                owned.append(sh, vec![ev], None).await?;
                return Ok(true);
            }
            let Some(agent_def) = pack.agent(&agent) else {
                let ev = Event::RunFailed(RunFailed {
                    run_id,
                    code: "unknown_agent".into(),
                    reason: format!("agent {agent:?} is not in the pack"),
                });
                owned.append(sh, vec![ev], None).await?;
                return Ok(true);
            };
            let started = Instant::now();
            // Token deltas go out on core NATS while the model streams; they are flushed before
            // the step's events are appended, so clients see them before the `agent.message`.
            let (sink, pieces) = crate::model::deltas::Sink::channel();
            let target = crate::model::deltas::Target {
                app_id: owned.app_id.clone(),
                chat_id: owned.chat_id.clone(),
                run_id,
                step,
                round,
                agent: agent.clone(),
            };
            let publisher = tokio::spawn(crate::model::deltas::publish(
                sh.bus.clone(),
                target,
                pieces,
            ));
            let reply = sh
                .model
                .complete(pack, agent_def, &owned.chat, round, Some(&sink))
                .await;
            metrics::histogram!(m::MODEL_SECONDS, "model" => sh.model.name())
                .record(started.elapsed().as_secs_f64());
            drop(sink);
            let _ = tokio::time::timeout(Duration::from_secs(1), publisher).await;
            match reply {
                Ok(reply) => {
                    debug!(step, round, agent = %agent, tool_calls = reply.tool_calls.len(), "Model answered.");
                    let events = owned.chat.on_reply(round, &reply);
                    owned.append(sh, events, None).await?;
                }
                Err(e) => {
                    warn!(step, round, agent = %agent, code = e.code, error = %e.message, "Model call failed; the run fails.");
                    let ev = Event::RunFailed(RunFailed {
                        run_id,
                        code: e.code.to_string(),
                        reason: e.message,
                    });
                    owned.append(sh, vec![ev], None).await?;
                }
            }
            Ok(true)
        }
        Next::CallTool {
            step,
            call_id,
            tool,
            arguments,
            ..
        } => {
            let started = Instant::now();
            let declared = pack.tool(&tool);
            let result = match (
                declared.and_then(|t| t.http.as_ref()),
                declared.and_then(|t| t.plugin.as_ref()),
            ) {
                (Some(http), _) => crate::tools::call_http(&sh.http, http, &arguments).await,
                (None, Some(plugin)) => {
                    let target = crate::tools::PluginTarget {
                        app_id: &owned.app_id,
                        user_id: &owned.user_id,
                        chat_id: &owned.chat_id,
                        call_id: &call_id,
                        plugin,
                    };
                    crate::tools::call_plugin(
                        sh.plugins.as_ref(),
                        &sh.registry,
                        target,
                        arguments.clone(),
                    )
                    .await
                }
                (None, None) => Err(format!(
                    "tool {tool:?} is not an HTTP or plugin tool of the pack"
                )),
            };
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics::histogram!(m::TOOL_SECONDS, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                info!(step, tool = %tool, call_id = %call_id, error = %e, "Tool failed; the agent gets the error.");
            }
            let events = owned.chat.on_tool_result(pack, &call_id, result);
            owned.append(sh, events, None).await?;
            Ok(true)
        }
    }
}
