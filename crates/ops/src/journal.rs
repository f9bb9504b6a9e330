//! What the ops agent records and what the API reads: incidents and actions on `MZ_OPS`, the
//! policy and the actions in force in `MZ_OPS_STATE`. Used by the agent ([`crate::Ops`]) and by
//! the gateway's `/api/ops/*` handlers alike.
//!
//! **Never twice.** An incident event is appended with `Nats-Expected-Last-Subject-Sequence` on
//! its subject (`mz.ops.incident.{rule}.{app_id}`) and a `Nats-Msg-Id` made of its fingerprint and
//! that sequence: a second leader that believed the same thing is refused (it then adopts what is
//! on the log), and a retried publish whose ack was lost is deduplicated. An action is recorded
//! under a `Nats-Msg-Id` of its id (derived from its incident and kind), and at most one action of
//! a kind is in force per app (its `MZ_OPS_STATE` key is created, never overwritten by another).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, kv};
use chrono::Utc;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_control::ops_actions::{OPS_BUCKET, OpsAction, action_key};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::incident::{
    ActionEvent, CloudEvent, Incident, TYPE_ACTION_APPLIED, TYPE_ACTION_REVERTED, action_subject,
    incident_subject,
};
use crate::policy::{self, Policy, PolicyError};

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ops journal unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

/// What an append of an incident found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this stream sequence (or had been: a deduplicated retry).
    At(u64),
    /// Somebody appended to the subject first.
    Conflict,
}

/// The longest a read of the journal waits for the next message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most events a list reads back.
const MAX_READ: usize = 20_000;

/// The journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    bus: Bus,
    kv: kv::Store,
    source: String,
}

