//! The status socket under a crowd: connection limits, idle connections closed early while
//! the shared slots run short, and administrators still getting in. A read-group user with
//! hundreds of idle connections against a real agent is in
//! `tests/tests/status_socket_pressure.rs`.

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

fn connect_when_free(path: &Path) -> RpcClient {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut client = RpcClient::connect(path).unwrap();
        match client.call("echo", json!([])) {
            Ok(_) => return client,
            Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("expected a free slot within 5 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_until_one_closes() {
    let agent = TestAgent::start(|o| {
        o.max_connections = 2;
        o.admin_reserve = 0;
    })
    .await;
    let path = agent.path.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        // The start-up probe's connection may hold a slot for a moment.
        let a = connect_when_free(&path);
        let b = connect_when_free(&path);
        let refused = RpcClient::connect(&path)
            .unwrap()
            .call("echo", json!([3]))
            .unwrap_err();
        match refused {
            ClientError::Rpc { code, message, .. } => {
                assert_eq!(code, BUSY);
                assert!(message.starts_with("too many connections"), "{message}");
            }
            other => panic!("expected too-many-connections, saw {other:?}"),
        }
        (a, b)
    })
    .await
    .unwrap();
    drop(first);
    // The agent notices the close asynchronously; a slot frees up shortly after.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match agent.call("echo", json!([4])).await {
            Ok(v) => break assert_eq!(v, json!([4])),
            Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("a slot should have freed up: {e}"),
        }
    }
    drop(second);
}

/// Raises the soft limit on open descriptors to at least `want`, within the hard limit.
fn raise_fd_limit(want: u64) -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return false;
    }
    if limit.rlim_cur >= want {
        return true;
    }
    if limit.rlim_max < want {
        return false;
    }
    limit.rlim_cur = want;
    // SAFETY: `limit` is a valid rlimit, with the soft limit within the hard one.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_at_once_are_each_answered_or_refused() {
    const CLIENTS: usize = 1000;
    // Both ends of every connection live in this process: ~2,000 descriptors at the peak.
    if !raise_fd_limit(2 * CLIENTS as u64 + 256) {
        eprintln!("skipped: the descriptor limit cannot be raised to hold {CLIENTS} clients");
        return;
    }
    let agent = TestAgent::start(|_| {}).await;
    let all_in = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut clients = JoinSet::new();
    for i in 0..CLIENTS {
        let (path, all_in) = (agent.path.clone(), Arc::clone(&all_in));
        clients.spawn(async move {
            let mut stream = UnixStream::connect(&path).await.expect("connect");
            let request = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"echo\",\"params\":[{i}]}}\n"
            );
            // A refused connection may be closed before the request is written.
            let _ = stream.write_all(request.as_bytes()).await;
            let mut line = String::new();
            BufReader::new(&mut stream)
                .read_line(&mut line)
                .await
                .expect("an answer");
            // Every connection stays open until all have their answer, so the limit binds.
            all_in.wait().await;
            let answer: Value = serde_json::from_str(&line).expect("one JSON line");
            if answer["result"] == json!([i]) {
                Ok(())
            } else {
                assert_eq!(code(&answer), BUSY, "{answer}");
                Err(())
            }
        });
    }
    let (mut answered, mut refused) = (0, 0);
    while let Some(outcome) = clients.join_next().await {
        match outcome.unwrap() {
            Ok(()) => answered += 1,
            Err(()) => refused += 1,
        }
    }
    assert_eq!(
        (answered, refused),
        // Every client is this process's uid, an administrator: the shared slots and the
        // ones kept for administrators.
        (
            DEFAULT_MAX_CONNECTIONS + DEFAULT_ADMIN_RESERVE,
            CLIENTS - DEFAULT_MAX_CONNECTIONS - DEFAULT_ADMIN_RESERVE
        )
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match agent.call("whoami", Value::Null).await {
            Ok(_) => break,
            Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the agent should serve again once the crowd left: {e}"),
        }
    }
}
