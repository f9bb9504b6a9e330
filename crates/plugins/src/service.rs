//! The plugins of a process: shipped packs and the apps' uploads, access, settings, execution
//! and its `plugin.executed` record.
//!
//! `MZ_PLUGIN_KV` keys (every part a checked token or hex, so nothing of one app is reachable
//! from another's keys):
//!
//! | key | value |
//! |---|---|
//! | `d.{app_id}.{plugin}.u.{hex user}.{hex key}` / `d.{app_id}.{plugin}.a.{hex key}` | a plugin's data (per user / per app) |
//! | `s.{app_id}.{plugin}.{hex user}` | a user's settings of a plugin (JSON object) |
//! | `m.{app_id}.{plugin}` | the app's upload of a plugin ([`Upload`]); the module is in `MZ_PLUGIN_MODULES` |
//! | `i.{app_id}` | the names the app uploaded (JSON array) |
//! | `e.{app_id}` | the app's enabled list (JSON array); absent: every plugin its tier allows |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, object_store};
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use crate::host::{CallContext, Io};
use crate::sandbox::{Compiled, hex};
use crate::{Access, Error, Manifest, Packs, Sandbox, metrics as m};

/// Largest input of one execution (the client's JSON), in bytes.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;
/// Largest settings object, in bytes.
pub const MAX_SETTINGS_BYTES: usize = 16 * 1024;
/// Most plugins an app may upload.
pub const MAX_UPLOADS: usize = 64;

/// How an execution was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `POST /api/execute/{plugin}`.
    Http,
    /// A workflow's tool (`plugin: <name>` in a pack).
    Tool,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Tool => "tool",
        }
    }
}

/// One execution: who asks (from the verified token, never the client's body) and the input.
#[derive(Clone, Debug)]
pub struct Call {
    pub app_id: String,
    /// The app's tier (for [`Access`]).
    pub tier: String,
    pub user_id: String,
    pub roles: Vec<String>,
    pub request_id: String,
    pub plugin: String,
    /// The client's JSON object; its `_context`, `app_id` and `user_id` are replaced.
    pub input: Value,
    pub via: Via,
    /// The chat of a tool call.
    pub chat_id: Option<String>,
}

/// A successful execution.
#[derive(Clone, Debug)]
pub struct Executed {
    pub output: Value,
    pub version: String,
    pub duration: Duration,
    pub fuel_used: u64,
}

/// `plugin.executed`: one execution, on `mz.plugin.executed.{app_id}.{plugin}` (stream
/// `MZ_PLUGINS`, JSON). Schema: `schemas/plugin.executed.schema.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PluginExecuted {
    /// Always `plugin.executed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// UUID v7, also the message's `Nats-Msg-Id`.
    pub event_id: String,
    pub app_id: String,
    pub plugin: String,
    pub version: String,
    /// `shipped` or `uploaded`.
    pub source: String,
    pub user_id: String,
    pub request_id: String,
    pub via: Via,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<String>,
    pub duration_ms: f64,
    pub fuel_used: u64,
    /// `ok`, `plugin_error`, `plugin_trapped` or `plugin_timeout`.
    pub outcome: String,
    /// The plugin's own error code (`outcome: plugin_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub ts: DateTime<Utc>,
}

/// An app's upload of a plugin (`m.{app_id}.{plugin}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    pub manifest: Manifest,
    /// SHA-256 of the module, hex.
    pub digest: String,
    pub size: usize,
    /// The module's object in `MZ_PLUGIN_MODULES`: `{app_id}/{plugin}/{version}`.
    pub object: String,
    pub uploaded_at: DateTime<Utc>,
    pub uploaded_by: String,
}

/// One plugin an app may see.
#[derive(Clone, Debug, Serialize)]
pub struct Listing {
    pub name: String,
    pub version: String,
    pub description: String,
    /// `shipped` or `uploaded`.
    pub source: &'static str,
    /// Whether the app may run it now (tier and enabled list).
    pub allowed: bool,
}

/// A resolved plugin.
struct Resolved {
    manifest: Manifest,
    compiled: Arc<Compiled>,
    uploaded: bool,
}

/// The plugins of a process. Cheap to clone.
#[derive(Clone)]
pub struct Plugins(Arc<Inner>);

