//! The blocking status-socket client the CLI (and any tool) uses: one connection, calls
//! answered in order, and subscriptions that stream notifications.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};

use super::jsonrpc::RpcError;
use crate::config::DEFAULT_SOCKET;

/// Where the CLI looks for the socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "FLOWWARDEN_SOCKET";
/// A call the agent has not answered by then is given up on (streams wait forever).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent socket at {}: is the agent running? (flowwarden agent --config …; set \
         --socket or FLOWWARDEN_SOCKET if it listens elsewhere)",
        path.display()
    )]
    NoSocket { path: PathBuf },
    #[error(
        "permission denied on {}: your user needs to be in {group} to open it (reads; \
         changes also need the agent's admin group)",
        path.display()
    )]
    PermissionDenied {
        path: PathBuf,
        /// The group that may open the socket, as its file (or the directory that stopped
        /// us) says: the agent's configured read group.
        group: String,
    },
    #[error("the agent is not listening on {} (stale socket?)", path.display())]
    NotListening { path: PathBuf },
    #[error("connecting to the agent on {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to the agent on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {} did not answer {method} within {after:?}", path.display())]
    Timeout {
        path: PathBuf,
        method: String,
        after: Duration,
    },
    #[error("the agent on {} closed the connection during {method}", path.display())]
    Closed { path: PathBuf, method: String },
    #[error("the agent on {} sent something that is not a JSON-RPC 2.0 message: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The agent answered with an error: its message is meant for people as it is.
    #[error("{message}")]
    Rpc {
        code: i64,
        message: String,
        data: Option<Value>,
    },
}

impl From<RpcError> for ClientError {
    fn from(e: RpcError) -> Self {
        Self::Rpc {
            code: e.code,
            message: e.message,
            data: e.data,
        }
    }
}

/// The socket to use: the flag's, else `$FLOWWARDEN_SOCKET`, else the default.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    match (flag, std::env::var_os(SOCKET_ENV)) {
        (Some(path), _) => path.to_owned(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// One connection to the agent's status socket.
pub struct RpcClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    call_timeout: Option<Duration>,
}

enum Message {
    Response {
        id: Value,
        outcome: Result<Value, RpcError>,
    },
    Notification {
        method: String,
        params: Value,
    },
}

