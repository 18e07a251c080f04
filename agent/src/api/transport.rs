//! The status socket server: binds the Unix socket, checks each peer's credentials, and moves
//! JSON-RPC lines between connections and the core's [`Handler`]. It decides nothing else.
//!
//! One connection is one conversation: requests are read one line at a time and answered in
//! order, so a client may pipeline and half-close. A streaming method (one the handler says
//! [`Handler::is_stream`] about) occupies its connection: after the initial result, each item
//! is a notification line, input is read and ignored, and the connection closes when the
//! stream ends. A slow or stuck client is dropped, never waited for.

use std::{
    future::Future,
    io::{self, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
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
        UnixListener, UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    task::JoinSet,
    time::timeout,
};

use super::{
    jsonrpc::{self, BUSY, Call, Incoming, RpcError},
    peer::{Access, AccessPolicy, Peer, peer_of},
};

pub const DEFAULT_SOCKET_PATH: &str = crate::config::DEFAULT_SOCKET;
pub const DEFAULT_MAX_LINE: usize = 1 << 20;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// A client that takes no bytes for this long is dropped so that it cannot hold anything up.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const SOCKET_MODE: u32 = 0o660;
const DIR_MODE: u32 = 0o750;
/// Notifications gathered into one write when a stream has a backlog.
const STREAM_BATCH_BYTES: usize = 64 * 1024;
/// How often a streaming connection whose client has shut down its write side is checked for a
/// full close: a Ctrl-C'd `audit --follow` must not hold a connection slot until the next event.
const HANGUP_CHECK: Duration = Duration::from_secs(1);
/// A line buffer that grew past this for one large request is given back afterwards.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the socket path {} has no file name", path.display())]
    BadPath { path: PathBuf },
    #[error("creating the socket directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting mode {mode:o} and group {gid:?} on {}: {source}", path.display())]
    Permissions {
        path: PathBuf,
        mode: u32,
        gid: Option<u32>,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("another agent is already serving on {}", path.display())]
    AlreadyServing { path: PathBuf },
    #[error("checking whether {} is a stale socket: {source}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing the stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding the status socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    // The variants below end one connection; they are logged, never returned by `serve`.
    #[error("reading the peer credentials of a new connection: {source}")]
    PeerCredentials {
        #[source]
        source: io::Error,
    },
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
}

/// Where and how the status socket listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Group of the socket, and of its directory when `bind` creates it.
    pub read_group: Option<u32>,
    /// Longest request line, in bytes, without its newline.
    pub max_line: usize,
    /// A connection that completes no line for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// A connection whose client takes no bytes for this long is dropped.
    pub write_timeout: Duration,
}

impl SocketOptions {
    /// The defaults at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_group: None,
            max_line: DEFAULT_MAX_LINE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self::new(DEFAULT_SOCKET_PATH)
    }
}

/// Who is calling, as the core sees it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Peer,
    pub access: Access,
}

/// What the transport needs from the core. `handle` gets the method, params and the caller's
/// access, and returns a result or an [`RpcError`]; `stream` is for streaming methods.
///
/// Each call runs in a task of its own: a panic becomes an `INTERNAL_ERROR` response, and a
/// call whose client goes away still runs to completion (a terminate is never half done).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        call: Call,
        caller: Caller,
    ) -> impl Future<Output = Result<Value, RpcError>> + Send;

    /// Whether `method` streams (e.g. `"audit.subscribe"`): such calls go to [`Self::stream`].
    fn is_stream(&self, method: &str) -> bool;

    /// Starts a stream: the initial result, and a receiver of `(method, params)` notifications
    /// that ends the stream (and closes the connection) when its senders are gone. The channel
    /// should be bounded and fed with `try_send`, dropping the subscriber when it is full: the
    /// transport stops taking items from a client that does not read, and the core must not
    /// wait for it.
    fn stream(
        &self,
        call: Call,
        caller: Caller,
    ) -> impl Future<Output = Result<(Value, mpsc::Receiver<(String, Value)>), RpcError>> + Send;
}

/// Binds the status socket and serves it until the returned future is dropped, which also
/// closes every connection and removes the socket file.
///
/// # Errors
///
/// Only binding fails (see [`bind`]); once listening, trouble ends single connections.
///
/// # Panics
///
/// Outside a Tokio runtime.
pub async fn serve<H: Handler>(
    opts: SocketOptions,
    access: AccessPolicy,
    handler: Arc<H>,
) -> Result<(), TransportError> {
    let listener = bind(&opts)?;
    serve_listener(listener, opts, access, handler).await;
    Ok(())
}

