//! Driving the app aggregate over the bus: the control log `MZ_CTL` (append with optimistic
//! concurrency, read back), the view in `MZ_APPS` (forward-only writes), and reconciliation.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use tracing::{info, warn};

use crate::aggregate::{self, AppCommand, AppEvent, AppRecord, Known};
use crate::app::{App, AppStatus};
use crate::{Error, Registry, metrics as m};

/// Attempts of a command whose append meets a concurrent writer (app commands are rare; many
/// writers on one app at once back off with jitter).
const MAX_ATTEMPTS: u32 = 12;

/// An app's state as a command sees it.
struct Loaded {
    state: Option<App>,
    /// The subject sequence the next append expects (0: no events yet).
    expected: u64,
    /// A view written before the control log existed: its events start with an `app.created`
    /// that carries the view as it is.
    adopt: bool,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

impl Registry {
    fn app_subject(&self, app_id: &str) -> String {
        self.bus.subjects().app_log(app_id)
    }

    fn all_apps_subject(&self) -> String {
        self.bus.subjects().all_app_logs()
    }

    async fn ctl_stream(&self) -> Result<jetstream::stream::Stream, Error> {
        self.bus.stream("MZ_CTL").await.map_err(unavailable)
    }

    /// Handles `cmd` for `app_id`: decides the events from the app's current state, appends
    /// them to `MZ_CTL` expecting the app's last event to be the one the state was folded to,
    /// then writes the new view to `MZ_APPS` and returns it. A concurrent writer makes the append
    /// fail; the app is then re-folded from the log and the command decided again.
    /// `workflows` are the shipped workflow names an allowlist is checked against.
    pub async fn execute(
        &self,
        app_id: &str,
        cmd: &AppCommand,
        actor: &str,
        workflows: Option<&[String]>,
    ) -> Result<Arc<App>, Error> {
        let kind = match cmd {
            AppCommand::Create { .. } => "create",
            AppCommand::Patch(_) => "patch",
            AppCommand::SetStorage(_) => "set_storage",
            AppCommand::Delete => "delete",
        };
        let out = self.execute_inner(app_id, cmd, actor, workflows).await;
        let outcome = match &out {
            Ok(_) => "ok",
            Err(Error::Rejected(r)) => r.code(),
            Err(Error::Conflict { .. }) => "conflict",
            Err(_) => "error",
        };
        ::metrics::counter!(m::APP_COMMANDS, "command" => kind, "outcome" => outcome).increment(1);
        out
    }

    async fn execute_inner(
        &self,
        app_id: &str,
        cmd: &AppCommand,
        actor: &str,
        workflows: Option<&[String]>,
    ) -> Result<Arc<App>, Error> {
        let known = Known {
            tiers: &self.tiers,
            workflows,
        };
        for attempt in 0..MAX_ATTEMPTS {
            let loaded = if attempt == 0 {
                self.load(app_id).await?
            } else {
                // Jittered backoff: 0..(5 ms × attempt), so racing writers spread out.
                let jitter = uuid::Uuid::new_v4().as_u128() % (5_000 * u128::from(attempt));
                tokio::time::sleep(Duration::from_micros(jitter as u64)).await;
                self.load_from_log(app_id).await?
            };
            let mut events = aggregate::handle(loaded.state.as_ref(), cmd, &known)?;
            if events.is_empty() {
                let app = loaded
                    .state
                    .ok_or(Error::Rejected(aggregate::Rejection::AppNotFound))?;
                return Ok(Arc::new(app));
            }
            let mut state = loaded.state;
            if loaded.adopt
                && let Some(view) = state.take()
            {
                // The adopted history reproduces the view, status included.
                let mut history = vec![adoption(&view)];
                match view.status {
                    AppStatus::Active => {}
                    AppStatus::Suspended => history.push(AppEvent::Suspended {
                        reason: "adopted".into(),
                    }),
                    AppStatus::Deleted => history.push(AppEvent::Deleted {}),
                }
                events.splice(0..0, history);
            }
            let mut expected = loaded.expected;
            let mut conflicted = false;
            for event in events {
                let rec = AppRecord::new(app_id, actor, event);
                match self.append(&rec, expected).await? {
                    Some(seq) => {
                        ::metrics::counter!(m::APP_EVENTS, "type" => rec.event.type_name())
                            .increment(1);
                        state = aggregate::apply(state, &rec, seq);
                        expected = seq;
                    }
                    None => {
                        conflicted = true;
                        break;
                    }
                }
            }
            if conflicted {
                // Another writer got there first (or the bucket was behind): re-fold and decide
                // again. Events already appended are part of the log and of the re-fold.
                ::metrics::counter!(m::APP_CONFLICTS).increment(1);
                continue;
            }
            let app = state.ok_or_else(|| Error::Corrupt {
                app_id: app_id.into(),
                reason: "events appended but the fold is empty".into(),
            })?;
            info!(app_id, command = ?cmd_name(cmd), version = app.version, "App changed.");
            if let Err(e) = self.write_view(&app).await {
                // The log has the change; reconcile (or the next command) repairs the bucket.
                ::metrics::counter!(m::VIEW_WRITE_FAILURES).increment(1);
                warn!(app_id, error = %e, "App view not written; the reconcile loop will repair it.");
            }
            return Ok(self.remember(app));
        }
        Err(Error::Conflict {
            app_id: app_id.into(),
        })
    }

