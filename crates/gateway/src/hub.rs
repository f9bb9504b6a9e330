//! The replica's fan-out hub: live events shared per chat, and the replica's open WebSockets.
//!
//! **Live events.** `MZ_EVT` republishes every *stored* event on core NATS
//! (`mz.live.{app_id}.{chat_id}.{type}`, with the stream sequence in `Nats-Sequence`; see
//! `streams/MZ_EVT.json`). A replica holds one subscription per chat that has sockets on it, shared
//! by all of them and dropped with the last ([`Hub::follow`]); each event is decoded and rendered to
//! its JSON frame once, then handed to every socket of the chat. JetStream is read only to catch up
//! (see [`crate::ws`]). Because only stored events are republished, an append refused by the
//! concurrency check never reaches a client.
//!
//! **Token deltas.** The worker publishes them under the chat's live subject
//! (`mz.live.{app_id}.{chat_id}.delta`, core NATS, never stored, no `Nats-Sequence`), so the one
//! subscription of the chat gets both, in the order the server routed them (a step's deltas
//! before its stored `agent.message`). Each delta is validated, rendered once as an
//! `agent.delta` frame (`"seq": null`) and handed to the chat's sockets on a channel of its own,
//! so deltas never push durable events out of the feed's buffer. Sockets merge or drop deltas
//! when they fall behind ([`crate::ws`]).
//!
//! **After a NATS reconnect.** Core subscriptions miss what is published while the connection is
//! down. The hub watches the connection ([`watch_reconnects`]); after a reconnect (once the
//! client's resubscriptions are on the server) every feed checks its chat's log: the events
//! stored meanwhile are read once per chat and handed to its sockets in order (sockets drop what
//! they already have, by seq), so a client gets them without waiting for the chat's next event.
//!
//! **Connections.** Every socket is admitted here before its upgrade ([`Hub::admit`]): the per-app
//! and per-user limits are counted per replica, and notifications ([`crate::notify`]) find a user's
//! sockets through the same table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::{Bus, ChatPosition};
use mozaiks_events::{AgentDelta, DeltaMessage, Envelope, Event, Frame, codec};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::metrics as m;

/// Live events buffered per chat for sockets that are busy (catching up, or writing). A socket
/// that falls further behind refetches the gap from JetStream. A ring's slots are allocated with
/// the chat's feed (≈ 34 bytes each), so this is per-chat memory on every replica: 32 holds two
/// whole `triage_handoff` runs.
pub const FEED_CAPACITY: usize = 32;

/// Token deltas buffered per chat for sockets that are busy; a socket that falls further behind
/// misses some (deltas are not durable; the step's `agent.message` has the whole text). The
/// worker publishes a delta per 30 ms of a streaming answer at most, and a socket's pump reads
/// them as they come (it merges them when its client is slow), so 16 is half a second of lag.
pub const DELTA_CAPACITY: usize = 16;

/// At most this many events missed during a NATS outage are read by the feed itself and handed
/// to the sockets; past it, the feed hands over the last one and each socket refetches its gap.
const RECOVER_MAX: u64 = 32;

/// How often the hub looks at the NATS connection's connect counter.
const RECONNECT_POLL: Duration = Duration::from_millis(100);

/// Chats checked against the log at once after a reconnect (a replica may follow thousands).
const RECOVER_CONCURRENCY: usize = 32;

/// WebSocket settings of a replica. Per-app limits come from the app's [`mozaiks_control::Limits`];
/// these are the defaults for limits an app leaves unset.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// How often the server pings an idle client.
    pub ping_interval: Duration,
    /// A client that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// Frames queued for one client before it counts as a slow consumer.
    pub queue_frames: usize,
    /// Frames queued for one client past which token deltas are merged (and, when the queue is
    /// full, dropped) instead of queued one by one. Below `queue_frames`.
    pub delta_backlog: usize,
    pub max_websockets_per_app: u32,
    pub max_websockets_per_user: u32,
    pub max_frames_per_second: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            queue_frames: 1024,
            delta_backlog: 64,
            max_websockets_per_app: 20_000,
            max_websockets_per_user: 50,
            max_frames_per_second: 50,
        }
    }
}

