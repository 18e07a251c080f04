//! The status socket server: binds the Unix socket, checks each peer's credentials, and moves
//! JSON-RPC lines between connections and the core's [`Handler`]. It decides nothing else.
//!
//! One connection is one conversation: requests are read one line at a time and answered in
//! order, so a client may pipeline and half-close. A streaming method (one the handler says
//! [`Handler::is_stream`] about) occupies its connection: after the initial result, each item
//! is a notification line, input is read and ignored, and the connection closes when the
//! stream ends. A slow or stuck client is dropped, never waited for.
//!
//! Connections are budgeted so that nobody with read access can lock an administrator out:
//! each uid has a cap, administrators have slots of their own beyond the shared ones, and
//! while the shared slots run short, idle connections are closed much sooner (see
//! [`budget`]).

mod budget;
mod conversation;
mod socket_file;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    io::{self, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::{net::UnixListener, sync::mpsc, task::JoinSet};

use self::{
    budget::{Budget, Limits},
    socket_file::SocketFile,
};
pub use self::{
    conversation::{ConnectionError, write_result_line},
    socket_file::{SocketError, bind},
};
use super::{
    jsonrpc::{Call, RpcError},
    peer::{Access, AccessPolicy, Peer, peer_of},
};

pub const DEFAULT_SOCKET_PATH: &str = crate::config::DEFAULT_SOCKET;
pub const DEFAULT_MAX_LINE: usize = 1 << 20;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Connections one uid without admin access may hold at once.
pub const DEFAULT_MAX_PER_UID: usize = 32;
/// Slots beyond `max_connections` that only administrators may take: a crowd of readers
/// can fill the shared slots, never these.
pub const DEFAULT_ADMIN_RESERVE: usize = 32;
/// How long a connection may stay idle while the shared slots are running short.
pub const DEFAULT_PRESSURE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that takes no bytes for this long is dropped so that it cannot hold anything up.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Connections everyone shares; administrators have `admin_reserve` more.
    pub max_connections: usize,
    /// Connections one uid without admin access may hold at once.
    pub max_per_uid: usize,
    /// Slots beyond `max_connections` for administrators only.
    pub admin_reserve: usize,
    /// The idle timeout while at least three quarters of the shared slots are taken.
    pub pressure_idle_timeout: Duration,
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
            max_per_uid: DEFAULT_MAX_PER_UID,
            admin_reserve: DEFAULT_ADMIN_RESERVE,
            pressure_idle_timeout: DEFAULT_PRESSURE_IDLE_TIMEOUT,
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

/// A result that serialises itself: it writes exactly one JSON value (the `result` member
/// of the response) into the writer it is given.
pub type WriteResult = Box<dyn FnOnce(&mut dyn Write) -> io::Result<()> + Send>;

/// The answer to a call.
pub enum Reply {
    /// A result built in memory.
    Value(Value),
    /// A result too large to build in memory (every session, every flow): the transport runs
    /// it on a blocking thread and sends what it writes in chunks as the client takes them,
    /// so memory stays bounded whatever the size. The response is still one line. If it
    /// fails before its first chunk is sent, the caller gets an `INTERNAL_ERROR` response;
    /// after, the connection is closed (half a line cannot be taken back).
    Raw(WriteResult),
}

impl Reply {
    /// A result that writes itself; see [`Reply::Raw`].
    pub fn raw(write: impl FnOnce(&mut dyn Write) -> io::Result<()> + Send + 'static) -> Self {
        Self::Raw(Box::new(write))
    }

    /// The result as a value, for in-process callers (tests, benchmarks); a raw result is
    /// written out and parsed back.
    ///
    /// # Errors
    ///
    /// `INTERNAL_ERROR` when a raw result fails or writes something that is not JSON.
    pub fn into_value(self) -> Result<Value, RpcError> {
        match self {
            Self::Value(v) => Ok(v),
            Self::Raw(write) => {
                let mut bytes = Vec::new();
                write(&mut bytes)
                    .map_err(|e| RpcError::internal(format!("writing the result: {e}")))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| RpcError::internal(format!("the result is not JSON: {e}")))
            }
        }
    }
}

impl From<Value> for Reply {
    fn from(v: Value) -> Self {
        Self::Value(v)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Value(v) => f.debug_tuple("Value").field(v).finish(),
            Self::Raw(_) => f.write_str("Raw(..)"),
        }
    }
}

/// What the transport needs from the core. `handle` gets the method, params and the caller's
/// access, and returns a [`Reply`] or an [`RpcError`]; `stream` is for streaming methods.
///
/// Each call runs on a thread of the runtime's blocking pool (driven there by the runtime's
/// handle, so it may await as usual): whatever the core does without awaiting (walking the
/// flow table, encoding a large answer) never holds up the runtime's workers. A panic
/// becomes an `INTERNAL_ERROR` response, and a call whose client goes away still runs to
/// completion (a terminate is never half done).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        call: Call,
        caller: Caller,
    ) -> impl Future<Output = Result<Reply, RpcError>> + Send;

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
) -> Result<(), SocketError> {
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
    let budget = Budget::new(Limits::of(&opts));
    let shared = Arc::new(conversation::Shared::new(opts, access, Arc::clone(&budget)));
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
        // Credentials first: who is asking decides which slots they may take.
        let peer = match peer_of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::debug!(error = %e, "reading the peer credentials of a new connection");
                continue;
            }
        };
        let level = shared.access.access(&peer);
        let slot = match budget.admit(peer.uid, level == Access::Admin) {
            Ok(slot) => slot,
            Err(refusal) => {
                budget::refuse(stream, &refusal, &budget);
                continue;
            }
        };
        let caller = Caller {
            peer,
            access: level,
        };
        connections.spawn(conversation::connection(
            stream,
            caller,
            slot,
            Arc::clone(&shared),
            Arc::clone(&handler),
        ));
    }
}
