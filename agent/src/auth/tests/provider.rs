//! The hostile identity provider of the chaos tests: a tiny HTTP server on 127.0.0.1 that
//! serves OIDC discovery and a JWKS, each path answering as the test sets it (good keys,
//! garbage, an error status, an endless or trickling body, or a stall).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::fixtures::{Key, claims, craft};

/// What the provider answers on one of its two paths.
#[derive(Clone)]
pub(super) enum Reply {
    /// 200 with this JSON.
    Json(Value),
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// 200 with this JSON and this `Cache-Control` header.
    Cached(Value, String),
    /// This status, with a small body.
    Status(u16),
    /// 200 and a chunked body that never ends.
    Endless,
    /// Headers at once, then one byte of body every 50 ms, never finishing.
    Trickle,
    /// Waits this long, then answers.
    After(Duration, Box<Reply>),
}

/// The provider's state, shared with its connection threads.
struct State {
    /// `None`: the right discovery document.
    document: Option<Reply>,
    jwks: Reply,
}

pub(super) struct Provider {
    pub(super) issuer: String,
    state: Arc<Mutex<State>>,
    jwks_requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Provider {
    pub(super) fn start(jwks: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let issuer = format!("http://{addr}/idp");
        let state = Arc::new(Mutex::new(State {
            document: None,
            jwks,
        }));
        let jwks_requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, jwks_requests, stop, issuer) = (
                state.clone(),
                jwks_requests.clone(),
                stop.clone(),
                issuer.clone(),
            );
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, jwks_requests, stop, issuer) = (
                        state.clone(),
                        jwks_requests.clone(),
                        stop.clone(),
                        issuer.clone(),
                    );
                    thread::spawn(move || {
                        serve(conn, &state, &jwks_requests, &stop, &issuer);
                    });
                }
            })
        };
        Self {
            issuer,
            state,
            jwks_requests,
            stop,
            addr,
            accept: Some(accept),
        }
    }

    pub(super) fn set_jwks(&self, reply: Reply) {
        self.state.lock().expect("state").jwks = reply;
    }

    pub(super) fn publish(&self, keys: &[Value]) {
        self.set_jwks(Reply::Json(json!({ "keys": keys })));
    }

    pub(super) fn set_document(&self, reply: Option<Reply>) {
        self.state.lock().expect("state").document = reply;
    }

    pub(super) fn jwks_requests(&self) -> usize {
        self.jwks_requests.load(Ordering::Relaxed)
    }

    pub(super) fn token(&self, kid: &str, key: &Key) -> String {
        let mut c = claims();
        c["iss"] = json!(self.issuer);
        craft(&json!({"alg": "ES256", "kid": kid}), &c, key)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    mut conn: TcpStream,
    state: &Mutex<State>,
    jwks_requests: &AtomicUsize,
    stop: &AtomicBool,
    issuer: &str,
) {
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
    let reply = {
        let st = state.lock().expect("state");
        match path.as_str() {
            "/idp/.well-known/openid-configuration" => st.document.clone().unwrap_or_else(|| {
                Reply::Json(json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")}))
            }),
            "/idp/jwks" => {
                jwks_requests.fetch_add(1, Ordering::Relaxed);
                st.jwks.clone()
            }
            _ => Reply::Status(404),
        }
    };
    answer(&mut conn, reply, stop);
}

fn answer(conn: &mut TcpStream, reply: Reply, stop: &AtomicBool) {
    let head = |status: &str, extra: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n\r\n"
        )
    };
    let whole = |conn: &mut TcpStream, status: &str, body: &[u8]| {
        let len = format!("Content-Length: {}\r\n", body.len());
        let _ = conn.write_all(head(status, &len).as_bytes());
        let _ = conn.write_all(body);
    };
    match reply {
        Reply::Cached(v, cache) => {
            let body = v.to_string();
            let extra = format!(
                "Content-Length: {}\r\nCache-Control: {cache}\r\n",
                body.len()
            );
            let _ = conn.write_all(head("200 OK", &extra).as_bytes());
            let _ = conn.write_all(body.as_bytes());
        }
        Reply::Json(v) => whole(conn, "200 OK", v.to_string().as_bytes()),
        Reply::Body(b) => whole(conn, "200 OK", &b),
        Reply::Status(code) => whole(conn, &format!("{code} Oops"), b"{\"error\":\"oops\"}"),
        Reply::Endless => {
            let _ = conn.write_all(head("200 OK", "Transfer-Encoding: chunked\r\n").as_bytes());
            let chunk = format!("4000\r\n{}\r\n", "k".repeat(0x4000));
            // Until the client hangs up (a write fails) or the provider stops.
            while !stop.load(Ordering::Acquire) && conn.write_all(chunk.as_bytes()).is_ok() {}
        }
        Reply::Trickle => {
            let _ = conn.write_all(head("200 OK", "Content-Length: 100000\r\n").as_bytes());
            while !stop.load(Ordering::Acquire) && conn.write_all(b" ").is_ok() {
                thread::sleep(Duration::from_millis(50));
            }
        }
        Reply::After(pause, then) => {
            let until = Instant::now() + pause;
            while Instant::now() < until && !stop.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(10));
            }
            answer(conn, *then, stop);
        }
    }
}
