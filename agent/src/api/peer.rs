//! Who is on the other end of the status socket (from the kernel, not from anything the peer
//! says) and what that lets them do: read-only access or administration.

use std::{
    ffi::CString,
    fmt, io, mem,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr,
};

use serde::Serialize;
use serde_json::json;

use super::jsonrpc::{PERMISSION_DENIED, RpcError};

/// The group whose members may change things (terminate sessions, reload policy).
pub const DEFAULT_ADMIN_GROUP: &str = "flowwarden-admin";
/// The group whose members may read status, sessions, flows and the audit log.
pub const DEFAULT_READ_GROUP: &str = "flowwarden";

/// Group database entries larger than this are refused rather than grown into without bound.
const MAX_GROUP_ENTRY_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("group name {group:?} contains a NUL byte")]
    GroupName { group: String },
    #[error("looking up group {group:?} in the group database: {source}")]
    GroupLookup {
        group: String,
        #[source]
        source: io::Error,
    },
}

/// The credentials of the process that connected, as the kernel recorded them at `connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from `SO_PEERGROUPS`.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Whether `gid` is the peer's primary group or one of its supplementary groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// What a connection may do. Ordered, so that `access >= Access::Read` reads naturally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    None,
    Read,
    Admin,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The peer of a connected status-socket stream.
///
/// # Errors
///
/// Whatever `getsockopt` reports; `SO_PEERGROUPS` needs Linux 4.13 or later.
pub fn peer_of(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
    peer_of_fd(stream.as_fd())
}

/// As [`peer_of`], for any connected `AF_UNIX` stream socket.
///
/// # Errors
///
/// Whatever `getsockopt` reports.
pub fn peer_of_fd(fd: BorrowedFd<'_>) -> io::Result<Peer> {
    let cred = peer_cred(fd)?;
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(fd)?,
    })
}

fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the borrow's duration; `cred` and `len` are valid for
    // writes and `len` holds the size of `cred`, so the kernel writes within it.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // Most users are in a handful of groups; the kernel says how many when this is too few.
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `fd` is a live socket; `groups` is valid for `len` bytes of writes, and the
        // kernel writes at most `len` bytes (it returns ERANGE instead of writing more).
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // On ERANGE the kernel has stored the size it needs in `len`.
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// Which groups grant which access, resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    pub admin_gid: Option<u32>,
    pub read_gid: Option<u32>,
    /// Names as configured, for messages that tell people which group to join.
    pub admin_group: String,
    pub read_group: String,
    /// The agent's own effective uid. A peer running as that user could ptrace the agent
    /// anyway, so refusing it would protect nothing; it matters when the agent runs unprivileged
    /// (development), since as root this is uid 0.
    pub agent_uid: u32,
}

impl AccessPolicy {
    /// Resolves the group names through the system's group database. An empty name turns that
    /// access level off; a group that does not exist leaves it to uid 0 alone, with a warning.
    ///
    /// # Errors
    ///
    /// A name with a NUL byte, or a group database that fails (not one that lacks the group).
    pub fn from_names(admin_group: &str, read_group: &str) -> Result<Self, PeerError> {
        Ok(Self {
            admin_gid: resolve(admin_group, "admin")?,
            read_gid: resolve(read_group, "read")?,
            admin_group: admin_group.to_owned(),
            read_group: read_group.to_owned(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            agent_uid: unsafe { libc::geteuid() },
        })
    }

    /// uid 0 (or the agent's own uid) and members of the admin group administer; members of
    /// the read group read; nobody else gets in.
    pub fn access(&self, p: &Peer) -> Access {
        if p.uid == 0 || p.uid == self.agent_uid || self.admin_gid.is_some_and(|g| p.in_group(g)) {
            Access::Admin
        } else if self.read_gid.is_some_and(|g| p.in_group(g)) {
            Access::Read
        } else {
            Access::None
        }
    }

    /// The error a peer without any access gets before its connection is closed.
    pub fn denied(&self, p: &Peer) -> RpcError {
        let (admin, read) = (&self.admin_group, &self.read_group);
        let mut message = format!(
            "permission denied: uid {} is in neither the {admin} nor the {read} group; ask an \
             administrator to add you to {read} (read) or {admin} (admin)",
            p.uid
        );
        for (name, gid) in [(admin, self.admin_gid), (read, self.read_gid)] {
            if gid.is_none() && !name.is_empty() {
                message.push_str(&format!(" (group {name} does not exist on this host yet)"));
            }
        }
        RpcError::new(PERMISSION_DENIED, message).with_data(json!({
            "uid": p.uid,
            "admin_group": admin,
            "read_group": read,
        }))
    }

    /// The configured group names.
    pub fn groups(&self) -> Groups {
        Groups {
            admin: self.admin_group.clone(),
            read: self.read_group.clone(),
        }
    }

    /// As [`require`], naming this host's groups in the message.
    ///
    /// # Errors
    ///
    /// `PERMISSION_DENIED` when `access` is below `needed`.
    pub fn require(&self, access: Access, needed: Access, method: &str) -> Result<(), RpcError> {
        self.groups().require(access, needed, method)
    }
}

/// The names of the admin and read groups as the agent is configured, for messages that say
/// which group to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    pub admin: String,
    pub read: String,
}

