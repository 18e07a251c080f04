//! `flowwarden dev ssf serve`: DEVELOPMENT TOOL. A stand-in Shared Signals transmitter over
//! plain HTTP: its `ssf-configuration` and JWKS, a stream management API (SSF 1.0 §8.1:
//! streams created, read, updated, deleted; status read and set; verification requested),
//! queued SETs served for polling (RFC 8936) or pushed to a push stream's endpoint
//! (RFC 8935). Streams live in memory. Never for production.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use super::output::outln;
use crate::{
    sessions::model::now_ms,
    signals::{
        SET_MEDIA_TYPE,
        dev::{self, DevSet, SigningKey},
        events::REQUESTED,
        poll::{PollRequest, PollResponse},
        stream::StreamDelivery,
    },
};

/// Push: how often the queue is looked at.
const PUSH_EVERY: Duration = Duration::from_millis(100);

/// `dev ssf serve`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub listen: String,
    /// The key directory (its JWKS is served).
    #[arg(long)]
    pub dir: PathBuf,
    /// Where `dev ssf set --queue` puts SETs; delivered ones are deleted.
    #[arg(long)]
    pub queue: PathBuf,
    #[arg(long, default_value = crate::signals::dev::DEV_TRANSMITTER)]
    pub issuer: String,
    /// The `aud` of the streams it creates (and of its verification events).
    #[arg(long, default_value = "flowwarden")]
    pub audience: String,
    /// A file with the bearer token every request but the metadata and JWKS must carry.
    #[arg(long)]
    pub bearer_file: Option<PathBuf>,
    /// Push to a push stream's endpoint, pinning this agent certificate fingerprint.
    #[arg(long)]
    pub agent_fingerprint: Option<String>,
}

/// One stream, as the transmitter keeps it.
#[derive(Debug, Clone)]
struct DevStream {
    stream_id: String,
    delivery: StreamDelivery,
    events_requested: Vec<String>,
    description: Option<String>,
    status: String,
}

struct Transmitter {
    issuer: String,
    audience: String,
    addr: String,
    queue: PathBuf,
    jwks: PathBuf,
    key: SigningKey,
    bearer: Option<String>,
    streams: Mutex<Vec<DevStream>>,
}

/// An HTTP request, as far as this server reads one.
struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    authorization: Option<String>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Answer = (u16, String);

fn error(status: u16, err: &str, description: &str) -> Answer {
    (
        status,
        json!({"err": err, "description": description}).to_string(),
    )
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?.to_string();
    std::fs::create_dir_all(&args.queue)?;
    let jwks = if args.dir.join(dev::SSF_JWKS_FILE).exists() {
        args.dir.join(dev::SSF_JWKS_FILE)
    } else {
        args.dir.join(crate::auth::dev::JWKS_FILE)
    };
    let key = SigningKey::from_dir(&args.dir)
        .with_context(|| format!("loading the transmitter key from {}", args.dir.display()))?;
    let bearer = args
        .bearer_file
        .as_deref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .with_context(|| format!("reading {}", p.display()))
        })
        .transpose()?;
    let tx = Arc::new(Transmitter {
        issuer: args.issuer,
        audience: args.audience,
        addr: addr.clone(),
        queue: args.queue.clone(),
        jwks,
        key,
        bearer,
        streams: Mutex::new(Vec::new()),
    });
    if let Some(fp) = args.agent_fingerprint {
        let pusher = Arc::clone(&tx);
        std::thread::spawn(move || pusher.push_loop(&fp));
    }
    outln!(
        "serving SETs from {} at http://{addr} (poll: /poll, streams: /streams)",
        args.queue.display()
    )?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if let Err(e) = tx.answer(stream) {
            tracing::warn!(error = %e, "dev ssf: a request failed");
        }
    }
    Ok(())
}

