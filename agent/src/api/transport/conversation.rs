//! One status-socket connection from its first line to its close: line framing and limits,
//! idle timeouts (shorter under pressure), calls run off the runtime's workers, answers
//! written with deadlines (large ones in chunks), and streams.

use std::{
    io::{self, Write},
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    time::{Instant, timeout},
};

use super::{
    Caller, Handler, Reply, SocketOptions, WriteResult,
    budget::{Budget, Slot},
};
use crate::api::{
    jsonrpc::{self, Call, Incoming, RpcError},
    peer::{Access, AccessPolicy},
};

/// Notifications gathered into one write when a stream has a backlog.
const STREAM_BATCH_BYTES: usize = 64 * 1024;
/// How often a streaming connection whose client has shut down its write side is checked for a
/// full close: a Ctrl-C'd `audit --follow` must not hold a connection slot until the next event.
const HANGUP_CHECK: Duration = Duration::from_secs(1);
/// A line buffer that grew past this for one large request is given back afterwards.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;
/// An answer goes to the socket in chunks of about this size...
const ANSWER_CHUNK: usize = 64 * 1024;
/// ...with at most this many between the thread writing it and the socket: with the chunk
/// being filled and the one being sent, what a large answer holds in memory is bounded.
const ANSWER_CHUNKS_IN_FLIGHT: usize = 4;

/// Why a connection ended early; logged, never returned to the caller of `serve`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("reading a request from uid {uid}: {source}")]
    Read {
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("writing to uid {uid}: {source}")]
    Write {
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("uid {uid} took no bytes for {after:?}: dropped as a slow client")]
    SlowClient { uid: u32, after: Duration },
    #[error("the answer to {method} for uid {uid} failed part way through: {detail}")]
    AnswerFailed {
        uid: u32,
        method: String,
        detail: String,
    },
}

/// What every connection of one socket shares.
pub(super) struct Shared {
    pub(super) opts: SocketOptions,
    pub(super) access: AccessPolicy,
    pub(super) budget: Arc<Budget>,
    next_conn: AtomicU64,
}

impl Shared {
    pub(super) fn new(opts: SocketOptions, access: AccessPolicy, budget: Arc<Budget>) -> Self {
        Self {
            opts,
            access,
            budget,
            next_conn: AtomicU64::new(1),
        }
    }
}

/// Serves one admitted connection; its slot is given back when it ends.
pub(super) async fn connection<H: Handler>(
    stream: UnixStream,
    caller: Caller,
    slot: Slot,
    shared: Arc<Shared>,
    handler: Arc<H>,
) {
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    match converse(stream, caller, &shared, &handler, conn).await {
        Ok(()) => tracing::debug!(conn, "status socket connection closed"),
        Err(e @ ConnectionError::SlowClient { .. }) => {
            if let Some(suppressed) = shared.budget.slow_clients.ready() {
                tracing::warn!(conn, error = %e, suppressed, "status socket under pressure");
            }
        }
        Err(e) => tracing::debug!(conn, error = %e, "status socket connection dropped"),
    }
    drop(slot);
}

/// One connection from credentials check to close.
async fn converse<H: Handler>(
    stream: UnixStream,
    caller: Caller,
    shared: &Shared,
    handler: &Arc<H>,
    conn: u64,
) -> Result<(), ConnectionError> {
    let opts = &shared.opts;
    let (read, write) = stream.into_split();
    let mut out = Writer {
        half: write,
        timeout: opts.write_timeout,
        uid: caller.peer.uid,
    };
    let peer = &caller.peer;
    if caller.access == Access::None {
        tracing::info!(
            conn,
            uid = peer.uid,
            pid = peer.pid,
            "status socket refused a peer"
        );
        let denied = shared.access.denied(peer);
        return out.send(jsonrpc::response_err(&Value::Null, &denied)).await;
    }
    tracing::debug!(conn, uid = peer.uid, pid = peer.pid, access = %caller.access, "status socket connection");
    let mut pressure = shared.budget.pressure();
    let mut input = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        if line.capacity() > KEEP_LINE_CAPACITY {
            line.shrink_to(KEEP_LINE_CAPACITY);
        }
        match next_line(&mut input, &mut line, opts, &mut pressure).await {
            Waited::Idle { pressure: false } => {
                tracing::debug!(conn, "closing an idle status socket connection");
                return Ok(());
            }
            Waited::Idle { pressure: true } => {
                if let Some(suppressed) = shared.budget.idle_closes.ready() {
                    tracing::warn!(
                        conn,
                        uid = peer.uid,
                        after = ?opts.pressure_idle_timeout,
                        suppressed,
                        "status socket under pressure: closed an idle connection early"
                    );
                }
                return Ok(());
            }
            Waited::Line(Err(source)) => {
                return Err(ConnectionError::Read {
                    uid: peer.uid,
                    source,
                });
            }
            Waited::Line(Ok(Line::End)) => return Ok(()),
            Waited::Line(Ok(Line::TooLong)) => {
                if let Some(suppressed) = shared.budget.long_lines.ready() {
                    tracing::warn!(
                        conn,
                        uid = peer.uid,
                        max = opts.max_line,
                        suppressed,
                        "status socket under pressure: closed a connection whose request line \
                         is too long"
                    );
                }
                // The rest of that line cannot be told apart from the next request: close.
                let err = RpcError::invalid_request(format!(
                    "request line exceeds {} bytes",
                    opts.max_line
                ));
                return out.send(jsonrpc::response_err(&Value::Null, &err)).await;
            }
            Waited::Line(Ok(Line::Complete)) => {}
        }
        // Blank lines (a stray newline from `socat` or a person typing) are not requests.
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let call = match jsonrpc::parse(&line) {
            Ok(Incoming::Call(call)) => call,
            Ok(Incoming::Notification { method }) => {
                tracing::debug!(
                    conn,
                    method,
                    "ignored a notification: every method is a call"
                );
                continue;
            }
            Err((id, err)) => {
                out.send(jsonrpc::response_err(&id, &err)).await?;
                continue;
            }
        };
        let id = call.id.clone();
        if !handler.is_stream(&call.method) {
            answer(handler, call, caller.clone(), &mut out).await?;
            continue;
        }
        match start_stream(handler, call, caller.clone()).await {
            Err(err) => out.send(jsonrpc::response_err(&id, &err)).await?,
            Ok((initial, items)) => {
                out.send(jsonrpc::response_ok(&id, initial)).await?;
                return pump(items, input, out).await;
            }
        }
    }
}