impl Default for Groups {
    fn default() -> Self {
        Self {
            admin: DEFAULT_ADMIN_GROUP.to_owned(),
            read: DEFAULT_READ_GROUP.to_owned(),
        }
    }
}

impl Groups {
    /// Checks that a call's access is enough for `method`, naming these groups when not.
    ///
    /// # Errors
    ///
    /// `PERMISSION_DENIED`, whose `data` carries the method, the access needed and held, and
    /// the configured group names.
    pub fn require(&self, access: Access, needed: Access, method: &str) -> Result<(), RpcError> {
        let who = match needed {
            Access::Admin => format!("uid 0 or the {} group", self.admin),
            _ => format!("the {} or {} group", self.read, self.admin),
        };
        check(access, needed, method, &who, Some(self))
    }
}

/// Checks that a connection's access is enough for `method`, without naming this host's
/// groups (the core names them through [`Groups::require`]).
///
/// # Errors
///
/// `PERMISSION_DENIED` with a message that says what was needed and what the caller has.
pub fn require(access: Access, needed: Access, method: &str) -> Result<(), RpcError> {
    let who = match needed {
        Access::Admin => "uid 0 or the agent's admin group",
        _ => "the agent's read or admin group",
    };
    check(access, needed, method, who, None)
}

/// The one place a refused call's message is written.
fn check(
    access: Access,
    needed: Access,
    method: &str,
    who: &str,
    groups: Option<&Groups>,
) -> Result<(), RpcError> {
    if access >= needed {
        return Ok(());
    }
    let mut data = json!({ "method": method, "needed": needed, "have": access });
    if let Some(g) = groups {
        data["admin_group"] = json!(g.admin);
        data["read_group"] = json!(g.read);
    }
    Err(RpcError::new(
        PERMISSION_DENIED,
        format!(
            "permission denied: {method} needs {needed} access ({who}); this connection has \
             {}",
            match access {
                Access::None => "no access".to_owned(),
                other => format!("{other} access"),
            }
        ),
    )
    .with_data(data))
}

fn resolve(name: &str, level: &str) -> Result<Option<u32>, PeerError> {
    if name.is_empty() {
        tracing::debug!(
            level,
            "no group configured: only uid 0 gets this access level"
        );
        return Ok(None);
    }
    let gid = gid_of(name)?;
    if gid.is_none() {
        tracing::warn!(
            group = name,
            level,
            "group does not exist: only uid 0 gets {level} access on the status socket until it \
             is created (groupadd {name})"
        );
    }
    Ok(gid)
}

