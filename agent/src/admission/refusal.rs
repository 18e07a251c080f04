//! Refusals made before a token is verified, answered like every other one: a JSON body and
//! an audit record. Hyper answers a request head over its buffer with a bare `431` and no
//! body, so [`HeadLimit`] refuses over-long heads first, below hyper's limit, itself.

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{request::Refusal, server::Admission, wire::ErrorResponse};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    auth::MAX_TOKEN_BYTES,
    metrics::AdmissionResult,
};

/// A request head (request line and headers) longer than this is refused `431 too_large`:
/// room for the largest token accepted and 16 KiB of other headers, and below hyper's own
/// buffer (64 KiB), so that this answer, not hyper's empty one, is sent.
pub const MAX_HEAD_BYTES: usize = MAX_TOKEN_BYTES + 16 * 1024;

/// The refusal of an over-long request head.
pub fn head_too_large() -> Refusal {
    Refusal {
        status: hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        code: "too_large",
        message: format!(
            "the request's headers are over {MAX_HEAD_BYTES} bytes; a token is at most \
             {MAX_TOKEN_BYTES} bytes"
        ),
    }
}

/// The raw HTTP/1.1 answer to an over-long head; the connection closes after it.
fn head_too_large_response() -> Vec<u8> {
    let refusal = head_too_large();
    let body = serde_json::to_vec(&ErrorResponse {
        error: refusal.code.to_owned(),
        message: refusal.message,
    })
    .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend(body);
    out
}

/// How much of an over-long request is read and dropped after the 431, at most.
const DRAIN_BYTES: usize = 2 * 1024 * 1024;

enum Phase {
    /// Passing bytes to hyper; `in_head` bytes of the current head so far, `tail` the last
    /// bytes seen (to find `\r\n\r\n` across reads).
    Reading {
        in_head: usize,
        tail: [u8; 3],
        body: BodyScan,
    },
    /// Writing the 431 answer from this offset, then flushing.
    Answering { response: Vec<u8>, at: usize },
    /// Closing the agent's side of the stream after the answer.
    Closing,
    /// Reading and dropping what the client still sends (up to this many bytes): closing
    /// with unread data would reset the connection, and a client still writing its token
    /// would lose the answer.
    Draining { left: usize },
    /// Answered: hyper sees the end of the stream.
    Done,
}

/// Wraps a connection's stream: once a request head passes [`MAX_HEAD_BYTES`], answers the
/// 431 itself, sets `oversized` (for the audit record), and ends the stream for hyper.
pub struct HeadLimit<T> {
    inner: T,
    phase: Phase,
    oversized: Arc<AtomicBool>,
}

impl<T> HeadLimit<T> {
    pub fn new(inner: T, oversized: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            phase: Phase::Reading {
                in_head: 0,
                tail: [0; 3],
                body: BodyScan::default(),
            },
            oversized,
        }
    }
}

/// The body a request head announced (`Content-Length`), which is not head: pushed SETs
/// (`/v1/ssf/events`) have one, and their own limit.
#[derive(Debug, Default)]
struct BodyScan {
    /// Body bytes still to pass uncounted.
    left: u64,
    /// `Content-Length` of the head being read.
    announced: u64,
    /// The start of the current header line (enough to hold a `Content-Length` line).
    line: Vec<u8>,
}

/// Like [`scan_bodies`], for requests without a body.
#[cfg(test)]
fn scan(in_head: &mut usize, tail: &mut [u8; 3], bytes: &[u8]) -> bool {
    scan_bodies(in_head, tail, &mut BodyScan::default(), bytes)
}

