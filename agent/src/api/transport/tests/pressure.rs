//! The status socket under a crowd: idle connections are closed early while the shared slots
//! run short, and administrators still get in. A read-group user with hundreds of idle
//! connections against a real agent is in `tests/tests/status_socket_pressure.rs`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_early_under_pressure() {
    // Six of eight shared slots taken is pressure, until only four are; the normal idle
    // timeout would be 300 s.
    let agent = TestAgent::start(|o| {
        o.max_connections = 8;
        o.pressure_idle_timeout = Duration::from_millis(200);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(UnixStream::connect(&agent.path).await.unwrap());
        // In order, so that the oldest is known.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The two oldest go first, which ends the pressure; `read_all` fails the test if the
    // agent has neither answered nor closed within 10 s.
    for stream in idle.drain(..2) {
        assert!(read_all(stream).await.is_empty(), "closed without a word");
    }
    drop(idle);
    // Once they are gone the pressure is too, and everyone is served as usual.
    assert_eq!(
        agent.call("echo", json!(["calm"])).await.unwrap(),
        json!(["calm"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_gets_in_when_the_shared_slots_are_full() {
    // This process is an administrator (the agent's own uid), so its connections may take
    // the reserved slots too; `max_per_uid` does not apply to it.
    let agent = TestAgent::start(|o| {
        o.max_connections = 3;
        o.admin_reserve = 2;
        o.pressure_idle_timeout = o.idle_timeout;
    })
    .await;
    let path = agent.path.clone();
    tokio::task::spawn_blocking(move || {
        let held: Vec<RpcClient> = (0..5).map(|_| connect_when_free(&path)).collect();
        let refused = RpcClient::connect(&path)
            .unwrap()
            .call("echo", json!([6]))
            .unwrap_err();
        match refused {
            ClientError::Rpc {
                code,
                message,
                data,
                ..
            } => {
                assert_eq!(code, BUSY);
                assert!(
                    message.starts_with("too many connections: the agent serves at most 5"),
                    "{message}"
                );
                assert_eq!(data, Some(json!({ "limit": "connections", "max": 5 })));
            }
            other => panic!("expected busy past shared + reserved slots, saw {other:?}"),
        }
        drop(held);
    })
    .await
    .unwrap();
}
