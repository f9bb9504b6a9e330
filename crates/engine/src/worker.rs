//! The worker service.

mod effects;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::Utc;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_control::Registry;
use mozaiks_events::{CommandEnvelope, ENVELOPE_VERSION, Envelope, Event, RunFailed, codec};
use mozaiks_packs::{Catalog, Pack};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::chat::{Chat, Next};
use crate::model::Model;
use crate::perf::{ActiveRun, Perf};
use crate::{Error, metrics as m};

/// Worker settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs in progress at once on this worker (`MAX_CONCURRENT_WORKFLOWS`).
    pub max_concurrent_runs: usize,
    /// A run that lasts longer fails with `timeout` (`WORKFLOW_TIMEOUT_SECONDS`).
    pub run_timeout: Duration,
    /// A chat actor with nothing to do for this long is dropped (its state is in the log).
    pub idle_evict: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_concurrent_runs: 50,
            run_timeout: Duration::from_secs(300),
            idle_evict: Duration::from_secs(60),
        }
    }
}

/// A command with the bus message to acknowledge once its events are durable.
struct Job {
    cmd: CommandEnvelope,
    msg: jetstream::Message,
}

/// Shared by every chat actor of a worker.
struct Shared {
    bus: Bus,
    registry: Registry,
    catalog: Catalog,
    model: Model,
    /// HTTP tools' client.
    http: reqwest::Client,
    runs: Semaphore,
    opts: Options,
    /// Live numbers for `MZ_PERF`.
    perf: Perf,
}

/// The worker service. See the crate docs.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(
        bus: Bus,
        registry: Registry,
        catalog: Catalog,
        model: Model,
        opts: Options,
    ) -> Worker {
        m::describe();
        Worker {
            shared: Arc::new(Shared {
                bus,
                registry,
                catalog,
                model,
                http: reqwest::Client::new(),
                runs: Semaphore::new(opts.max_concurrent_runs.max(1)),
                opts,
                perf: Perf::default(),
            }),
        }
    }

    /// Pulls commands until `shutdown` resolves, then lets chat actors finish what they hold.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let sh = self.shared.clone();
        let stream = sh.bus.stream("MZ_CMD").await?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_consumer(&sh.bus.subjects().name("workers"))
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        // A command that starts or continues a run stays unacknowledged (with progress acks)
        // until the run settles: if this worker dies, JetStream redelivers it after `ack_wait`
        // and the worker that gets it resumes the run from the log.
        let progress = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(100));
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let stop_perf = Arc::new(tokio::sync::Notify::new());
        let perf_task = tokio::spawn(sh.perf.clone().publish(sh.bus.clone(), stop_perf.clone()));
        info!(
            max_concurrent_runs = sh.opts.max_concurrent_runs,
            worker = %sh.perf.key(),
            "Worker started."
        );
        let mut actors: HashMap<(String, String), mpsc::UnboundedSender<Job>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                msg = messages.next() => msg,
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    warn!(error = %e, "Command consumer error.");
                    continue;
                }
                None => return Err(Error::Consumer("command stream ended".into())),
            };
            let cmd = match codec::decode_command(&msg.payload) {
                Ok(cmd) => cmd,
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "Dropping a command that does not decode.");
                    let _ = msg.ack_with(AckKind::Term).await;
                    continue;
                }
            };
            let key = (cmd.app_id.clone(), cmd.chat_id.clone());
            let mut job = Job { cmd, msg };
            loop {
                let tx = actors.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let sh = sh.clone();
                    let (app_id, chat_id) = key.clone();
                    let span = info_span!("chat", app_id = %app_id, chat_id = %chat_id);
                    tasks.spawn(actor(sh, app_id, chat_id, rx, progress).instrument(span));
                    tx
                });
                match tx.send(job) {
                    Ok(()) => break,
                    // The actor went idle and stopped: start a fresh one.
                    Err(mpsc::error::SendError(back)) => {
                        actors.remove(&key);
                        job = back;
                    }
                }
            }
            actors.retain(|_, tx| !tx.is_closed());
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
        stop_perf.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), perf_task).await;
        Ok(())
    }
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
    /// Child chats this actor started or whose log it checked (see `reconcile_children`).
    known_children: HashSet<String>,
    step_started: Option<Instant>,
}

