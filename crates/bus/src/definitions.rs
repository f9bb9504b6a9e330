//! Stream, consumer and bucket definitions from `streams/`, applied idempotently.
//!
//! The files are embedded in the binary at build time, so `mozaiks` runs from any directory;
//! `MOZAIKS_STREAMS_DIR` (or [`Definitions::load_dir`]) points at another set, e.g. the
//! replicated production definitions.

use std::path::Path;

use async_nats::jetstream::{self, consumer, stream};
use serde::Deserialize;
use tracing::info;

use crate::{Bus, Error};

/// A durable consumer: the stream it reads and its NATS configuration.
#[derive(Clone, Debug, Deserialize)]
pub struct ConsumerDef {
    pub stream: String,
    pub config: consumer::Config,
}

/// A key-value bucket.
#[derive(Clone, Debug, Deserialize)]
pub struct BucketDef {
    pub bucket: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "one")]
    pub history: i64,
    #[serde(default)]
    pub storage: stream::StorageType,
    #[serde(default = "one_usize")]
    pub num_replicas: usize,
    /// Entries older than this many nanoseconds are dropped (0: kept).
    #[serde(default)]
    pub max_age: u64,
}

fn one() -> i64 {
    1
}
fn one_usize() -> usize {
    1
}

/// Everything the runtime needs on the server.
#[derive(Clone, Debug, Default)]
pub struct Definitions {
    pub streams: Vec<stream::Config>,
    pub consumers: Vec<ConsumerDef>,
    pub buckets: Vec<BucketDef>,
    /// Object stores (`objects/*.json`; `history` and `max_age` are not used).
    pub objects: Vec<BucketDef>,
}

const EMBEDDED: &[(&str, &str)] = &[
    ("MZ_EVT.json", include_str!("../../../streams/MZ_EVT.json")),
    ("MZ_CMD.json", include_str!("../../../streams/MZ_CMD.json")),
    (
        "MZ_USAGE.json",
        include_str!("../../../streams/MZ_USAGE.json"),
    ),
    ("MZ_OPS.json", include_str!("../../../streams/MZ_OPS.json")),
    ("MZ_CTL.json", include_str!("../../../streams/MZ_CTL.json")),
    ("MZ_DLQ.json", include_str!("../../../streams/MZ_DLQ.json")),
    (
        "MZ_BILLING.json",
        include_str!("../../../streams/MZ_BILLING.json"),
    ),
    (
        "consumers/workers.json",
        include_str!("../../../streams/consumers/workers.json"),
    ),
    (
        "consumers/projector.json",
        include_str!("../../../streams/consumers/projector.json"),
    ),
    (
        "consumers/billing.json",
        include_str!("../../../streams/consumers/billing.json"),
    ),
    (
        "consumers/billing-grants.json",
        include_str!("../../../streams/consumers/billing-grants.json"),
    ),
    (
        "kv/MZ_APPS.json",
        include_str!("../../../streams/kv/MZ_APPS.json"),
    ),
    (
        "kv/MZ_KEYS.json",
        include_str!("../../../streams/kv/MZ_KEYS.json"),
    ),
    (
        "kv/MZ_PERF.json",
        include_str!("../../../streams/kv/MZ_PERF.json"),
    ),
    (
        "kv/MZ_LEASES.json",
        include_str!("../../../streams/kv/MZ_LEASES.json"),
    ),
    (
        "kv/MZ_OWNERS.json",
        include_str!("../../../streams/kv/MZ_OWNERS.json"),
    ),
    (
        "kv/MZ_PRESENCE.json",
        include_str!("../../../streams/kv/MZ_PRESENCE.json"),
    ),
    (
        "kv/MZ_OPS_STATE.json",
        include_str!("../../../streams/kv/MZ_OPS_STATE.json"),
    ),
    (
        "kv/MZ_CREDITS.json",
        include_str!("../../../streams/kv/MZ_CREDITS.json"),
    ),
    (
        "kv/MZ_ADMINS.json",
        include_str!("../../../streams/kv/MZ_ADMINS.json"),
    ),
    (
        "MZ_PLUGINS.json",
        include_str!("../../../streams/MZ_PLUGINS.json"),
    ),
    (
        "kv/MZ_PLUGIN_KV.json",
        include_str!("../../../streams/kv/MZ_PLUGIN_KV.json"),
    ),
    (
        "objects/MZ_PLUGIN_MODULES.json",
        include_str!("../../../streams/objects/MZ_PLUGIN_MODULES.json"),
    ),
];

impl Definitions {
    /// The definitions shipped in `streams/`, embedded at build time.
    pub fn embedded() -> Result<Definitions, Error> {
        let mut defs = Definitions::default();
        for (file, text) in EMBEDDED {
            defs.add(file, text)?;
        }
        Ok(defs)
    }

