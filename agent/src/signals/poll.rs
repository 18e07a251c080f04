//! Poll delivery (RFC 8936): a loop per polled stream that asks the transmitter for SETs
//! (`maxEvents`, `returnImmediately`), acts on each, and acknowledges them (`ack`) or reports
//! why not (`setErrs`) in the next request. The `jti`s to acknowledge are durable before the
//! request that carries them, so a restart neither loses an event nor applies one twice (a
//! redelivered SET is recognised by its `jti` and acknowledged again).

use std::{
    io::Read as _,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    Delivery, SignalError,
    receiver::{NotAccepted, Receiver},
};
use crate::{
    sessions::model::now_ms,
    store::{PollState, SignalWrite, Store, Write},
};

/// A poll answer larger than this is refused (`maxEvents` SETs of a few KiB each).
const MAX_POLL_BYTES: u64 = 4 * 1024 * 1024;
/// Longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a managed stream's poller looks for the endpoint the stream will name.
const ENDPOINT_WAIT: Duration = Duration::from_millis(200);

/// The body of a poll request (RFC 8936 2.4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ack: Vec<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub set_errs: Map<String, Value>,
    pub max_events: u32,
    pub return_immediately: bool,
}

/// The answer to a poll (RFC 8936 2.5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollResponse {
    #[serde(default)]
    pub sets: Map<String, Value>,
    #[serde(default)]
    pub more_available: bool,
}

/// Stops the poll threads when dropped.
pub struct Pollers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::Thread>,
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
    }
}

/// Starts a poll loop for every polled transmitter of `receiver`, on threads of their own
/// (HTTP with ureq is blocking); SETs are acted on through `runtime`.
///
/// # Errors
/// A thread cannot be started, or a bearer token file cannot be read.
pub fn start(
    receiver: &Arc<Receiver>,
    store: Store,
    runtime: tokio::runtime::Handle,
) -> Result<Pollers, SignalError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (index, t) in receiver.transmitters().iter().enumerate() {
        if t.cfg.delivery != Delivery::Poll {
            continue;
        }
        if t.cfg.poll_endpoint.is_none() && !t.cfg.manage_stream {
            tracing::warn!(issuer = %t.cfg.issuer, "no poll endpoint known: the stream is not polled");
            continue;
        }
        let (bearer, http) =
            super::receiver::transmitter_client(index, &t.cfg, Duration::from_secs(30))?;
        let poller = Poller {
            receiver: Arc::clone(receiver),
            store: store.clone(),
            runtime: runtime.clone(),
            index,
            bearer,
            http,
            stop: Arc::clone(&stop),
        };
        let handle = std::thread::Builder::new()
            .name("ssf-poll".into())
            .spawn(move || poller.run())
            .map_err(|e| SignalError::Transmitter {
                what: "starting a poll thread".into(),
                detail: e.to_string(),
            })?;
        threads.push(handle.thread().clone());
    }
    Ok(Pollers { stop, threads })
}

struct Poller {
    receiver: Arc<Receiver>,
    store: Store,
    runtime: tokio::runtime::Handle,
    index: usize,
    bearer: Option<Vec<u8>>,
    http: ureq::Agent,
    stop: Arc<AtomicBool>,
}

impl Poller {
    fn issuer(&self) -> &str {
        &self.receiver.transmitters()[self.index].cfg.issuer
    }

    /// Where to poll: the configured endpoint, or the one a managed stream named (none
    /// until the stream is established, see [`super::stream`]).
    fn endpoint(&self) -> Option<String> {
        let t = &self.receiver.transmitters()[self.index];
        t.cfg.poll_endpoint.clone().or_else(|| {
            t.stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .poll_endpoint
                .clone()
        })
    }