/// Serves a socket that [`bind`] made for `opts`, until the returned future is dropped, which
/// also closes every connection and removes the socket file. For a caller that binds first,
/// so that a bad socket path stops it before anything else starts, and binds only once.
///
/// # Panics
///
/// Outside a Tokio runtime.
pub async fn serve_listener<H: Handler>(
    listener: UnixListener,
    opts: SocketOptions,
    access: AccessPolicy,
    handler: Arc<H>,
) {
    let _socket_file = SocketFile::record(&opts.path);
    tracing::info!(path = %opts.path.display(), "status socket listening");
    let shared = Arc::new(Shared {
        opts,
        access,
        next_conn: AtomicU64::new(1),
    });
    // Owning the connection tasks here means dropping `serve` aborts them all.
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "status socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Some(done) = connections.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a status socket connection task failed");
            }
        }
        if connections.len() >= shared.opts.max_connections {
            refuse_busy(stream, shared.opts.max_connections);
            continue;
        }
        connections.spawn(connection(
            stream,
            Arc::clone(&shared),
            Arc::clone(&handler),
        ));
    }
}

/// Creates the socket's directory if needed (mode 0750, group `read_group`), clears a stale
/// socket left by an agent that died, and binds the socket with mode 0660 and group
/// `read_group`. An existing directory is left as it is (it may be shared, like `/tmp`).
///
/// # Errors
///
/// [`TransportError::AlreadyServing`] when an agent answers on the path, and errors naming the
/// path for everything the filesystem refuses.
///
/// # Panics
///
/// Outside a Tokio runtime.
pub fn bind(opts: &SocketOptions) -> Result<UnixListener, TransportError> {
    let path = &opts.path;
    let Some(name) = path.file_name() else {
        return Err(TransportError::BadPath { path: path.clone() });
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    ensure_dir(dir, opts.read_group)?;
    clear_stale(path)?;

    // Bound under a temporary name and renamed into place once its mode and group are right,
    // so that the socket is never reachable with whatever the umask allowed.
    let tmp = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let bind_err = |source| TransportError::Bind {
        path: path.clone(),
        source,
    };
    remove_if_present(&tmp).map_err(bind_err)?;
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = set_mode_and_group(&tmp, SOCKET_MODE, opts.read_group)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(bind_err))
        .and_then(|()| listener.set_nonblocking(true).map_err(bind_err))
        .and_then(|()| UnixListener::from_std(listener).map_err(bind_err));
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

fn ensure_dir(dir: &Path, group: Option<u32>) -> Result<(), TransportError> {
    let create_err = |source| TransportError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            warn_if_unreachable(dir, &meta, group);
            Ok(())
        }
        Ok(_) => Err(create_err(io::Error::from(io::ErrorKind::NotADirectory))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(create_err)?;
            }
            match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
                // Another process made it between the check and here: theirs to configure.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                other => other.map_err(create_err)?,
            }
            // The umask may have taken bits away; set exactly what is meant.
            set_mode_and_group(dir, DIR_MODE, group)
        }
        Err(e) => Err(create_err(e)),
    }
}

fn warn_if_unreachable(dir: &Path, meta: &std::fs::Metadata, group: Option<u32>) {
    let mode = meta.permissions().mode();
    let others_enter = mode & 0o001 != 0;
    let group_enters = group.is_some_and(|g| meta.gid() == g && mode & 0o010 != 0);
    if group.is_some() && !others_enter && !group_enters {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            dir_gid = meta.gid(),
            read_gid = group,
            "members of the read group cannot reach the status socket through its directory"
        );
    }
}