impl Tuning {
    /// The defaults with the configured ping interval and idle timeout, when given (and not
    /// zero).
    pub fn with(ping: Option<Duration>, idle: Option<Duration>) -> Tuning {
        let mut t = Tuning::default();
        if let Some(d) = ping.filter(|d| !d.is_zero()) {
            t.ping_interval = d;
        }
        if let Some(d) = idle.filter(|d| !d.is_zero()) {
            t.idle_timeout = d;
        }
        t
    }
}

/// One live event of a chat, rendered once for every socket.
#[derive(Debug)]
pub struct Live {
    pub seq: u64,
    pub stream_seq: u64,
    pub json: Utf8Bytes,
    /// `(run_id, step)` when the event is an `agent.message` (later deltas of it are stale).
    pub message: Option<(Uuid, u32)>,
}

impl Live {
    pub fn of(env: &Envelope, stream_seq: u64) -> Live {
        Live {
            seq: env.seq,
            stream_seq,
            json: Utf8Bytes::from(Frame::from_envelope(env).to_json()),
            message: message_of(env),
        }
    }
}

/// `(run_id, step)` of an `agent.message`.
pub fn message_of(env: &Envelope) -> Option<(Uuid, u32)> {
    match &env.event {
        Event::AgentMessage(m) => Some((m.run_id, m.step)),
        _ => None,
    }
}

/// One token delta of a chat, validated and rendered once for every socket.
#[derive(Debug)]
pub struct Delta {
    pub id: Uuid,
    pub ts: DateTime<Utc>,
    pub delta: AgentDelta,
    pub json: Utf8Bytes,
}

/// Why a socket was refused before its upgrade.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    App(u32),
    User(u32),
}

/// The fan-out hub of one replica. Cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    bus: Bus,
    tuning: Tuning,
    feeds: Mutex<HashMap<String, Weak<Feed>>>,
    conns: Mutex<HashMap<String, AppConns>>,
    next_id: AtomicU64,
    /// Bumped after each NATS reconnect, once the subscriptions are back on the server.
    reconnects: watch::Sender<u64>,
    watcher: JoinHandle<()>,
    /// Bounds the log reads of the checks after a reconnect.
    recovering: Arc<Semaphore>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

#[derive(Default)]
struct AppConns {
    total: u32,
    users: HashMap<String, Vec<(u64, mpsc::Sender<Utf8Bytes>)>>,
}

/// A chat's shared subscription; unsubscribed when the last [`Follow`] drops.
struct Feed {
    key: String,
    tx: broadcast::Sender<Arc<Live>>,
    deltas: broadcast::Sender<Arc<Delta>>,
    task: JoinHandle<()>,
    hub: Weak<Inner>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
        metrics::gauge!(m::LIVE_FEEDS).decrement(1.0);
        if let Some(hub) = self.hub.upgrade() {
            let mut feeds = hub.feeds.lock().unwrap_or_else(|p| p.into_inner());
            // A newer feed may already have replaced this one.
            if feeds.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                feeds.remove(&self.key);
            }
        }
    }
}

/// One socket's share of a chat's live events and token deltas.
pub struct Follow {
    _feed: Arc<Feed>,
    pub rx: broadcast::Receiver<Arc<Live>>,
    pub deltas: broadcast::Receiver<Arc<Delta>>,
}

impl Follow {
    fn of(feed: Arc<Feed>) -> Follow {
        let rx = feed.tx.subscribe();
        let deltas = feed.deltas.subscribe();
        Follow {
            _feed: feed,
            rx,
            deltas,
        }
    }
}

/// A socket's place in the replica's table; removed on drop.
pub struct Admission {
    hub: Hub,
    app_id: String,
    user_id: String,
    id: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut conns = self.hub.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = conns.get_mut(&self.app_id) {
            app.total = app.total.saturating_sub(1);
            if let Some(list) = app.users.get_mut(&self.user_id) {
                list.retain(|(id, _)| *id != self.id);
                if list.is_empty() {
                    app.users.remove(&self.user_id);
                }
            }
            if app.total == 0 {
                conns.remove(&self.app_id);
            }
        }
    }
}