struct Inner {
    sandbox: Sandbox,
    io: Arc<Io>,
    bus: Bus,
    kv: kv::Store,
    objects: object_store::ObjectStore,
    shipped: BTreeMap<String, (Manifest, Arc<Compiled>)>,
    access: Access,
    /// Calls in progress per app on this replica.
    inflight: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// Most calls of one app running at once on one replica.
pub const MAX_INFLIGHT_PER_APP: u32 = 4;

/// An in-flight slot of an app, given back when dropped.
struct Slot {
    plugins: Plugins,
    app_id: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inflight = self.plugins.0.inflight.lock().expect("inflight lock");
        if let Some(n) = inflight.get_mut(&self.app_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inflight.remove(&self.app_id);
            }
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("the plugin store ({e})"))
}

impl Plugins {
    /// Opens the buckets (applied from `streams/`) and compiles every shipped pack of `dir`
    /// with `dir/access.yaml` (or the embedded one).
    pub async fn open(bus: &Bus, dir: &Path) -> Result<Plugins, Error> {
        let packs = Packs::load_dir(dir)?;
        let access = Access::load(dir)?;
        Plugins::open_with(bus, packs, access).await
    }

    pub async fn open_with(bus: &Bus, packs: Packs, access: Access) -> Result<Plugins, Error> {
        m::describe();
        let sandbox = Sandbox::new()?;
        let sb = sandbox.clone();
        let shipped = tokio::task::spawn_blocking(move || {
            let mut shipped = BTreeMap::new();
            for (name, pack) in packs.packs {
                let compiled = sb.compile(&pack.module).map_err(|e| {
                    Error::InvalidModule(format!("plugins/{name}: {}", e.message()))
                })?;
                shipped.insert(name, (pack.manifest, compiled));
            }
            Ok::<_, Error>(shipped)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let js = bus.jetstream();
        let kv = js
            .get_key_value(bus.subjects().name("MZ_PLUGIN_KV"))
            .await
            .map_err(unavailable)?;
        let objects = js
            .get_object_store(bus.subjects().name("MZ_PLUGIN_MODULES"))
            .await
            .map_err(unavailable)?;
        let io = Arc::new(Io {
            rt: tokio::runtime::Handle::current(),
            bus: bus.clone(),
            kv: kv.clone(),
            http: crate::host::http_client(),
        });
        info!(shipped = shipped.len(), "Plugins ready.");
        Ok(Plugins(Arc::new(Inner {
            sandbox,
            io,
            bus: bus.clone(),
            kv,
            objects,
            shipped,
            access,
            inflight: Default::default(),
        })))
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.0.sandbox
    }

    /// Names of the shipped packs.
    pub fn shipped(&self) -> Vec<String> {
        self.0.shipped.keys().cloned().collect()
    }

    /// Runs a plugin for `call`, records `plugin.executed` and the metrics.
    pub async fn execute(&self, call: Call) -> Result<Executed, Error> {
        crate::manifest::check_name(&call.plugin)
            .map_err(|_| Error::NotFound(call.plugin.clone()))?;
        let Value::Object(mut input) = call.input.clone() else {
            return Err(Error::InvalidInput("the body must be a JSON object".into()));
        };
        // Three reads of MZ_PLUGIN_KV at once: the app's upload, its enabled list, the settings.
        let (resolved, enabled, settings) = tokio::join!(
            self.resolve(&call.app_id, &call.plugin),
            self.enabled(&call.app_id),
            self.settings(&call.app_id, &call.user_id, &call.plugin),
        );
        let resolved = resolved?;
        self.check_access(&call.tier, &call.plugin, resolved.uploaded, enabled?)?;
        let settings = settings?;
        // At most MAX_INFLIGHT_PER_APP calls of one app at once on this replica: one tenant
        // cannot hold every sandbox thread.
        let _slot = self.slot(&call.app_id)?;
        // The server's context replaces whatever the client sent under these names.
        input.insert("app_id".into(), Value::String(call.app_id.clone()));
        input.insert("user_id".into(), Value::String(call.user_id.clone()));
        input.insert(
            "_context".into(),
            json!({
                "app_id": call.app_id,
                "user_id": call.user_id,
                "roles": call.roles,
                "request_id": call.request_id,
                "settings": settings,
            }),
        );
        let bytes = serde_json::to_vec(&Value::Object(input))
            .map_err(|e| Error::Internal(e.to_string()))?;
        if bytes.len() > MAX_INPUT_BYTES + MAX_SETTINGS_BYTES + 1024 {
            return Err(Error::TooLarge(format!(
                "the input is larger than {MAX_INPUT_BYTES} bytes"
            )));
        }
        let ctx = CallContext {
            app_id: call.app_id.clone(),
            user_id: call.user_id.clone(),
            plugin: call.plugin.clone(),
            request_id: call.request_id.clone(),
            http_allowlist: resolved.manifest.limits_hosts(),
        };
        let sandbox = self.0.sandbox.clone();
        let io = self.0.io.clone();
        let limits = resolved.manifest.limits;
        let compiled = resolved.compiled.clone();
        let ran = tokio::task::spawn_blocking(move || {
            sandbox.run(&compiled, bytes, ctx, limits, Some(io))
        })
        .await
        .map_err(|e| Error::Internal(format!("the sandbox thread failed: {e}")))?;
        let (outcome, fuel_used, duration, error_code) = match &ran {
            Ok(r) => ("ok", r.fuel_used, r.duration, None),
            Err(f) => {
                let code = match &f.error {
                    Error::Plugin { code, .. } => Some(code.clone()),
                    _ => None,
                };
                (f.error.code(), f.fuel_used, f.duration, code)
            }
        };
        let labels = [
            ("app_id", call.app_id.clone()),
            ("plugin", call.plugin.clone()),
        ];
        metrics::counter!(m::EXECUTIONS, "app_id" => call.app_id.clone(), "plugin" => call.plugin.clone(), "via" => call.via.as_str(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(m::EXECUTION_SECONDS, &labels).record(duration.as_secs_f64());
        metrics::histogram!(m::FUEL_USED, &labels).record(fuel_used as f64);
        let record = PluginExecuted {
            kind: "plugin.executed".into(),
            event_id: uuid::Uuid::now_v7().to_string(),
            app_id: call.app_id.clone(),
            plugin: call.plugin.clone(),
            version: resolved.manifest.version.clone(),
            source: if resolved.uploaded {
                "uploaded"
            } else {
                "shipped"
            }
            .into(),
            user_id: call.user_id.clone(),
            request_id: call.request_id.clone(),
            via: call.via,
            chat_id: call.chat_id.clone(),
            duration_ms: duration.as_secs_f64() * 1000.0,
            fuel_used,
            outcome: outcome.into(),
            error_code,
            ts: Utc::now(),
        };
        self.record(&record).await;
        match ran {
            Ok(r) => {
                debug!(app_id = %call.app_id, plugin = %call.plugin, fuel_used, "Plugin executed.");
                Ok(Executed {
                    output: r.output,
                    version: resolved.manifest.version,
                    duration: r.duration,
                    fuel_used: r.fuel_used,
                })
            }
            Err(f) => {
                info!(app_id = %call.app_id, plugin = %call.plugin, code = f.error.code(), error = %f.error, "Plugin execution failed.");
                Err(f.error)
            }
        }
    }

    /// Publishes a `plugin.executed` record; a failure is logged, never the caller's error.
    async fn record(&self, record: &PluginExecuted) {
        let subject = format!(
            "{}mz.plugin.executed.{}.{}",
            self.0.bus.subjects().prefix(),
            record.app_id,
            record.plugin
        );
        let payload = match serde_json::to_vec(record) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "Cannot encode plugin.executed.");
                return;
            }
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", record.event_id.as_str());
        let js = self.0.bus.jetstream().clone();
        let app_id = record.app_id.clone();
        // Not on the caller's path: the ack is awaited in the background.
        match js
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            Ok(ack) => {
                tokio::spawn(async move {
                    if let Err(e) = ack.await {
                        warn!(app_id = %app_id, error = %e, "plugin.executed not stored.");
                    }
                });
            }
            Err(e) => warn!(app_id = %app_id, error = %e, "plugin.executed not published."),
        }
    }

    /// The app's upload of `name`, else the shipped pack.
    async fn resolve(&self, app_id: &str, name: &str) -> Result<Resolved, Error> {
        if let Some(up) = self.upload(app_id, name).await? {
            let compiled = match self.0.sandbox.cached(&up.digest) {
                Some(c) => c,
                None => {
                    let bytes = self.module_bytes(&up.object).await?;
                    let sb = self.0.sandbox.clone();
                    tokio::task::spawn_blocking(move || sb.compile(&bytes))
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))??
                }
            };
            return Ok(Resolved {
                manifest: up.manifest,
                compiled,
                uploaded: true,
            });
        }
        match self.0.shipped.get(name) {
            Some((manifest, compiled)) => Ok(Resolved {
                manifest: manifest.clone(),
                compiled: compiled.clone(),
                uploaded: false,
            }),
            None => Err(Error::NotFound(name.into())),
        }
    }

    async fn module_bytes(&self, object: &str) -> Result<Vec<u8>, Error> {
        let mut obj = self.0.objects.get(object).await.map_err(unavailable)?;
        let mut bytes = Vec::new();
        obj.read_to_end(&mut bytes).await.map_err(unavailable)?;
        Ok(bytes)
    }

    /// The app's upload of `name`, if any.
    pub async fn upload(&self, app_id: &str, name: &str) -> Result<Option<Upload>, Error> {
        let key = format!("m.{app_id}.{name}");
        match self.0.kv.get(key).await.map_err(unavailable)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Internal(format!("upload record {app_id}/{name}: {e}"))),
        }
    }

    /// Takes one of the app's in-flight slots on this replica (`plugin_busy` when all are taken).
    fn slot(&self, app_id: &str) -> Result<Slot, Error> {
        let mut inflight = self.0.inflight.lock().expect("inflight lock");
        let n = inflight.entry(app_id.to_string()).or_insert(0);
        if *n >= MAX_INFLIGHT_PER_APP {
            return Err(Error::Busy(format!(
                "the app already runs {MAX_INFLIGHT_PER_APP} plugin calls on this replica; retry"
            )));
        }
        *n += 1;
        Ok(Slot {
            plugins: self.clone(),
            app_id: app_id.to_string(),
        })
    }

    /// Whether the app may run `name` now: its tier, then its enabled list.
    fn check_access(
        &self,
        tier: &str,
        name: &str,
        uploaded: bool,
        enabled: Option<Vec<String>>,
    ) -> Result<(), Error> {
        let by_tier = if uploaded {
            self.0.access.allows_uploads(tier)
        } else {
            self.0.access.allows_shipped(tier, name)
        };
        if !by_tier {
            return Err(Error::NotAllowed(format!(
                "the app's tier {tier:?} does not include plugin {name:?}"
            )));
        }
        if let Some(list) = enabled
            && !list.iter().any(|n| n == name)
        {
            return Err(Error::NotAllowed(format!(
                "plugin {name:?} is not in the app's enabled list"
            )));
        }
        Ok(())
    }

    /// The app's enabled list (`None`: every plugin its tier allows).
    pub async fn enabled(&self, app_id: &str) -> Result<Option<Vec<String>>, Error> {
        match self
            .0
            .kv
            .get(format!("e.{app_id}"))
            .await
            .map_err(unavailable)?
        {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Internal(format!("enabled list of {app_id}: {e}"))),
        }
    }

    /// Sets (or with `None` clears) the app's enabled list.
    pub async fn set_enabled(&self, app_id: &str, list: Option<Vec<String>>) -> Result<(), Error> {
        if let Some(list) = &list {
            if list.len() > 256 {
                return Err(Error::InvalidInput("at most 256 plugins".into()));
            }
            for n in list {
                crate::manifest::check_name(n).map_err(|e| Error::InvalidInput(e.message()))?;
            }
        }
        let bytes = serde_json::to_vec(&list).map_err(|e| Error::Internal(e.to_string()))?;
        self.0
            .kv
            .put(format!("e.{app_id}"), bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Every plugin the app can see: the shipped packs and its uploads, with whether it may run
    /// each now.
    pub async fn list(&self, app_id: &str, tier: &str) -> Result<Vec<Listing>, Error> {
        let enabled = self.enabled(app_id).await?;
        let on = |name: &str| enabled.as_ref().is_none_or(|l| l.iter().any(|n| n == name));
        let mut out = Vec::new();
        let uploads = self.uploaded_names(app_id).await?;
        for name in &uploads {
            if let Some(up) = self.upload(app_id, name).await? {
                out.push(Listing {
                    name: name.clone(),
                    version: up.manifest.version,
                    description: up.manifest.description,
                    source: "uploaded",
                    allowed: self.0.access.allows_uploads(tier) && on(name),
                });
            }
        }
        for (name, (manifest, _)) in &self.0.shipped {
            if uploads.contains(name) {
                continue;
            }
            out.push(Listing {
                name: name.clone(),
                version: manifest.version.clone(),
                description: manifest.description.clone(),
                source: "shipped",
                allowed: self.0.access.allows_shipped(tier, name) && on(name),
            });
        }
        Ok(out)
    }

    async fn uploaded_names(&self, app_id: &str) -> Result<Vec<String>, Error> {
        match self
            .0
            .kv
            .entry(format!("i.{app_id}"))
            .await
            .map_err(unavailable)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(serde_json::from_slice(&e.value).unwrap_or_default())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Stores an app's plugin: checks the manifest and compiles the module first, then writes the
    /// module to `MZ_PLUGIN_MODULES` and the record to `MZ_PLUGIN_KV` (every replica reads it on
    /// the next call).
    pub async fn store_upload(
        &self,
        app_id: &str,
        tier: &str,
        uploaded_by: &str,
        mut manifest: Manifest,
        module: Vec<u8>,
    ) -> Result<Upload, Error> {
        let outcome = self
            .store_upload_inner(app_id, tier, uploaded_by, &mut manifest, module)
            .await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::counter!(m::UPLOADS, "app_id" => app_id.to_string(), "outcome" => label)
            .increment(1);
        outcome
    }

    async fn store_upload_inner(
        &self,
        app_id: &str,
        tier: &str,
        uploaded_by: &str,
        manifest: &mut Manifest,
        module: Vec<u8>,
    ) -> Result<Upload, Error> {
        if !self.0.access.allows_uploads(tier) {
            return Err(Error::NotAllowed(format!(
                "the app's tier {tier:?} does not include uploaded plugins"
            )));
        }
        manifest.module.clear();
        manifest.validate()?;
        let sb = self.0.sandbox.clone();
        let bytes = Arc::new(module);
        let b = bytes.clone();
        let compiled = tokio::task::spawn_blocking(move || sb.compile(&b))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let name = manifest.name.clone();
        let mut names = self.uploaded_names(app_id).await?;
        if !names.contains(&name) {
            if names.len() >= MAX_UPLOADS {
                return Err(Error::TooLarge(format!(
                    "an app may upload at most {MAX_UPLOADS} plugins"
                )));
            }
            names.push(name.clone());
            names.sort();
        }
        let object = format!("{app_id}/{name}/{}", manifest.version);
        let meta = object_store::ObjectMetadata {
            name: object.clone(),
            description: Some(format!(
                "plugin {name} {} of app {app_id}",
                manifest.version
            )),
            ..Default::default()
        };
        let mut reader: &[u8] = &bytes;
        self.0
            .objects
            .put(meta, &mut reader)
            .await
            .map_err(unavailable)?;
        let up = Upload {
            manifest: manifest.clone(),
            digest: compiled.digest.clone(),
            size: bytes.len(),
            object,
            uploaded_at: Utc::now(),
            uploaded_by: uploaded_by.into(),
        };
        let rec = serde_json::to_vec(&up).map_err(|e| Error::Internal(e.to_string()))?;
        self.0
            .kv
            .put(format!("m.{app_id}.{name}"), rec.into())
            .await
            .map_err(unavailable)?;
        let list = serde_json::to_vec(&names).map_err(|e| Error::Internal(e.to_string()))?;
        self.0
            .kv
            .put(format!("i.{app_id}"), list.into())
            .await
            .map_err(unavailable)?;
        info!(app_id = %app_id, plugin = %name, version = %up.manifest.version, digest = %up.digest, "Plugin uploaded.");
        Ok(up)
    }

    /// The app's executions per plugin still in `MZ_PLUGINS` (30 days): the subject counts of
    /// its `plugin.executed` records, one per execution (deduplicated on the record's id).
    pub async fn usage(&self, app_id: &str) -> Result<BTreeMap<String, u64>, Error> {
        use futures::StreamExt;
        let stream = self.0.bus.stream("MZ_PLUGINS").await.map_err(unavailable)?;
        let prefix = format!(
            "{}mz.plugin.executed.{app_id}.",
            self.0.bus.subjects().prefix()
        );
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(unavailable)?;
        let mut counts = BTreeMap::new();
        while let Some(item) = subjects.next().await {
            let (subject, n) = item.map_err(unavailable)?;
            if let Some(plugin) = subject.strip_prefix(&prefix) {
                counts.insert(plugin.to_string(), n as u64);
            }
        }
        Ok(counts)
    }

    /// The app's executions with `ts` in `[from, to)` still in `MZ_PLUGINS` (30 days), oldest
    /// first; `Err(TooLarge)` past `max` of them.
    pub async fn executions(
        &self,
        app_id: &str,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        max: usize,
    ) -> Result<Vec<PluginExecuted>, Error> {
        use async_nats::jetstream::consumer;
        use futures::StreamExt;
        let stream = self.0.bus.stream("MZ_PLUGINS").await.map_err(unavailable)?;
        let deliver_policy = match from.and_then(|f| {
            time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(f.timestamp()) * 1_000_000_000 + i128::from(f.timestamp_subsec_nanos()),
            )
            .ok()
        }) {
            Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            None => consumer::DeliverPolicy::All,
        };
        let mut c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!(
                    "{}mz.plugin.executed.{app_id}.*",
                    self.0.bus.subjects().prefix()
                ),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        if c.info().await.map_err(unavailable)?.num_pending == 0 {
            return Ok(out);
        }
        let mut messages = c.messages().await.map_err(unavailable)?;
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| unavailable("MZ_PLUGINS did not answer within 10 s"))?
        {
            let msg = msg.map_err(unavailable)?;
            let pending = msg.info().map(|i| i.pending).unwrap_or(0);
            match serde_json::from_slice::<PluginExecuted>(&msg.payload) {
                Ok(e) if to.is_some_and(|t| e.ts >= t) => break,
                Ok(e) if from.is_none_or(|f| e.ts >= f) => {
                    if out.len() == max {
                        return Err(Error::TooLarge(format!(
                            "more than {max} plugin executions in the range: narrow from and to"
                        )));
                    }
                    out.push(e);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "A plugin.executed that does not parse; skipped.")
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// A user's settings of a plugin (`{}` when none).
    pub async fn settings(
        &self,
        app_id: &str,
        user_id: &str,
        plugin: &str,
    ) -> Result<Value, Error> {
        let key = settings_key(app_id, user_id, plugin);
        match self.0.kv.get(key).await.map_err(unavailable)? {
            None => Ok(Value::Object(Map::new())),
            Some(b) => {
                serde_json::from_slice(&b).map_err(|e| Error::Internal(format!("settings: {e}")))
            }
        }
    }

    /// Replaces a user's settings of a plugin (a JSON object up to 16 KiB). The plugin must be
    /// one the app can see.
    pub async fn set_settings(
        &self,
        app_id: &str,
        user_id: &str,
        plugin: &str,
        value: Value,
    ) -> Result<Value, Error> {
        if !value.is_object() {
            return Err(Error::InvalidInput("settings must be a JSON object".into()));
        }
        let bytes = serde_json::to_vec(&value).map_err(|e| Error::Internal(e.to_string()))?;
        if bytes.len() > MAX_SETTINGS_BYTES {
            return Err(Error::TooLarge(format!(
                "settings are larger than {MAX_SETTINGS_BYTES} bytes"
            )));
        }
        self.exists(app_id, plugin).await?;
        self.0
            .kv
            .put(settings_key(app_id, user_id, plugin), bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(value)
    }

    /// `plugin_not_found` unless the app can see `plugin` (shipped or its upload).
    pub async fn exists(&self, app_id: &str, plugin: &str) -> Result<(), Error> {
        crate::manifest::check_name(plugin).map_err(|_| Error::NotFound(plugin.into()))?;
        if self.0.shipped.contains_key(plugin) || self.upload(app_id, plugin).await?.is_some() {
            Ok(())
        } else {
            Err(Error::NotFound(plugin.into()))
        }
    }
}

fn settings_key(app_id: &str, user_id: &str, plugin: &str) -> String {
    format!("s.{app_id}.{plugin}.{}", hex(user_id.as_bytes()))
}

impl Manifest {
    fn limits_hosts(&self) -> Vec<String> {
        self.http_allowlist.clone()
    }
}
