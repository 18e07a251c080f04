//! Admissions over HTTPS from a chosen source address, in process: what `flowwarden login`
//! does, for tests that need several client addresses, many admissions, or to tell a refusal
//! from an answer that never came.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use flowwarden::admission::{client::pinned_config, wire::AdmissionResponse};
use rustls::{ClientConfig, ClientConnection, StreamOwned, pki_types::ServerName};

use crate::tcp::connect_from;

/// What became of one admission request.
#[derive(Debug)]
pub enum AdmitOutcome {
    /// 201: the agent acknowledged the session (it is durable).
    Admitted(AdmissionResponse),
    /// A complete answer other than 201: the agent decided, and refused.
    Refused { status: u16, body: String },
    /// No complete answer (refused connection, reset, cut short): the outcome is unknown to
    /// the client, which is what a crash of the agent mid-request looks like.
    NoAnswer(String),
}

/// An admission client that trusts exactly the agent certificate with a given fingerprint.
#[derive(Clone)]
pub struct AdmitClient {
    agent: SocketAddr,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl AdmitClient {
    /// Trusts what `flowwarden login --fingerprint` trusts: the agent's own pinned verifier.
    ///
    /// # Panics
    /// The fingerprint is not 64 hex digits.
    pub fn new(agent: SocketAddr, fingerprint: &str) -> Self {
        let tls = pinned_config(fingerprint).expect("a SHA-256 fingerprint");
        Self {
            agent,
            tls: Arc::new(tls),
            timeout: Duration::from_secs(10),
        }
    }

    /// Presents `token` from the local address `source`: one connection, one request. Call it
    /// on a thread inside the namespace that holds `source` (see `Netns::run`).
    pub fn admit(&self, source: IpAddr, token: &str) -> AdmitOutcome {
        match self.exchange(source, token) {
            Ok(raw) => parse(&raw),
            Err(e) => AdmitOutcome::NoAnswer(e.to_string()),
        }
    }

    fn exchange(&self, source: IpAddr, token: &str) -> std::io::Result<Vec<u8>> {
        let tcp = connect_from((source, 0).into(), self.agent, self.timeout)?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        let name = ServerName::IpAddress(self.agent.ip().into());
        let conn =
            ClientConnection::new(Arc::clone(&self.tls), name).map_err(std::io::Error::other)?;
        let mut tls = StreamOwned::new(conn, tcp);
        write!(
            tls,
            "POST /v1/sessions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.agent
        )?;
        tls.flush()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // A peer that closes without close_notify after a whole answer is still an
                // answer; `parse` decides whether it is whole.
                Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(raw)
    }
}

/// Splits an HTTP/1.1 answer; anything short of a status line, headers and a body as long as
/// Content-Length says counts as no answer.
fn parse(raw: &[u8]) -> AdmitOutcome {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return AdmitOutcome::NoAnswer(format!("an answer cut short: {text:?}"));
    };
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return AdmitOutcome::NoAnswer(format!("no status line: {head:?}"));
    };
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    if length.is_some_and(|n| body.len() < n) {
        return AdmitOutcome::NoAnswer(format!("a body cut short: {body:?}"));
    }
    if status != 201 {
        return AdmitOutcome::Refused {
            status,
            body: body.to_owned(),
        };
    }
    match serde_json::from_str(body) {
        Ok(r) => AdmitOutcome::Admitted(r),
        Err(e) => AdmitOutcome::Refused {
            status,
            body: format!("201 with a body that does not parse ({e}): {body}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_answers_count() {
        let ok = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        // `{}` is not an AdmissionResponse: a 201 the client cannot read is not an ack.
        assert!(matches!(
            parse(ok),
            AdmitOutcome::Refused { status: 201, .. }
        ));
        let denied = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n\r\nnope!";
        assert!(matches!(
            parse(denied),
            AdmitOutcome::Refused { status: 403, .. }
        ));
        let cut = b"HTTP/1.1 201 Created\r\ncontent-length: 50\r\n\r\n{\"sess";
        assert!(matches!(parse(cut), AdmitOutcome::NoAnswer(_)));
        assert!(matches!(parse(b"HTTP/1.1 20"), AdmitOutcome::NoAnswer(_)));
    }
}
