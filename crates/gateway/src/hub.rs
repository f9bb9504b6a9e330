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
//! **Connections.** Every socket is admitted here before its upgrade ([`Hub::admit`]): the per-app
//! and per-user limits are counted per replica, and notifications ([`crate::notify`]) find a user's
//! sockets through the same table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{Frame, codec};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::metrics as m;

/// Live events buffered per chat for sockets that are busy (catching up, or writing). A socket
/// that falls further behind refetches the gap from JetStream.
pub const FEED_CAPACITY: usize = 64;

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
            max_websockets_per_app: 20_000,
            max_websockets_per_user: 50,
            max_frames_per_second: 50,
        }
    }
}

impl Tuning {
    /// The defaults, with `MOZAIKS_WS_PING_SECONDS` and `MOZAIKS_WS_IDLE_SECONDS` applied when set.
    pub fn from_env() -> Tuning {
        let secs = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs)
        };
        let mut t = Tuning::default();
        if let Some(d) = secs("MOZAIKS_WS_PING_SECONDS") {
            t.ping_interval = d;
        }
        if let Some(d) = secs("MOZAIKS_WS_IDLE_SECONDS") {
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

/// One socket's share of a chat's live events.
pub struct Follow {
    _feed: Arc<Feed>,
    pub rx: broadcast::Receiver<Arc<Live>>,
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
    pub fn new(bus: Bus, tuning: Tuning) -> Hub {
        Hub(Arc::new(Inner {
            bus,
            tuning,
            feeds: Mutex::default(),
            conns: Mutex::default(),
            next_id: AtomicU64::new(1),
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

    /// Joins a chat's live events. The subscription is registered with the server before this
    /// returns, so every event stored after it reaches the returned receiver.
    pub async fn follow(&self, app_id: &str, chat_id: &str) -> Result<Follow, mozaiks_bus::Error> {
        let key = format!("{app_id}.{chat_id}");
        if let Some(f) = self.existing(&key) {
            return Ok(f);
        }
        let bus = &self.0.bus;
        let subject = bus
            .subjects()
            .apply(&format!("mz.live.{app_id}.{chat_id}.>"));
        let sub = bus
            .client()
            .subscribe(subject)
            .await
            .map_err(|e| mozaiks_bus::Error::JetStream(e.to_string()))?;
        bus.client()
            .flush()
            .await
            .map_err(|e| mozaiks_bus::Error::JetStream(e.to_string()))?;
        let mut feeds = self.0.feeds.lock().unwrap_or_else(|p| p.into_inner());
        // Another socket of the chat may have won the race; ours is dropped (unsubscribed).
        if let Some(f) = feeds.get(&key).and_then(Weak::upgrade) {
            let rx = f.tx.subscribe();
            return Ok(Follow { _feed: f, rx });
        }
        let (tx, rx) = broadcast::channel(FEED_CAPACITY);
        let task = tokio::spawn(run_feed(sub, tx.clone()));
        let feed = Arc::new(Feed {
            key: key.clone(),
            tx,
            task,
            hub: Arc::downgrade(&self.0),
        });
        metrics::gauge!(m::LIVE_FEEDS).increment(1.0);
        feeds.insert(key, Arc::downgrade(&feed));
        Ok(Follow { _feed: feed, rx })
    }

    fn existing(&self, key: &str) -> Option<Follow> {
        let feeds = self.0.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let f = feeds.get(key).and_then(Weak::upgrade)?;
        let rx = f.tx.subscribe();
        Some(Follow { _feed: f, rx })
    }
}

async fn run_feed(mut sub: async_nats::Subscriber, tx: broadcast::Sender<Arc<Live>>) {
    while let Some(msg) = sub.next().await {
        let stream_seq = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let Some(stream_seq) = stream_seq else {
            warn!(subject = %msg.subject, "Ignoring a live event without Nats-Sequence.");
            continue;
        };
        let env = match codec::decode_event(&msg.payload) {
            Ok(env) => env,
            Err(e) => {
                warn!(subject = %msg.subject, error = %e, "Ignoring a live event that does not decode.");
                continue;
            }
        };
        let live = Live {
            seq: env.seq,
            stream_seq,
            json: Utf8Bytes::from(Frame::from_envelope(&env).to_json()),
        };
        // No receiver: every socket of the chat left; the feed is being dropped.
        let _ = tx.send(Arc::new(live));
    }
    debug!("Live feed ended.");
}
