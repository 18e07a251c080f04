//! Stream management (SSF 1.0 §8.1): with `manage_stream = true` the agent finds its own
//! stream at the transmitter's `configuration_endpoint` (creating it when there is none),
//! checks that the stream's `iss` and `aud` are the ones it verifies SETs against, asks for a
//! verification event (§8.1.4.2) and reads the stream's status (§8.1.2) — at start, and the
//! status again every `refresh_secs`. HTTP is blocking (ureq), so each managed stream has a
//! thread of its own that retries with backoff until the transmitter answers; pushed SETs
//! are accepted meanwhile (the credential is the agent's own), polling starts once the
//! stream has named its poll endpoint.

use std::{
    io::Read as _,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Delivery, SignalError, TransmitterConfig, events::REQUESTED, receiver::Receiver};
use crate::{auth::check_url, sessions::model::now_ms};

/// A management answer larger than this is refused (a stream's configuration is a few KiB).
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;
/// Time for one management request, connect to body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A stream's delivery (SSF 1.0 §8.1.1): as the agent asks for it, and as the transmitter
/// reports it (the transmitter supplies a poll `endpoint_url`; nobody reads a push
/// `authorization_header` back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDelivery {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_header: Option<String>,
}

/// The members of a transmitter's stream configuration the agent reads; the rest is ignored
/// on purpose.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamConfiguration {
    pub stream_id: String,
    #[serde(default)]
    pub iss: Option<String>,
    /// A string or an array of strings.
    #[serde(default)]
    pub aud: Option<Value>,
    #[serde(default)]
    pub delivery: Option<StreamDelivery>,
    #[serde(default)]
    pub events_requested: Vec<String>,
    #[serde(default)]
    pub events_delivered: Vec<String>,
}

/// The body of a create (POST) or update (PATCH) request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    pub delivery: StreamDelivery,
    pub events_requested: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A stream's status (SSF 1.0 §8.1.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamStatus {
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The stream the agent settled on, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    pub stream_id: String,
    /// Poll delivery: where to poll, as the transmitter said.
    pub poll_endpoint: Option<String>,
    /// Event types the agent asked for that the transmitter does not deliver.
    pub not_delivered: Vec<String>,
}

/// What the agent asks the transmitter for: its delivery, with the push credential it will
/// accept, and every event type it acts on.
pub fn wanted(cfg: &TransmitterConfig, push_authorization: Option<&str>) -> StreamRequest {
    StreamRequest {
        stream_id: None,
        delivery: StreamDelivery {
            method: cfg.delivery.urn().to_owned(),
            endpoint_url: match cfg.delivery {
                Delivery::Push => cfg.push_endpoint.clone(),
                Delivery::Poll => None,
            },
            authorization_header: match cfg.delivery {
                Delivery::Push => push_authorization.map(str::to_owned),
                Delivery::Poll => None,
            },
        },
        events_requested: REQUESTED.iter().map(|e| (*e).to_owned()).collect(),
        description: Some(format!(
            "flowwarden on {}",
            crate::fleet::config::hostname()
        )),
    }
}

/// The streams of a read without `stream_id`: an array, or one object from transmitters that
/// keep one stream per receiver.
///
/// # Errors
/// Neither.
pub fn parse_streams(body: &[u8]) -> Result<Vec<StreamConfiguration>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let streams = match value {
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        _ => return Err("the answer is neither a stream nor a list of streams".into()),
    };
    streams
        .into_iter()
        .map(|s| serde_json::from_value(s).map_err(|e| format!("not a stream configuration: {e}")))
        .collect()
}

/// This agent's stream among `streams`: the same delivery method and, for push, the same
/// endpoint (several agents may share one transmitter account; each pushes to its own URL).
pub fn ours<'a>(
    cfg: &TransmitterConfig,
    streams: &'a [StreamConfiguration],
) -> Option<&'a StreamConfiguration> {
    streams.iter().find(|s| {
        let Some(d) = &s.delivery else { return false };
        d.method == cfg.delivery.urn()
            && match cfg.delivery {
                Delivery::Push => d.endpoint_url == cfg.push_endpoint,
                Delivery::Poll => true,
            }
    })
}

/// Whether `stream` must be updated before use: a push stream always (its credential cannot
/// be read back, and must be the one this agent accepts), a poll stream when it lacks an
/// event type the agent acts on.
pub fn needs_update(cfg: &TransmitterConfig, stream: &StreamConfiguration) -> bool {
    cfg.delivery == Delivery::Push
        || REQUESTED
            .iter()
            .any(|e| !stream.events_requested.iter().any(|r| r == e))
}

