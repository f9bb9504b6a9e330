//! Workers: run workflow packs for the chats they own.
//!
//! - [`chat`]: the pure chat aggregate (given events, when command, then events).
//! - [`model`]: model providers: the built-in offline model and the OpenAI-compatible client.
//! - [`tools`]: HTTP tools (the other tools are pure, in the aggregate).
//! - [`worker`]: the service: pulls commands from `MZ_CMD`, keeps one actor per live chat,
//!   appends the aggregate's events to the chat's log with optimistic concurrency, and drives
//!   runs to their end.

pub mod chat;
pub mod metrics;
pub mod model;
pub mod perf;
pub mod tools;
pub mod worker;

pub use worker::{Options, Worker};

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    #[error("consumer failed: {0}")]
    Consumer(String),
}