/// Counts head bytes in `bytes`; `true` once the head is over the limit. The count restarts
/// after each `\r\n\r\n` (a request head's end); the body its `Content-Length` announces is
/// passed uncounted.
fn scan_bodies(in_head: &mut usize, tail: &mut [u8; 3], body: &mut BodyScan, bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if body.left > 0 {
            // A body is skipped whole, not byte by byte.
            let skip = usize::try_from(body.left)
                .unwrap_or(usize::MAX)
                .min(bytes.len() - i);
            body.left -= skip as u64;
            i += skip;
            continue;
        }
        let b = bytes[i];
        i += 1;
        if b == b'\n' {
            let line = std::str::from_utf8(&body.line).unwrap_or_default();
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                body.announced = value.trim().parse().unwrap_or(0);
            }
            body.line.clear();
        } else if body.line.len() < 48 {
            body.line.push(b);
        }
        if *tail == *b"\r\n\r" && b == b'\n' {
            body.left = std::mem::take(&mut body.announced);
        }
        *in_head += 1;
        if *tail == *b"\r\n\r" && b == b'\n' {
            *in_head = 0;
        }
        *tail = [tail[1], tail[2], b];
        if *in_head > MAX_HEAD_BYTES {
            return true;
        }
    }
    false
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadLimit<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Answering { response, at } => {
                    while *at < response.len() {
                        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &response[*at..]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *at += n;
                    }
                    ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                    this.phase = Phase::Closing;
                }
                Phase::Closing => {
                    // close_notify and FIN: a client that reads to the end of the stream
                    // (`Connection: close`) has its whole answer.
                    ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.phase = Phase::Draining { left: DRAIN_BYTES };
                }
                Phase::Draining { left } => {
                    let mut scratch = [0u8; 8192];
                    let mut sink = ReadBuf::new(&mut scratch);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sink))?;
                    let n = sink.filled().len();
                    if n == 0 || n >= *left {
                        this.phase = Phase::Done;
                    } else {
                        *left -= n;
                    }
                }
                Phase::Reading {
                    in_head,
                    tail,
                    body,
                } => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    if !scan_bodies(in_head, tail, body, &buf.filled()[before..]) {
                        return Poll::Ready(Ok(()));
                    }
                    // Hyper never sees the bytes past the limit.
                    buf.set_filled(before);
                    this.oversized.store(true, Ordering::Release);
                    this.phase = Phase::Answering {
                        response: head_too_large_response(),
                        at: 0,
                    };
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeadLimit<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Admission {
    /// Records a refusal made before any token was verified. A refusal that did not pass the
    /// source's rate limit yet (unknown path, wrong method, an over-long head) spends its
    /// budget first, and one over the budget (`rate_limited` included) is counted in the
    /// metrics only: a flood must not become a flood of durable writes.
    pub(super) async fn record_refusal(&self, refusal: &Refusal, source: IpAddr) {
        // These two are decided after the rate limit was asked (see request::read).
        let budget_spent = matches!(refusal.code, "missing_token" | "duplicate_authorization");
        let started = Instant::now();
        self.metrics
            .admission(AdmissionResult::Rejected(refusal.code), started.elapsed());
        if refusal.code == "rate_limited" || !(budget_spent || self.limiter.allow(source)) {
            return;
        }
        let mut e = AuditEvent::new(AuditKind::AdmissionRejected {
            reason: refusal.code.to_owned(),
        });
        e.source = Some(source);
        e.detail = refusal.message.clone();
        if let Err(err) = self.sessions.record(vec![e]).await {
            tracing::error!(error = %err, "cannot record a refused admission request");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn heads_are_counted_per_request() {
        let (mut n, mut tail) = (0, [0; 3]);
        assert!(!scan(&mut n, &mut tail, b"POST / HTTP/1.1\r\nA: b\r\n\r"));
        assert!(!scan(&mut n, &mut tail, b"\n"));
        assert_eq!(n, 0, "the head ended across two reads");
        let big = vec![b'x'; MAX_HEAD_BYTES];
        assert!(!scan(&mut n, &mut tail, &big));
        assert!(scan(&mut n, &mut tail, b"x"));
    }

    #[test]
    fn an_announced_body_is_not_head() {
        let (mut n, mut tail, mut body) = (0, [0; 3], BodyScan::default());
        let head = b"POST /v1/ssf/events HTTP/1.1\r\nContent-Length: 40000\r\n\r\n";
        assert!(!scan_bodies(&mut n, &mut tail, &mut body, head));
        assert!(!scan_bodies(
            &mut n,
            &mut tail,
            &mut body,
            &vec![b'x'; 40_000]
        ));
        assert_eq!(n, 0, "the body was not counted");
        assert!(!scan_bodies(
            &mut n,
            &mut tail,
            &mut body,
            &vec![b'x'; MAX_HEAD_BYTES]
        ));
        assert!(
            scan_bodies(&mut n, &mut tail, &mut body, b"x"),
            "past the body, a head again"
        );
    }

    #[tokio::test]
    async fn an_over_long_head_gets_a_json_431_and_hyper_sees_the_end() {
        let (client, server) = tokio::io::duplex(4096);
        let oversized = Arc::new(AtomicBool::new(false));
        let mut guarded = HeadLimit::new(server, Arc::clone(&oversized));
        let writer = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(client);
            let head = format!(
                "POST /v1/sessions HTTP/1.1\r\nAuthorization: Bearer {}",
                "a".repeat(1024 * 1024)
            );
            // The agent stops reading at the limit: the rest of the write may fail.
            let _ = wr.write_all(head.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = rd.read_to_end(&mut answer).await;
            answer
        });
        let mut seen = Vec::new();
        guarded.read_to_end(&mut seen).await.expect("ends cleanly");
        assert!(
            seen.len() <= MAX_HEAD_BYTES,
            "hyper saw {} bytes",
            seen.len()
        );
        assert!(oversized.load(Ordering::Acquire));
        drop(guarded);
        let answer = String::from_utf8(writer.await.unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let parsed: ErrorResponse = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(parsed.error, "too_large");
    }
}
