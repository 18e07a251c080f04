//! The fleet on a three-server JetStream cluster (R3 streams): the control stream's leader is
//! killed in the middle of a burst of commands, and the agent still applies every command
//! exactly once.

use std::{collections::BTreeMap, time::Duration};

use flowwarden::fleet::{
    admin::Admin,
    command::{Action, Envelope, Target},
    keys::AdminKey,
};
use flowwarden_tests::{
    nats::{FleetAdmin, FleetHost, NatsCluster, wait_for},
    privileged::require_root,
    stack::ECHO_POLICY,
};
use serde_json::json;

/// Commands in the burst; the leader dies after a third of them.
const BURST: usize = 300;

#[test]
fn a_server_killed_during_a_burst_loses_no_command_and_doubles_none() {
    if !require_root("a_server_killed_during_a_burst_loses_no_command_and_doubles_none") {
        return;
    }
    let mut cluster = NatsCluster::start("fleet-cluster").expect("three nats-servers");
    let admin = FleetAdmin::new("fleet-cluster", cluster.urls());
    // The cluster elects its JetStream meta leader first; until then creating streams fails.
    wait_for(
        Duration::from_secs(60),
        "fleet init --replicas 3 on the cluster",
        || admin.cli(&["init", "--replicas", "3"]).0,
    );
    let ports: Vec<u16> = cluster.servers.iter().map(|s| s.port).collect();
    let host = FleetHost::start(&admin, "fk1", ECHO_POLICY, &ports, "");
    wait_for(Duration::from_secs(60), "the agent is current", || {
        host.fleet_status()["current"] == true
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = AdminKey::load(&admin.key).unwrap();
    let config =
        flowwarden::fleet::FleetConfig::for_admin(admin.servers.clone(), admin.prefix.clone());
    let (ids, killed) = rt.block_on(async {
        let a = Admin::connect(&config, 3).await.unwrap();
        let mut ids = Vec::new();
        let mut killed = None;
        for i in 0..BURST {
            if i == BURST / 3 {
                let mut stream = a.js.get_stream(a.names.control_stream()).await.unwrap();
                let info = stream.info().await.unwrap();
                let leader = info
                    .cluster
                    .as_ref()
                    .and_then(|c| c.leader.clone())
                    .unwrap();
                let victim = cluster
                    .servers
                    .iter_mut()
                    .find(|s| s.name == leader)
                    .unwrap();
                victim.kill();
                killed = Some(leader);
            }
            // Each command ends a session nobody has: cheap, and answered "not found".
            let env = Envelope::new(
                &key,
                Target::All,
                Action::Call {
                    method: "sessions.terminate".into(),
                    params: json!({"ids": [format!("{:016x}", 0xdead_0000_u64 + i as u64)]}),
                },
            )
            .unwrap();
            let bytes = env.sign(&key);
            // Retried with the same message id until stored: the stream keeps one copy.
            let mut tries = 0;
            loop {
                match a
                    .publish_signed(&env.id, &Target::All, bytes.clone(), None, Duration::ZERO)
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tries += 1;
                        assert!(tries < 200, "command {i} never stored: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            ids.push(env.id);
        }
        (ids, killed.unwrap())
    });

    wait_for(Duration::from_secs(120), "every command applied", || {
        host.fleet_status()["commands_applied"]
            .as_u64()
            .unwrap_or(0)
            >= BURST as u64
    });
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    for e in host.audit("fleet_command_applied") {
        *applied
            .entry(e["command"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let lost: Vec<&String> = ids.iter().filter(|id| !applied.contains_key(*id)).collect();
    let doubled: Vec<(&String, &usize)> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(lost.is_empty(), "lost after killing {killed}: {lost:?}");
    assert!(
        doubled.is_empty(),
        "applied twice after killing {killed}: {doubled:?}"
    );
    assert_eq!(applied.len(), BURST);
}