    /// Reads `*.json`, `consumers/*.json` and `kv/*.json` under `dir`.
    pub fn load_dir(dir: &Path) -> Result<Definitions, Error> {
        let mut defs = Definitions::default();
        for sub in ["", "consumers", "kv", "objects"] {
            let d = dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut files: Vec<_> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            for path in files {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::Definition {
                    file: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let rel = if sub.is_empty() {
                    path.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string()
                } else {
                    format!(
                        "{sub}/{}",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    )
                };
                defs.add(&rel, &text)?;
            }
        }
        if defs.streams.is_empty() {
            return Err(Error::Definition {
                file: dir.display().to_string(),
                reason: "no stream definitions found".into(),
            });
        }
        Ok(defs)
    }

    /// Sets the replica count of every stream and bucket (for a clustered install, e.g. 3).
    pub fn with_replicas(mut self, replicas: usize) -> Definitions {
        for s in &mut self.streams {
            s.num_replicas = replicas;
        }
        for b in self.buckets.iter_mut().chain(self.objects.iter_mut()) {
            b.num_replicas = replicas;
        }
        self
    }

    fn add(&mut self, file: &str, text: &str) -> Result<(), Error> {
        let bad = |e: serde_json::Error| Error::Definition {
            file: file.to_string(),
            reason: e.to_string(),
        };
        if file.starts_with("consumers/") {
            self.consumers
                .push(serde_json::from_str(text).map_err(bad)?);
        } else if file.starts_with("kv/") {
            self.buckets.push(serde_json::from_str(text).map_err(bad)?);
        } else if file.starts_with("objects/") {
            self.objects.push(serde_json::from_str(text).map_err(bad)?);
        } else {
            let cfg: stream::Config = serde_json::from_str(text).map_err(bad)?;
            if cfg.name.is_empty() {
                return Err(Error::Definition {
                    file: file.to_string(),
                    reason: "stream needs a name".into(),
                });
            }
            self.streams.push(cfg);
        }
        Ok(())
    }
}

impl Bus {
    /// Creates or updates every stream, consumer and bucket. Safe to run concurrently from many
    /// replicas and on every start.
    pub async fn apply(&self, defs: &Definitions) -> Result<(), Error> {
        self.remember(defs);
        let s = self.subjects();
        for cfg in &defs.streams {
            let mut cfg = cfg.clone();
            cfg.name = s.name(&cfg.name);
            cfg.subjects = cfg.subjects.iter().map(|x| s.apply(x)).collect();
            if let Some(r) = cfg.republish.as_mut() {
                r.source = s.apply(&r.source);
                r.destination = s.apply(&r.destination);
            }
            if let Some(sources) = cfg.sources.as_mut() {
                for src in sources {
                    src.name = s.name(&src.name);
                    if let Some(f) = src.filter_subject.as_mut() {
                        *f = s.apply(f);
                    }
                }
            }
            apply_stream(self.jetstream(), cfg).await?;
        }
        for def in &defs.consumers {
            let stream = self.stream(&def.stream).await?;
            let mut cfg = def.config.clone();
            if !cfg.filter_subject.is_empty() {
                cfg.filter_subject = s.apply(&cfg.filter_subject);
            }
            cfg.durable_name = cfg.durable_name.as_deref().map(|n| s.name(n));
            cfg.name = cfg.name.as_deref().map(|n| s.name(n));
            let name = cfg.durable_name.clone().unwrap_or_default();
            // create_consumer creates, or updates a consumer whose config differs in editable fields.
            stream
                .create_consumer(cfg)
                .await
                .map_err(|e| Error::jetstream(format!("consumer {name}"), e))?;
        }
        for b in &defs.buckets {
            let cfg = jetstream::kv::Config {
                bucket: s.name(&b.bucket),
                description: b.description.clone(),
                history: b.history,
                storage: b.storage,
                num_replicas: b.num_replicas,
                max_age: std::time::Duration::from_nanos(b.max_age),
                ..Default::default()
            };
            apply_bucket(self.jetstream(), cfg)
                .await
                .map_err(|e| Error::kv(format!("bucket {}", b.bucket), e))?;
        }
        for o in &defs.objects {
            let cfg = jetstream::object_store::Config {
                bucket: s.name(&o.bucket),
                description: Some(o.description.clone()).filter(|d| !d.is_empty()),
                storage: o.storage,
                num_replicas: o.num_replicas,
                ..Default::default()
            };
            apply_object_store(self.jetstream(), cfg)
                .await
                .map_err(|e| Error::jetstream(format!("object store {}", o.bucket), e))?;
        }
        info!(
            streams = defs.streams.len(),
            consumers = defs.consumers.len(),
            buckets = defs.buckets.len(),
            "Stream definitions applied."
        );
        Ok(())
    }
}

async fn apply_stream(js: &jetstream::Context, cfg: stream::Config) -> Result<(), Error> {
    let name = cfg.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|e| Error::jetstream(format!("stream {name}'s info"), e))?
                .config
                .clone();
            if differs(&current, &cfg) {
                js.update_stream(&cfg)
                    .await
                    .map_err(|e| Error::jetstream(format!("update stream {name}"), e))?;
                info!(stream = %name, "Stream updated to match its definition.");
            }
            Ok(())
        }
        Err(_) => match js.create_stream(cfg.clone()).await {
            Ok(_) => {
                info!(stream = %name, "Stream created.");
                Ok(())
            }
            // Another replica created it between our get and create.
            Err(e) if js.get_stream(&name).await.is_ok() => {
                tracing::debug!(stream = %name, error = %e, "Stream created concurrently.");
                Ok(())
            }
            Err(e) => Err(Error::jetstream(format!("create stream {name}"), e)),
        },
    }
}