impl Journal {
    /// Opens `MZ_OPS_STATE` (applied from `streams/`). `source` is the CloudEvents `source` of
    /// what this process records (e.g. `mozaiks/ops/{instance}`).
    pub async fn open(bus: &Bus, source: impl Into<String>) -> Result<Journal, Error> {
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(OPS_BUCKET))
            .await
            .map_err(unavailable)?;
        Ok(Journal {
            bus: bus.clone(),
            kv,
            source: source.into(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    // ---- policy ----

    /// The stored patch under `key`, if any.
    pub async fn patch(&self, key: &str) -> Result<Option<Value>, Error> {
        match self.kv.entry(key).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(serde_json::from_slice(&e.value).ok())
            }
            _ => Ok(None),
        }
    }

    /// The effective policy of `app_id` (or the default).
    pub async fn policy(&self, app_id: Option<&str>) -> Result<Policy, Error> {
        let d = self.patch(policy::DEFAULT_KEY).await?;
        let a = match app_id {
            Some(app) => self.patch(&policy::app_key(app)).await?,
            None => None,
        };
        Ok(Policy::effective(d.as_ref(), a.as_ref())?)
    }

    /// Checks `patch` (over the stored default, and for an app under its overrides) and stores
    /// it; returns the effective policy. A refused body stores nothing.
    pub async fn put_policy(&self, app_id: Option<&str>, patch: Value) -> Result<Policy, Error> {
        let effective = match app_id {
            None => Policy::effective(Some(&patch), None)?,
            Some(_) => {
                let d = self.patch(policy::DEFAULT_KEY).await?;
                Policy::effective(d.as_ref(), Some(&patch))?
            }
        };
        let key = match app_id {
            None => policy::DEFAULT_KEY.to_string(),
            Some(app) => policy::app_key(app),
        };
        let bytes = serde_json::to_vec(&patch).map_err(unavailable)?;
        self.kv.put(key, bytes.into()).await.map_err(unavailable)?;
        Ok(effective)
    }

    // ---- incidents ----

    async fn ops_stream(&self) -> Result<jetstream::stream::Stream, Error> {
        self.bus.stream("MZ_OPS").await.map_err(unavailable)
    }

    /// Appends an incident event if its subject's last sequence is `expected` (0: none).
    pub async fn append_incident(
        &self,
        ev: &CloudEvent<Incident>,
        expected: u64,
    ) -> Result<Appended, Error> {
        let inc = &ev.data;
        let subject = incident_subject(self.bus.subjects(), &inc.rule, &inc.app_id);
        let id = format!("inc:{}:{expected}", inc.fingerprint);
        self.append_expecting(subject, &id, expected, ev).await
    }

    /// Publishes `ev` on `subject` if the subject's last sequence is `expected`, deduplicated by
    /// `msg_id` (a retried publish whose ack was lost).
    pub(crate) async fn append_expecting<T: serde::Serialize>(
        &self,
        subject: String,
        msg_id: &str,
        expected: u64,
        ev: &CloudEvent<T>,
    ) -> Result<Appended, Error> {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", msg_id);
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        h.insert("Content-Type", "application/cloudevents+json");
        let body = serde_json::to_vec(ev).map_err(unavailable)?;
        let ack = self
            .bus
            .jetstream()
            .publish_with_headers(subject, h, body.into())
            .await
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(a) => Ok(Appended::At(a.sequence)),
            Err(e) if mozaiks_bus::wrong_last_sequence(&e) => Ok(Appended::Conflict),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The last incident event of `rule` for `app_id`, with its sequence.
    pub async fn last_incident(
        &self,
        rule: &str,
        app_id: &str,
    ) -> Result<Option<(u64, CloudEvent<Incident>)>, Error> {
        let stream = self.ops_stream().await?;
        let subject = incident_subject(self.bus.subjects(), rule, app_id);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(serde_json::from_slice(&m.payload)
                .ok()
                .map(|ev| (m.sequence, ev))),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Reads every message on `filter` (`last_per_subject`: only each subject's last), in order,
    /// with its sequence; messages that do not parse are skipped.
    pub(crate) async fn read_events<T: DeserializeOwned>(
        &self,
        filter: String,
        last_per_subject: bool,
    ) -> Result<Vec<(u64, T)>, Error> {
        let mut stream = self.ops_stream().await?;
        if stream.info().await.map_err(unavailable)?.state.messages == 0 {
            return Ok(Vec::new());
        }
        let mut c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: if last_per_subject {
                    consumer::DeliverPolicy::LastPerSubject
                } else {
                    consumer::DeliverPolicy::All
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let pending = c.info().await.map_err(unavailable)?.num_pending;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        let mut messages = c.messages().await.map_err(unavailable)?;
        loop {
            let msg = tokio::time::timeout(READ_TIMEOUT, messages.next())
                .await
                .map_err(|_| unavailable("reading MZ_OPS timed out"))?
                .ok_or_else(|| unavailable("MZ_OPS read ended"))?
                .map_err(unavailable)?;
            let info = msg.info().map_err(unavailable)?;
            let (seq, left) = (info.stream_sequence, info.pending);
            if let Ok(v) = serde_json::from_slice(&msg.payload) {
                out.push((seq, v));
            }
            if left == 0 || out.len() >= MAX_READ {
                return Ok(out);
            }
        }
    }

    /// Each `(rule, app)`'s last incident event (a firing one is open), with its sequence.
    pub async fn incident_heads(&self) -> Result<Vec<(u64, CloudEvent<Incident>)>, Error> {
        self.read_events(self.bus.subjects().ops("incident.>"), true)
            .await
    }

    /// Every incident (of `app_id`, or of every app), each as its latest event, newest first.
    pub async fn incidents(&self, app_id: Option<&str>) -> Result<Vec<Incident>, Error> {
        let filter = self
            .bus
            .subjects()
            .ops(&format!("incident.*.{}", app_id.unwrap_or("*")));
        let all: Vec<(u64, CloudEvent<Incident>)> = self.read_events(filter, false).await?;
        let mut by_id: std::collections::HashMap<String, Incident> = Default::default();
        for (_, ev) in all {
            by_id.insert(ev.data.incident_id.clone(), ev.data);
        }
        let mut out: Vec<Incident> = by_id.into_values().collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.starts_at));
        Ok(out)
    }

    // ---- actions ----

    /// Records `action` (applied) on `mz.ops.action.{kind}.{app_id}` and, for one with a TTL,
    /// puts it in force in `MZ_OPS_STATE` unless another action of its kind is in force for the
    /// app. Returns the action in force afterwards (`action`, or the one already there), or
    /// `None` for an action without a lasting effect. Idempotent.
    pub async fn apply(&self, action: &OpsAction) -> Result<Option<OpsAction>, Error> {
        let in_force = if action.expires_at.is_some() {
            let key = action_key(&action.app_id, &action.kind);
            let bytes = serde_json::to_vec(action).map_err(unavailable)?;
            match self.kv.create(&key, bytes.into()).await {
                Ok(_) => Some(action.clone()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match self.kv.entry(&key).await.map_err(unavailable)? {
                        Some(e) => serde_json::from_slice::<OpsAction>(&e.value).ok(),
                        None => None,
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        } else {
            None
        };
        // Another action of the kind was already in force: this one is not taken.
        if let Some(other) = &in_force
            && other.action_id != action.action_id
        {
            return Ok(in_force);
        }
        self.record(action, "applied", None).await?;
        Ok(in_force)
    }

    async fn record(
        &self,
        action: &OpsAction,
        status: &str,
        by: Option<&str>,
    ) -> Result<(), Error> {
        let reverted = status != "applied";
        let ev = CloudEvent::new(
            &self.source,
            if reverted {
                TYPE_ACTION_REVERTED
            } else {
                TYPE_ACTION_APPLIED
            },
            &action.app_id,
            ActionEvent {
                action: action.clone(),
                status: status.to_string(),
                reverted_at: reverted.then(Utc::now),
                reverted_by: by.map(str::to_string),
            },
        );
        let mut h = HeaderMap::new();
        let phase = if reverted { "reverted" } else { "applied" };
        h.insert(
            "Nats-Msg-Id",
            format!("act:{}:{phase}", action.action_id).as_str(),
        );
        h.insert("Content-Type", "application/cloudevents+json");
        let body = serde_json::to_vec(&ev).map_err(unavailable)?;
        self.bus
            .jetstream()
            .publish_with_headers(
                action_subject(self.bus.subjects(), &action.kind, &action.app_id),
                h,
                body.into(),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Ends `action` (`status`: `reverted` by hand, or `expired` at its TTL): records it and
    /// takes it out of force (only if it is still the one in force). Idempotent.
    pub async fn revert(&self, action: &OpsAction, status: &str, by: &str) -> Result<(), Error> {
        self.record(action, status, Some(by)).await?;
        let key = action_key(&action.app_id, &action.kind);
        if let Some(e) = self.kv.entry(&key).await.map_err(unavailable)?
            && e.operation == kv::Operation::Put
            && serde_json::from_slice::<OpsAction>(&e.value)
                .is_ok_and(|a| a.action_id == action.action_id)
        {
            // Refused if rewritten meanwhile: then it is another action's key.
            let _ = self.kv.delete_expect_revision(&key, Some(e.revision)).await;
        }
        Ok(())
    }

    /// The actions written in force (expired ones included: the agent reverts them).
    pub async fn in_force(&self) -> Result<Vec<OpsAction>, Error> {
        let mut keys = self.kv.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            if !k.starts_with("action.") {
                continue;
            }
            if let Some(e) = self.kv.entry(&k).await.map_err(unavailable)?
                && e.operation == kv::Operation::Put
                && let Ok(a) = serde_json::from_slice::<OpsAction>(&e.value)
            {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Every action (of `app_id`, or of every app) as its latest event, newest first; an
    /// `applied` one whose TTL passed reads `expired`.
    pub async fn actions(&self, app_id: Option<&str>) -> Result<Vec<ActionEvent>, Error> {
        let filter = self
            .bus
            .subjects()
            .ops(&format!("action.*.{}", app_id.unwrap_or("*")));
        let all: Vec<(u64, CloudEvent<ActionEvent>)> = self.read_events(filter, false).await?;
        let mut by_id: std::collections::HashMap<String, ActionEvent> = Default::default();
        for (_, ev) in all {
            by_id.insert(ev.data.action.action_id.clone(), ev.data);
        }
        let now = Utc::now();
        let mut out: Vec<ActionEvent> = by_id
            .into_values()
            .map(|mut a| {
                if a.status == "applied" && !a.action.in_force(now) {
                    a.status = "expired".into();
                }
                a
            })
            .collect();
        out.sort_by_key(|a| std::cmp::Reverse(a.action.created_at));
        Ok(out)
    }
}