    /// The app as the bucket has it; a legacy view (version 0) is checked against the log.
    async fn load(&self, app_id: &str) -> Result<Loaded, Error> {
        let view = match self.kv.entry(app_id).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => Some(
                serde_json::from_slice::<App>(&e.value).map_err(|err| Error::Corrupt {
                    app_id: app_id.into(),
                    reason: err.to_string(),
                })?,
            ),
            _ => None,
        };
        match view {
            Some(v) if v.version == 0 => {
                let from_log = self.load_from_log(app_id).await?;
                if from_log.state.is_some() {
                    Ok(from_log)
                } else {
                    Ok(Loaded {
                        state: Some(v),
                        expected: 0,
                        adopt: true,
                    })
                }
            }
            Some(v) => Ok(Loaded {
                expected: v.version,
                state: Some(v),
                adopt: false,
            }),
            None => Ok(Loaded {
                state: None,
                expected: 0,
                adopt: false,
            }),
        }
    }

    /// The app folded from every one of its events on `MZ_CTL`.
    async fn load_from_log(&self, app_id: &str) -> Result<Loaded, Error> {
        let records = self.read_log(app_id).await?;
        let expected = records.last().map(|(_, s)| *s).unwrap_or(0);
        let state = aggregate::fold(records.iter().map(|(r, s)| (r, *s)));
        Ok(Loaded {
            state,
            expected,
            adopt: false,
        })
    }

