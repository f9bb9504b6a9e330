//! Configuration: the seeds' environment names, with flags that override them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

/// The shared read-model database when neither MOZAIKS_MONGO_DB nor MONGO_URI names one.
pub const DEFAULT_MONGO_DB: &str = "mozaiks";

/// The development JWT secret used with `--dev` when `JWT_SECRET` is not set.
pub const DEV_SECRET: &str = "mozaiks-development-secret-not-for-production";

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// NATS server URL(s), comma-separated for a cluster.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// MongoDB URI (also read from MONGODB_URI). A database in its path
    /// (`mongodb://mongo:27017/MozaiksAI`) is the shared database unless MOZAIKS_MONGO_DB is set.
    #[arg(long, env = "MONGO_URI", global = true)]
    pub mongo_uri: Option<String>,
    /// Shared database of the read models. Default: the database MONGO_URI names, else `mozaiks`.
    #[arg(
        long = "mongo-db",
        value_name = "DB",
        env = "MOZAIKS_MONGO_DB",
        global = true
    )]
    pub mongo_db_setting: Option<String>,
    /// The shared database in effect, set by [`Global::resolve_mongo_db`] right after parsing.
    #[arg(skip = DEFAULT_MONGO_DB.to_string())]
    pub mongo_db: String,
    /// Prefix of every subject, stream and bucket (lets several installs share one NATS).
    #[arg(long, env = "MOZAIKS_NAMESPACE", default_value = "", global = true)]
    pub namespace: String,
    /// Another tiers file instead of the embedded config/tiers.yaml (read at start, validated).
    #[arg(long, env = "MOZAIKS_TIERS_FILE", global = true)]
    pub tiers_file: Option<PathBuf>,
    /// Folder of stream definitions (default: the ones built into the binary).
    #[arg(long, env = "MOZAIKS_STREAMS_DIR", global = true)]
    pub streams_dir: Option<PathBuf>,
    /// Replicas of every stream and bucket, overriding the definitions (3 on a NATS cluster).
    #[arg(long, env = "MOZAIKS_STREAM_REPLICAS", global = true)]
    pub stream_replicas: Option<usize>,
    /// Address of the health and metrics listener of a process without a gateway (worker,
    /// projector, billing): `/health/live`, `/health/ready`, `/metrics`. Off when unset; a
    /// gateway serves these on its own port.
    #[arg(long, env = "MOZAIKS_HEALTH_LISTEN", global = true)]
    pub health_listen: Option<SocketAddr>,
    /// The app that exists from the first start with every workflow enabled.
    #[arg(long, env = "DEFAULT_APP_ID", default_value = "default", global = true)]
    pub default_app_id: String,
    /// Log level or filter (e.g. info, debug, mozaiks_gateway=debug).
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format: text or json.
    #[arg(
        long,
        env = "MOZAIKS_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: String,
    /// Credit periods of this many seconds instead of calendar months (tests and demos; every
    /// role of a fleet must agree).
    #[arg(long, env = "MOZAIKS_CREDITS_PERIOD_SECONDS", global = true)]
    pub credits_period_seconds: Option<u64>,
    /// This process's name in the fleet (presence, worker snapshots, chat and singleton leases,
    /// storage moves): `{instance}-{pid}-{tag}`. Kubernetes and Docker set HOSTNAME to the pod
    /// or container name.
    #[arg(long, env = "HOSTNAME", default_value = "host", global = true)]
    pub instance: String,
    #[command(flatten)]
    pub metrics: crate::metrics_http::MetricsArgs,
}

/// Token verification: gateways (and `mozaiks token`, which signs with the same secret).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Tokens")]
pub struct AuthArgs {
    /// HS256 secret of user and runtime tokens (at least 32 bytes unless --dev).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The issuer's JWKS URL (Keycloak: .../realms/{realm}/protocol/openid-connect/certs) for
    /// RS256/ES256 user tokens.
    #[arg(long, env = "JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Algorithms accepted on user tokens, e.g. RS256,ES256 (HS256 uses JWT_SECRET; the others
    /// need JWT_JWKS_URL). Default: HS256, plus RS256 when JWT_JWKS_URL is set.
    #[arg(long, env = "JWT_ALGORITHMS")]
    pub jwt_algorithms: Option<String>,
    /// `iss` of user tokens signed with JWKS keys (Keycloak: the realm URL).
    #[arg(long, env = "JWT_JWKS_ISSUER", default_value = "mozaiks")]
    pub jwt_jwks_issuer: String,
    /// Least seconds between two fetches of the JWKS for a token naming an unknown `kid` (key
    /// rotation without restart; bounds how often made-up `kid`s make us call the issuer).
    #[arg(long, env = "JWT_JWKS_MIN_REFRESH_SECONDS", default_value_t = 30)]
    pub jwt_jwks_min_refresh_seconds: u64,
    /// Development mode: a built-in JWT secret when JWT_SECRET is unset, short secrets allowed.
    #[arg(
        long,
        env = "MOZAIKS_DEV",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dev: bool,
}