impl RpcClient {
    /// Connects to the socket at `path`.
    ///
    /// # Errors
    ///
    /// Says what to do about a missing socket, a permission problem or a stale socket.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let path = path.to_owned();
        let stream = match UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                return Err(match e.kind() {
                    io::ErrorKind::NotFound => ClientError::NoSocket { path },
                    io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                        group: socket_group(&path),
                        path,
                    },
                    io::ErrorKind::ConnectionRefused => ClientError::NotListening { path },
                    _ => ClientError::Connect { path, source: e },
                });
            }
        };
        let writer = stream.try_clone().map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            call_timeout: Some(DEFAULT_CALL_TIMEOUT),
        })
    }

    /// How long a call waits for its answer; `None` waits forever.
    pub fn set_call_timeout(&mut self, after: Option<Duration>) {
        self.call_timeout = after;
    }

    /// Calls `method` and waits for its answer.
    ///
    /// # Errors
    ///
    /// [`ClientError::Rpc`] when the agent answers with an error; the others when the
    /// connection fails or times out.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.set_read_timeout(self.call_timeout)?;
        let id = self.send(method, params)?;
        loop {
            match self.read_message(method)? {
                Message::Response { id: got, outcome } if got == id => {
                    return outcome.map_err(ClientError::from);
                }
                // Errors the agent sends before reading any request (permission denied,
                // too many connections) carry a null id.
                Message::Response {
                    id: Value::Null,
                    outcome: Err(e),
                } => return Err(e.into()),
                // A late answer to an earlier call that timed out here.
                Message::Response {
                    id: Value::Number(n),
                    ..
                } if n.as_u64().is_some_and(|n| n < self.next_id) => {}
                Message::Response { id: got, .. } => {
                    return Err(self.protocol(format!("an answer for id {got}, expected {id}")));
                }
                // Left over from a stream this connection had: not an answer.
                Message::Notification { .. } => {}
            }
        }
    }

    /// Calls a streaming method: its initial result, then its notifications as
    /// `(method, params)` until the agent ends the stream (the iterator ends) or fails.
    ///
    /// # Errors
    ///
    /// As [`Self::call`] for the initial answer; the iterator yields later failures.
    pub fn subscribe(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<(Value, Notifications<'_>), ClientError> {
        let initial = self.call(method, params)?;
        // Items come whenever there is something to report; silence is not a failure.
        self.set_read_timeout(None)?;
        Ok((
            initial,
            Notifications {
                client: self,
                method: method.to_owned(),
                done: false,
            },
        ))
    }

    fn send(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("jsonrpc".into(), json!("2.0"));
        request.insert("id".into(), id.clone());
        request.insert("method".into(), json!(method));
        if !params.is_null() {
            request.insert("params".into(), params);
        }
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        match self.writer.write_all(line.as_bytes()) {
            Ok(()) => Ok(id),
            // The agent may have said why before closing (permission denied, too many
            // connections); that says more than "broken pipe".
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                match self.read_message(method) {
                    Ok(Message::Response {
                        outcome: Err(err), ..
                    }) => Err(err.into()),
                    _ => Err(self.io(e)),
                }
            }
            Err(e) => Err(self.io(e)),
        }
    }

    fn read_message(&mut self, method: &str) -> Result<Message, ClientError> {
        match self.read_message_or_end(method)? {
            Some(message) => Ok(message),
            None => Err(ClientError::Closed {
                path: self.path.clone(),
                method: method.to_owned(),
            }),
        }
    }

    /// The next message, or `None` at a clean end of the connection.
    fn read_message_or_end(&mut self, method: &str) -> Result<Option<Message>, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            // A read timeout shows up as EAGAIN on Linux.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout {
                    path: self.path.clone(),
                    method: method.to_owned(),
                    after: self.call_timeout.unwrap_or_default(),
                });
            }
            Err(e) => return Err(self.io(e)),
        }
        self.decode(&line).map(Some)
    }

    fn decode(&self, line: &str) -> Result<Message, ClientError> {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| self.protocol(format!("invalid JSON ({e}): {}", line.trim_end())))?;
        let Value::Object(mut object) = value else {
            return Err(self.protocol(format!("not an object: {}", line.trim_end())));
        };
        if object.get("jsonrpc") != Some(&json!("2.0")) {
            return Err(self.protocol(format!("no \"jsonrpc\": \"2.0\": {}", line.trim_end())));
        }
        if let Some(id) = object.remove("id") {
            let outcome = match (object.remove("result"), object.remove("error")) {
                (Some(result), None) => Ok(result),
                (None, Some(error)) => Err(serde_json::from_value::<RpcError>(error)
                    .map_err(|e| self.protocol(format!("malformed error ({e})")))?),
                _ => {
                    return Err(
                        self.protocol(format!("neither result nor error: {}", line.trim_end()))
                    );
                }
            };
            return Ok(Message::Response { id, outcome });
        }
        match object.remove("method") {
            Some(Value::String(method)) => Ok(Message::Notification {
                method,
                params: object.remove("params").unwrap_or(Value::Null),
            }),
            _ => Err(self.protocol(format!(
                "neither a response nor a notification: {}",
                line.trim_end()
            ))),
        }
    }

    fn set_read_timeout(&self, after: Option<Duration>) -> Result<(), ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(after)
            .map_err(|e| self.io(e))
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }
}

/// The notifications of one subscription, in the order the agent sent them.
pub struct Notifications<'a> {
    pub(super) client: &'a mut RpcClient,
    method: String,
    done: bool,
}

impl Iterator for Notifications<'_> {
    type Item = Result<(String, Value), ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match self.client.read_message_or_end(&self.method) {
            Ok(Some(Message::Notification { method, params })) => {
                return Some(Ok((method, params)));
            }
            Ok(None) => None,
            Ok(Some(Message::Response { id, .. })) => Some(Err(self
                .client
                .protocol(format!("a response (id {id}) in the middle of a stream")))),
            Err(e) => Some(Err(e)),
        };
        self.done = true;
        item
    }
}

/// The group named on the socket file, or on the nearest directory above it that we can
/// see, for a refusal that names the group to join.
fn socket_group(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    path.ancestors()
        .find_map(|p| std::fs::metadata(p).ok())
        .and_then(|m| super::peer::group_name(m.gid()))
        .map_or_else(
            || "the agent's read group".to_owned(),
            |name| format!("the {name} group"),
        )
}

#[cfg(test)]
pub(super) mod tests {
    //! Also the helpers the transport's tests use to run a client as another user.

    use std::{
        os::unix::{fs::PermissionsExt, net::UnixListener, process::CommandExt},
        process::Command,
        sync::{Mutex, MutexGuard},
    };

    use super::*;

    /// Tests that add users and groups or drop privileges run one at a time.
    static PRIVILEGED: Mutex<()> = Mutex::new(());