/// Creates a bucket, or updates it when its definition changed. Like [`apply_stream`], an
/// existing bucket that matches is left alone: updating a stream that another replica is
/// creating at the same moment can time out on a cluster (every role applies the definitions
/// when a fleet starts), while concurrent identical creates succeed.
async fn apply_bucket(
    js: &jetstream::Context,
    cfg: jetstream::kv::Config,
) -> Result<(), async_nats::Error> {
    let stream_name = format!("KV_{}", cfg.bucket);
    match js.get_stream(&stream_name).await {
        Ok(mut existing) => {
            let c = existing.info().await?.config.clone();
            let differs = c.num_replicas.max(1) != cfg.num_replicas.max(1)
                || c.max_age != cfg.max_age
                || c.max_messages_per_subject != cfg.history.max(1)
                || c.storage != cfg.storage
                || c.description != Some(cfg.description.clone()).filter(|d| !d.is_empty());
            if differs {
                js.create_or_update_key_value(cfg).await?;
                info!(stream = %stream_name, "Bucket updated to match its definition.");
            }
            Ok(())
        }
        Err(_) => match js.create_key_value(cfg).await {
            Ok(_) => Ok(()),
            // Another replica created it between our get and create.
            Err(e) if js.get_stream(&stream_name).await.is_ok() => {
                tracing::debug!(stream = %stream_name, error = %e, "Bucket created concurrently.");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Creates an object store unless it exists (its stream `OBJ_{bucket}`).
async fn apply_object_store(
    js: &jetstream::Context,
    cfg: jetstream::object_store::Config,
) -> Result<(), async_nats::Error> {
    let stream_name = format!("OBJ_{}", cfg.bucket);
    if js.get_stream(&stream_name).await.is_ok() {
        return Ok(());
    }
    match js.create_object_store(cfg).await {
        Ok(_) => Ok(()),
        // Another replica created it between our get and create.
        Err(_) if js.get_stream(&stream_name).await.is_ok() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether the editable parts of a stream's configuration differ from its definition.
fn differs(current: &stream::Config, wanted: &stream::Config) -> bool {
    // The server reports "unlimited" as -1 where a definition may leave 0.
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    let limit32 = |v: i32| if v <= 0 { -1 } else { v };
    let sources = |c: &stream::Config| {
        c.sources
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.filter_subject.clone().unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let dup_window = |c: &stream::Config| {
        // The server fills in its default (2 min) when a definition leaves it out.
        if c.duplicate_window.is_zero() {
            std::time::Duration::from_secs(120)
        } else {
            c.duplicate_window
        }
    };
    current.subjects != wanted.subjects
        || current.max_age != wanted.max_age
        || limit(current.max_bytes) != limit(wanted.max_bytes)
        || limit(current.max_messages) != limit(wanted.max_messages)
        || limit32(current.max_message_size) != limit32(wanted.max_message_size)
        || dup_window(current) != dup_window(wanted)
        || current.num_replicas.max(1) != wanted.num_replicas.max(1)
        || current.description != wanted.description
        || sources(current) != sources(wanted)
        || current.allow_direct != wanted.allow_direct
        || current.republish != wanted.republish
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_definitions_parse() {
        let d = Definitions::embedded().unwrap();
        assert_eq!(d.streams.len(), 8);
        assert_eq!(d.consumers.len(), 4);
        assert_eq!(d.buckets.len(), 10);
        assert_eq!(d.objects.len(), 1);
        let evt = d.streams.iter().find(|s| s.name == "MZ_EVT").unwrap();
        assert_eq!(evt.duplicate_window, std::time::Duration::from_secs(120));
    }

    #[test]
    fn embedded_match_the_streams_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../streams");
        let from_dir = Definitions::load_dir(&dir).unwrap();
        assert_eq!(
            from_dir.streams.len(),
            8,
            "a new file in streams/ must be embedded too"
        );
        assert_eq!(from_dir.consumers.len(), 4);
        assert_eq!(from_dir.buckets.len(), 10);
        assert_eq!(from_dir.objects.len(), 1);
    }

    #[test]
    fn a_broken_file_names_itself() {
        let mut d = Definitions::default();
        let err = d.add("MZ_X.json", "{ not json").unwrap_err();
        assert!(matches!(err, Error::Definition { ref file, .. } if file == "MZ_X.json"));
    }
}