impl Transmitter {
    fn streams(&self) -> std::sync::MutexGuard<'_, Vec<DevStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One HTTP/1.1 request, answered and closed.
    fn answer(&self, stream: TcpStream) -> anyhow::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let request = read_request(&mut reader)?;
        let (status, reply) = self
            .route(&request)
            .unwrap_or_else(|e| error(400, "invalid_request", &format!("{e:#}")));
        let mut stream = reader.into_inner();
        write!(
            stream,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
            reply.len()
        )?;
        Ok(())
    }

    fn route(&self, r: &Request) -> anyhow::Result<Answer> {
        let open = matches!(
            r.path.as_str(),
            "/.well-known/ssf-configuration" | "/jwks.json"
        );
        if !open
            && let Some(token) = &self.bearer
            && r.authorization.as_deref() != Some(&format!("Bearer {token}"))
        {
            return Ok(error(
                401,
                "authentication_failed",
                "a bearer token is required",
            ));
        }
        let base = format!("http://{}", self.addr);
        Ok(match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/.well-known/ssf-configuration") => (
                200,
                json!({
                    "spec_version": "1_0",
                    "issuer": self.issuer,
                    "jwks_uri": format!("{base}/jwks.json"),
                    "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
                    "configuration_endpoint": format!("{base}/streams"),
                    "status_endpoint": format!("{base}/streams/status"),
                    "verification_endpoint": format!("{base}/streams/verify"),
                })
                .to_string(),
            ),
            ("GET", "/jwks.json") => (200, std::fs::read_to_string(&self.jwks)?),
            ("POST", "/poll") => (200, self.poll(&r.body)?),
            ("GET", "/streams") => self.read_streams(r.param("stream_id")),
            ("POST", "/streams") => self.create(&r.body)?,
            ("PATCH" | "PUT", "/streams") => self.update(&r.body, r.method == "PUT")?,
            ("DELETE", "/streams") => self.delete(r.param("stream_id")),
            ("GET", "/streams/status") => self.status(r.param("stream_id"), None)?,
            ("POST", "/streams/status") => {
                let body: Value = serde_json::from_slice(&r.body)?;
                self.status(body["stream_id"].as_str(), Some(&body))?
            }
            ("POST", "/streams/verify") => self.verify(&r.body)?,
            _ => error(404, "not_found", "no such endpoint"),
        })
    }

    /// A stream's configuration as the transmitter reports it: the push credential is never
    /// read back.
    fn describe(&self, s: &DevStream) -> Value {
        let mut delivery = s.delivery.clone();
        delivery.authorization_header = None;
        if s.delivery.method == "urn:ietf:rfc:8936" {
            delivery.endpoint_url = Some(format!("http://{}/poll", self.addr));
        }
        let delivered: Vec<&String> = s
            .events_requested
            .iter()
            .filter(|e| REQUESTED.contains(&e.as_str()))
            .collect();
        let mut v = json!({
            "stream_id": s.stream_id,
            "iss": self.issuer,
            "aud": self.audience,
            "delivery": delivery,
            "events_supported": REQUESTED,
            "events_requested": s.events_requested,
            "events_delivered": delivered,
        });
        if let Some(d) = &s.description {
            v["description"] = d.clone().into();
        }
        v
    }

    fn read_streams(&self, id: Option<&str>) -> Answer {
        let streams = self.streams();
        match id {
            None => (
                200,
                Value::Array(streams.iter().map(|s| self.describe(s)).collect()).to_string(),
            ),
            Some(id) => match streams.iter().find(|s| s.stream_id == id) {
                Some(s) => (200, self.describe(s).to_string()),
                None => error(404, "not_found", "no such stream"),
            },
        }
    }

    fn create(&self, body: &[u8]) -> anyhow::Result<Answer> {
        let req: Value = serde_json::from_slice(body).context("not JSON")?;
        let delivery: StreamDelivery = serde_json::from_value(req["delivery"].clone())
            .context("delivery is missing or malformed")?;
        if !["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"].contains(&delivery.method.as_str()) {
            return Ok(error(400, "invalid_request", "unknown delivery method"));
        }
        let stream = DevStream {
            stream_id: dev::random_jti(),
            delivery,
            events_requested: strings(&req["events_requested"]),
            description: req["description"].as_str().map(str::to_owned),
            status: "enabled".into(),
        };
        let answer = self.describe(&stream).to_string();
        self.streams().push(stream);
        Ok((201, answer))
    }

    fn update(&self, body: &[u8], replace: bool) -> anyhow::Result<Answer> {
        let req: Value = serde_json::from_slice(body).context("not JSON")?;
        let Some(id) = req["stream_id"].as_str() else {
            return Ok(error(400, "invalid_request", "stream_id is required"));
        };
        let mut streams = self.streams();
        let Some(s) = streams.iter_mut().find(|s| s.stream_id == id) else {
            return Ok(error(404, "not_found", "no such stream"));
        };
        if let Some(d) = req.get("delivery") {
            s.delivery = serde_json::from_value(d.clone()).context("delivery is malformed")?;
        }
        if req.get("events_requested").is_some() || replace {
            s.events_requested = strings(&req["events_requested"]);
        }
        if let Some(d) = req["description"].as_str() {
            s.description = Some(d.to_owned());
        }
        Ok((200, self.describe(s).to_string()))
    }

    fn delete(&self, id: Option<&str>) -> Answer {
        let mut streams = self.streams();
        let before = streams.len();
        streams.retain(|s| Some(s.stream_id.as_str()) != id);
        if streams.len() == before {
            error(404, "not_found", "no such stream")
        } else {
            (204, String::new())
        }
    }

    /// Reads, or with `set` changes, a stream's status; a change is announced with a
    /// stream-updated event, as a transmitter does (SSF 1.0 §8.1.5).
    fn status(&self, id: Option<&str>, set: Option<&Value>) -> anyhow::Result<Answer> {
        let mut streams = self.streams();
        let Some(s) = streams
            .iter_mut()
            .find(|s| Some(s.stream_id.as_str()) == id)
        else {
            return Ok(error(404, "not_found", "no such stream"));
        };
        if let Some(body) = set {
            let Some(status) = body["status"].as_str() else {
                return Ok(error(400, "invalid_request", "status is required"));
            };
            if !["enabled", "paused", "disabled"].contains(&status) {
                return Ok(error(400, "invalid_request", "enabled, paused or disabled"));
            }
            s.status = status.to_owned();
            let mut event = Map::new();
            event.insert("status".into(), status.into());
            self.enqueue(&s.stream_id, "stream-updated", event)?;
        }
        Ok((
            200,
            json!({"stream_id": s.stream_id, "status": s.status}).to_string(),
        ))
    }

    /// SSF 1.0 §8.1.4.2: a verification event echoing the receiver's `state`, delivered on
    /// the stream like any other event.
    fn verify(&self, body: &[u8]) -> anyhow::Result<Answer> {
        let req: Value = serde_json::from_slice(body).context("not JSON")?;
        let Some(id) = req["stream_id"].as_str() else {
            return Ok(error(400, "invalid_request", "stream_id is required"));
        };
        if !self.streams().iter().any(|s| s.stream_id == id) {
            return Ok(error(404, "not_found", "no such stream"));
        }
        let mut event = Map::new();
        if let Some(state) = req["state"].as_str() {
            event.insert("state".into(), state.into());
        }
        self.enqueue(id, "verification", event)?;
        Ok((204, String::new()))
    }

    /// Signs a stream event (its subject is the stream) into the queue.
    fn enqueue(
        &self,
        stream_id: &str,
        event: &str,
        members: Map<String, Value>,
    ) -> anyhow::Result<()> {
        let mut set = DevSet::new(event, Some(json!({"format": "opaque", "id": stream_id})));
        set.issuer = self.issuer.clone();
        set.audience = self.audience.clone();
        set.event = members;
        let token = self.key.sign(&set, now_ms() / 1000)?;
        let path = queue_path(&self.queue);
        std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))
    }

    /// Queued SETs, oldest first: (path, jti, SET).
    fn queued(&self) -> anyhow::Result<Vec<(PathBuf, String, String)>> {
        let mut pending = Vec::new();
        for entry in std::fs::read_dir(&self.queue)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "set") {
                let set = std::fs::read_to_string(&path)?;
                let jti = jti_of(&set).unwrap_or_default();
                pending.push((path, jti, set));
            }
        }
        // Names begin with the time they were queued: delivered in that order.
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(pending)
    }

    /// RFC 8936: drop the acknowledged SETs from the queue, answer up to `maxEvents` others.
    /// A paused or disabled poll stream holds them back.
    fn poll(&self, body: &[u8]) -> anyhow::Result<String> {
        let req: PollRequest = serde_json::from_slice(body).context("not a poll request")?;
        let held = self
            .streams()
            .iter()
            .any(|s| s.delivery.method == "urn:ietf:rfc:8936" && s.status != "enabled");
        let mut pending = Vec::new();
        for (path, jti, set) in self.queued()? {
            if req.ack.contains(&jti) || req.set_errs.contains_key(&jti) {
                std::fs::remove_file(&path)?;
            } else if !held {
                pending.push((jti, set));
            }
        }
        let more = pending.len() > req.max_events as usize;
        let sets = pending
            .into_iter()
            .take(req.max_events as usize)
            .map(|(jti, set)| (jti, Value::String(set)))
            .collect();
        Ok(serde_json::to_string(&PollResponse {
            sets,
            more_available: more,
        })?)
    }

    /// Pushes queued SETs to the enabled push stream, pinning the agent's certificate. A SET
    /// the agent answers (202 or an error) leaves the queue; one it cannot be reached for
    /// stays.
    fn push_loop(&self, fingerprint: &str) {
        loop {
            std::thread::sleep(PUSH_EVERY);
            let target = self.streams().iter().find_map(|s| {
                (s.delivery.method == "urn:ietf:rfc:8935" && s.status == "enabled")
                    .then(|| s.delivery.clone())
            });
            let Some(StreamDelivery {
                endpoint_url: Some(url),
                authorization_header,
                ..
            }) = target
            else {
                continue;
            };
            let Some(authority) = url
                .strip_prefix("https://")
                .and_then(|r| r.split('/').next())
            else {
                continue;
            };
            let Ok(pusher) = dev::Pusher::new(authority, fingerprint) else {
                continue;
            };
            let Ok(queued) = self.queued() else { continue };
            for (path, jti, set) in queued {
                let auth = authorization_header.as_deref().unwrap_or_default();
                match pusher.push(auth, SET_MEDIA_TYPE, set.as_bytes()) {
                    Ok((202, _)) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Ok((status, body)) => {
                        tracing::warn!(
                            jti,
                            status,
                            body,
                            "dev ssf: the agent refused a pushed SET"
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dev ssf: cannot push");
                        break;
                    }
                }
            }
        }
    }
}

/// A new queue file: named by the time it is queued, so that SETs are delivered in order.
pub(super) fn queue_path(queue: &std::path::Path) -> PathBuf {
    queue.join(format!("{:016}-{}.set", now_ms(), dev::random_jti()))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn read_request(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Request> {
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let mut length = 0usize;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        path: path.to_owned(),
        query,
        authorization,
        body,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn jti_of(set: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = set.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["jti"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(percent_decode("abc%"), "abc%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41%é"), "A%é");
    }
}
