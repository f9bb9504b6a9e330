//! `mozaiks`: one binary, one sub-command per role. It parses configuration, starts tracing and
//! metrics, wires the roles and shuts them down on SIGTERM; the roles live in `crates/`.

mod config;
mod health;
mod lag;
mod metrics_http;
mod metrics_layer;
mod rebuild;
mod roles;
mod storage_metrics;
mod tools;

use clap::{Parser, Subcommand};

use crate::config::Global;

/// `mozaiks --version`: the version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MOZAIKS_GIT_COMMIT"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "mozaiks",
    version = VERSION,
    about = "Mozaiks Runtime: an event-sourced, multi-tenant runtime for AI-agent chat apps.",
    long_about = "Mozaiks Runtime: an event-sourced, multi-tenant runtime for AI-agent chat apps.\n\n\
Every role talks only to NATS JetStream (the event log) and MongoDB (read models), so any role can \
run as many replicas as needed. Configuration comes from the environment (names below) and flags \
override it."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Every role in one process (development and small installs).
    All(Box<config::AllArgs>),
    /// HTTP + WebSocket front door: sessions, live events, reads, health, metrics.
    Gateway(config::GatewayCmd),
    /// Runs workflow packs for the chats it owns.
    Worker(config::WorkerCmd),
    /// Keeps the MongoDB read models (chat_sessions, chat_messages) from the event log.
    Projector(config::ProjectorCmd),
    /// Keeps the per-app usage ledger and the credit wallets from the event log.
    Billing(config::BillingCmd),
    /// The ops agent: rules over the fleet's live state, incidents on NATS, safe actions.
    ///
    /// Watches the fleet (workers' snapshots in MZ_PERF, gateways' presence, run.failed, failed
    /// tool results, usage.charged, session starts) and evaluates the ops policy's rules every
    /// MOZAIKS_OPS_EVALUATE_MS (5000): noisy_neighbour (one app over 40 % of the active runs for
    /// 5 min), error_spike, cost_spike, socket_share, slow_start. Run several: one replica
    /// evaluates at a time (the `ops` lease); a takeover never duplicates an incident or action.
    /// With --poll URL it also polls that fleet's /api/health, /health/active-runs and
    /// /metrics/perf/aggregate (the seeds' ops guide), whose runs, errors and tokens feed the rules.
    ///
    /// Incidents: CloudEvents on mz.ops.incident.{rule}.{app_id} (stream MZ_OPS), types
    /// mozaiks.ops.incident.firing / .resolved; GET /api/ops/incidents[?status=], /{id}.
    ///
    /// Safe actions, each an event on mz.ops.action.{kind}.{app_id} with who, why and until when,
    /// applied on every gateway and worker within a second (MZ_OPS_STATE) and reverted at their
    /// TTL: throttle (lower max_concurrent_runs), pause_runs (503 app_paused + Retry-After),
    /// disable_pack (a workflow off the allowlist), notify (Slack or Alertmanager webhook).
    /// GET /api/ops/actions; POST /api/ops/actions/{id}/revert ends one by hand.
    ///
    /// Risky actions (suspend_app, raise_limits, move_storage, scale) are only proposed:
    /// GET /api/ops/approvals, POST /api/ops/approvals/{id}/approve or /reject (superadmin).
    /// cost_spike's default is notify plus a proposal to suspend the app.
    ///
    /// The policy (thresholds, `for` durations, actions): GET/PUT /api/ops/policy and
    /// /api/ops/policy/{app_id} (superadmin), applied live. Subscribers outside the runtime:
    /// examples/ops-python, examples/ops-typescript, schemas/ops.*.schema.json. README:
    /// "Operating the fleet". MOZAIKS_HEALTH_LISTEN serves health and metrics.
    Ops(config::OpsCmd),
    /// Mints a user token signed with JWT_SECRET (development and scripts).
    Token(config::TokenArgs),
    /// Workflow pack tools.
    #[command(subcommand)]
    Workflows(config::WorkflowsCmd),
    /// Plugin pack tools.
    #[command(subcommand)]
    Plugins(config::PluginsCmd),
    /// Writes the JSON Schemas of events, commands, frames and packs (or checks them with --check).
    Schemas(config::SchemasArgs),
    /// Drops and rebuilds the read models (sessions, messages, usage ledger, credit grants) of
    /// an app (--app) or of every app from the event log while the fleet keeps running; with
    /// --from SEQ, re-applies events from that stream sequence without dropping. Idempotent.
    Rebuild(rebuild::RebuildArgs),
    /// Exits 0 when `GET URL` answers 200 (container healthchecks without curl), e.g.
    /// `mozaiks probe http://127.0.0.1:8000/health/ready`.
    Probe {
        /// The URL to probe (http:// only).
        #[arg(default_value = "http://127.0.0.1:8000/health/ready")]
        url: String,
    },
}

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    cli.global.resolve_mongo_db();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mozaiks: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let g = cli.global;
        match cli.command {
            Cmd::Token(args) => tools::token(&g, args),
            Cmd::Workflows(cmd) => tools::workflows(cmd),
            Cmd::Plugins(cmd) => tools::plugins(cmd),
            Cmd::Schemas(args) => tools::schemas(args),
            Cmd::Probe { url } => health::probe(&url).await,
            Cmd::Rebuild(args) => rebuild::run(&g, args).await,
            Cmd::All(args) => roles::serve(g, (*args).into()).await,
            Cmd::Gateway(args) => roles::serve(g, args.into()).await,
            Cmd::Worker(args) => roles::serve(g, args.into()).await,
            Cmd::Projector(args) => roles::serve(g, args.into()).await,
            Cmd::Billing(args) => roles::serve(g, args.into()).await,
            Cmd::Ops(args) => roles::serve(g, args.into()).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Stopped on an error.");
            eprintln!("mozaiks: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn help(sub: &str) -> String {
        let mut cmd = Cli::command();
        cmd.build();
        cmd.find_subcommand_mut(sub)
            .unwrap_or_else(|| panic!("no sub-command {sub}"))
            .render_long_help()
            .to_string()
    }

    #[test]
    fn each_sub_command_takes_the_settings_of_its_roles_and_no_others() {
        let shared = ["--nats-url", "--mongo-uri", "--namespace", "--instance"];
        let own: [(&str, &[&str]); 6] = [
            ("gateway", &["--listen", "--jwt-secret", "--workflows-dir"]),
            (
                "worker",
                &[
                    "--max-concurrent-workflows",
                    "--model",
                    "--prices-file",
                    "--workflows-dir",
                ],
            ),
            ("projector", &["--archive-dir", "--retention"]),
            ("billing", &["--prices-file"]),
            (
                "ops",
                &["--ops-evaluate-ms", "--model", "--poll", "--jwt-secret"],
            ),
            (
                "all",
                &[
                    "--listen",
                    "--jwt-secret",
                    "--workflows-dir",
                    "--max-concurrent-workflows",
                    "--archive-dir",
                    "--prices-file",
                    "--ops-evaluate-ms",
                ],
            ),
        ];
        let every: Vec<&str> = own.iter().flat_map(|(_, o)| o.iter().copied()).collect();
        for (sub, flags) in own {
            let text = help(sub);
            let wanted: &[&str] = if sub == "all" { &every } else { flags };
            for flag in shared.iter().chain(wanted) {
                assert!(text.contains(flag), "`{sub} --help` lacks {flag}");
            }
            for flag in &every {
                if sub != "all" && !flags.contains(flag) {
                    assert!(
                        !text.contains(&format!("{flag} ")),
                        "`{sub} --help` shows {flag}, a setting of another role"
                    );
                }
            }
        }
    }

    #[test]
    fn shared_settings_go_anywhere_and_role_settings_after_their_sub_command() {
        let ok = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        ok(&[
            "mozaiks",
            "--nats-url",
            "nats://n:4222",
            "worker",
            "--max-concurrent-workflows",
            "3",
        ])
        .unwrap();
        ok(&[
            "mozaiks",
            "projector",
            "--namespace",
            "t1",
            "--retention-interval-seconds",
            "60",
        ])
        .unwrap();
        // A worker's setting on billing is refused, not silently ignored.
        let e = ok(&["mozaiks", "billing", "--max-concurrent-workflows", "3"]).unwrap_err();
        assert!(e.contains("--max-concurrent-workflows"), "{e}");
    }
}