    /// Every event of an app, in order, with stream sequences.
    pub async fn read_log(&self, app_id: &str) -> Result<Vec<(AppRecord, u64)>, Error> {
        let stream = self.ctl_stream().await?;
        let subject = self.app_subject(app_id);
        let end = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => msg.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(unavailable(e)),
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| unavailable(format!("reading app {app_id}'s log timed out")))?
                .ok_or_else(|| unavailable("control log read ended"))?
                .map_err(unavailable)?;
            let seq = msg.info().map_err(unavailable)?.stream_sequence;
            out.push((decode(app_id, &msg.payload)?, seq));
            if seq >= end {
                return Ok(out);
            }
        }
    }

    /// Appends one record if the app's last event is at `expected` (0: none). `None`: refused
    /// because another writer appended first.
    async fn append(&self, rec: &AppRecord, expected: u64) -> Result<Option<u64>, Error> {
        let payload = serde_json::to_vec(rec).map_err(|e| Error::Corrupt {
            app_id: rec.app_id.clone(),
            reason: e.to_string(),
        })?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", rec.event_id.to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        headers.insert("Mz-Codec", "json");
        let ack = self
            .bus
            .jetstream()
            .publish_with_headers(self.app_subject(&rec.app_id), headers, payload.into())
            .await
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if mozaiks_bus::wrong_last_sequence(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Writes the view unless the bucket already holds the same or a newer version. Idempotent.
    async fn write_view(&self, app: &App) -> Result<(), Error> {
        let bytes = serde_json::to_vec(app).map_err(|e| Error::Corrupt {
            app_id: app.app_id.clone(),
            reason: e.to_string(),
        })?;
        for _ in 0..8 {
            let current = self.kv.entry(&app.app_id).await.map_err(unavailable)?;
            let written = match current {
                Some(e) if e.operation == kv::Operation::Put => {
                    let cur_version = serde_json::from_slice::<App>(&e.value)
                        .map(|a| a.version)
                        .unwrap_or(0);
                    if cur_version >= app.version && cur_version > 0 {
                        return Ok(());
                    }
                    self.kv
                        .update(&app.app_id, bytes.clone().into(), e.revision)
                        .await
                        .is_ok()
                }
                Some(e) => self
                    .kv
                    .update(&app.app_id, bytes.clone().into(), e.revision)
                    .await
                    .is_ok(),
                None => self
                    .kv
                    .create(&app.app_id, bytes.clone().into())
                    .await
                    .is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(Error::Unavailable(format!(
            "view of app {} kept changing under the writer",
            app.app_id
        )))
    }

    /// Compares the last event of every app on `MZ_CTL` with the bucket and rewrites the views
    /// that are behind. Returns how many were rewritten.
    pub async fn reconcile(&self) -> Result<usize, Error> {
        let mut stream = self.ctl_stream().await?;
        if stream.info().await.map_err(unavailable)?.state.messages == 0 {
            return Ok(0);
        }
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.all_apps_subject(),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let pending = consumer.info().await.map_err(unavailable)?.num_pending;
        let mut heads = Vec::new();
        if pending > 0 {
            let subjects = self.bus.subjects();
            let mut messages = consumer.messages().await.map_err(unavailable)?;
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
                    .await
                    .map_err(|_| unavailable("reading the control log's heads timed out"))?
                    .ok_or_else(|| unavailable("control log read ended"))?
                    .map_err(unavailable)?;
                let info = msg.info().map_err(unavailable)?;
                let (seq, left) = (info.stream_sequence, info.pending);
                if let Some(app_id) = subjects.app_log_app(msg.subject.as_str()) {
                    heads.push((app_id.to_string(), seq));
                }
                if left == 0 {
                    break;
                }
            }
        }
        let mut fixed = 0;
        for (app_id, head) in heads {
            let behind = match self.kv.entry(&app_id).await.map_err(unavailable)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    serde_json::from_slice::<App>(&e.value)
                        .map(|a| a.version < head)
                        .unwrap_or(true)
                }
                _ => true,
            };
            if !behind {
                continue;
            }
            let loaded = self.load_from_log(&app_id).await?;
            if let Some(app) = loaded.state {
                warn!(app_id = %app_id, version = app.version, "App view was behind the control log; rewriting it.");
                self.write_view(&app).await?;
                self.remember(app);
                ::metrics::counter!(m::VIEWS_RECONCILED).increment(1);
                fixed += 1;
            }
        }
        Ok(fixed)
    }
}

fn decode(app_id: &str, payload: &[u8]) -> Result<AppRecord, Error> {
    let rec: AppRecord = serde_json::from_slice(payload).map_err(|e| Error::Corrupt {
        app_id: app_id.into(),
        reason: e.to_string(),
    })?;
    if rec.v > AppRecord::VERSION {
        return Err(Error::Corrupt {
            app_id: app_id.into(),
            reason: format!("record version {} is newer than this binary knows", rec.v),
        });
    }
    Ok(rec)
}

/// The `app.created` that adopts a view written before the control log existed.
fn adoption(view: &App) -> AppEvent {
    AppEvent::Created {
        name: view.name.clone(),
        tier: view.tier.clone(),
        workflows: view.workflows.clone(),
        limits: view.limits.clone(),
        context: view.context.clone(),
        runtime_url: view.runtime_url.clone(),
        storage: view.storage.clone(),
    }
}

fn cmd_name(cmd: &AppCommand) -> &'static str {
    match cmd {
        AppCommand::Create { .. } => "create",
        AppCommand::Patch(_) => "patch",
        AppCommand::SetStorage(_) => "set_storage",
        AppCommand::Delete => "delete",
    }
}