impl Hub {
    /// Must be called within a tokio runtime (it starts the reconnect watcher).
    pub fn new(bus: Bus, tuning: Tuning) -> Hub {
        let (reconnects, _) = watch::channel(0);
        let watcher = tokio::spawn(watch_reconnects(bus.clone(), reconnects.clone()));
        Hub(Arc::new(Inner {
            bus,
            tuning,
            feeds: Mutex::default(),
            conns: Mutex::default(),
            next_id: AtomicU64::new(1),
            reconnects,
            watcher,
            recovering: Arc::new(Semaphore::new(RECOVER_CONCURRENCY)),
        }))
    }

    pub fn tuning(&self) -> &Tuning {
        &self.0.tuning
    }

    /// Open sockets on this replica.
    pub fn connections(&self) -> u64 {
        let conns = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.values().map(|a| u64::from(a.total)).sum()
    }

    /// Open sockets per app on this replica (published fleet-wide by [`crate::presence`]).
    pub fn per_app(&self) -> Vec<(String, u32)> {
        let conns = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.iter().map(|(a, c)| (a.clone(), c.total)).collect()
    }

    /// Chats with a live subscription on this replica.
    pub fn feeds(&self) -> usize {
        let feeds = self.0.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Counts a socket against the app's and the user's limits and registers it for notifications.
    pub fn admit(
        &self,
        app_id: &str,
        user_id: &str,
        max_app: u32,
        max_user: u32,
        tx: mpsc::Sender<Utf8Bytes>,
    ) -> Result<Admission, Refused> {
        let mut conns = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        let app = conns.entry(app_id.to_string()).or_default();
        if app.total >= max_app {
            return Err(Refused::App(max_app));
        }
        let list = app.users.entry(user_id.to_string()).or_default();
        if list.len() >= max_user as usize {
            if list.is_empty() {
                app.users.remove(user_id);
            }
            return Err(Refused::User(max_user));
        }
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        list.push((id, tx));
        app.total += 1;
        Ok(Admission {
            hub: self.clone(),
            app_id: app_id.to_string(),
            user_id: user_id.to_string(),
            id,
        })
    }

    /// Hands an ephemeral frame to this replica's sockets of one user of an app, or of every user
    /// when `user_id` is `None`. A socket whose queue is full misses it (notifications are not
    /// durable). Returns how many sockets got it.
    pub fn deliver(&self, app_id: &str, user_id: Option<&str>, json: &Utf8Bytes) -> usize {
        let conns = self.0.conns.lock().unwrap_or_else(|p| p.into_inner());
        let Some(app) = conns.get(app_id) else {
            return 0;
        };
        let send = |list: &Vec<(u64, mpsc::Sender<Utf8Bytes>)>| {
            list.iter()
                .filter(|(_, tx)| tx.try_send(json.clone()).is_ok())
                .count()
        };
        match user_id {
            Some(u) => app.users.get(u).map(send).unwrap_or(0),
            None => app.users.values().map(send).sum(),
        }
    }

    /// Joins a chat's live events and token deltas. The subscription is registered with the
    /// server before this returns, so every event stored after it reaches the returned receiver.
    pub async fn follow(&self, app_id: &str, chat_id: &str) -> Result<Follow, mozaiks_bus::Error> {
        let key = format!("{app_id}.{chat_id}");
        if let Some(f) = self.existing(&key) {
            return Ok(f);
        }
        let bus = &self.0.bus;
        // One subscription: the stored events' republished copies and the token deltas.
        let subject = bus.subjects().chat_live(app_id, chat_id);
        let sub = bus
            .client()
            .subscribe(subject)
            .await
            .map_err(|e| mozaiks_bus::Error::nats("subscribe to the chat's live events", e))?;
        bus.client()
            .flush()
            .await
            .map_err(|e| mozaiks_bus::Error::nats("flush the chat's subscription", e))?;
        let mut feeds = self.0.feeds.lock().unwrap_or_else(|p| p.into_inner());
        // Another socket of the chat may have won the race; ours is dropped (unsubscribed).
        if let Some(f) = feeds.get(&key).and_then(Weak::upgrade) {
            return Ok(Follow::of(f));
        }
        let (tx, _) = broadcast::channel(FEED_CAPACITY);
        let (deltas, _) = broadcast::channel(DELTA_CAPACITY);
        let task = tokio::spawn(run_feed(
            FeedCtx {
                bus: bus.clone(),
                app_id: app_id.to_string(),
                chat_id: chat_id.to_string(),
                events: tx.clone(),
                deltas: deltas.clone(),
                recovering: self.0.recovering.clone(),
            },
            sub,
            self.0.reconnects.subscribe(),
        ));
        let feed = Arc::new(Feed {
            key: key.clone(),
            tx,
            deltas,
            task,
            hub: Arc::downgrade(&self.0),
        });
        metrics::gauge!(m::LIVE_FEEDS).increment(1.0);
        feeds.insert(key, Arc::downgrade(&feed));
        Ok(Follow::of(feed))
    }

    fn existing(&self, key: &str) -> Option<Follow> {
        let feeds = self.0.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let f = feeds.get(key).and_then(Weak::upgrade)?;
        Some(Follow::of(f))
    }
}

/// Watches the NATS connection's connect counter; after a reconnect, once a round trip shows the
/// server has the client's resubscriptions, bumps `reconnects` so every feed checks its log.
async fn watch_reconnects(bus: Bus, reconnects: watch::Sender<u64>) {
    let stats = bus.client().statistics();
    let mut seen = stats.connects.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(RECONNECT_POLL).await;
        let now = stats.connects.load(Ordering::Relaxed);
        if now == seen || !bus.is_connected() {
            continue;
        }
        // The client re-sends its subscriptions right after it reconnects; a flush is a round
        // trip behind them, so events stored after it reach the live subscriptions.
        match tokio::time::timeout(Duration::from_secs(5), bus.client().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "Flush after a reconnect failed; trying again.");
                continue;
            }
            Err(_) => {
                debug!("Flush after a reconnect timed out; trying again.");
                continue;
            }
        }
        seen = now;
        metrics::counter!(m::NATS_RECONNECTS).increment(1);
        info!(
            feeds = reconnects.receiver_count(),
            "NATS connection re-established; checking every followed chat against its log."
        );
        reconnects.send_replace(now);
    }
}

