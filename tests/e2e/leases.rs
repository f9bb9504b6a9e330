//! Fleet-wide singletons: of two projector processes exactly one holds the `retention` lease
//! (and so sweeps retention and archives deleted apps); when it dies, the other takes over.

use std::time::{Duration, Instant};

use mozaiks_control::lease::Leases;

use crate::fleet::*;

/// The pid in a holder id `{host}-{pid}-{tag}`.
fn pid_of(holder: &str) -> u32 {
    let parts: Vec<&str> = holder.rsplitn(3, '-').collect();
    parts[1]
        .parse()
        .unwrap_or_else(|_| panic!("holder {holder}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_projectors_holds_the_retention_lease_and_the_other_takes_over_when_it_dies() {
    let mut fleet = Fleet::start(1).await;
    let second = fleet.spawn("projector", None);
    let projectors: Vec<usize> = fleet
        .procs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.role == "projector")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(projectors.len(), 2);
    assert!(projectors.contains(&second));
    let bus = mozaiks_bus::Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "test")
        .await
        .unwrap();
    let leases = Leases::open(&bus, "observer").await.unwrap();
    let pids: Vec<u32> = projectors
        .iter()
        .map(|&i| fleet.procs[i].child.id())
        .collect();

    // Exactly one holds it, and keeps holding it while both live.
    let holder = fleet
        .eventually("a projector to hold the retention lease", || async {
            leases.holder_of("retention").await.unwrap()
        })
        .await;
    let first = pid_of(&holder.holder);
    assert!(pids.contains(&first), "{} not in {pids:?}", holder.holder);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let h = leases.holder_of("retention").await.unwrap().unwrap();
        assert_eq!(pid_of(&h.holder), first, "the lease changed hands");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acquired = |i: usize| {
        std::fs::read_to_string(&fleet.procs[i].log)
            .unwrap_or_default()
            .matches("Lease acquired.")
            .count()
    };
    let (a, b) = (acquired(projectors[0]), acquired(projectors[1]));
    assert_eq!(a + b, 1, "exactly one projector acquired it ({a}, {b})");

    // The holder dies (SIGKILL: no release); its lease ages out and the other takes over.
    let dead = projectors[pids.iter().position(|&p| p == first).unwrap()];
    fleet.procs[dead].child.kill().unwrap();
    fleet.procs[dead].child.wait().unwrap();
    let other = *pids.iter().find(|&&p| p != first).unwrap();
    fleet
        .eventually("the other projector to take the lease over", || async {
            leases
                .holder_of("retention")
                .await
                .unwrap()
                .filter(|h| pid_of(&h.holder) == other)
        })
        .await;
}
