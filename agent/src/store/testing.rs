//! Test helpers shared by the store's and the audit log's tests: throwaway state directories and
//! sample rows.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    audit::event::{AuditEvent, AuditKind},
    identity::test_identity,
    sessions::model::{
        EndCause, Session, SessionEnd, SessionGrant, SessionId, SessionSettings, SessionState,
    },
};

/// `s` terminated by uid 0 for `reason`.
pub(crate) fn terminated(s: &Session, reason: &str) -> Session {
    let mut s = s.clone();
    s.state = SessionState::Terminated;
    s.ended = Some(SessionEnd {
        at_ms: 1_700_000_100_000,
        cause: EndCause::Terminated {
            by: "uid 0".into(),
            reason: reason.into(),
        },
    });
    s
}

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fw-store-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Where tests put the state file.
    pub(crate) fn state_file(&self) -> PathBuf {
        self.0.join("state.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn session(id: u64, email: &str) -> Session {
    Session {
        id: SessionId(id),
        state: SessionState::Active,
        identity: test_identity(email, &["ops"]),
        source: IpAddr::from([10, 0, 0, 7]),
        previous_sources: Vec::new(),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_003_600_000,
        dormant_since_ms: None,
        grants: vec![SessionGrant {
            resource: "ssh".into(),
            resource_id: 1,
            rule: "ops-ssh".into(),
        }],
        settings: SessionSettings {
            max_duration_secs: 3600,
            idle_timeout_secs: 300,
            dormant_timeout_secs: 900,
            reconnect: false,
        },
        reconnect: None,
        ended: None,
    }
}

pub(crate) fn event(kind: AuditKind, session: Option<u64>, user: Option<&str>) -> AuditEvent {
    AuditEvent {
        session: session.map(SessionId),
        user: user.map(str::to_owned),
        source: Some(IpAddr::from([10, 0, 0, 7])),
        resource: Some("ssh".into()),
        detail: "test event".into(),
        ..AuditEvent::new(kind)
    }
}
