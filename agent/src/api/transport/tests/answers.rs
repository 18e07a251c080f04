//! Large answers that write themselves: one line, byte for byte what a built value gives,
//! and an error or a close (never a wrong line) when writing fails.

use super::*;

async fn raw_answer(path: &Path, request: &str) -> Vec<u8> {
    let mut stream = UnixStream::connect(path).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(b"\n").await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    timeout(Duration::from_secs(30), reader.read_until(b'\n', &mut line))
        .await
        .expect("an answer or a close within 30 s")
        .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_one_line_exactly_as_a_value_would_be() {
    let agent = TestAgent::start(|_| {}).await;
    // About 2.5 MiB: dozens of chunks.
    let n = 20_000;
    let line = raw_answer(
        &agent.path,
        &format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"method\":\"rows\",\"params\":{{\"n\":{n}}}}}"
        ),
    )
    .await;
    let mut rows = Vec::new();
    write_rows(n, &mut rows).unwrap();
    let rows: Value = serde_json::from_slice(&rows).unwrap();
    let want = crate::api::jsonrpc::response_ok(&json!("big"), rows) + "\n";
    assert_eq!(line.len(), want.len(), "one line of the same length");
    assert!(
        line == want.as_bytes(),
        "the streamed line differs from the one a built value gives"
    );

    // Through the client, and on a connection that then goes on.
    let path = agent.path.clone();
    let (rows, after) = tokio::task::spawn_blocking(move || {
        let mut client = RpcClient::connect(&path).unwrap();
        let rows = client.call("rows", json!({ "n": 3 })).unwrap();
        (rows, client.call("echo", json!(["after"])).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(rows[2]["row"], json!(2), "{rows}");
    assert_eq!(after, json!(["after"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_that_fails_is_an_error_or_a_close_never_a_wrong_line() {
    let agent = TestAgent::start(|_| {}).await;
    // Before anything was sent: an error answer, and the connection goes on.
    let input = concat!(
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"rows.fail_early\"}\n",
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]}\n",
    );
    let seen = agent.exchange(input.as_bytes()).await;
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        (code(&seen[0]), &seen[0]["id"]),
        (INTERNAL_ERROR, &json!(1))
    );
    assert!(
        seen[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no rows today"),
        "{}",
        seen[0]
    );
    assert_eq!(seen[1]["result"], json!([2]));

    // After chunks went out: the line cannot be finished, so the connection closes without
    // a newline, and nothing after it is answered.
    let mut stream = UnixStream::connect(&agent.path).await.unwrap();
    stream
        .write_all(
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"rows.fail_late\",\"params\":{\"n\":20000}}\n\
              {\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]}\n",
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut all),
    )
    .await
    .expect("closed within 30 s")
    .unwrap();
    assert!(!all.is_empty(), "part of the answer went out first");
    assert!(
        !all.contains(&b'\n'),
        "a failed answer must not end in a newline, nor be followed by other answers"
    );
}