/// Checks the transmitter's stream against what the agent verifies SETs with: a stream
/// whose SETs would all be refused is an error now, not a silence later.
///
/// # Errors
/// The `iss` is not the configured issuer, the `aud` does not contain the configured
/// audience, the delivery is not the configured one, or a poll stream names no usable
/// endpoint.
pub fn check(cfg: &TransmitterConfig, stream: &StreamConfiguration) -> Result<Established, String> {
    let id = &stream.stream_id;
    if id.is_empty() {
        return Err("the transmitter's stream has no stream_id".into());
    }
    match stream.iss.as_deref() {
        Some(iss) if iss.trim_end_matches('/') == cfg.issuer.trim_end_matches('/') => {}
        Some(iss) => {
            return Err(format!(
                "stream {id}: its iss is {iss:?}, not the configured issuer {:?}: the agent would \
                 refuse every SET (invalid_issuer)",
                cfg.issuer
            ));
        }
        None => return Err(format!("stream {id}: the transmitter reports no iss")),
    }
    let audiences: Vec<&str> = match &stream.aud {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&cfg.audience.as_str()) {
        return Err(format!(
            "stream {id}: its aud is {audiences:?}, which does not contain the configured \
             audience {:?}: set audience to the stream's aud",
            cfg.audience
        ));
    }
    let delivery = stream.delivery.clone().unwrap_or_default();
    if delivery.method != cfg.delivery.urn() {
        return Err(format!(
            "stream {id}: its delivery method is {:?}, not {:?} ({})",
            delivery.method,
            cfg.delivery.urn(),
            cfg.delivery.as_str()
        ));
    }
    let poll_endpoint = match cfg.delivery {
        Delivery::Push => None,
        Delivery::Poll => {
            let url = delivery.endpoint_url.ok_or_else(|| {
                format!("stream {id}: the transmitter gave no endpoint_url to poll")
            })?;
            check_url(&url).map_err(|why| format!("stream {id}: its poll endpoint_url {why}"))?;
            Some(url)
        }
    };
    let not_delivered = if stream.events_delivered.is_empty() {
        // Not reported: nothing to say.
        Vec::new()
    } else {
        REQUESTED
            .iter()
            .filter(|e| !e.ends_with("/verification") && !e.ends_with("/stream-updated"))
            .filter(|e| !stream.events_delivered.iter().any(|d| d == *e))
            .map(|e| (*e).to_owned())
            .collect()
    };
    Ok(Established {
        stream_id: id.clone(),
        poll_endpoint,
        not_delivered,
    })
}

/// Stops the stream threads when dropped.
pub struct Managers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::Thread>,
}

impl Drop for Managers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
    }
}

/// Starts a thread for every transmitter of `receiver` with `manage_stream`.
///
/// # Errors
/// A token file cannot be read, the `ca_file` cannot be used, or a thread cannot start.
pub fn start(receiver: &Arc<Receiver>) -> Result<Managers, SignalError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (index, t) in receiver.transmitters().iter().enumerate() {
        if !t.cfg.manage_stream {
            continue;
        }
        let (bearer, http) = super::receiver::transmitter_client(index, &t.cfg, REQUEST_TIMEOUT)?;
        let Some(bearer) = bearer else {
            return Err(SignalError::Config {
                field: format!("signals.transmitter[{index}].bearer_token_file"),
                reason: "stream management needs the transmitter's management token".into(),
            });
        };
        let manager = Manager {
            receiver: Arc::clone(receiver),
            index,
            http,
            bearer: String::from_utf8_lossy(&bearer).into_owned(),
            stop: Arc::clone(&stop),
        };
        let handle = std::thread::Builder::new()
            .name("ssf-stream".into())
            .spawn(move || manager.run())
            .map_err(|e| SignalError::Transmitter {
                what: "starting a stream management thread".into(),
                detail: e.to_string(),
            })?;
        threads.push(handle.thread().clone());
    }
    Ok(Managers { stop, threads })
}

/// The endpoints of the transmitter's management API.
struct Endpoints {
    configuration: String,
    status: Option<String>,
    verification: Option<String>,
}

struct Manager {
    receiver: Arc<Receiver>,
    index: usize,
    http: ureq::Agent,
    /// The `ssf.manage` token. Never logged, never part of an error.
    bearer: String,
    stop: Arc<AtomicBool>,
}

