//! The bus on a three-node JetStream cluster (real nats-servers on loopback): `NATS_URL` lists
//! every node, and a whole fleet applying R3 definitions at the same moment all succeed.

use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_testkit::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_starting_at_once_applies_r3_definitions_on_a_cluster() {
    let cluster = NatsCluster::start(3).await.unwrap();
    assert_eq!(cluster.url.split(',').count(), 3);
    let namespace = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let defs = Definitions::embedded().unwrap().with_replicas(3);
    // Six roles start together, as `docker compose up` starts them.
    let mut starts = Vec::new();
    for i in 0..6 {
        let (url, ns, defs) = (cluster.url.clone(), namespace.clone(), defs.clone());
        starts.push(tokio::spawn(async move {
            let bus = Bus::connect(&url, &ns, &format!("role-{i}")).await?;
            bus.apply(&defs).await?;
            Ok::<Bus, mozaiks_bus::Error>(bus)
        }));
    }
    let mut buses = Vec::new();
    for s in starts {
        buses.push(s.await.unwrap().expect("connect and apply"));
    }
    let bus = &buses[0];
    let names = [
        bus.subjects().name("MZ_EVT"),
        bus.subjects().name("MZ_CMD"),
        format!("KV_{}", bus.subjects().name("MZ_OWNERS")),
        format!("KV_{}", bus.subjects().name("MZ_APPS")),
    ];
    for base in &names {
        let mut stream = bus.jetstream().get_stream(base).await.expect(base);
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{base}");
        assert_eq!(
            info.cluster.as_ref().map(|c| c.replicas.len()),
            Some(2),
            "{base}: {:?}",
            info.cluster
        );
    }
    // Applying again (the next start) changes nothing and succeeds.
    bus.apply(&defs).await.unwrap();
}