fn set_mode_and_group(path: &Path, mode: u32, gid: Option<u32>) -> Result<(), TransportError> {
    let err = |source| TransportError::Permissions {
        path: path.to_owned(),
        mode,
        gid,
        source,
    };
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Removes `path` if it is a socket nobody answers on; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TransportError::Probe {
                path: path.to_owned(),
                source,
            });
        }
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(TransportError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(TransportError::AlreadyServing {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale status socket");
            remove_if_present(path).map_err(|source| TransportError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TransportError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the socket file when serving stops, unless another agent has replaced it since.
struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    fn record(path: &Path) -> Self {
        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self {
            path: path.to_owned(),
            identity,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Shared {
    opts: SocketOptions,
    access: AccessPolicy,
    next_conn: AtomicU64,
}

fn refuse_busy(stream: UnixStream, max: usize) {
    let err = RpcError::new(
        BUSY,
        format!("too many connections: the agent serves at most {max} at once; try again shortly"),
    );
    let line = jsonrpc::response_err(&Value::Null, &err) + "\n";
    // A fresh socket's send buffer is empty, so this short line goes out without waiting; if
    // it does not, the client was gone anyway. Written on the plain socket because Tokio's
    // `try_write` says "would block" until the reactor has seen the new socket writable.
    if let Ok(plain) = stream.into_std() {
        let _ = (&plain).write(line.as_bytes());
    }
    tracing::debug!(
        max,
        "refused a status socket connection: at the connection limit"
    );
}

async fn connection<H: Handler>(stream: UnixStream, shared: Arc<Shared>, handler: Arc<H>) {
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    match converse(stream, &shared, &handler, conn).await {
        Ok(()) => tracing::debug!(conn, "status socket connection closed"),
        Err(e) => tracing::debug!(conn, error = %e, "status socket connection dropped"),
    }
}

/// One connection from credentials check to close.
async fn converse<H: Handler>(
    stream: UnixStream,
    shared: &Shared,
    handler: &Arc<H>,
    conn: u64,
) -> Result<(), TransportError> {
    let opts = &shared.opts;
    let peer = peer_of(&stream).map_err(|source| TransportError::PeerCredentials { source })?;
    let access = shared.access.access(&peer);
    let (read, write) = stream.into_split();
    let mut out = Writer {
        half: write,
        timeout: opts.write_timeout,
        uid: peer.uid,
    };
    if access == Access::None {
        tracing::info!(
            conn,
            uid = peer.uid,
            pid = peer.pid,
            "status socket refused a peer"
        );
        return out
            .send(jsonrpc::response_err(
                &Value::Null,
                &shared.access.denied(&peer),
            ))
            .await;
    }
    tracing::debug!(conn, uid = peer.uid, pid = peer.pid, %access, "status socket connection");
    let caller = Caller { peer, access };
    let mut input = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        if line.capacity() > KEEP_LINE_CAPACITY {
            line.shrink_to(KEEP_LINE_CAPACITY);
        }
        match timeout(
            opts.idle_timeout,
            read_line(&mut input, &mut line, opts.max_line),
        )
        .await
        {
            Err(_) => {
                tracing::debug!(conn, "closing an idle status socket connection");
                return Ok(());
            }
            Ok(Err(source)) => {
                return Err(TransportError::Read {
                    uid: caller.peer.uid,
                    source,
                });
            }
            Ok(Ok(Line::End)) => return Ok(()),
            Ok(Ok(Line::TooLong)) => {
                // The rest of that line cannot be told apart from the next request: close.
                let err = RpcError::invalid_request(format!(
                    "request line exceeds {} bytes",
                    opts.max_line
                ));
                return out.send(jsonrpc::response_err(&Value::Null, &err)).await;
            }
            Ok(Ok(Line::Complete)) => {}
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
            let reply = match run_call(handler, call, caller.clone()).await {
                Ok(result) => jsonrpc::response_ok(&id, result),
                Err(err) => jsonrpc::response_err(&id, &err),
            };
            out.send(reply).await?;
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

async fn run_call<H: Handler>(
    handler: &Arc<H>,
    call: Call,
    caller: Caller,
) -> Result<Value, RpcError> {
    let method = call.method.clone();
    let handler = Arc::clone(handler);
    tokio::spawn(async move { handler.handle(call, caller).await })
        .await
        .unwrap_or_else(|e| Err(panicked(&method, &e)))
}

async fn start_stream<H: Handler>(
    handler: &Arc<H>,
    call: Call,
    caller: Caller,
) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
    let method = call.method.clone();
    let handler = Arc::clone(handler);
    tokio::spawn(async move { handler.stream(call, caller).await })
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
) -> Result<(), TransportError> {
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
                Err(source) => return Err(TransportError::Read { uid: out.uid, source }),
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
    async fn send(&mut self, mut line: String) -> Result<(), TransportError> {
        line.push('\n');
        match timeout(self.timeout, self.half.write_all(line.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(TransportError::Write {
                uid: self.uid,
                source,
            }),
            Err(_) => Err(TransportError::SlowClient {
                uid: self.uid,
                after: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        sync::Notify,
        task::JoinHandle,
    };

    use super::*;
    use crate::api::{
        client::{
            ClientError, RpcClient,
            tests::{TempDir, TestGroup, TestUser, call_as, privileged},
        },
        jsonrpc::{
            INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, PERMISSION_DENIED,
        },
        peer::require,
    };

    /// A stand-in core: `echo`, `whoami`, `admin.poke` (admin only), `sleep`, `panic`; streams
    /// `count` (n items, then the end), `flood` (large items until nobody takes them) and
    /// `quiet` (nothing, until the subscriber is gone).
    #[derive(Default)]
    struct Toy {
        /// Signalled when a `flood` or `quiet` subscriber has gone away.
        gone: Arc<Notify>,
    }

    impl Handler for Toy {
        async fn handle(&self, call: Call, caller: Caller) -> Result<Value, RpcError> {
            match call.method.as_str() {
                "echo" => Ok(call.params),
                "whoami" => Ok(json!({ "uid": caller.peer.uid, "access": caller.access })),
                "admin.poke" => {
                    require(caller.access, Access::Admin, "admin.poke")?;
                    Ok(json!("poked"))
                }
                "sleep" => {
                    let ms = call.params["ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!(ms))
                }
                "panic" => panic!("the toy handler panics on purpose"),
                other => Err(RpcError::method_not_found(other)),
            }
        }

        fn is_stream(&self, method: &str) -> bool {
            matches!(method, "count" | "flood" | "quiet")
        }

        async fn stream(
            &self,
            call: Call,
            _caller: Caller,
        ) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
            let (tx, rx) = mpsc::channel(4);
            let gone = Arc::clone(&self.gone);
            match call.method.as_str() {
                "count" => {
                    let Some(n) = call.params["n"].as_u64() else {
                        return Err(RpcError::invalid_params("count needs {\"n\": number}"));
                    };
                    tokio::spawn(async move {
                        for i in 0..n {
                            let _ = tx.send(("count.tick".to_owned(), json!({ "i": i }))).await;
                        }
                    });
                }
                "flood" => {
                    tokio::spawn(async move {
                        let big = "x".repeat(64 * 1024);
                        while tx.send(("flood.item".to_owned(), json!(big))).await.is_ok() {}
                        gone.notify_one();
                    });
                }
                _ => {
                    tokio::spawn(async move {
                        tx.closed().await;
                        gone.notify_one();
                    });
                }
            }
            Ok((json!({ "subscribed": call.method }), rx))
        }
    }

    /// An agent serving a `Toy` on a socket in a throwaway directory.
    struct TestAgent {
        path: PathBuf,
        toy_gone: Arc<Notify>,
        task: JoinHandle<Result<(), TransportError>>,
        _dir: TempDir,
    }

    impl TestAgent {
        async fn start(tweak: impl FnOnce(&mut SocketOptions)) -> Self {
            let policy = AccessPolicy {
                admin_gid: None,
                read_gid: None,
                admin_group: "fw-admin".into(),
                read_group: "fw".into(),
                // SAFETY: geteuid has no preconditions and cannot fail.
                agent_uid: unsafe { libc::geteuid() },
            };
            Self::start_with(policy, tweak).await
        }

        async fn start_with(policy: AccessPolicy, tweak: impl FnOnce(&mut SocketOptions)) -> Self {
            let dir = TempDir::new("transport");
            let mut opts = SocketOptions::new(dir.0.join("run").join("agent.sock"));
            tweak(&mut opts);
            let toy = Arc::new(Toy::default());
            let toy_gone = Arc::clone(&toy.gone);
            let path = opts.path.clone();
            let task = tokio::spawn(serve(opts, policy, toy));
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::os::unix::net::UnixStream::connect(&path).is_err() {
                assert!(!task.is_finished(), "serve ended early: {:?}", task.await);
                assert!(
                    Instant::now() < deadline,
                    "the agent never listened on {}",
                    path.display()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Self {
                path,
                toy_gone,
                task,
                _dir: dir,
            }
        }

        /// A blocking client call, off the runtime's threads.
        async fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
            let path = self.path.clone();
            let method = method.to_owned();
            tokio::task::spawn_blocking(move || RpcClient::connect(&path)?.call(&method, params))
                .await
                .unwrap()
        }

        /// Sends `bytes`, shuts down the write side and returns every line the agent sent
        /// before closing.
        async fn exchange(&self, bytes: &[u8]) -> Vec<Value> {
            let mut stream = UnixStream::connect(&self.path).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            stream.shutdown().await.unwrap();
            read_all(stream).await
        }
    }

    impl Drop for TestAgent {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn read_all(from: impl tokio::io::AsyncRead + Unpin) -> Vec<Value> {
        let mut lines = BufReader::new(from).lines();
        let mut seen = Vec::new();
        // A reset after the last line (the agent closed with input unread) ends it too.
        while let Ok(Some(line)) = timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the agent neither answered nor closed within 10 s")
        {
            seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
        seen
    }

    fn code(v: &Value) -> i64 {
        v["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("expected an error, saw {v}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_and_streams_round_trip_through_the_client() {
        let agent = TestAgent::start(|_| {}).await;
        assert_eq!(
            agent.call("echo", json!({ "a": [1, 2] })).await.unwrap(),
            json!({ "a": [1, 2] })
        );
        let who = agent.call("whoami", Value::Null).await.unwrap();
        assert_eq!(
            who["access"],
            json!("admin"),
            "the agent's own uid administers: {who}"
        );
        match agent.call("nope", Value::Null).await {
            Err(ClientError::Rpc { code, message, .. }) => {
                assert_eq!(
                    (code, message.as_str()),
                    (METHOD_NOT_FOUND, "unknown method \"nope\"")
                );
            }
            other => panic!("expected method-not-found, saw {other:?}"),
        }

        let path = agent.path.clone();
        let (initial, items, after) = tokio::task::spawn_blocking(move || {
            let mut client = RpcClient::connect(&path).unwrap();
            // A panic in the core answers that call and leaves the connection usable.
            let panicked = client.call("panic", Value::Null).unwrap_err();
            assert!(
                matches!(
                    &panicked,
                    ClientError::Rpc {
                        code: INTERNAL_ERROR,
                        ..
                    }
                ),
                "{panicked:?}"
            );
            let bad = client.subscribe("count", json!({})).err().expect("no n");
            assert!(
                matches!(bad, ClientError::Rpc { code: -32602, .. }),
                "{bad:?}"
            );
            let (initial, items) = client.subscribe("count", json!({ "n": 5 })).unwrap();
            let items: Vec<_> = items.map(Result::unwrap).collect();
            // The stream's end closes the connection.
            let after = client.call("echo", json!([]));
            (initial, items, after)
        })
        .await
        .unwrap();
        assert_eq!(initial, json!({ "subscribed": "count" }));
        let want: Vec<_> = (0..5)
            .map(|i| ("count.tick".to_owned(), json!({ "i": i })))
            .collect();
        assert_eq!(items, want);
        assert!(
            matches!(
                after,
                Err(ClientError::Closed { .. } | ClientError::Io { .. })
            ),
            "{after:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_lines_get_errors_and_the_connection_goes_on() {
        let agent = TestAgent::start(|_| {}).await;
        let input = concat!(
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"echo\",\"params\":[1]}\n",
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\"\n",
            "42\n",
            "{\"jsonrpc\":\"1.0\",\"id\":3,\"method\":\"echo\"}\n",
            "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"echo\",\"prams\":{}}\n",
            "[{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"echo\"}]\n",
            "{\"jsonrpc\":\"2.0\",\"method\":\"echo\"}\n",
            "\n",
            "   \r\n",
            "{\"jsonrpc\":\"2.0\",\"id\":\"last\",\"method\":\"echo\",\"params\":{\"ok\":true}}\r\n",
        );
        let seen = agent.exchange(input.as_bytes()).await;
        assert_eq!(
            seen.len(),
            7,
            "one answer per call, none for the notification: {seen:#?}"
        );
        assert_eq!(seen[0], json!({ "jsonrpc": "2.0", "id": 1, "result": [1] }));
        assert_eq!(
            (code(&seen[1]), &seen[1]["id"]),
            (PARSE_ERROR, &Value::Null)
        );
        assert!(
            seen[1]["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid JSON at line 1 column")
        );
        assert_eq!(code(&seen[2]), INVALID_REQUEST);
        assert_eq!(
            (code(&seen[3]), &seen[3]["id"]),
            (INVALID_REQUEST, &json!(3))
        );
        assert_eq!(
            (code(&seen[4]), &seen[4]["id"]),
            (INVALID_REQUEST, &json!(4))
        );
        assert!(
            seen[4]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("\"prams\"")
        );
        assert_eq!(
            seen[5]["error"]["message"],
            json!("batches are not supported")
        );
        assert_eq!(
            seen[6],
            json!({ "jsonrpc": "2.0", "id": "last", "result": { "ok": true } })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overlong_line_closes_its_connection_but_not_the_agent() {
        let agent = TestAgent::start(|_| {}).await;
        let stream = UnixStream::connect(&agent.path).await.unwrap();
        let (read, mut write) = stream.into_split();
        // The agent stops reading part way, so this write may fail: that is expected.
        let writer = tokio::spawn(async move {
            let mut line = vec![b'x'; 2 << 20];
            line.push(b'\n');
            let _ = write.write_all(&line).await;
        });
        let seen = read_all(read).await;
        drop(writer);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(code(&seen[0]), INVALID_REQUEST);
        assert_eq!(
            seen[0]["error"]["message"],
            json!("request line exceeds 1048576 bytes")
        );
        assert_eq!(
            agent.call("echo", json!(["still here"])).await.unwrap(),
            json!(["still here"])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_closed() {
        let agent = TestAgent::start(|o| o.idle_timeout = Duration::from_millis(300)).await;
        let started = Instant::now();
        let silent = UnixStream::connect(&agent.path).await.unwrap();
        assert!(read_all(silent).await.is_empty());
        // A line dribbled out byte by byte never completes, so it counts as idle too.
        let mut dribbling = UnixStream::connect(&agent.path).await.unwrap();
        for _ in 0..10 {
            if dribbling.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(read_all(dribbling).await.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_closed_connection_gets_its_answers_in_order() {
        let agent = TestAgent::start(|_| {}).await;
        let input = concat!(
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"sleep\",\"params\":{\"ms\":200}}\n",
            "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"echo\",\"params\":[2]}\n",
            // The last line needs no newline: the end of input ends it.
            "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"count\",\"params\":{\"n\":3}}",
        );
        let seen = agent.exchange(input.as_bytes()).await;
        let ids: Vec<_> = seen.iter().map(|v| v.get("id").cloned()).collect();
        let methods: Vec<_> = seen.iter().map(|v| v.get("method").cloned()).collect();
        assert_eq!(
            ids[..3],
            [Some(json!(1)), Some(json!(2)), Some(json!(3))],
            "{seen:#?}"
        );
        assert_eq!(
            methods[3..],
            [
                Some(json!("count.tick")),
                Some(json!("count.tick")),
                Some(json!("count.tick"))
            ]
        );
    }

    /// A connection that has been answered once, retried while the agent is at its limit.
    fn connect_when_free(path: &Path) -> RpcClient {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut client = RpcClient::connect(path).unwrap();
            match client.call("echo", json!([])) {
                Ok(_) => return client,
                Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("expected a free slot within 5 s: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_are_refused_until_one_closes() {
        let agent = TestAgent::start(|o| o.max_connections = 2).await;
        let path = agent.path.clone();
        let (first, second) = tokio::task::spawn_blocking(move || {
            // The start-up probe's connection may hold a slot for a moment.
            let a = connect_when_free(&path);
            let b = connect_when_free(&path);
            let refused = RpcClient::connect(&path)
                .unwrap()
                .call("echo", json!([3]))
                .unwrap_err();
            match refused {
                ClientError::Rpc { code, message, .. } => {
                    assert_eq!(code, BUSY);
                    assert!(message.starts_with("too many connections"), "{message}");
                }
                other => panic!("expected too-many-connections, saw {other:?}"),
            }
            (a, b)
        })
        .await
        .unwrap();
        drop(first);
        // The agent notices the close asynchronously; a slot frees up shortly after.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match agent.call("echo", json!([4])).await {
                Ok(v) => break assert_eq!(v, json!([4])),
                Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("a slot should have freed up: {e}"),
            }
        }
        drop(second);
    }

    /// Raises the soft limit on open descriptors to at least `want`, within the hard limit.
    fn raise_fd_limit(want: u64) -> bool {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return false;
        }
        if limit.rlim_cur >= want {
            return true;
        }
        if limit.rlim_max < want {
            return false;
        }
        limit.rlim_cur = want;
        // SAFETY: `limit` is a valid rlimit, with the soft limit within the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_clients_at_once_are_each_answered_or_refused() {
        const CLIENTS: usize = 1000;
        // Both ends of every connection live in this process: ~2,000 descriptors at the peak.
        if !raise_fd_limit(2 * CLIENTS as u64 + 256) {
            eprintln!("skipped: the descriptor limit cannot be raised to hold {CLIENTS} clients");
            return;
        }
        let agent = TestAgent::start(|_| {}).await;
        let all_in = Arc::new(tokio::sync::Barrier::new(CLIENTS));
        let mut clients = JoinSet::new();
        for i in 0..CLIENTS {
            let (path, all_in) = (agent.path.clone(), Arc::clone(&all_in));
            clients.spawn(async move {
                let mut stream = UnixStream::connect(&path).await.expect("connect");
                let request = format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{i},\"method\":\"echo\",\"params\":[{i}]}}\n"
                );
                // A refused connection may be closed before the request is written.
                let _ = stream.write_all(request.as_bytes()).await;
                let mut line = String::new();
                BufReader::new(&mut stream)
                    .read_line(&mut line)
                    .await
                    .expect("an answer");
                // Every connection stays open until all have their answer, so the limit binds.
                all_in.wait().await;
                let answer: Value = serde_json::from_str(&line).expect("one JSON line");
                if answer["result"] == json!([i]) {
                    Ok(())
                } else {
                    assert_eq!(code(&answer), BUSY, "{answer}");
                    Err(())
                }
            });
        }
        let (mut answered, mut refused) = (0, 0);
        while let Some(outcome) = clients.join_next().await {
            match outcome.unwrap() {
                Ok(()) => answered += 1,
                Err(()) => refused += 1,
            }
        }
        assert_eq!(
            (answered, refused),
            (DEFAULT_MAX_CONNECTIONS, CLIENTS - DEFAULT_MAX_CONNECTIONS)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match agent.call("whoami", Value::Null).await {
                Ok(_) => break,
                Err(ClientError::Rpc { code: BUSY, .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the agent should serve again once the crowd left: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_dropped_without_holding_anyone_up() {
        let agent = TestAgent::start(|o| o.write_timeout = Duration::from_millis(300)).await;
        let mut stuck = UnixStream::connect(&agent.path).await.unwrap();
        stuck
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"flood\"}\n")
            .await
            .unwrap();
        // Meanwhile others are served as usual.
        assert_eq!(
            agent.call("echo", json!(["fine"])).await.unwrap(),
            json!(["fine"])
        );
        timeout(Duration::from_secs(10), agent.toy_gone.notified())
            .await
            .expect("the flood's subscriber should be dropped once writes stall for 300 ms");
        drop(stuck);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_ends_when_its_client_closes() {
        let agent = TestAgent::start(|_| {}).await;
        for half_close_first in [false, true] {
            let mut stream = UnixStream::connect(&agent.path).await.unwrap();
            stream
                .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"quiet\"}\n")
                .await
                .unwrap();
            let mut line = String::new();
            let mut reader = BufReader::new(&mut stream);
            reader.read_line(&mut line).await.unwrap();
            assert!(line.contains("\"subscribed\":\"quiet\""), "{line}");
            if half_close_first {
                // Shutting down the write side alone keeps the stream alive...
                stream.shutdown().await.unwrap();
                let early = timeout(Duration::from_millis(1500), agent.toy_gone.notified()).await;
                assert!(early.is_err(), "a half-close must not end a stream");
            }
            drop(stream);
            // ...closing the socket ends it.
            timeout(Duration::from_secs(5), agent.toy_gone.notified())
                .await
                .unwrap_or_else(|_| {
                    panic!("the stream outlived its client (half-close first: {half_close_first})")
                });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bind_sets_modes_clears_stale_sockets_and_refuses_live_ones() {
        let dir = TempDir::new("bind");
        let mut opts = SocketOptions::new(dir.0.join("run").join("agent.sock"));
        // SAFETY: getegid has no preconditions and cannot fail.
        opts.read_group = Some(unsafe { libc::getegid() });
        let listener = bind(&opts).unwrap();
        let sock = std::fs::metadata(&opts.path).unwrap();
        let parent = std::fs::metadata(dir.0.join("run")).unwrap();
        assert_eq!(sock.permissions().mode() & 0o7777, 0o660);
        assert_eq!(parent.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            (sock.gid(), parent.gid()),
            (opts.read_group.unwrap(), opts.read_group.unwrap())
        );
        assert_eq!(
            std::fs::read_dir(dir.0.join("run")).unwrap().count(),
            1,
            "no temporary left"
        );

        let err = bind(&opts).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another agent is already serving on {}",
                opts.path.display()
            )
        );

        // Dropping a listener leaves its file behind, as a crashed agent would.
        drop(listener);
        let again = bind(&opts).expect("a stale socket is replaced");
        drop(again);

        std::fs::remove_file(&opts.path).unwrap();
        std::fs::write(&opts.path, "not a socket").unwrap();
        assert!(matches!(
            bind(&opts),
            Err(TransportError::NotASocket { .. })
        ));
    }

    /// The agent binds before it serves, so that a bad path stops its start; serving must
    /// take over that socket, not bind again (which found the first one "stale").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_listener_serves_the_socket_bind_made() {
        let dir = TempDir::new("bind-once");
        let opts = SocketOptions::new(dir.0.join("agent.sock"));
        let listener = bind(&opts).unwrap();
        let bound = std::fs::metadata(&opts.path).unwrap().ino();
        let policy = AccessPolicy {
            admin_gid: None,
            read_gid: None,
            admin_group: "fw-admin".into(),
            read_group: "fw".into(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            agent_uid: unsafe { libc::geteuid() },
        };
        let task = tokio::spawn(serve_listener(
            listener,
            opts.clone(),
            policy,
            Arc::new(Toy::default()),
        ));
        let path = opts.path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            RpcClient::connect(&path)?.call("echo", json!({ "x": 1 }))
        })
        .await
        .unwrap()
        .expect("an answer on the socket bind made");
        assert_eq!(answer, json!({ "x": 1 }));
        assert_eq!(
            std::fs::metadata(&opts.path).unwrap().ino(),
            bound,
            "the socket file was replaced: bound a second time"
        );
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_the_server_removes_its_socket() {
        let agent = TestAgent::start(|_| {}).await;
        let path = agent.path.clone();
        agent.task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} is still there",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // The guard only keeps other privileged tests (in other threads, on other runtimes) from
    // adding users at the same time; nothing on this runtime waits for it.
    #[expect(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_users_get_the_access_their_groups_give() {
        let Some(_guard) = privileged() else { return };
        let (admin, read) = (TestGroup::create("adm"), TestGroup::create("rd"));
        let user = TestUser::create("u");
        let policy = AccessPolicy::from_names(&admin.name, &read.name).unwrap();
        assert_eq!(
            (policy.admin_gid, policy.read_gid),
            (Some(admin.gid), Some(read.gid))
        );
        let agent = TestAgent::start_with(policy.clone(), |o| o.read_group = Some(read.gid)).await;
        let run = agent.path.parent().unwrap().to_owned();
        let as_user =
            |groups: &[u32], method: &str| call_as(user.uid, user.gid, groups, &agent.path, method);

        // The filesystem is the first gate: neither group cannot even open the socket...
        let seen = tokio::task::block_in_place(|| as_user(&[], "whoami"));
        assert!(
            seen["client"]
                .as_str()
                .is_some_and(|m| m.starts_with("permission denied on ")),
            "{seen}"
        );
        // ...and the read group can, as a supplementary group among many (past the 32 that
        // `peer_of` asks for at first).
        let mut many: Vec<u32> = (0..40).map(|i| 70_000 + i).collect();
        many.push(read.gid);
        let seen = tokio::task::block_in_place(|| as_user(&many, "whoami"));
        assert_eq!(seen, json!({ "ok": { "uid": user.uid, "access": "read" } }));
        let seen = tokio::task::block_in_place(|| as_user(&[read.gid], "admin.poke"));
        assert_eq!(seen["rpc"]["code"], json!(PERMISSION_DENIED), "{seen}");
        // The socket's group is the read group, so administrators are in both.
        let seen = tokio::task::block_in_place(|| {
            call_as(user.uid, admin.gid, &[read.gid], &agent.path, "admin.poke")
        });
        assert_eq!(seen, json!({ "ok": "poked" }), "admin as the primary group");

        // The credentials check is the second gate, for a socket someone opened up.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&agent.path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let seen = tokio::task::block_in_place(|| as_user(&[], "whoami"));
        let want = format!(
            "permission denied: uid {} is in neither the {a} nor the {r} group; ask an \
             administrator to add you to {r} (read) or {a} (admin)",
            user.uid,
            a = admin.name,
            r = read.name
        );
        assert_eq!(
            seen,
            json!({ "rpc": { "code": PERMISSION_DENIED, "message": want } })
        );
        let seen = tokio::task::block_in_place(|| as_user(&[admin.gid], "whoami"));
        assert_eq!(
            seen,
            json!({ "ok": { "uid": user.uid, "access": "admin" } })
        );
    }
}
