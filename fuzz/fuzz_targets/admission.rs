//! Fuzz target `admission`: arbitrary bytes as what a client sends once TLS is done, served by
//! hyper with the endpoint's own HTTP/1 settings, routed by the endpoint's own request reader,
//! and answered with the real token verifier or reconnect-token check. Nothing below may panic,
//! a session is only granted for a token the trusted key signed, no answer is a server error,
//! and no answer carries the token.
//!
//! The session table (policy, kernel grants, store) is not reached: it needs the kernel
//! programs and root, and the integration tests drive it.

#![no_main]

use std::{
    cell::Cell,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr},
    rc::Rc,
    sync::OnceLock,
};

use flowwarden::{
    admission::{
        http1_builder,
        request::{self, Ask},
    },
    auth::reconnect,
};
use flowwarden_fuzz::{NOW, fixture};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Requests a connection may make before the rate limit answers: deterministic, unlike the
/// agent's clock-driven buckets, so that an input always takes the same path.
const BURST: u32 = 6;
/// The reconnect seed of the one session the target knows.
const SEED: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    fixture();
    let sent = Rc::new(Cell::new(0u32));
    let answers = runtime().block_on(async {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let service = service_fn(move |req| {
            let sent = Rc::clone(&sent);
            async move { Ok::<_, Infallible>(answer(&req, &sent)) }
        });
        // One change to the endpoint's settings: the input ends with the client closing its
        // write side, and without half-close hyper would drop the requests still in flight
        // at that EOF instead of answering them.
        let conn = http1_builder()
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async move {
            // The server may close first (a request it cannot parse): that ends the write.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let mut answers = Vec::new();
        let read = rd.read_to_end(&mut answers);
        let (_, _, read) = tokio::join!(conn, write, read);
        read.expect("reading the answers from memory");
        answers
    });
    // Every answer is one of ours, or hyper's own answer to bad HTTP (400, 414, 431).
    for line in answers
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"HTTP/1."))
    {
        let code: u16 = std::str::from_utf8(&line[9..12.min(line.len())])
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("a malformed status line: {line:?}"));
        assert!(
            (200..500).contains(&code),
            "status {code}: {}",
            String::from_utf8_lossy(&answers)
        );
    }
});

/// What the endpoint answers, up to where it would hand a verified identity or a reconnect to
/// the session table.
fn answer<B>(req: &Request<B>, sent: &Cell<u32>) -> Response<Full<Bytes>> {
    let allow = || {
        sent.set(sent.get() + 1);
        sent.get() <= BURST
    };
    let ask = request::read(req.method(), req.uri().path(), req.headers(), SOURCE, allow);
    match ask {
        Err(refusal) => reply(refusal.status, refusal.code, &refusal.message),
        Ok(Ask::Admit { token }) => {
            let fx = fixture();
            match fx.verifier.verify(token, NOW) {
                Ok(identity) => {
                    fx.check_accepted(token, &identity);
                    reply(StatusCode::CREATED, "admitted", &identity.subject)
                }
                Err(rejection) => {
                    let message = rejection.to_string();
                    if token.len() >= 24 && token.matches('.').count() >= 2 {
                        assert!(!message.contains(token), "an answer carries the token");
                    }
                    reply(StatusCode::UNAUTHORIZED, rejection.code(), &message)
                }
            }
        }
        Ok(Ask::Reconnect { token }) => match reconnect::session_of(token)
            .and_then(|id| reconnect::check(token, SEED, 0, NOW).map(|counter| (id, counter)))
        {
            Ok((id, counter)) => {
                // Only the token the seed mints for that session and counter passes.
                let secs = token
                    .split('.')
                    .nth(3)
                    .and_then(|s| s.parse().ok())
                    .expect("an accepted reconnect token has a time");
                assert_eq!(
                    reconnect::mint(SEED, id, counter, secs).as_deref(),
                    Ok(token),
                    "accepted a reconnect token the seed did not mint"
                );
                reply(StatusCode::OK, "reconnected", &id.to_string())
            }
            Err(e) => reply(StatusCode::UNAUTHORIZED, e.code(), &e.to_string()),
        },
    }
}

fn reply(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
