//! OIDC discovery against a tiny HTTP server on 127.0.0.1: lazy first fetch, caching, and a
//! failing, garbage-serving or slow provider refused as keys_unavailable, then recovered from.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::fixtures::*;
use crate::auth::{Rejection, Verifier, source::Tuning};

#[derive(Clone)]
enum Mode {
    Good,
    Garbage,
    Slow(Duration),
    /// Serves this discovery document instead of the right one.
    Document(Value),
}

struct Idp {
    issuer: String,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Idp {
    /// Serves `<issuer>/.well-known/openid-configuration` and `<issuer>/jwks` with `jwks`.
    fn start(jwks: Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let issuer = format!("http://{addr}/realm");
        let mode = Arc::new(Mutex::new(Mode::Good));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (mode, requests, stop, issuer) =
                (mode.clone(), requests.clone(), stop.clone(), issuer.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    requests.fetch_add(1, Ordering::Relaxed);
                    let current = mode.lock().map(|m| m.clone()).unwrap_or(Mode::Garbage);
                    let (issuer, jwks) = (issuer.clone(), jwks.clone());
                    thread::spawn(move || serve(conn, current, &issuer, &jwks));
                }
            })
        };
        Self {
            issuer,
            mode,
            requests,
            stop,
            addr,
            accept: Some(accept),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode lock") = mode;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so that it sees the stop flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(mut conn: TcpStream, mode: Mode, issuer: &str, jwks: &Value) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let document = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")});
    let (status, body) = match (mode, path.as_str()) {
        (Mode::Garbage, _) => ("200 OK", "<html>surprise</html>".to_owned()),
        (Mode::Slow(pause), _) => {
            thread::sleep(pause);
            ("200 OK", document.to_string())
        }
        (Mode::Document(doc), "/realm/.well-known/openid-configuration") => {
            ("200 OK", doc.to_string())
        }
        (_, "/realm/.well-known/openid-configuration") => ("200 OK", document.to_string()),
        (_, "/realm/jwks") => ("200 OK", jwks.to_string()),
        _ => ("404 Not Found", "{}".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
}

/// Least time between token-triggered fetches in these tests (10 s in production).
const ON_DEMAND_EVERY: Duration = Duration::from_millis(400);

/// A verifier trusting `idp` by discovery, with short timeouts so the tests run quickly.
fn verifier_for(idp: &Idp) -> Verifier {
    let mut issuer = issuer(&idp.issuer, &["ES256"]);
    issuer.discovery = Some(true);
    let tuning = Tuning {
        http_timeout: Duration::from_millis(300),
        on_demand_every: ON_DEMAND_EVERY,
        ..Tuning::default()
    };
    Verifier::with_tuning(&config(vec![issuer]), tuning).expect("verifier")
}

fn token_for(idp: &Idp, dev: &DevIssuer) -> String {
    let payload = {
        let mut c = claims();
        c["iss"] = json!(idp.issuer);
        c
    };
    craft(&dev.header(), &payload, &dev.key())
}

#[test]
fn discovery_fetches_lazily_and_caches() {
    let dev = DevIssuer::new("disc-good");
    let idp = Idp::start(json!({"keys": [dev.jwk()]}));
    let verifier = verifier_for(&idp);
    assert_eq!(
        idp.requests(),
        0,
        "nothing is fetched before the first token"
    );
    assert!(!verifier.key_status()[0].loaded);

    let token = token_for(&idp, &dev);
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
    assert_eq!(idp.requests(), 2, "one discovery document, one JWKS");
    for _ in 0..20 {
        assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
    }
    assert_eq!(idp.requests(), 2, "cached keys need no HTTP");
    let status = &verifier.key_status()[0];
    assert!(
        status.loaded && status.keys == 1 && status.source == "discovery",
        "{status:?}"
    );
}

#[test]
fn garbage_is_keys_unavailable_until_the_provider_heals() {
    let dev = DevIssuer::new("disc-garbage");
    let idp = Idp::start(json!({"keys": [dev.jwk()]}));
    idp.set(Mode::Garbage);
    let verifier = verifier_for(&idp);
    let token = token_for(&idp, &dev);
    assert_eq!(code(&verifier.verify(&token, NOW)), "keys_unavailable");
    // Within the rate limit, the last failure is repeated without a new fetch.
    let before = idp.requests();
    assert_eq!(code(&verifier.verify(&token, NOW)), "keys_unavailable");
    assert_eq!(idp.requests(), before);

    idp.set(Mode::Good);
    thread::sleep(ON_DEMAND_EVERY + Duration::from_millis(50));
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
}

#[test]
fn slow_provider_times_out_then_recovers() {
    let dev = DevIssuer::new("disc-slow");
    let idp = Idp::start(json!({"keys": [dev.jwk()]}));
    idp.set(Mode::Slow(Duration::from_millis(1500)));
    let verifier = verifier_for(&idp);
    let token = token_for(&idp, &dev);
    let started = Instant::now();
    let got = verifier.verify(&token, NOW);
    assert!(
        matches!(&got, Err(Rejection::KeysUnavailable { detail }) if detail.contains("openid-configuration")),
        "{got:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "the fetch should give up at its timeout, not wait for the server: {:?}",
        started.elapsed()
    );

    idp.set(Mode::Good);
    thread::sleep(ON_DEMAND_EVERY + Duration::from_millis(50));
    assert_eq!(
        code(&verifier.verify(&token, NOW)),
        "ok",
        "recovers by itself"
    );
}

#[test]
fn failed_refresh_keeps_the_last_good_keys() {
    let dev = DevIssuer::new("disc-keep");
    let idp = Idp::start(json!({"keys": [dev.jwk()]}));
    let verifier = verifier_for(&idp);
    let token = token_for(&idp, &dev);
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");

    idp.set(Mode::Garbage);
    // Past the on-demand rate limit that the first (lazy) fetch started.
    thread::sleep(ON_DEMAND_EVERY + Duration::from_millis(50));
    let mut stranger_claims = claims();
    stranger_claims["iss"] = json!(idp.issuer);
    let stranger = craft(
        &json!({"alg": "ES256", "kid": "rotated"}),
        &stranger_claims,
        &dev.key(),
    );
    assert_eq!(
        code(&verifier.verify(&stranger, NOW)),
        "keys_unavailable",
        "an unknown kid whose refresh failed is not known to be absent"
    );
    assert_eq!(
        code(&verifier.verify(&stranger, NOW)),
        "unknown_key",
        "rate-limited: the cached set lacks it"
    );
    assert_eq!(
        code(&verifier.verify(&token, NOW)),
        "ok",
        "the cached key still serves"
    );
    assert!(verifier.key_status()[0].last_error.is_some());
}

#[test]
fn a_document_for_another_issuer_or_over_plain_http_is_refused() {
    let dev = DevIssuer::new("disc-mixup");
    let idp = Idp::start(json!({"keys": [dev.jwk()]}));
    let token = token_for(&idp, &dev);

    idp.set(Mode::Document(
        json!({"issuer": "https://evil.example", "jwks_uri": format!("{}/jwks", idp.issuer)}),
    ));
    let verifier = verifier_for(&idp);
    let got = verifier.verify(&token, NOW);
    assert!(
        matches!(&got, Err(Rejection::KeysUnavailable { detail }) if detail.contains("evil.example")),
        "{got:?}"
    );

    idp.set(Mode::Document(
        json!({"issuer": idp.issuer, "jwks_uri": "http://keys.example/jwks"}),
    ));
    let verifier = verifier_for(&idp);
    assert_eq!(code(&verifier.verify(&token, NOW)), "keys_unavailable");
}
