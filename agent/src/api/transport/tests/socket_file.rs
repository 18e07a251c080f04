//! The socket file: its modes and group, stale and live sockets, and its removal.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_sets_modes_clears_stale_sockets_and_refuses_live_ones() {
    let dir = TempDir::new("bind");
    let mut opts = SocketOptions::new(dir.0.join("run").join("agent.sock"));
    // SAFETY: getegid has no preconditions and cannot fail.
    opts.read_group = Some(unsafe { libc::getegid() });
    let listener = bind(&opts).unwrap();
    let sock = std::fs::metadata(&opts.path).unwrap();
    let parent = std::fs::metadata(dir.0.join("run")).unwrap();
    assert_eq!(sock.permissions().mode() & 0o7777, 0o660);
    assert_eq!(parent.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        (sock.gid(), parent.gid()),
        (opts.read_group.unwrap(), opts.read_group.unwrap())
    );
    assert_eq!(
        std::fs::read_dir(dir.0.join("run")).unwrap().count(),
        1,
        "no temporary left"
    );

    let err = bind(&opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "another agent is already serving on {}",
            opts.path.display()
        )
    );

    // Dropping a listener leaves its file behind, as a crashed agent would.
    drop(listener);
    let again = bind(&opts).expect("a stale socket is replaced");
    drop(again);

    std::fs::remove_file(&opts.path).unwrap();
    std::fs::write(&opts.path, "not a socket").unwrap();
    assert!(matches!(bind(&opts), Err(SocketError::NotASocket { .. })));
}

/// The agent binds before it serves, so that a bad path stops its start; serving must
/// take over that socket, not bind again (which found the first one "stale").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_listener_serves_the_socket_bind_made() {
    let dir = TempDir::new("bind-once");
    let opts = SocketOptions::new(dir.0.join("agent.sock"));
    let listener = bind(&opts).unwrap();
    let bound = std::fs::metadata(&opts.path).unwrap().ino();
    let policy = AccessPolicy {
        admin_gid: None,
        read_gid: None,
        admin_group: "fw-admin".into(),
        read_group: "fw".into(),
        // SAFETY: geteuid has no preconditions and cannot fail.
        agent_uid: unsafe { libc::geteuid() },
    };
    let task = tokio::spawn(serve_listener(
        listener,
        opts.clone(),
        policy,
        Arc::new(Toy::default()),
    ));
    let path = opts.path.clone();
    let answer = tokio::task::spawn_blocking(move || {
        RpcClient::connect(&path)?.call("echo", json!({ "x": 1 }))
    })
    .await
    .unwrap()
    .expect("an answer on the socket bind made");
    assert_eq!(answer, json!({ "x": 1 }));
    assert_eq!(
        std::fs::metadata(&opts.path).unwrap().ino(),
        bound,
        "the socket file was replaced: bound a second time"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_removes_its_socket() {
    let agent = TestAgent::start(|_| {}).await;
    let path = agent.path.clone();
    agent.task.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is still there",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