/// What a feed task works with.
struct FeedCtx {
    bus: Bus,
    app_id: String,
    chat_id: String,
    events: broadcast::Sender<Arc<Live>>,
    deltas: broadcast::Sender<Arc<Delta>>,
    recovering: Arc<Semaphore>,
}

async fn run_feed(
    ctx: FeedCtx,
    mut live: async_nats::Subscriber,
    mut reconnects: watch::Receiver<u64>,
) {
    let deltas_subject = ctx.bus.subjects().deltas(&ctx.app_id, &ctx.chat_id);
    // The last event handed to the sockets (0: none yet).
    let mut last = ChatPosition::default();
    // A reconnect happened and the chat's log has not been checked yet.
    let mut check_due: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        tokio::select! {
            msg = live.next() => match msg {
                // A step's deltas reach the server before its `agent.message` is stored, so
                // they arrive first on this one subscription.
                Some(msg) if msg.subject.as_str() == deltas_subject => on_delta(&ctx, &msg),
                Some(msg) => {
                    if let Some(pos) = on_live(&ctx, &msg) {
                        last = pos;
                    }
                }
                None => break,
            },
            Ok(()) = reconnects.changed() => {
                check_due = Some(tokio::time::Instant::now());
                backoff = Duration::from_millis(250);
            }
            _ = tokio::time::sleep_until(check_due.unwrap_or_else(tokio::time::Instant::now)), if check_due.is_some() => {
                // Boxed: the log reads' state would otherwise be part of every idle feed task.
                match Box::pin(recover(&ctx, &mut last)).await {
                    Ok(()) => check_due = None,
                    Err(e) => {
                        debug!(chat_id = %ctx.chat_id, error = %e, "Cannot check the chat's log after a reconnect yet; retrying.");
                        check_due = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }
    debug!("Live feed ended.");
}

/// Hands a stored event to the sockets; its position, or `None` when it is not one.
fn on_live(ctx: &FeedCtx, msg: &async_nats::Message) -> Option<ChatPosition> {
    let stream_seq = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse::<u64>().ok());
    let Some(stream_seq) = stream_seq else {
        warn!(subject = %msg.subject, "Ignoring a live event without Nats-Sequence.");
        return None;
    };
    let env = match codec::decode_event(&msg.payload) {
        Ok(env) => env,
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "Ignoring a live event that does not decode.");
            return None;
        }
    };
    let pos = ChatPosition {
        seq: env.seq,
        stream_seq,
    };
    // No receiver: every socket of the chat left; the feed is being dropped.
    let _ = ctx.events.send(Arc::new(Live::of(&env, stream_seq)));
    Some(pos)
}