impl Owned {
    /// Sets the chat to the fold of `events`, the whole log as read from the stream.
    fn replace_with(&mut self, events: &[(Envelope, u64)]) {
        self.chat = Chat::from_events(events.iter().map(|(e, _)| (&e.event, e.causation_id)));
        self.stream_seq = events.last().map(|(_, s)| *s).unwrap_or(0);
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
        for event in events {
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

const MAX_CONFLICT_RETRIES: usize = 5;

/// One chat's actor: handles its commands in order and drives its runs.
async fn actor(
    sh: Arc<Shared>,
    app_id: String,
    chat_id: String,
    mut rx: mpsc::UnboundedReceiver<Job>,
    progress: Duration,
) {
    let Some(first) = rx.recv().await else { return };
    let mut held = Held {
        interval: progress,
        msgs: Vec::new(),
    };
    let mut owned = match Owned::load(&sh, &app_id, &chat_id, &first.cmd).await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "Cannot load the chat; the command will be redelivered.");
            let _ = first
                .msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    let mut next_job = Some(first);
    loop {
        if let Some(job) = next_job.take() {
            handle(&sh, &mut owned, job, &mut held).await;
        }
        // Drive the run, taking commands in between steps so that cancel and new messages are
        // handled mid-run.
        if drive(&sh, &mut owned, &mut rx, &mut held).await {
            held.release(None).await;
        } else {
            // Redelivered later, to this worker or another, which retries the run from the log.
            held.release(Some(AckKind::Nak(Some(Duration::from_secs(5)))))
                .await;
        }
        next_job = match tokio::time::timeout(sh.opts.idle_evict, rx.recv()).await {
            Ok(Some(job)) => Some(job),
            Ok(None) | Err(_) => break,
        };
    }
    sh.perf.forget(&app_id, &chat_id);
    debug!("Chat actor idle; stopping.");
}

/// Commands held unacknowledged while their run is driven, each with a task sending progress
/// acks so that JetStream does not redeliver them while this worker is alive.
struct Held {
    interval: Duration,
    msgs: Vec<(Arc<jetstream::Message>, tokio::task::JoinHandle<()>)>,
}

impl Held {
    fn keep(&mut self, msg: jetstream::Message) {
        let msg = Arc::new(msg);
        let m = msg.clone();
        let interval = self.interval;
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if m.ack_with(AckKind::Progress).await.is_err() {
                    break;
                }
            }
        });
        self.msgs.push((msg, ticker));
    }

    /// Acknowledges (`None`) or answers `kind` to every held command.
    async fn release(&mut self, kind: Option<AckKind>) {
        for (msg, ticker) in self.msgs.drain(..) {
            ticker.abort();
            let _ = match kind {
                None => msg.ack().await,
                Some(k) => msg.ack_with(k).await,
            };
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (_, ticker) in &self.msgs {
            ticker.abort();
        }
    }
}

async fn handle(sh: &Shared, owned: &mut Owned, job: Job, held: &mut Held) {
    let Job { cmd, msg } = job;
    let kind = cmd.command.type_name();
    let Some(pack) = sh.catalog.get(&owned.workflow) else {
        warn!(workflow = %owned.workflow, "Command for a workflow this worker does not have; dropped.");
        metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "unknown_workflow")
            .increment(1);
        let _ = msg.ack_with(AckKind::Term).await;
        return;
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
                if !matches!(cmd.command, mozaiks_events::Command::ChildFinished { .. }) {
                    effects::notify_refusal(sh, &cmd, &refusal).await;
                    metrics::counter!(m::REFUSALS_NOTIFIED, "code" => refusal.code()).increment(1);
                }
                let _ = msg.ack().await;
                return;
            }
            Ok(events) => owned.append(sh, events, Some(cmd.command_id)).await,
        };
        match outcome {
            Ok(()) => {
                metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "ok").increment(1);
                if owned.chat.next(&pack, Uuid::nil()).is_idle() {
                    let _ = msg.ack().await;
                } else {
                    held.keep(msg);
                }
                return;
            }
            Err(Error::Bus(mozaiks_bus::Error::Conflict { .. }))
                if attempt < MAX_CONFLICT_RETRIES =>
            {
                warn!(attempt, "Chat written concurrently; reloading it.");
                if let Err(e) = reload(sh, owned).await {
                    warn!(error = %e, "Reload failed.");
                }
            }
            Err(e) => {
                warn!(error = %e, command = kind, "Command failed; it will be redelivered.");
                metrics::counter!(m::COMMANDS, "type" => kind, "outcome" => "error").increment(1);
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        }
    }
}