    pub(in crate::api) fn privileged() -> Option<MutexGuard<'static, ()>> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to add users and groups and to drop privileges");
            return None;
        }
        Some(PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A directory under /tmp, removed on drop.
    pub(in crate::api) struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("fw-api-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            // Reachable by the unprivileged users some tests run clients as.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn run(cmd: &str, args: &[&str]) {
        let out = Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A system group made for one test (`groupadd`), deleted on drop.
    pub(in crate::api) struct TestGroup {
        pub name: String,
        pub gid: u32,
    }

    impl TestGroup {
        pub fn create(tag: &str) -> Self {
            let name = format!("fwt{tag}{}", std::process::id());
            let _ = Command::new("groupdel").arg(&name).output();
            run("groupadd", &[&name]);
            let gid = crate::api::peer::gid_of(&name)
                .unwrap()
                .expect("group just added");
            Self { name, gid }
        }
    }

    impl Drop for TestGroup {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.name).output();
        }
    }

    /// An unprivileged user made for one test (`useradd`), deleted on drop.
    pub(in crate::api) struct TestUser {
        pub name: String,
        pub uid: u32,
        pub gid: u32,
    }

    impl TestUser {
        pub fn create(tag: &str) -> Self {
            let name = format!("fwt{tag}{}", std::process::id());
            let _ = Command::new("userdel").arg(&name).output();
            run(
                "useradd",
                &[
                    "--no-create-home",
                    "--no-user-group",
                    "--gid",
                    "users",
                    "--shell",
                    "/usr/sbin/nologin",
                    &name,
                ],
            );
            let id = |flag: &str| {
                let out = Command::new("id").args([flag, &name]).output().unwrap();
                String::from_utf8(out.stdout)
                    .unwrap()
                    .trim()
                    .parse::<u32>()
                    .unwrap()
            };
            let (uid, gid) = (id("-u"), id("-g"));
            Self { name, uid, gid }
        }
    }

    impl Drop for TestUser {
        fn drop(&mut self) {
            let _ = Command::new("userdel").arg(&self.name).output();
        }
    }

    /// What the helper child saw: `{"ok": result}`, `{"rpc": {code, message}}` or
    /// `{"client": "error message"}`.
    pub(in crate::api) fn call_as(
        uid: u32,
        gid: u32,
        groups: &[u32],
        socket: &Path,
        method: &str,
    ) -> Value {
        let name = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, rest)| rest);
        let groups: Vec<libc::gid_t> = groups.to_vec();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            &format!("{name}::helper_child"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FW_API_HELPER_SOCKET", socket)
        .env("FW_API_HELPER_METHOD", method);
        // SAFETY: between fork and exec the closure only makes three system calls on memory
        // allocated before the fork (`groups`), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout
            .lines()
            .find_map(|l| l.split_once("HELPER-RESULT:").map(|(_, r)| r))
        else {
            panic!(
                "the helper as uid {uid} printed no result; stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        serde_json::from_str(line).unwrap()
    }

    /// Not a test on its own: the body of the child `call_as` starts as another user.
    #[test]
    fn helper_child() {
        let Some(socket) = std::env::var_os("FW_API_HELPER_SOCKET") else {
            return;
        };
        let method = std::env::var("FW_API_HELPER_METHOD").unwrap();
        let result =
            RpcClient::connect(Path::new(&socket)).and_then(|mut c| c.call(&method, Value::Null));
        let report = match result {
            Ok(v) => json!({ "ok": v }),
            Err(ClientError::Rpc { code, message, .. }) => {
                json!({ "rpc": { "code": code, "message": message } })
            }
            Err(e) => json!({ "client": e.to_string() }),
        };
        println!("HELPER-RESULT:{report}");
    }

    #[test]
    fn a_missing_socket_says_to_start_the_agent() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("agent.sock");
        let err = RpcClient::connect(&path).err().expect("no socket there");
        assert!(matches!(err, ClientError::NoSocket { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "no agent socket at {}: is the agent running? (flowwarden agent --config …; set \
                 --socket or FLOWWARDEN_SOCKET if it listens elsewhere)",
                path.display()
            )
        );
    }

    #[test]
    fn a_socket_nobody_listens_on_is_called_stale() {
        let dir = TempDir::new("stale");
        let path = dir.0.join("agent.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = RpcClient::connect(&path).err().expect("nobody listens");
        assert_eq!(
            err.to_string(),
            format!(
                "the agent is not listening on {} (stale socket?)",
                path.display()
            )
        );
    }

    #[test]
    fn a_socket_the_user_may_not_open_names_the_groups() {
        let dir = TempDir::new("eacces");
        let path = dir.0.join("agent.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The socket's own group is the one to join (the agent makes it its read group).
        let group = {
            use std::os::unix::fs::MetadataExt as _;
            crate::api::peer::group_name(std::fs::metadata(&path).unwrap().gid()).unwrap()
        };
        let want = format!(
            "permission denied on {}: your user needs to be in the {group} group to open it \
             (reads; changes also need the agent's admin group)",
            path.display()
        );
        match privileged() {
            // Root ignores file modes: ask as nobody.
            Some(_guard) => {
                let seen = call_as(65534, 65534, &[], &path, "status");
                assert_eq!(seen, json!({ "client": want }));
            }
            None => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
                let err = RpcClient::connect(&path).err().expect("mode 000");
                assert_eq!(err.to_string(), want);
            }
        }
    }

    #[test]
    fn socket_path_prefers_the_flag() {
        assert_eq!(
            socket_path(Some(Path::new("/x.sock"))),
            PathBuf::from("/x.sock")
        );
    }
}
