//! End-to-end tests: real NATS, a real Mongo-wire server, real `mozaiks` processes, real HTTP and
//! WebSocket clients.

mod agui;
mod bad_input;
mod billing_stall;
mod children;
mod cli;
mod control;
mod cors;
mod credits;
mod dashboards;
mod deltas;
mod engine;
mod expiry;
mod fleet;
mod gateway;
mod jwks;
mod keys;
mod leases;
mod limits;
mod metrics;
mod mongo_uri;
mod ops;
mod plugins;
mod rebuild;
mod reliability;
mod slice;
mod storage;
