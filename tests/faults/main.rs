//! Fault injection (issue 9): a fleet of separate processes (two gateways, two workers,
//! projector, billing) serving clients that stream and reconnect across gateways, while its
//! processes and servers are killed, drained, stalled and restarted one after another; then
//! checks that nothing acknowledged was lost (see `checks`). And a three-node NATS cluster with
//! R3 streams that loses a node under load.
//!
//! `cargo nextest run --test faults` (or `scripts/faults.sh`) runs the bounded mode, as CI does.
//! `MOZAIKS_FAULTS=long` runs longer: more chats in flight, longer phases, the matrix three
//! times. `MOZAIKS_FAULTS_PHASES=worker,gateway,…` runs only some phases of the matrix.
//! `MOZAIKS_FAULTS=measure` measures the throughput of each durability mode (`durability`).

#[allow(dead_code)]
#[path = "../e2e/fleet.rs"]
mod fleet;

mod checks;
mod cluster;
mod durability;
mod harness;
mod load;
mod matrix;

use std::time::Duration;

/// How long and how hard: the bounded default, or `MOZAIKS_FAULTS=long`.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub long: bool,
    pub plan: load::Plan,
    /// Load between two faults (and before the first).
    pub dwell: Duration,
    /// How long the Mongo-wire server stays stopped.
    pub stall: Duration,
    /// How many times the matrix runs.
    pub rounds: usize,
    /// How long the checks wait for clients, read models, ledger and MZ_CMD to settle.
    pub settle: Duration,
}

impl Mode {
    pub fn from_env() -> Mode {
        let long = std::env::var("MOZAIKS_FAULTS").is_ok_and(|v| v == "long");
        if long {
            Mode {
                long,
                plan: load::Plan {
                    in_flight: 40,
                    runs: 4,
                    eager_every: 3,
                },
                dwell: Duration::from_secs(20),
                stall: Duration::from_secs(20),
                rounds: 3,
                settle: Duration::from_secs(180),
            }
        } else {
            Mode {
                long,
                plan: load::Plan {
                    in_flight: 12,
                    runs: 3,
                    eager_every: 3,
                },
                dwell: Duration::from_secs(5),
                stall: Duration::from_secs(12),
                rounds: 1,
                settle: Duration::from_secs(90),
            }
        }
    }
}

/// Free space where the servers keep their data (a full disk on a shared machine stalls
/// JetStream; worth knowing when a run fails).
pub fn disk_space() -> String {
    let out = std::process::Command::new("df")
        .args(["-h", &std::env::temp_dir().to_string_lossy()])
        .output();
    match out {
        Ok(o) => format!("df: {}", String::from_utf8_lossy(&o.stdout).trim()),
        Err(e) => format!("df: {e}"),
    }
}
