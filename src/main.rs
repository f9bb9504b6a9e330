//! `mozaiks`: one binary, one sub-command per role. It parses configuration, starts tracing and
//! metrics, wires the roles and shuts them down on SIGTERM; the roles live in `crates/`.

mod config;
mod health;
mod roles;

use clap::{Parser, Subcommand};

use crate::config::Global;

#[derive(Parser, Debug)]
#[command(
    name = "mozaiks",
    version,
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
    All(config::GatewayArgs),
    /// HTTP + WebSocket front door: sessions, live events, reads, health, metrics.
    Gateway(config::GatewayArgs),
    /// Runs workflow packs for the chats it owns.
    Worker,
    /// Keeps the MongoDB read models (chat_sessions, chat_messages) from the event log.
    Projector,
    /// Keeps the per-app usage ledger from usage.charged.
    Billing,
    /// The ops agent (not built yet: see issue tracker).
    Ops,
    /// Mints a user token signed with JWT_SECRET (development and scripts).
    Token(config::TokenArgs),
    /// Workflow pack tools.
    #[command(subcommand)]
    Workflows(config::WorkflowsCmd),
    /// Writes the JSON Schemas of events, commands, frames and packs (or checks them with --check).
    Schemas(config::SchemasArgs),
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
        match cli.command {
            Cmd::Token(args) => roles::token(&cli.global, args),
            Cmd::Workflows(cmd) => roles::workflows(&cli.global, cmd),
            Cmd::Schemas(args) => roles::schemas(args),
            Cmd::Ops => {
                eprintln!(
                    "mozaiks ops: the ops agent is not built yet; the other roles run without it."
                );
                Ok(std::process::ExitCode::from(2))
            }
            Cmd::All(args) => roles::serve(&cli.global, roles::Roles::all(), Some(args)).await,
            Cmd::Gateway(args) => {
                roles::serve(&cli.global, roles::Roles::gateway(), Some(args)).await
            }
            Cmd::Worker => roles::serve(&cli.global, roles::Roles::worker(), None).await,
            Cmd::Projector => roles::serve(&cli.global, roles::Roles::projector(), None).await,
            Cmd::Billing => roles::serve(&cli.global, roles::Roles::billing(), None).await,
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