/// The workflow and plugin packs: gateways (allowlists, /api/execute) and workers (runs).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Packs")]
pub struct PacksArgs {
    /// Folder of workflow packs.
    #[arg(long, env = "MOZAIKS_WORKFLOWS_DIR", default_value = "workflows")]
    pub workflows_dir: PathBuf,
    /// Folder of plugin packs (`<name>/plugin.yaml` + module) and `access.yaml` (tier → plugins).
    #[arg(long, env = "MOZAIKS_PLUGINS_DIR", default_value = "plugins")]
    pub plugins_dir: PathBuf,
}

/// Credit enforcement: gateways (refusals at the door) and workers (before each model call).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Credits")]
pub struct EnforceArgs {
    /// Enforce credits (the seeds' name): gateways refuse new sessions and messages, and workers
    /// refuse the next model call, of an app whose credits (or a user whose daily budget) are
    /// spent. Off (the development default): usage is metered and nothing is refused.
    #[arg(
        long,
        env = "MONETIZATION_ENABLED",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub monetization_enabled: bool,
}

/// Model prices: workers (the cost recorded with each charge) and billing.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Prices")]
pub struct PricesArgs {
    /// Another prices file instead of the embedded config/prices.yaml (read at start, validated).
    #[arg(long, env = "MOZAIKS_PRICES_FILE")]
    pub prices_file: Option<PathBuf>,
}

/// The worker role's own settings.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Worker")]
pub struct WorkerArgs {
    /// Runs in progress at once per worker.
    #[arg(long, env = "MAX_CONCURRENT_WORKFLOWS", default_value_t = 50)]
    pub max_concurrent_workflows: usize,
    /// Whether a worker hands its run slots out fairly across apps (smooth weighted round
    /// robin by app, weighted by tier) or, when false, first come first served (only to measure the
    /// difference: one app's backlog then delays every other app's runs).
    #[arg(
        long,
        env = "MOZAIKS_FAIR_SLOTS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub fair_slots: bool,
    /// With fair slots, how many slots at most a worker keeps free for apps whose run ended a
    /// moment ago (2 s) while another app holds the others, so that a light app's next run
    /// starts at once instead of waiting for a busy app's run to end (one per such app; an app
    /// that holds no slot may always take one). 0: none (every slot goes to whoever waits).
    #[arg(long, env = "MOZAIKS_RESERVE_SLOTS", default_value_t = 1)]
    pub reserve_slots: usize,
    /// A run that lasts longer fails with `timeout`.
    #[arg(long, env = "WORKFLOW_TIMEOUT_SECONDS", default_value_t = 300)]
    pub workflow_timeout_seconds: u64,
}

/// The projector role's own settings (retention and deleted apps' archiving).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Projector")]
pub struct ProjectorArgs {
    /// Where the projector role archives sessions past their tier's retention and deleted apps'
    /// sessions (`{dir}/{app_id}/{YYYY-MM-DD}.jsonl`). Default: an absolute folder, see
    /// [`default_archive_dir`].
    #[arg(
        long,
        env = "MOZAIKS_ARCHIVE_DIR",
        default_value_os_t = default_archive_dir()
    )]
    pub archive_dir: PathBuf,
    /// Whether the projector role takes part in retention and deleted-app archiving (the
    /// replicas that do contend for the `retention` lease in `MZ_LEASES`; one works at a time).
    #[arg(
        long,
        env = "MOZAIKS_RETENTION",
        default_value_t = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub retention: bool,
    /// Seconds between retention sweeps.
    #[arg(
        long,
        env = "MOZAIKS_RETENTION_INTERVAL_SECONDS",
        default_value_t = 3600
    )]
    pub retention_interval_seconds: u64,
    /// Whether archived chats' events are purged from MZ_EVT too.
    #[arg(
        long,
        env = "MOZAIKS_RETENTION_PURGE_LOG",
        default_value_t = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub retention_purge_log: bool,
    /// Seconds between looks for deleted apps whose read models are still to archive and remove.
    #[arg(
        long,
        env = "MOZAIKS_APP_ARCHIVE_INTERVAL_SECONDS",
        default_value_t = 5
    )]
    pub app_archive_interval_seconds: u64,
}