    fn run(self) {
        let t = &self.receiver.transmitters()[self.index];
        let every = Duration::from_secs(t.cfg.poll_interval_secs);
        let mut backoff = Duration::ZERO;
        while !self.stop.load(Ordering::Acquire) {
            let Some(endpoint) = self.endpoint() else {
                std::thread::park_timeout(ENDPOINT_WAIT);
                continue;
            };
            match self.once(&endpoint) {
                Ok(more) => {
                    backoff = Duration::ZERO;
                    if !more {
                        std::thread::park_timeout(every);
                    }
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                    tracing::warn!(issuer = %self.issuer(), error = %e, retry_in = ?backoff, "polling the transmitter failed");
                    t.stats
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .error(&format!("poll: {e}"), now_ms());
                    std::thread::park_timeout(backoff);
                }
            }
        }
    }

    /// One poll: send the pending acks and errors, act on what comes back, make the new
    /// acks durable. Answers whether the transmitter has more.
    fn once(&self, endpoint: &str) -> Result<bool, String> {
        let t = &self.receiver.transmitters()[self.index];
        let state = self
            .store
            .poll_state(self.issuer())
            .map_err(|e| e.to_string())?;
        let mut set_errs = Map::new();
        for (jti, err, description) in &state.pending_errors {
            set_errs.insert(
                jti.clone(),
                serde_json::json!({"err": err, "description": description}),
            );
        }
        let request = PollRequest {
            ack: state.pending_acks.clone(),
            set_errs,
            max_events: t.cfg.max_events,
            return_immediately: true,
        };
        let response = self.post(endpoint, &request)?;
        t.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_poll_at_ms = Some(now_ms());
        let mut next = PollState::default();
        for (jti, set) in response.sets.iter().take(t.cfg.max_events as usize) {
            let Some(token) = set.as_str() else {
                next.pending_errors.push((
                    jti.clone(),
                    "invalid_request".into(),
                    "the SET is not a string".into(),
                ));
                continue;
            };
            let received = self
                .runtime
                .block_on(self.receiver.receive(self.index, token.to_owned()));
            match received {
                Ok(_) => next.pending_acks.push(jti.clone()),
                Err(NotAccepted::Refused(r)) => {
                    next.pending_errors
                        .push((jti.clone(), r.err.as_str().into(), r.description))
                }
                // Neither acknowledged nor refused: the transmitter delivers it again.
                Err(NotAccepted::Failed(e)) => {
                    tracing::warn!(jti, error = %e, "a polled SET was not applied; it will be delivered again")
                }
            }
        }
        // Durable before the request that acknowledges them: acknowledged means applied.
        let write = Write::Signal(SignalWrite::Poll {
            transmitter: self.issuer().to_owned(),
            state: next,
        });
        self.store.commit(vec![write]).map_err(|e| e.to_string())?;
        Ok(response.more_available)
    }

    fn post(&self, endpoint: &str, body: &PollRequest) -> Result<PollResponse, String> {
        let mut call = self
            .http
            .post(endpoint)
            .set("Content-Type", "application/json")
            .set("Accept", "application/json");
        if let Some(bearer) = &self.bearer {
            let token = String::from_utf8_lossy(bearer);
            call = call.set("Authorization", &format!("Bearer {token}"));
        }
        let json = serde_json::to_string(body).map_err(|e| e.to_string())?;
        let response = call.send_string(&json).map_err(|e| match e {
            ureq::Error::Status(code, _) => format!("{}: HTTP status {code}", endpoint),
            ureq::Error::Transport(t) => format!("{}: {t}", endpoint),
        })?;
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_POLL_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: reading the answer: {e}", endpoint))?;
        if bytes.len() as u64 > MAX_POLL_BYTES {
            return Err(format!(
                "{}: the answer is larger than {MAX_POLL_BYTES} bytes",
                endpoint
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a poll answer: {e}", endpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_messages_use_rfc_8936_names() {
        let req = PollRequest {
            ack: vec!["a".into()],
            set_errs: Map::new(),
            max_events: 10,
            return_immediately: true,
        };
        let text = serde_json::to_string(&req).expect("json");
        assert_eq!(
            text,
            r#"{"ack":["a"],"maxEvents":10,"returnImmediately":true}"#
        );
        let resp: PollResponse =
            serde_json::from_str(r#"{"sets":{"j":"x.y.z"},"moreAvailable":true}"#).expect("json");
        assert!(resp.more_available);
        assert_eq!(resp.sets.len(), 1);
    }
}
