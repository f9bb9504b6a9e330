//! The kill matrix: one fault after another under load, then the checks.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mozaiks_testkit::TestServers;

use crate::Mode;
use crate::checks::{self, Report};
use crate::harness::Harness;
use crate::load::{self, Shared};

/// One fault of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// SIGKILL a worker, start it again.
    Worker,
    /// SIGKILL a gateway, start it again.
    Gateway,
    /// SIGTERM a gateway: it drains (1012 to its sockets, which reconnect to the other), stops,
    /// and is started again.
    Drain,
    /// SIGKILL the projector, start it again.
    Projector,
    /// SIGKILL billing, start it again.
    Billing,
    /// SIGSTOP the Mongo-wire server, SIGCONT it after `Mode::stall`.
    Mongo,
    /// SIGKILL nats-server and start it again on its store.
    Nats,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Worker,
        Phase::Gateway,
        Phase::Drain,
        Phase::Projector,
        Phase::Billing,
        Phase::Mongo,
        Phase::Nats,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Worker => "worker",
            Phase::Gateway => "gateway",
            Phase::Drain => "drain",
            Phase::Projector => "projector",
            Phase::Billing => "billing",
            Phase::Mongo => "mongo",
            Phase::Nats => "nats",
        }
    }

    /// `MOZAIKS_FAULTS_PHASES` (comma-separated names), else all of them in order.
    fn from_env() -> Vec<Phase> {
        match std::env::var("MOZAIKS_FAULTS_PHASES") {
            Ok(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|n| {
                    let n = n.trim();
                    *Phase::ALL
                        .iter()
                        .find(|p| p.name() == n)
                        .unwrap_or_else(|| panic!("unknown phase {n:?} in MOZAIKS_FAULTS_PHASES"))
                })
                .collect(),
            _ => Phase::ALL.to_vec(),
        }
    }

    /// Injects the fault (round `round` picks which replica); returns what happened.
    async fn inject(
        self,
        h: &mut Harness,
        shared: &Shared,
        mode: &Mode,
        round: usize,
        report: &mut Report,
        extra: &mut Vec<load::ChatRecord>,
    ) -> String {
        let pause = Duration::from_secs(1);
        match self {
            Phase::Worker | Phase::Gateway | Phase::Projector | Phase::Billing => {
                let name = match self {
                    Phase::Worker => format!("worker-{}", round % 2),
                    Phase::Gateway => format!("gateway-{}", (round + 1) % 2),
                    Phase::Projector => "projector-0".into(),
                    _ => "billing-0".into(),
                };
                let i = h.slot(&name);
                h.kill(i);
                tokio::time::sleep(pause).await;
                h.restart(i).await;
                format!("SIGKILL {name}, restarted")
            }
            Phase::Drain => {
                let gw = round % 2;
                let other = (gw + 1) % 2;
                let name = format!("gateway-{gw}");
                let i = h.slot(&name);
                let observer =
                    load::DrainObserver::open(shared, gw, &format!("drain-observer-{round}")).await;
                let open = shared.open[gw].load(Ordering::Relaxed);
                let since = Instant::now();
                let status = h.terminate(i).await;
                let drained = shared.closes_since(gw, 1012, since);
                let (code, record) = observer.finish(shared, other).await;
                extra.push(record);
                if !status.success() {
                    report
                        .failures
                        .push(format!("{name} exited with {status} after SIGTERM"));
                }
                if code != Some(1012) {
                    report.failures.push(format!(
                        "{name} drained: an idle socket ended with {code:?}, not 1012"
                    ));
                }
                h.restart(i).await;
                format!(
                    "SIGTERM {name} with {open} client socket(s) and an idle one: {drained} client(s) and the idle one ({code:?}) closed with 1012, exit {status}; restarted"
                )
            }
            Phase::Mongo => {
                h.servers
                    .pause_mongo()
                    .expect("SIGSTOP the Mongo-wire server");
                tokio::time::sleep(mode.stall).await;
                h.servers
                    .resume_mongo()
                    .expect("SIGCONT the Mongo-wire server");
                format!("Mongo-wire server stopped for {} s", mode.stall.as_secs())
            }
            Phase::Nats => {
                h.servers.kill_nats().expect("SIGKILL nats-server");
                tokio::time::sleep(Duration::from_secs(2)).await;
                h.servers.restart_nats().await.expect("restart nats-server");
                "nats-server SIGKILLed, restarted 2 s later on its store".into()
            }
        }
    }
}

/// Waits (up to `limit`) until clients saw `more` runs end after `before`: the fleet serves.
pub async fn serving(shared: &Shared, before: usize, more: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while shared.runs_ended.load(Ordering::Relaxed) < before + more {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// Stops the load and collects the clients' records: they get `settle` to finish their runs,
/// then give up and report.
pub async fn finish_load(
    shared: &Shared,
    mut load: tokio::task::JoinHandle<Vec<load::ChatRecord>>,
    settle: Duration,
) -> Vec<load::ChatRecord> {
    shared.stop.store(true, Ordering::Relaxed);
    match tokio::time::timeout(settle, &mut load).await {
        Ok(records) => records.expect("the load task panicked"),
        Err(_) => {
            shared.give_up.store(true, Ordering::Relaxed);
            load.await.expect("the load task panicked")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_matrix_loses_nothing_acknowledged() {
    let mode = Mode::from_env();
    let phases = Phase::from_env();
    let started = Instant::now();
    let servers = TestServers::start().await.expect("test servers");
    let mut h = Harness::start(servers, &[]).await;
    let shared = Shared::new(h.gateway_urls());
    let load = tokio::spawn(load::run(shared.clone(), mode.plan));
    let mut report = Report::default();
    // Records of the test's own sockets (the drain observers), checked with the clients'.
    let mut extra = Vec::new();
    let mut timeline = vec![format!(
        "{:>6.1} s fleet ready ({} mode; health listener on every role: {})",
        started.elapsed().as_secs_f64(),
        if mode.long { "long" } else { "bounded" },
        h.health_listener
    )];
    tokio::time::sleep(mode.dwell).await;
    for round in 0..mode.rounds {
        for &phase in &phases {
            let at = started.elapsed().as_secs_f64();
            let what = phase
                .inject(&mut h, &shared, &mode, round, &mut report, &mut extra)
                .await;
            let before = shared.runs_ended.load(Ordering::Relaxed);
            timeline.push(format!(
                "{at:>6.1} s {}: {what} ({:.1} s)",
                phase.name(),
                started.elapsed().as_secs_f64() - at
            ));
            tokio::time::sleep(mode.dwell).await;
            // The fleet serves again after each fault: runs keep ending.
            if !serving(&shared, before, 1, Duration::from_secs(60)).await {
                report.failures.push(format!(
                    "no run ended between {at:.1} s and {:.1} s (the {} phase and after)",
                    started.elapsed().as_secs_f64(),
                    phase.name()
                ));
            }
        }
    }
    let mut records = finish_load(&shared, load, mode.settle).await;
    timeline.push(format!(
        "{:>6.1} s load stopped: {} chats",
        started.elapsed().as_secs_f64(),
        records.len()
    ));
    records.extend(extra);
    let checked = checks::run(&mut h, &records, mode.settle).await;
    report.failures.extend(checked.failures);
    report.facts.extend(checked.facts);
    timeline.push(format!(
        "{:>6.1} s checked",
        started.elapsed().as_secs_f64()
    ));
    report.facts.extend(timeline);
    if !report.failures.is_empty() {
        report.facts.push(crate::disk_space());
        report.facts.push(format!("process logs:\n{}", h.logs()));
    }
    report.assert_clean("kill matrix");
}
