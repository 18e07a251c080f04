//! The status socket server's tests against a stand-in core: framing, calls, streams and
//! peer access here; large answers, the connection budget and the socket file in their own
//! files.

mod answers;
mod pressure;
mod socket_file;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::Instant,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    sync::Notify,
    task::JoinHandle,
    time::timeout,
};

use super::*;
use crate::api::{
    client::{
        ClientError, RpcClient,
        tests::{TempDir, TestGroup, TestUser, call_as, privileged},
    },
    jsonrpc::{
        BUSY, INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, PERMISSION_DENIED,
    },
    peer::require,
};

/// A stand-in core: `echo`, `whoami`, `admin.poke` (admin only), `sleep`, `panic`; streams
/// `count` (n items, then the end), `flood` (large items until nobody takes them) and
/// `quiet` (nothing, until the subscriber is gone).
#[derive(Default)]
struct Toy {
    /// Signalled when a `flood` or `quiet` subscriber has gone away.
    gone: Arc<Notify>,
}

impl Handler for Toy {
    async fn handle(&self, call: Call, caller: Caller) -> Result<Reply, RpcError> {
        let n = call.params["n"].as_u64().unwrap_or(0);
        match call.method.as_str() {
            "rows" => return Ok(Reply::raw(move |out| write_rows(n, out))),
            "rows.fail_early" => {
                return Ok(Reply::raw(|_| Err(io::Error::other("no rows today"))));
            }
            "rows.fail_late" => {
                return Ok(Reply::raw(move |out| {
                    write_rows(n, out)?;
                    Err(io::Error::other("the rows ran out"))
                }));
            }
            _ => {}
        }
        self.value(call, caller).await.map(Reply::Value)
    }

    fn is_stream(&self, method: &str) -> bool {
        matches!(method, "count" | "flood" | "quiet")
    }

    async fn stream(
        &self,
        call: Call,
        _caller: Caller,
    ) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
        let (tx, rx) = mpsc::channel(4);
        let gone = Arc::clone(&self.gone);
        match call.method.as_str() {
            "count" => {
                let Some(n) = call.params["n"].as_u64() else {
                    return Err(RpcError::invalid_params("count needs {\"n\": number}"));
                };
                tokio::spawn(async move {
                    for i in 0..n {
                        let _ = tx.send(("count.tick".to_owned(), json!({ "i": i }))).await;
                    }
                });
            }
            "flood" => {
                tokio::spawn(async move {
                    let big = "x".repeat(64 * 1024);
                    while tx.send(("flood.item".to_owned(), json!(big))).await.is_ok() {}
                    gone.notify_one();
                });
            }
            _ => {
                tokio::spawn(async move {
                    tx.closed().await;
                    gone.notify_one();
                });
            }
        }
        Ok((json!({ "subscribed": call.method }), rx))
    }
}