impl Manager {
    fn cfg(&self) -> &TransmitterConfig {
        &self.receiver.transmitters()[self.index].cfg
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, super::status::Stats> {
        self.receiver.transmitters()[self.index]
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn run(self) {
        let every = Duration::from_secs(self.cfg().refresh_secs);
        let mut backoff = Duration::ZERO;
        let mut established: Option<(Endpoints, String)> = None;
        while !self.stop.load(Ordering::Acquire) {
            let step = match &established {
                None => self.establish().map(Some),
                Some((endpoints, id)) => self.refresh_status(endpoints, id),
            };
            match step {
                Ok(Some(now)) => {
                    established = Some(now);
                    backoff = Duration::ZERO;
                    std::thread::park_timeout(every);
                }
                Ok(None) => {
                    backoff = Duration::ZERO;
                    std::thread::park_timeout(every);
                }
                Err(e) => {
                    // A stream that vanished, or a status that cannot be read, starts over.
                    established = None;
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                    tracing::warn!(issuer = %self.cfg().issuer, error = %e, retry_in = ?backoff, "managing the Shared Signals stream failed");
                    self.stats().error(&format!("stream: {e}"), now_ms());
                    std::thread::park_timeout(backoff);
                }
            }
        }
    }

    /// Finds or creates the stream, checks it, reads its status and asks for verification.
    fn establish(&self) -> Result<(Endpoints, String), String> {
        let cfg = self.cfg();
        let meta = super::keys::fetch_configuration(&self.http, &cfg.issuer, REQUEST_TIMEOUT)?;
        let configuration = meta.configuration_endpoint.ok_or_else(|| {
            format!(
                "the ssf-configuration of {} has no configuration_endpoint: the transmitter \
                 offers no stream management; set manage_stream = false and configure the \
                 stream at the transmitter",
                cfg.issuer
            )
        })?;
        let urn = cfg.delivery.urn();
        if !meta.delivery_methods_supported.is_empty()
            && !meta.delivery_methods_supported.iter().any(|m| m == urn)
        {
            return Err(format!(
                "the transmitter does not deliver by {} ({urn}); it offers {:?}",
                cfg.delivery.as_str(),
                meta.delivery_methods_supported
            ));
        }
        for url in [Some(&configuration), meta.status_endpoint.as_ref()]
            .into_iter()
            .chain([meta.verification_endpoint.as_ref()])
            .flatten()
        {
            check_url(url)?;
        }
        let endpoints = Endpoints {
            configuration,
            status: meta.status_endpoint,
            verification: meta.verification_endpoint,
        };

        let push_authorization = self.receiver.transmitters()[self.index]
            .push_authorization
            .as_deref()
            .map(String::from_utf8_lossy);
        let mut request = wanted(cfg, push_authorization.as_deref());
        let (status, body) = self.call("GET", &endpoints.configuration, &[], None)?;
        let streams = match status {
            200 => parse_streams(&body).map_err(|e| format!("{}: {e}", endpoints.configuration))?,
            // Some transmitters answer a read of no streams with 404.
            404 => Vec::new(),
            _ => return Err(http_error(&endpoints.configuration, "GET", status, &body)),
        };
        let (verb, stream) = match ours(cfg, &streams) {
            Some(existing) if !needs_update(cfg, existing) => ("read", existing.clone()),
            Some(existing) => {
                request.stream_id = Some(existing.stream_id.clone());
                request.description = None;
                let stream = self.write("PATCH", &endpoints.configuration, &request)?;
                ("updated", stream)
            }
            None => {
                let stream = self.write("POST", &endpoints.configuration, &request)?;
                ("created", stream)
            }
        };
        let checked = check(cfg, &stream)?;
        if !checked.not_delivered.is_empty() {
            tracing::warn!(issuer = %cfg.issuer, stream = %checked.stream_id, events = ?checked.not_delivered, "the transmitter does not deliver these event types on the agent's stream");
        }
        tracing::info!(issuer = %cfg.issuer, stream = %checked.stream_id, "Shared Signals stream {verb}");
        {
            let mut stats = self.stats();
            stats.stream_id = Some(checked.stream_id.clone());
            stats.poll_endpoint = checked.poll_endpoint.clone();
        }
        self.refresh_status(&endpoints, &checked.stream_id)?;
        if let Some(url) = &endpoints.verification {
            self.request_verification(url, &checked.stream_id)?;
        }
        Ok((endpoints, checked.stream_id))
    }

    /// Reads the stream's status into `signals status` (`disabled` refuses SETs, as a
    /// stream-updated event's does). `Ok(None)`: nothing new to keep.
    fn refresh_status(
        &self,
        endpoints: &Endpoints,
        stream_id: &str,
    ) -> Result<Option<(Endpoints, String)>, String> {
        let Some(url) = &endpoints.status else {
            return Ok(None);
        };
        let (status, body) = self.call("GET", url, &[("stream_id", stream_id)], None)?;
        if status == 404 {
            return Err(format!("{url}: stream {stream_id} is gone (404)"));
        }
        if status != 200 {
            return Err(http_error(url, "GET", status, &body));
        }
        let read: StreamStatus = serde_json::from_slice(&body)
            .map_err(|e| format!("{url}: not a stream status: {e}"))?;
        let mut stats = self.stats();
        if stats.stream_status != read.status {
            tracing::info!(issuer = %self.cfg().issuer, stream = %stream_id, status = %read.status, reason = ?read.reason, "Shared Signals stream status");
        }
        stats.stream_status = read.status.chars().take(32).collect();
        Ok(None)
    }

    /// Asks for a verification event echoing a fresh random `state`; the event, pushed or
    /// polled, is recorded as `verified` when it echoes it.
    fn request_verification(&self, url: &str, stream_id: &str) -> Result<(), String> {
        let state = super::dev::random_jti();
        // Before the request: the event may arrive before the answer does.
        self.stats().verification_state = Some(state.clone());
        let body = serde_json::json!({"stream_id": stream_id, "state": state});
        let (status, answer) = self.call("POST", url, &[], Some(&body))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(http_error(url, "POST", status, &answer))
        }
    }

    /// A create or update: the transmitter answers with the stream's configuration.
    fn write(
        &self,
        method: &str,
        url: &str,
        request: &StreamRequest,
    ) -> Result<StreamConfiguration, String> {
        let body = serde_json::to_value(request).map_err(|e| e.to_string())?;
        let (status, answer) = self.call(method, url, &[], Some(&body))?;
        if !(200..300).contains(&status) {
            return Err(http_error(url, method, status, &answer));
        }
        serde_json::from_slice(&answer)
            .map_err(|e| format!("{method} {url}: not a stream configuration: {e}"))
    }

    /// One request with the management token: (status, body). Errors are transport errors;
    /// an HTTP error status is returned for the caller to judge.
    fn call(
        &self,
        method: &str,
        url: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), String> {
        // The agent's timeout (REQUEST_TIMEOUT) bounds the whole request.
        let mut request = self
            .http
            .request(method, url)
            .set("Authorization", &format!("Bearer {}", self.bearer))
            .set("Accept", "application/json");
        for (k, v) in query {
            request = request.query(k, v);
        }
        let result = match body {
            Some(b) => request
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => request.call(),
        };
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(format!("{method} {url}: {t}")),
        };
        let status = response.status();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_ANSWER_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?;
        if bytes.len() as u64 > MAX_ANSWER_BYTES {
            return Err(format!(
                "{method} {url}: the answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        Ok((status, bytes))
    }
}

/// An HTTP error status, with what the transmitter said (its SSF error body when it sent one).
fn http_error(url: &str, method: &str, status: u16, body: &[u8]) -> String {
    let said: String = String::from_utf8_lossy(body).chars().take(300).collect();
    let hint = match status {
        401 => " (the management token in bearer_token_file is not accepted)",
        403 => " (the management token lacks the ssf.manage scope)",
        _ => "",
    };
    format!("{method} {url}: HTTP status {status}{hint}: {said}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cfg(delivery: Delivery) -> TransmitterConfig {
        let text = match delivery {
            Delivery::Push => {
                "issuer = \"https://tx.example\"\naudience = \"fw\"\ndiscovery = true\n\
                 push_authorization_file = \"a\"\nbearer_token_file = \"b\"\n\
                 manage_stream = true\npush_endpoint = \"https://agent.example:7443/v1/ssf/events\"\n"
            }
            Delivery::Poll => {
                "issuer = \"https://tx.example\"\naudience = \"fw\"\ndiscovery = true\n\
                 delivery = \"poll\"\nbearer_token_file = \"b\"\nmanage_stream = true\n"
            }
        };
        toml::from_str(text).expect("a transmitter")
    }

    fn stream(v: Value) -> StreamConfiguration {
        serde_json::from_value(v).expect("a stream")
    }

    #[test]
    fn the_agent_asks_for_its_delivery_its_credential_and_every_event_it_acts_on() {
        let push = wanted(&cfg(Delivery::Push), Some("Bearer s3cret"));
        let v = serde_json::to_value(&push).unwrap();
        assert_eq!(
            v["delivery"],
            json!({
                "method": "urn:ietf:rfc:8935",
                "endpoint_url": "https://agent.example:7443/v1/ssf/events",
                "authorization_header": "Bearer s3cret",
            })
        );
        assert_eq!(
            v["events_requested"].as_array().unwrap().len(),
            REQUESTED.len()
        );
        assert!(v.get("stream_id").is_none());
        let poll = serde_json::to_value(wanted(&cfg(Delivery::Poll), None)).unwrap();
        // A poll stream's endpoint is the transmitter's to give.
        assert_eq!(poll["delivery"], json!({"method": "urn:ietf:rfc:8936"}));
    }

    #[test]
    fn a_list_an_object_or_garbage() {
        let one = parse_streams(br#"{"stream_id":"s1","iss":"https://tx.example"}"#).unwrap();
        assert_eq!(one.len(), 1);
        let two = parse_streams(br#"[{"stream_id":"s1"},{"stream_id":"s2"}]"#).unwrap();
        assert_eq!(two[1].stream_id, "s2");
        assert!(parse_streams(b"[1]").is_err());
        assert!(parse_streams(b"\"x\"").is_err());
        assert!(parse_streams(b"<html>").is_err());
    }

    #[test]
    fn our_stream_is_the_one_with_our_delivery() {
        let push = cfg(Delivery::Push);
        let streams = [
            stream(json!({"stream_id": "poll", "delivery": {"method": "urn:ietf:rfc:8936"}})),
            stream(
                json!({"stream_id": "other-host", "delivery": {"method": "urn:ietf:rfc:8935",
                "endpoint_url": "https://other.example:7443/v1/ssf/events"}}),
            ),
            stream(
                json!({"stream_id": "mine", "delivery": {"method": "urn:ietf:rfc:8935",
                "endpoint_url": "https://agent.example:7443/v1/ssf/events"}}),
            ),
        ];
        assert_eq!(ours(&push, &streams).unwrap().stream_id, "mine");
        assert_eq!(
            ours(&cfg(Delivery::Poll), &streams).unwrap().stream_id,
            "poll"
        );
        assert!(ours(&push, &streams[..2]).is_none());
        // A push stream is always updated (its credential cannot be read back); a poll stream
        // only when it misses an event type.
        assert!(needs_update(&push, &streams[2]));
        let full = stream(json!({"stream_id": "p", "events_requested": REQUESTED}));
        assert!(!needs_update(&cfg(Delivery::Poll), &full));
        assert!(needs_update(&cfg(Delivery::Poll), &streams[0]));
    }

    #[test]
    fn a_stream_whose_sets_would_be_refused_is_an_error_now() {
        let poll = cfg(Delivery::Poll);
        let good = json!({
            "stream_id": "s1",
            "iss": "https://tx.example/",
            "aud": ["other", "fw"],
            "delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": "https://tx.example/poll/s1"},
            "events_delivered": [REQUESTED[0], REQUESTED[1]],
        });
        let ok = check(&poll, &stream(good.clone())).expect("a usable stream");
        assert_eq!(ok.stream_id, "s1");
        assert_eq!(
            ok.poll_endpoint.as_deref(),
            Some("https://tx.example/poll/s1")
        );
        // Verification and stream-updated are not "event types the transmitter fails to
        // deliver": they are the stream's own.
        assert_eq!(ok.not_delivered.len(), REQUESTED.len() - 4);

        for (change, expect) in [
            (json!({"iss": "https://evil.example"}), "invalid_issuer"),
            (json!({"iss": null}), "no iss"),
            (json!({"aud": "someone-else"}), "does not contain"),
            (json!({"aud": null}), "does not contain"),
            (
                json!({"delivery": {"method": "urn:ietf:rfc:8935"}}),
                "delivery method",
            ),
            (
                json!({"delivery": {"method": "urn:ietf:rfc:8936"}}),
                "no endpoint_url",
            ),
            (
                json!({"delivery": {"method": "urn:ietf:rfc:8936",
                    "endpoint_url": "http://tx.example/poll"}}),
                "not an https",
            ),
            (json!({"stream_id": ""}), "no stream_id"),
        ] {
            let mut s = good.clone();
            for (k, v) in change.as_object().unwrap() {
                s[k] = v.clone();
            }
            let err = check(&poll, &stream(s)).unwrap_err();
            assert!(err.contains(expect), "{change}: {err}");
        }
    }

    #[test]
    fn errors_name_the_status_and_never_the_token() {
        let e = http_error("https://tx.example/streams", "GET", 401, b"{\"err\":\"x\"}");
        assert!(e.contains("401") && e.contains("bearer_token_file"), "{e}");
        assert!(e.contains("{\"err\":\"x\"}"), "{e}");
    }
}