enum Waited {
    Line(io::Result<Line>),
    /// No complete line within the idle timeout; `pressure` when it was the shorter one.
    Idle {
        pressure: bool,
    },
}

/// The next line, or `Idle` when none completes in time. The time allowed is the idle
/// timeout, or the pressure one while the socket is under pressure: a connection that has
/// been idle for longer than that when pressure starts is closed at once.
async fn next_line(
    input: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    opts: &SocketOptions,
    pressure: &mut watch::Receiver<bool>,
) -> Waited {
    let started = Instant::now();
    let read = read_line(input, line, opts.max_line);
    tokio::pin!(read);
    // The budget outlives every connection, so `changed` fails only while serving stops.
    let mut watching = true;
    loop {
        let pressed = *pressure.borrow_and_update();
        let idle = if pressed {
            opts.pressure_idle_timeout.min(opts.idle_timeout)
        } else {
            opts.idle_timeout
        };
        tokio::select! {
            read = &mut read => return Waited::Line(read),
            () = tokio::time::sleep_until(started + idle) => {
                return Waited::Idle { pressure: pressed && idle < opts.idle_timeout };
            }
            changed = pressure.changed(), if watching => watching = changed.is_ok(),
        }
    }
}

enum Line {
    /// A whole line is in the buffer, without its newline (the last line may lack one).
    Complete,
    /// The client has shut down its side and every line has been read.
    End,
    TooLong,
}

async fn read_line(
    input: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    // One byte past the limit is enough to know a line is too long without buffering it.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = input.take(limit).read_until(b'\n', line).await?;
    if n == 0 {
        return Ok(Line::End);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    } else if line.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete)
}

/// Runs one call and writes its answer. The call, the encoding of its answer and a raw
/// answer's writing all happen on a thread of the blocking pool; this task only moves the
/// chunks they produce to the socket, each within the write timeout.
async fn answer<H: Handler>(
    handler: &Arc<H>,
    call: Call,
    caller: Caller,
    out: &mut Writer,
) -> Result<(), ConnectionError> {
    let (id, method) = (call.id.clone(), call.method.clone());
    let id_for_line = id.clone();
    let (tx, mut chunks) = mpsc::channel(ANSWER_CHUNKS_IN_FLIGHT);
    let handler = Arc::clone(handler);
    let runtime = tokio::runtime::Handle::current();
    let work = tokio::task::spawn_blocking(move || {
        let reply = runtime.block_on(handler.handle(call, caller));
        write_answer(&id_for_line, reply, ChunkSender::new(tx))
    });
    let mut sent = false;
    while let Some(chunk) = chunks.recv().await {
        sent = true;
        out.write(&chunk).await?;
    }
    match work.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(detail)) => Err(ConnectionError::AnswerFailed {
            uid: out.uid,
            method,
            detail,
        }),
        Err(e) if !sent => {
            out.send(jsonrpc::response_err(&id, &panicked(&method, &e)))
                .await
        }
        Err(e) => {
            panicked(&method, &e);
            Err(ConnectionError::AnswerFailed {
                uid: out.uid,
                method,
                detail: "panicked".into(),
            })
        }
    }
}