impl Toy {
    async fn value(&self, call: Call, caller: Caller) -> Result<Value, RpcError> {
        match call.method.as_str() {
            "echo" => Ok(call.params),
            "whoami" => Ok(json!({ "uid": caller.peer.uid, "access": caller.access })),
            "admin.poke" => {
                require(caller.access, Access::Admin, "admin.poke")?;
                Ok(json!("poked"))
            }
            "sleep" => {
                let ms = call.params["ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!(ms))
            }
            "panic" => panic!("the toy handler panics on purpose"),
            other => Err(RpcError::method_not_found(other)),
        }
    }
}

/// The answer of `rows`: `[{"row":0,"pad":"…"},…]`, written piece by piece as a large
/// list would be.
fn write_rows(n: u64, out: &mut dyn io::Write) -> io::Result<()> {
    let pad = "p".repeat(100);
    out.write_all(b"[")?;
    for i in 0..n {
        if i > 0 {
            out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *out, &json!({ "row": i, "pad": pad }))?;
    }
    out.write_all(b"]")
}

/// An agent serving a `Toy` on a socket in a throwaway directory.
struct TestAgent {
    path: PathBuf,
    toy_gone: Arc<Notify>,
    task: JoinHandle<Result<(), SocketError>>,
    _dir: TempDir,
}

impl TestAgent {
    async fn start(tweak: impl FnOnce(&mut SocketOptions)) -> Self {
        let policy = AccessPolicy {
            admin_gid: None,
            read_gid: None,
            admin_group: "fw-admin".into(),
            read_group: "fw".into(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            agent_uid: unsafe { libc::geteuid() },
        };
        Self::start_with(policy, tweak).await
    }

    async fn start_with(policy: AccessPolicy, tweak: impl FnOnce(&mut SocketOptions)) -> Self {
        let dir = TempDir::new("transport");
        let mut opts = SocketOptions::new(dir.0.join("run").join("agent.sock"));
        tweak(&mut opts);
        let toy = Arc::new(Toy::default());
        let toy_gone = Arc::clone(&toy.gone);
        let path = opts.path.clone();
        let task = tokio::spawn(serve(opts, policy, toy));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&path).is_err() {
            assert!(!task.is_finished(), "serve ended early: {:?}", task.await);
            assert!(
                Instant::now() < deadline,
                "the agent never listened on {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            path,
            toy_gone,
            task,
            _dir: dir,
        }
    }

    /// A blocking client call, off the runtime's threads.
    async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        let path = self.path.clone();
        let method = method.to_owned();
        tokio::task::spawn_blocking(move || RpcClient::connect(&path)?.call(&method, params))
            .await
            .unwrap()
    }