/// The ops role's own settings.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Ops")]
pub struct OpsArgs {
    /// Milliseconds between two evaluations of the ops rules by the ops leader (role `ops`).
    #[arg(long, env = "MOZAIKS_OPS_EVALUATE_MS", default_value_t = 5000)]
    pub ops_evaluate_ms: u64,
    /// A fleet for the ops agent to poll too, as the seeds' ops guide does: its `/api/health`,
    /// `/health/active-runs` and `/metrics/perf/aggregate` (every app's view), whose active
    /// runs, errors and tokens feed the rules next to the bus's (the larger value per app, so
    /// the fleet this agent also follows on the bus is not counted twice). Repeat the flag or
    /// separate URLs with commas for several fleets.
    #[arg(
        long = "poll",
        value_name = "URL",
        env = "MOZAIKS_OPS_POLL",
        value_delimiter = ','
    )]
    pub ops_poll: Vec<String>,
    /// The bearer token for --poll (a superadmin token of the polled fleet). Default: a
    /// superadmin token minted with this process's JWT_SECRET, renewed before each poll.
    #[arg(long = "poll-token", env = "MOZAIKS_OPS_POLL_TOKEN")]
    pub ops_poll_token: Option<String>,
    /// Milliseconds between two polls of the --poll fleets.
    #[arg(
        long = "poll-every-ms",
        env = "MOZAIKS_OPS_POLL_MS",
        default_value_t = 5000
    )]
    pub ops_poll_ms: u64,
}

/// The model provider: the OpenAI-compatible client when `OPENAI_API_KEY` or `OPENAI_BASE_URL`
/// is set, else the built-in offline model.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// API key of the OpenAI-compatible provider.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Base URL of the provider, e.g. http://127.0.0.1:11434/v1 (Ollama); default https://api.openai.com/v1.
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    /// Header carrying the key instead of `Authorization: Bearer` (Azure: api-key).
    #[arg(long, env = "OPENAI_API_KEY_HEADER")]
    pub openai_api_key_header: Option<String>,
    /// Model of agents that do not name one.
    #[arg(long, env = "MOZAIKS_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,
    /// Tries per model call (429, 5xx, timeouts and connection errors are retried).
    #[arg(long, env = "MOZAIKS_MODEL_MAX_ATTEMPTS", default_value_t = 4)]
    pub model_max_attempts: u32,
    /// Seconds a model call may take, streamed answer included.
    #[arg(long, env = "MOZAIKS_MODEL_TIMEOUT_SECONDS", default_value_t = 120)]
    pub model_timeout_seconds: u64,
}

impl Global {
    pub fn mongo_uri(&self) -> String {
        self.mongo_uri
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("MONGODB_URI").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "mongodb://127.0.0.1:27017/?directConnection=true".into())
    }

    /// Sets [`Global::mongo_db`] from the settings: see [`shared_mongo_db`].
    pub fn resolve_mongo_db(&mut self) {
        self.mongo_db = shared_mongo_db(self.mongo_db_setting.as_deref(), &self.mongo_uri());
    }
}

impl AuthArgs {
    /// The verifier's configuration: the secret, and the JWKS source when configured.
    pub fn auth_config(&self) -> anyhow::Result<mozaiks_auth::Config> {
        let mut cfg = mozaiks_auth::Config::hs256(self.jwt_secret()?, self.dev);
        let url = self.jwt_jwks_url.as_deref().filter(|u| !u.is_empty());
        let algorithms = match (self.jwt_algorithms.as_deref(), url) {
            (Some(list), _) if !list.trim().is_empty() => mozaiks_auth::parse_algorithms(list)?,
            (_, Some(_)) => vec![
                mozaiks_auth::Algorithm::HS256,
                mozaiks_auth::Algorithm::RS256,
            ],
            _ => vec![mozaiks_auth::Algorithm::HS256],
        };
        cfg.user_algorithms = algorithms;
        cfg.jwks_url = url.map(String::from);
        cfg.jwks_issuer = self.jwt_jwks_issuer.clone();
        cfg.jwks_min_refresh = std::time::Duration::from_secs(self.jwt_jwks_min_refresh_seconds);
        Ok(cfg)
    }