/// Validates a delta from the bus and hands it to the sockets.
fn on_delta(ctx: &FeedCtx, msg: &async_nats::Message) {
    let dm = match DeltaMessage::decode(&msg.payload) {
        Ok(dm) if dm.app_id == ctx.app_id && dm.chat_id == ctx.chat_id => dm,
        Ok(dm) => {
            metrics::counter!(m::DELTAS_IN, "outcome" => "invalid").increment(1);
            warn!(app_id = %ctx.app_id, chat_id = %ctx.chat_id, claimed_app_id = %dm.app_id, claimed_chat_id = %dm.chat_id, "Ignoring a delta whose ids do not match its subject.");
            return;
        }
        Err(e) => {
            metrics::counter!(m::DELTAS_IN, "outcome" => "invalid").increment(1);
            warn!(app_id = %ctx.app_id, chat_id = %ctx.chat_id, error = %e, "Ignoring a delta that does not decode.");
            return;
        }
    };
    metrics::counter!(m::DELTAS_IN, "outcome" => "accepted").increment(1);
    let json = Utf8Bytes::from(Frame::delta(dm.id, dm.ts, &dm.delta).to_json());
    let _ = ctx.deltas.send(Arc::new(Delta {
        id: dm.id,
        ts: dm.ts,
        delta: dm.delta,
        json,
    }));
}

/// After a reconnect: hands the sockets what the chat's log got while the subscription was down.
async fn recover(ctx: &FeedCtx, last: &mut ChatPosition) -> Result<(), mozaiks_bus::Error> {
    let _permit = ctx.recovering.acquire().await;
    let Some((head, head_ss)) = ctx.bus.last_event(&ctx.app_id, &ctx.chat_id).await? else {
        metrics::counter!(m::RECONNECT_CHECKS, "outcome" => "current").increment(1);
        return Ok(());
    };
    if head.seq <= last.seq {
        metrics::counter!(m::RECONNECT_CHECKS, "outcome" => "current").increment(1);
        return Ok(());
    }
    // Read the missed events once for every socket when there are few and the feed knows where
    // they start; otherwise hand over the last one: each socket sees its gap and refetches it.
    let missed = if last.stream_seq > 0 && head.seq - last.seq <= RECOVER_MAX {
        ctx.bus
            .read_chat_since(&ctx.app_id, &ctx.chat_id, last.stream_seq)
            .await?
    } else {
        vec![(head, head_ss)]
    };
    let mut handed = 0u64;
    for (env, stream_seq) in missed {
        if env.seq <= last.seq {
            continue;
        }
        *last = ChatPosition {
            seq: env.seq,
            stream_seq,
        };
        let _ = ctx.events.send(Arc::new(Live::of(&env, stream_seq)));
        handed += 1;
    }
    metrics::counter!(m::RECONNECT_CHECKS, "outcome" => "behind").increment(1);
    metrics::counter!(m::RECONNECT_EVENTS).increment(handed);
    info!(app_id = %ctx.app_id, chat_id = %ctx.chat_id, seq = last.seq, events = handed, "Handed events stored during a NATS outage to the chat's sockets.");
    Ok(())
}