    /// Sends `bytes`, shuts down the write side and returns every line the agent sent
    /// before closing.
    async fn exchange(&self, bytes: &[u8]) -> Vec<Value> {
        let mut stream = UnixStream::connect(&self.path).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        read_all(stream).await
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_all(from: impl tokio::io::AsyncRead + Unpin) -> Vec<Value> {
    let mut lines = BufReader::new(from).lines();
    let mut seen = Vec::new();
    // A reset after the last line (the agent closed with input unread) ends it too.
    while let Ok(Some(line)) = timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the agent neither answered nor closed within 10 s")
    {
        seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
    }
    seen
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, saw {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_streams_round_trip_through_the_client() {
    let agent = TestAgent::start(|_| {}).await;
    assert_eq!(
        agent.call("echo", json!({ "a": [1, 2] })).await.unwrap(),
        json!({ "a": [1, 2] })
    );
    let who = agent.call("whoami", Value::Null).await.unwrap();
    assert_eq!(
        who["access"],
        json!("admin"),
        "the agent's own uid administers: {who}"
    );
    match agent.call("nope", Value::Null).await {
        Err(ClientError::Rpc { code, message, .. }) => {
            assert_eq!(
                (code, message.as_str()),
                (METHOD_NOT_FOUND, "unknown method \"nope\"")
            );
        }
        other => panic!("expected method-not-found, saw {other:?}"),
    }

    let path = agent.path.clone();
    let (initial, items, after) = tokio::task::spawn_blocking(move || {
        let mut client = RpcClient::connect(&path).unwrap();
        // A panic in the core answers that call and leaves the connection usable.
        let panicked = client.call("panic", Value::Null).unwrap_err();
        assert!(
            matches!(
                &panicked,
                ClientError::Rpc {
                    code: INTERNAL_ERROR,
                    ..
                }
            ),
            "{panicked:?}"
        );
        let bad = client.subscribe("count", json!({})).err().expect("no n");
        assert!(
            matches!(bad, ClientError::Rpc { code: -32602, .. }),
            "{bad:?}"
        );
        let (initial, items) = client.subscribe("count", json!({ "n": 5 })).unwrap();
        let items: Vec<_> = items.map(Result::unwrap).collect();
        // The stream's end closes the connection.
        let after = client.call("echo", json!([]));
        (initial, items, after)
    })
    .await
    .unwrap();
    assert_eq!(initial, json!({ "subscribed": "count" }));
    let want: Vec<_> = (0..5)
        .map(|i| ("count.tick".to_owned(), json!({ "i": i })))
        .collect();
    assert_eq!(items, want);
    assert!(
        matches!(
            after,
            Err(ClientError::Closed { .. } | ClientError::Io { .. })
        ),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_get_errors_and_the_connection_goes_on() {
    let agent = TestAgent::start(|_| {}).await;
    let input = concat!(
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[1]}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\"\n",
        "42\n",
        "{\"jsonrpc\":\"1.0\",\"id\":3,\"method\":\"echo\"}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"echo\",\"prams\":{}}\n",
        "[{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"echo\"}]\n",
        "{\"jsonrpc\":\"2.0\",\"method\":\"echo\"}\n",
        "\n",
        "   \r\n",
        "{\"jsonrpc\":\"2.0\",\"id\":\"last\",\"method\":\"echo\",\"params\":{\"ok\":true}}\r\n",
    );
    let seen = agent.exchange(input.as_bytes()).await;
    assert_eq!(
        seen.len(),
        7,
        "one answer per call, none for the notification: {seen:#?}"
    );
    assert_eq!(seen[0], json!({ "jsonrpc": "2.0", "id": 1, "result": [1] }));
    assert_eq!(
        (code(&seen[1]), &seen[1]["id"]),
        (PARSE_ERROR, &Value::Null)
    );
    assert!(
        seen[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON at line 1 column")
    );
    assert_eq!(code(&seen[2]), INVALID_REQUEST);
    assert_eq!(
        (code(&seen[3]), &seen[3]["id"]),
        (INVALID_REQUEST, &json!(3))
    );
    assert_eq!(
        (code(&seen[4]), &seen[4]["id"]),
        (INVALID_REQUEST, &json!(4))
    );
    assert!(
        seen[4]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"prams\"")
    );
    assert_eq!(
        seen[5]["error"]["message"],
        json!("batches are not supported")
    );
    assert_eq!(
        seen[6],
        json!({ "jsonrpc": "2.0", "id": "last", "result": { "ok": true } })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_line_closes_its_connection_but_not_the_agent() {
    let agent = TestAgent::start(|_| {}).await;
    let stream = UnixStream::connect(&agent.path).await.unwrap();
    let (read, mut write) = stream.into_split();
    // The agent stops reading part way, so this write may fail: that is expected.
    let writer = tokio::spawn(async move {
        let mut line = vec![b'x'; 2 << 20];
        line.push(b'\n');
        let _ = write.write_all(&line).await;
    });
    let seen = read_all(read).await;
    drop(writer);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(code(&seen[0]), INVALID_REQUEST);
    assert_eq!(
        seen[0]["error"]["message"],
        json!("request line exceeds 1048576 bytes")
    );
    assert_eq!(
        agent.call("echo", json!(["still here"])).await.unwrap(),
        json!(["still here"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let agent = TestAgent::start(|o| o.idle_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let silent = UnixStream::connect(&agent.path).await.unwrap();
    assert!(read_all(silent).await.is_empty());
    // A line dribbled out byte by byte never completes, so it counts as idle too.
    let mut dribbling = UnixStream::connect(&agent.path).await.unwrap();
    for _ in 0..10 {
        if dribbling.write_all(b" ").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(read_all(dribbling).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_gets_its_answers_in_order() {
    let agent = TestAgent::start(|_| {}).await;
    let input = concat!(
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"sleep\",\"params\":{\"ms\":200}}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]}\n",
        // The last line needs no newline: the end of input ends it.
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"count\",\"params\":{\"n\":3}}",
    );
    let seen = agent.exchange(input.as_bytes()).await;
    let ids: Vec<_> = seen.iter().map(|v| v.get("id").cloned()).collect();
    let methods: Vec<_> = seen.iter().map(|v| v.get("method").cloned()).collect();
    assert_eq!(
        ids[..3],
        [Some(json!(1)), Some(json!(2)), Some(json!(3))],
        "{seen:#?}"
    );
    assert_eq!(
        methods[3..],
        [
            Some(json!("count.tick")),
            Some(json!("count.tick")),
            Some(json!("count.tick"))
        ]
    );
}

/// A connection that has been answered once, retried while the agent is at its limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_without_holding_anyone_up() {
    let agent = TestAgent::start(|o| o.write_timeout = Duration::from_millis(300)).await;
    let mut stuck = UnixStream::connect(&agent.path).await.unwrap();
    stuck
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"flood\"}\n")
        .await
        .unwrap();
    // Meanwhile others are served as usual.
    assert_eq!(
        agent.call("echo", json!(["fine"])).await.unwrap(),
        json!(["fine"])
    );
    timeout(Duration::from_secs(10), agent.toy_gone.notified())
        .await
        .expect("the flood's subscriber should be dropped once writes stall for 300 ms");
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_client_closes() {
    let agent = TestAgent::start(|_| {}).await;
    for half_close_first in [false, true] {
        let mut stream = UnixStream::connect(&agent.path).await.unwrap();
        stream
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"quiet\"}\n")
            .await
            .unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(&mut stream);
        reader.read_line(&mut line).await.unwrap();
        assert!(line.contains("\"subscribed\":\"quiet\""), "{line}");
        if half_close_first {
            // Shutting down the write side alone keeps the stream alive...
            stream.shutdown().await.unwrap();
            let early = timeout(Duration::from_millis(1500), agent.toy_gone.notified()).await;
            assert!(early.is_err(), "a half-close must not end a stream");
        }
        drop(stream);
        // ...closing the socket ends it.
        timeout(Duration::from_secs(5), agent.toy_gone.notified())
            .await
            .unwrap_or_else(|_| {
                panic!("the stream outlived its client (half-close first: {half_close_first})")
            });
    }
}

// The guard only keeps other privileged tests (in other threads, on other runtimes) from
// adding users at the same time; nothing on this runtime waits for it.
#[expect(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_users_get_the_access_their_groups_give() {
    let Some(_guard) = privileged() else { return };
    let (admin, read) = (TestGroup::create("adm"), TestGroup::create("rd"));
    let user = TestUser::create("u");
    let policy = AccessPolicy::from_names(&admin.name, &read.name).unwrap();
    assert_eq!(
        (policy.admin_gid, policy.read_gid),
        (Some(admin.gid), Some(read.gid))
    );
    let agent = TestAgent::start_with(policy.clone(), |o| o.read_group = Some(read.gid)).await;
    let run = agent.path.parent().unwrap().to_owned();
    let as_user =
        |groups: &[u32], method: &str| call_as(user.uid, user.gid, groups, &agent.path, method);

    // The filesystem is the first gate: neither group cannot even open the socket...
    let seen = tokio::task::block_in_place(|| as_user(&[], "whoami"));
    assert!(
        seen["client"]
            .as_str()
            .is_some_and(|m| m.starts_with("permission denied on ")),
        "{seen}"
    );
    // ...and the read group can, as a supplementary group among many (past the 32 that
    // `peer_of` asks for at first).
    let mut many: Vec<u32> = (0..40).map(|i| 70_000 + i).collect();
    many.push(read.gid);
    let seen = tokio::task::block_in_place(|| as_user(&many, "whoami"));
    assert_eq!(seen, json!({ "ok": { "uid": user.uid, "access": "read" } }));
    let seen = tokio::task::block_in_place(|| as_user(&[read.gid], "admin.poke"));
    assert_eq!(seen["rpc"]["code"], json!(PERMISSION_DENIED), "{seen}");
    // The socket's group is the read group, so administrators are in both.
    let seen = tokio::task::block_in_place(|| {
        call_as(user.uid, admin.gid, &[read.gid], &agent.path, "admin.poke")
    });
    assert_eq!(seen, json!({ "ok": "poked" }), "admin as the primary group");

    // The credentials check is the second gate, for a socket someone opened up.
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&agent.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let seen = tokio::task::block_in_place(|| as_user(&[], "whoami"));
    let want = format!(
        "permission denied: uid {} is in neither the {a} nor the {r} group; ask an \
         administrator to add you to {r} (read) or {a} (admin)",
        user.uid,
        a = admin.name,
        r = read.name
    );
    assert_eq!(
        seen,
        json!({ "rpc": { "code": PERMISSION_DENIED, "message": want } })
    );
    let seen = tokio::task::block_in_place(|| as_user(&[admin.gid], "whoami"));
    assert_eq!(
        seen,
        json!({ "ok": { "uid": user.uid, "access": "admin" } })
    );
}