    pub fn jwt_secret(&self) -> anyhow::Result<Vec<u8>> {
        match self.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Ok(s.as_bytes().to_vec()),
            None if self.dev => Ok(DEV_SECRET.as_bytes().to_vec()),
            None => anyhow::bail!(
                "JWT_SECRET is not set: set a secret of at least 32 bytes, or run with --dev (MOZAIKS_DEV=1) for the development secret"
            ),
        }
    }
}

/// The shared read-model database: MOZAIKS_MONGO_DB when set (and not empty), else the database
/// the URI names (`mongodb://mongo:27017/MozaiksAI`, as the seeds' deployment guides set it, read
/// by the driver's own parser), else [`DEFAULT_MONGO_DB`]. A URI the driver cannot parse names no
/// database here; connecting with it reports why.
pub fn shared_mongo_db(setting: Option<&str>, uri: &str) -> String {
    use mozaiks_store::mongodb::options::ConnectionString;
    setting
        .filter(|db| !db.is_empty())
        .map(str::to_string)
        .or_else(|| {
            ConnectionString::parse(uri)
                .ok()
                .and_then(|c| c.default_database)
                .filter(|db| !db.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_MONGO_DB.to_string())
}

/// The archive folder when MOZAIKS_ARCHIVE_DIR is not set, from the process's environment (see
/// [`archive_dir_from`]).
pub fn default_archive_dir() -> PathBuf {
    archive_dir_from(|name| std::env::var_os(name))
}

/// The archive folder when MOZAIKS_ARCHIVE_DIR is not set: `archive` in the service's state
/// folder, never relative to the working directory. The first that is set to an absolute path:
/// `$STATE_DIRECTORY/archive` (systemd's `StateDirectory=`), `$XDG_STATE_HOME/mozaiks/archive`,
/// `$HOME/.local/state/mozaiks/archive`; else `/var/lib/mozaiks/archive`.
pub fn archive_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    // systemd sets STATE_DIRECTORY to a colon-separated list when a unit names several.
    let systemd = var("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|p| p.is_absolute());
    if let Some(dir) = systemd {
        return dir.join("archive");
    }
    if let Some(dir) = absolute("XDG_STATE_HOME") {
        return dir.join("mozaiks").join("archive");
    }
    if let Some(home) = absolute("HOME") {
        return home.join(".local/state/mozaiks/archive");
    }
    PathBuf::from("/var/lib/mozaiks/archive")
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address the gateway listens on.
    #[arg(long, env = "MOZAIKS_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Base of the ws_url in session tickets, e.g. wss://chat.example.com (default: from Host).
    #[arg(long, env = "MOZAIKS_PUBLIC_WS_URL")]
    pub public_ws_url: Option<String>,
    /// Largest WebSocket frame accepted, in bytes.
    #[arg(long, env = "MOZAIKS_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Seconds a draining gateway waits for its sockets to close.
    #[arg(long, env = "MOZAIKS_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
    /// Browser origins allowed to call the HTTP API for every app, comma-separated (on top of
    /// each app's allowed_origins), e.g. https://console.example.com.
    #[arg(long, env = "MOZAIKS_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Seconds between two pings of an idle WebSocket (default 20).
    #[arg(long, env = "MOZAIKS_WS_PING_SECONDS")]
    pub ws_ping_seconds: Option<u64>,
    /// Seconds a WebSocket may stay silent (no frame, no pong) before it is closed (default 60).
    #[arg(long, env = "MOZAIKS_WS_IDLE_SECONDS")]
    pub ws_idle_seconds: Option<u64>,
}

/// `mozaiks all`: every role in one process, so every role's settings.
#[derive(Args, Debug, Clone)]
pub struct AllArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub packs: PacksArgs,
    #[command(flatten)]
    pub enforce: EnforceArgs,
    #[command(flatten)]
    pub prices: PricesArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `mozaiks gateway`.
#[derive(Args, Debug, Clone)]
pub struct GatewayCmd {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub packs: PacksArgs,
    #[command(flatten)]
    pub enforce: EnforceArgs,
}

/// `mozaiks worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerCmd {
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub packs: PacksArgs,
    #[command(flatten)]
    pub enforce: EnforceArgs,
    #[command(flatten)]
    pub prices: PricesArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `mozaiks projector`.
#[derive(Args, Debug, Clone)]
pub struct ProjectorCmd {
    #[command(flatten)]
    pub projector: ProjectorArgs,
}

/// `mozaiks billing`.
#[derive(Args, Debug, Clone)]
pub struct BillingCmd {
    #[command(flatten)]
    pub prices: PricesArgs,
}

/// `mozaiks ops`.
#[derive(Args, Debug, Clone)]
pub struct OpsCmd {
    #[command(flatten)]
    pub ops: OpsArgs,
    /// For the token `--poll` mints when `--poll-token` is not given.
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// What a process runs: its roles and the settings of exactly those roles (a group is `None`
/// when no role of the process uses it).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub roles: Vec<crate::roles::Role>,
    pub gateway: Option<GatewayArgs>,
    pub auth: Option<AuthArgs>,
    pub packs: Option<PacksArgs>,
    pub enforce: Option<EnforceArgs>,
    pub prices: Option<PricesArgs>,
    pub worker: Option<WorkerArgs>,
    pub projector: Option<ProjectorArgs>,
    pub ops: Option<OpsArgs>,
    pub model: Option<ModelArgs>,
}

impl Plan {
    /// Whether credits are enforced (MONETIZATION_ENABLED; off when no role here enforces).
    pub fn monetization_enabled(&self) -> bool {
        self.enforce
            .as_ref()
            .is_some_and(|e| e.monetization_enabled)
    }
}

impl From<AllArgs> for Plan {
    fn from(a: AllArgs) -> Plan {
        Plan {
            roles: crate::roles::Role::ALL.to_vec(),
            gateway: Some(a.gateway),
            auth: Some(a.auth),
            packs: Some(a.packs),
            enforce: Some(a.enforce),
            prices: Some(a.prices),
            worker: Some(a.worker),
            projector: Some(a.projector),
            ops: Some(a.ops),
            model: Some(a.model),
        }
    }
}

impl From<GatewayCmd> for Plan {
    fn from(a: GatewayCmd) -> Plan {
        Plan {
            roles: vec![crate::roles::Role::Gateway],
            gateway: Some(a.gateway),
            auth: Some(a.auth),
            packs: Some(a.packs),
            enforce: Some(a.enforce),
            ..Default::default()
        }
    }
}

impl From<WorkerCmd> for Plan {
    fn from(a: WorkerCmd) -> Plan {
        Plan {
            roles: vec![crate::roles::Role::Worker],
            worker: Some(a.worker),
            packs: Some(a.packs),
            enforce: Some(a.enforce),
            prices: Some(a.prices),
            model: Some(a.model),
            ..Default::default()
        }
    }
}

impl From<ProjectorCmd> for Plan {
    fn from(a: ProjectorCmd) -> Plan {
        Plan {
            roles: vec![crate::roles::Role::Projector],
            projector: Some(a.projector),
            ..Default::default()
        }
    }
}

impl From<BillingCmd> for Plan {
    fn from(a: BillingCmd) -> Plan {
        Plan {
            roles: vec![crate::roles::Role::Billing],
            prices: Some(a.prices),
            ..Default::default()
        }
    }
}

impl From<OpsCmd> for Plan {
    fn from(a: OpsCmd) -> Plan {
        Plan {
            roles: vec![crate::roles::Role::Ops],
            ops: Some(a.ops),
            auth: Some(a.auth),
            model: Some(a.model),
            ..Default::default()
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    #[command(flatten)]
    pub auth: AuthArgs,
    /// User id (`sub`).
    #[arg(long, default_value = "dev-user")]
    pub sub: String,
    /// App id; defaults to DEFAULT_APP_ID.
    #[arg(long)]
    pub app: Option<String>,
    /// Roles, comma-separated (user, admin, superadmin).
    #[arg(long, default_value = "user")]
    pub roles: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
}

#[derive(Subcommand, Debug, Clone)]
pub enum WorkflowsCmd {
    /// Validates every pack in DIR and lists them.
    Check {
        /// The folder of workflow packs.
        #[arg(env = "MOZAIKS_WORKFLOWS_DIR", default_value = "workflows")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginsCmd {
    /// Validates every plugin pack in DIR: manifest, module compiled and its imports and
    /// exports checked, access.yaml; lists them.
    Check {
        /// The folder of plugin packs.
        #[arg(env = "MOZAIKS_PLUGINS_DIR", default_value = "plugins")]
        dir: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SchemasArgs {
    /// Folder to write to.
    #[arg(default_value = "schemas")]
    pub dir: PathBuf,
    /// Fail if the files differ instead of writing them.
    #[arg(long)]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_archive_folder_is_absolute_and_follows_the_state_folders() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            archive_dir_from(move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
            })
        };
        let all = [
            ("STATE_DIRECTORY", "/var/lib/mozaiks:/var/lib/other"),
            ("XDG_STATE_HOME", "/home/ops/.state"),
            ("HOME", "/home/ops"),
        ];
        assert_eq!(with(&all), PathBuf::from("/var/lib/mozaiks/archive"));
        assert_eq!(
            with(&all[1..]),
            PathBuf::from("/home/ops/.state/mozaiks/archive")
        );
        assert_eq!(
            with(&all[2..]),
            PathBuf::from("/home/ops/.local/state/mozaiks/archive")
        );
        assert_eq!(with(&[]), PathBuf::from("/var/lib/mozaiks/archive"));
        // Relative values are ignored (the XDG rule), so the default never depends on the
        // working directory.
        let relative = [
            ("STATE_DIRECTORY", "state"),
            ("XDG_STATE_HOME", ".state"),
            ("HOME", "ops"),
        ];
        assert_eq!(with(&relative), PathBuf::from("/var/lib/mozaiks/archive"));
        assert!(default_archive_dir().is_absolute());
    }

    #[test]
    fn the_uri_database_is_the_shared_one_unless_mozaiks_mongo_db_is_set() {
        for (setting, uri, want) in [
            // The seeds' deployment guides.
            (None, "mongodb://mongo:27017/MozaiksAI", "MozaiksAI"),
            (
                None,
                "mongodb://u:p@db1:27017,db2:27017/MozaiksAI?replicaSet=rs0&authSource=admin",
                "MozaiksAI",
            ),
            (
                None,
                "mongodb+srv://cluster0.example.net/Prod?retryWrites=true",
                "Prod",
            ),
            // No database in the URI: the default.
            (
                None,
                "mongodb://127.0.0.1:27017/?directConnection=true",
                "mozaiks",
            ),
            (None, "mongodb://127.0.0.1:27017", "mozaiks"),
            (None, "mongodb://127.0.0.1:27017/", "mozaiks"),
            // Set explicitly, MOZAIKS_MONGO_DB wins; set empty, it counts as unset.
            (Some("other"), "mongodb://mongo:27017/MozaiksAI", "other"),
            (Some("other"), "mongodb://mongo:27017/", "other"),
            (
                Some("mozaiks"),
                "mongodb://mongo:27017/MozaiksAI",
                "mozaiks",
            ),
            (Some(""), "mongodb://mongo:27017/MozaiksAI", "MozaiksAI"),
            // Unparsable: the default here; connecting reports the URI's problem.
            (None, "not a uri", "mozaiks"),
        ] {
            assert_eq!(shared_mongo_db(setting, uri), want, "{setting:?} {uri}");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        global: Global,
    }

    #[test]
    fn the_mongo_db_flag_wins_over_the_uri_database() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            let mut g = Cli::try_parse_from(args).unwrap().global;
            g.resolve_mongo_db();
            g.mongo_db
        };
        assert_eq!(
            parse(&[
                "mozaiks",
                "--mongo-uri",
                "mongodb://m/FromUri",
                "--mongo-db",
                "Explicit"
            ]),
            "Explicit"
        );
        assert_eq!(
            parse(&[
                "mozaiks",
                "--mongo-db",
                "Explicit",
                "--mongo-uri",
                "mongodb://m/"
            ]),
            "Explicit"
        );
    }
}