/// Writes the response line for `reply` into `out`. A raw result that fails before anything
/// was sent is answered with an internal error instead; after, only closing is left.
fn write_answer(
    id: &Value,
    reply: Result<Reply, RpcError>,
    mut out: ChunkSender,
) -> Result<(), String> {
    let line = match reply {
        Ok(Reply::Value(result)) => jsonrpc::response_ok(id, result),
        Err(err) => jsonrpc::response_err(id, &err),
        Ok(Reply::Raw(write)) => {
            match write_result_line(id, write, &mut out).and_then(|()| out.finish()) {
                Ok(()) => return Ok(()),
                Err(e) if out.sent => return Err(e.to_string()),
                Err(e) => {
                    tracing::error!(error = %e, "a status socket answer failed");
                    out.discard();
                    jsonrpc::response_err(
                        id,
                        &RpcError::internal(format!(
                            "internal error while writing the answer: {e}; see the agent's log"
                        )),
                    )
                }
            }
        }
    };
    out.write_all(line.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.finish())
        .map_err(|e| e.to_string())
}

/// Writes a success response line whose result writes itself: exactly what
/// `jsonrpc::response_ok` would write for the same result, and the newline. For the transport,
/// and for benchmarks that want the line without a socket.
///
/// # Errors
///
/// Whatever `write` or `out` fail with.
pub fn write_result_line(id: &Value, write: WriteResult, out: &mut dyn Write) -> io::Result<()> {
    out.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":")?;
    serde_json::to_writer(&mut *out, id)?;
    out.write_all(b",\"result\":")?;
    write(out)?;
    out.write_all(b"}\n")
}

/// The writing end of an answer: fills chunks and hands each full one to the task that
/// writes the socket, waiting while the socket is behind.
struct ChunkSender {
    tx: mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    /// Whether a chunk has gone out: after that, the line cannot be replaced by an error.
    sent: bool,
}

impl ChunkSender {
    fn new(tx: mpsc::Sender<Vec<u8>>) -> Self {
        Self {
            tx,
            chunk: Vec::new(),
            sent: false,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::take(&mut self.chunk);
        self.sent = true;
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the connection is gone"))
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.send()
    }

    fn discard(&mut self) {
        self.chunk.clear();
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.chunk.capacity() == 0 {
            self.chunk.reserve(ANSWER_CHUNK + ANSWER_CHUNK / 4);
        }
        self.chunk.extend_from_slice(data);
        if self.chunk.len() >= ANSWER_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    /// Sending part of a line early gains nothing: the client reads whole lines.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

async fn start_stream<H: Handler>(
    handler: &Arc<H>,
    call: Call,
    caller: Caller,
) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
    let method = call.method.clone();
    let handler = Arc::clone(handler);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(handler.stream(call, caller)))
        .await
        .unwrap_or_else(|e| Err(panicked(&method, &e)))
}

fn panicked(method: &str, e: &tokio::task::JoinError) -> RpcError {
    tracing::error!(method, error = %e, "a status socket method failed unexpectedly");
    RpcError::internal(format!(
        "internal error while handling {method}; see the agent's log"
    ))
}

/// Writes a stream's items until it ends, the client goes away, or the client stops reading.
async fn pump(
    mut items: mpsc::Receiver<(String, Value)>,
    mut input: BufReader<OwnedReadHalf>,
    mut out: Writer,
) -> Result<(), ConnectionError> {
    let fd = out.half.as_ref().as_raw_fd();
    let mut discard = [0u8; 4096];
    let mut reading = true;
    let mut hangup = tokio::time::interval(HANGUP_CHECK);
    loop {
        tokio::select! {
            item = items.recv() => {
                let Some((method, params)) = item else { return Ok(()) };
                let mut batch = jsonrpc::notification(&method, params);
                while batch.len() < STREAM_BATCH_BYTES {
                    let Ok((method, params)) = items.try_recv() else { break };
                    batch.push('\n');
                    batch.push_str(&jsonrpc::notification(&method, params));
                }
                out.send(batch).await?;
            }
            // Input during a stream is ignored, but reading it is how a disconnect shows up.
            read = input.read(&mut discard), if reading => match read {
                Ok(0) => reading = false,
                Ok(_) => {}
                Err(source) => return Err(ConnectionError::Read { uid: out.uid, source }),
            },
            _ = hangup.tick(), if !reading => {
                if hung_up(fd) {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether the peer has closed its socket entirely, not just shut down its write side: only
/// then does the kernel report POLLHUP on our end.
fn hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for a descriptor we own for the call's duration, and a
    // zero timeout makes the call return at once.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// The write side of a connection, where every write has a deadline.
struct Writer {
    half: OwnedWriteHalf,
    timeout: Duration,
    uid: u32,
}

impl Writer {
    async fn send(&mut self, mut line: String) -> Result<(), ConnectionError> {
        line.push('\n');
        self.write(line.as_bytes()).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        match timeout(self.timeout, self.half.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ConnectionError::Write {
                uid: self.uid,
                source,
            }),
            Err(_) => Err(ConnectionError::SlowClient {
                uid: self.uid,
                after: self.timeout,
            }),
        }
    }
}