/// The gid of a group by name, or `None` when the group database has no such group.
///
/// # Errors
///
/// A name with a NUL byte, or a failing group database (NSS, unreadable `/etc/group`).
pub fn gid_of(name: &str) -> Result<Option<u32>, PeerError> {
    let c_name = CString::new(name).map_err(|_| PeerError::GroupName {
        group: name.to_owned(),
    })?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `libc::group` is plain old data (integers and pointers); all-zero is valid.
        let mut entry: libc::group = unsafe { mem::zeroed() };
        let mut found: *mut libc::group = ptr::null_mut();
        // SAFETY: the name is NUL-terminated; `entry`, `found` and `buf` (of `buf.len()` bytes)
        // are valid for writes, and the strings in `entry` point into `buf`, which we do not
        // read after this call.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if !found.is_null() {
            return Ok(Some(entry.gr_gid));
        }
        match rc {
            libc::ERANGE if buf.len() < MAX_GROUP_ENTRY_BYTES => buf.resize(buf.len() * 2, 0),
            // getgrnam_r(3) lists all of these as "no such group", depending on the backend.
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => {
                return Err(PeerError::GroupLookup {
                    group: name.to_owned(),
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
    }
}

/// The name of group `gid`, or `None` when the group database has no such group or fails
/// (this only words messages, so a failure is no reason to fail).
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `libc::group` is plain old data (integers and pointers); all-zero is valid.
        let mut entry: libc::group = unsafe { mem::zeroed() };
        let mut found: *mut libc::group = ptr::null_mut();
        // SAFETY: `entry`, `found` and `buf` (of `buf.len()` bytes) are valid for writes; the
        // strings in `entry` point into `buf`, which outlives the read of `gr_name` below.
        let rc =
            unsafe { libc::getgrgid_r(gid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        if !found.is_null() {
            // SAFETY: on success `gr_name` is a NUL-terminated string inside `buf`.
            let name = unsafe { std::ffi::CStr::from_ptr(entry.gr_name) };
            return Some(name.to_string_lossy().into_owned());
        }
        if rc == libc::ERANGE && buf.len() < MAX_GROUP_ENTRY_BYTES {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return None;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn policy() -> AccessPolicy {
        AccessPolicy {
            admin_gid: Some(900),
            read_gid: Some(901),
            admin_group: "fw-admin".into(),
            read_group: "fw".into(),
            agent_uid: 0,
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn access_follows_uid_and_groups() {
        let p = policy();
        assert_eq!(p.access(&peer(0, 0, &[])), Access::Admin);
        assert_eq!(
            p.access(&peer(1000, 900, &[])),
            Access::Admin,
            "primary admin group"
        );
        assert_eq!(
            p.access(&peer(1000, 100, &[5, 900])),
            Access::Admin,
            "supplementary admin"
        );
        assert_eq!(
            p.access(&peer(1000, 100, &[901, 900])),
            Access::Admin,
            "both: admin wins"
        );
        assert_eq!(p.access(&peer(1000, 901, &[])), Access::Read);
        assert_eq!(p.access(&peer(1000, 100, &[901])), Access::Read);
        assert_eq!(p.access(&peer(1000, 100, &[5, 6])), Access::None);

        let own = AccessPolicy {
            agent_uid: 1234,
            ..policy()
        };
        assert_eq!(
            own.access(&peer(1234, 100, &[])),
            Access::Admin,
            "the agent's own uid"
        );

        let none = AccessPolicy {
            admin_gid: None,
            read_gid: None,
            ..policy()
        };
        assert_eq!(none.access(&peer(1000, 900, &[901])), Access::None);
    }

    #[test]
    fn denial_names_the_groups_to_join() {
        let e = policy().denied(&peer(1001, 100, &[]));
        assert_eq!(e.code, PERMISSION_DENIED);
        assert_eq!(
            e.message,
            "permission denied: uid 1001 is in neither the fw-admin nor the fw group; ask an \
             administrator to add you to fw (read) or fw-admin (admin)"
        );
        let missing = AccessPolicy {
            read_gid: None,
            ..policy()
        };
        assert!(
            missing
                .denied(&peer(1001, 100, &[]))
                .message
                .ends_with("(group fw does not exist on this host yet)")
        );
    }

    #[test]
    fn require_says_what_was_needed_and_what_the_caller_has() {
        assert!(require(Access::Admin, Access::Admin, "sessions.terminate").is_ok());
        assert!(require(Access::Admin, Access::Read, "status").is_ok());
        assert!(require(Access::Read, Access::Read, "status").is_ok());
        let e = require(Access::Read, Access::Admin, "sessions.terminate").unwrap_err();
        assert_eq!(e.code, PERMISSION_DENIED);
        assert!(
            e.message.contains("sessions.terminate needs admin access")
                && e.message.ends_with("this connection has read access"),
            "{}",
            e.message
        );
        let e = policy()
            .require(Access::Read, Access::Admin, "policy.reload")
            .unwrap_err();
        assert!(
            e.message.contains("uid 0 or the fw-admin group"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_refusal_names_the_configured_groups_in_its_message_and_data() {
        let groups = policy().groups();
        let e = groups
            .require(Access::Read, Access::Admin, "datapath.mode")
            .unwrap_err();
        assert_eq!(
            e.message,
            "permission denied: datapath.mode needs admin access (uid 0 or the fw-admin group); \
             this connection has read access"
        );
        assert_eq!(
            e.data,
            Some(
                json!({"method": "datapath.mode", "needed": "admin", "have": "read",
                        "admin_group": "fw-admin", "read_group": "fw"})
            )
        );
        assert!(groups.require(Access::Admin, Access::Admin, "x").is_ok());
        assert_eq!(Groups::default().admin, DEFAULT_ADMIN_GROUP);
    }

    #[test]
    fn group_names_come_from_the_group_database() {
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(group_name(0xFFFF_FFF0), None);
    }

    #[test]
    fn peer_of_a_socketpair_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = peer_of_fd(a.as_fd()).unwrap();
        // SAFETY: these getters have no preconditions and cannot fail.
        let (uid, gid, pid) = unsafe { (libc::geteuid(), libc::getegid(), libc::getpid()) };
        assert_eq!((p.pid, p.uid, p.gid), (pid, uid, gid));
        let mut own = vec![0; 4096];
        // SAFETY: `own` has room for 4096 gids, the count passed.
        let n = unsafe { libc::getgroups(own.len() as i32, own.as_mut_ptr()) };
        own.truncate(usize::try_from(n).unwrap());
        let (mut want, mut got) = (own, p.groups.clone());
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(
            got, want,
            "SO_PEERGROUPS should list this process's supplementary groups"
        );
    }

    #[test]
    fn group_lookup_finds_root_and_not_nonsense() {
        assert_eq!(gid_of("root").unwrap(), Some(0));
        assert_eq!(gid_of("flowwarden-no-such-group-xyz").unwrap(), None);
        assert!(matches!(gid_of("a\0b"), Err(PeerError::GroupName { .. })));
        let p = AccessPolicy::from_names("flowwarden-no-such-group-xyz", "").unwrap();
        assert_eq!((p.admin_gid, p.read_gid), (None, None));
    }
}