/// Catches the chat up with what another writer appended: the aggregate already holds every event
/// up to `stream_seq`, so only the later ones are read and applied.
async fn reload(sh: &Shared, owned: &mut Owned) -> Result<(), Error> {
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
    }
    Ok(())
}

/// Drives the run until it is idle (`true`), or gives up for now (`false`).
async fn drive(
    sh: &Shared,
    owned: &mut Owned,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    held: &mut Held,
) -> bool {
    let Some(pack) = sh.catalog.get(&owned.workflow) else {
        return true;
    };
    owned.chat.max_parallel_children = sh
        .registry
        .get(&owned.app_id)
        .map(|a| sh.registry.effective_limits(&a).max_parallel_children as usize)
        .unwrap_or(0);
    if owned.chat.next(&pack, Uuid::nil()) == Next::Idle {
        return true;
    }
    let Ok(_permit) = sh.runs.acquire().await else {
        return false;
    };
    let mut conflicts = 0;
    let mut early = Vec::new();
    let mut open = true;
    loop {
        // Commands that arrived meanwhile (cancel, more messages) go first.
        for job in early.drain(..) {
            handle(sh, owned, job, held).await;
        }
        while let Ok(job) = rx.try_recv() {
            handle(sh, owned, job, held).await;
        }
        // A step (a model or tool call) is interrupted by a `cancel` or by the run's timeout:
        // the step's future is dropped, and what it may have appended is found by the next
        // append's concurrency check. Other commands wait for the step to end.
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let deadline = owned
            .run_started
            .map(|t| tokio::time::Instant::from_std(t + sh.opts.run_timeout))
            .unwrap_or(far);
        let result = {
            let fut = step(sh, owned, &pack);
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    r = &mut fut => break Some(r),
                    job = rx.recv(), if open => match job {
                        Some(job) => {
                            let cancel = matches!(job.cmd.command, mozaiks_events::Command::Cancel { .. });
                            early.push(job);
                            if cancel {
                                info!("Cancel arrived mid-step; interrupting the step.");
                                break None;
                            }
                        }
                        None => open = false,
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
            Ok(false) => return true,
            Err(Error::Bus(mozaiks_bus::Error::Conflict { .. }))
                if conflicts < MAX_CONFLICT_RETRIES =>
            {
                conflicts += 1;
                let _ = reload(sh, owned).await;
            }
            Err(e) => {
                warn!(error = %e, "Run step failed; retrying shortly.");
                tokio::time::sleep(Duration::from_millis(500)).await;
                conflicts += 1;
                if conflicts > MAX_CONFLICT_RETRIES {
                    warn!("Giving up on the run for now; its command is redelivered to resume it.");
                    return false;
                }
            }
        }
    }
}

/// Takes one step of the run. `Ok(false)` when there is nothing left to do.
async fn step(sh: &Shared, owned: &mut Owned, pack: &Pack) -> Result<bool, Error> {
    if let (Some(run), Some(started)) = (&owned.chat.run, owned.run_started)
        && started.elapsed() > sh.opts.run_timeout
    {
        let ev = Event::RunFailed(RunFailed {
            run_id: run.run_id,
            code: "timeout".into(),
            reason: format!("the run exceeded {} s", sh.opts.run_timeout.as_secs()),
        });
        owned.append(sh, vec![ev], None).await?;
        return Ok(true);
    }
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
            let result = match pack.tool(&tool).and_then(|t| t.http.as_ref()) {
                Some(http) => crate::tools::call_http(&sh.http, http, &arguments).await,
                None => Err(format!("tool {tool:?} is not an HTTP tool of the pack")),
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
