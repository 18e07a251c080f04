//! Unit tests of admission, termination, the sweep and reconciliation over the in-memory
//! enforcer (`Enforcer::in_memory`): the logic, without root. The privileged tests hold the
//! same paths against the kernel.

use std::{net::IpAddr, sync::Arc};

use super::{SESSION_TABLE_FULL, SessionError, Sessions, Target, model::SessionId};
use crate::{
    audit::{Audit, AuditQuery},
    config::SessionsConfig,
    datapath::{Flow, FlowKey, addr_bytes, monotonic_ns},
    enforce::Enforcer,
    identity::test_identity,
    policy::PolicyHandle,
    sessions::model::SessionGrant,
    store::{Store, testing::TempDir},
};

const POLICY: &str = "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
                      [[rule]]\nname = \"staff\"\ngroups = [\"staff\"]\nresources = [\"ssh\"]\n";

/// Sessions wired as the agent wires them, over in-memory maps with `slots` session slots:
/// for unit tests here and of the rooms above (the control API).
pub(crate) struct Harness {
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) enforcer: Arc<Enforcer>,
    pub(crate) policy: Arc<PolicyHandle>,
    pub(crate) ssh: u32,
    _dir: TempDir,
}

/// A [`Harness`] with one resource (`ssh`, tcp/22) granted to the group `staff`.
pub(crate) fn harness(slots: u32) -> Harness {
    let dir = TempDir::new("sessions");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("staff.toml"), POLICY).unwrap();
    let policy = Arc::new(PolicyHandle::new(&policies).unwrap());
    let enforcer = Arc::new(Enforcer::in_memory(slots, 1024).unwrap());
    enforcer
        .install_resources(&policy.current().resources)
        .unwrap();
    let ssh = policy.current().resources.by_name("ssh").unwrap().id;
    let store = Store::open(&dir.state_file()).unwrap();
    let sessions = Arc::new(Sessions::new(
        Arc::clone(&enforcer),
        store.clone(),
        Audit::new(store),
        Arc::clone(&policy),
        SessionsConfig::default(),
        Vec::new(),
    ));
    Harness {
        sessions,
        enforcer,
        policy,
        ssh,
        _dir: dir,
    }
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Harness {
    pub(crate) async fn admit(&self, email: &str, source: &str) -> SessionId {
        self.sessions
            .admit(test_identity(email, &["staff"]), addr(source))
            .await
            .unwrap_or_else(|e| panic!("admitting {email} from {source}: {e}"))
            .session
            .id
    }

    /// Who holds the kernel grant of `source` to ssh.
    fn ssh_grant_of(&self, source: &str) -> Option<SessionId> {
        self.enforcer
            .grants()
            .into_iter()
            .find(|(s, r, _)| *s == addr(source) && *r == self.ssh)
            .map(|(_, _, id)| id)
    }

    /// A flow of `session` from `source` to ssh, written as the kernel would open it.
    fn open_flow(&self, session: SessionId, source: &str, sport: u16) -> FlowKey {
        let key = FlowKey {
            src: addr_bytes(addr(source)),
            dst: addr_bytes(addr("192.0.2.1")),
            sport,
            dport: 22,
            proto: agent_common::IPPROTO_TCP,
            _pad: [0; 3],
        };
        let now = monotonic_ns();
        self.enforcer
            .insert_flow(
                key,
                Flow {
                    session_id: session.0,
                    resource_id: self.ssh,
                    created_ns: now,
                    last_seen_ns: now,
                    ..Flow::default()
                },
            )
            .unwrap();
        self.enforcer.flow_opened(session, &key);
        key
    }

    fn audit_kinds(&self, kind: &str) -> Vec<crate::audit::event::AuditEvent> {
        self.sessions
            .audit()
            .query(&AuditQuery {
                kind: Some(kind.into()),
                ..AuditQuery::default()
            })
            .unwrap()
    }
}

#[tokio::test]
async fn terminating_the_grant_holder_hands_the_grant_to_the_other_session_from_its_source() {
    let h = harness(16);
    let older = h.admit("alice@corp.example", "198.51.100.7").await;
    let newer = h.admit("bob@corp.example", "198.51.100.7").await;
    let elsewhere = h.admit("carol@corp.example", "198.51.100.8").await;
    assert_eq!(
        h.ssh_grant_of("198.51.100.7"),
        Some(newer),
        "the newest session from a source holds its grant"
    );

    let ended = h
        .sessions
        .terminate(&Target::Sessions(vec![newer]), "uid 0", "test")
        .await
        .unwrap();
    assert_eq!(ended.len(), 1);
    assert!(
        h.enforcer.revocation(newer).is_some(),
        "the ended session is revoked"
    );
    assert_eq!(
        h.ssh_grant_of("198.51.100.7"),
        Some(older),
        "the live session from the same source inherits the grant"
    );
    assert_eq!(h.ssh_grant_of("198.51.100.8"), Some(elsewhere));

    h.sessions
        .terminate(&Target::Sessions(vec![older]), "uid 0", "test")
        .await
        .unwrap();
    assert_eq!(
        h.ssh_grant_of("198.51.100.7"),
        None,
        "nobody from that source holds ssh any more: the grant is gone"
    );
    assert_eq!(h.ssh_grant_of("198.51.100.8"), Some(elsewhere), "untouched");
    assert!(h.enforcer.revocation(elsewhere).is_none());
    let recorded = h.audit_kinds("session_terminated");
    assert_eq!(recorded.len(), 2, "{recorded:?}");
}

#[tokio::test]
async fn terminating_an_unknown_session_changes_nothing() {
    let h = harness(16);
    let live = h.admit("alice@corp.example", "198.51.100.7").await;
    let err = h
        .sessions
        .terminate(
            &Target::Sessions(vec![live, SessionId(0xdead)]),
            "uid 0",
            "test",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::NotFound(SessionId(0xdead))),
        "{err}"
    );
    assert!(
        h.enforcer.revocation(live).is_none(),
        "a refused termination revoked a session"
    );
    assert!(h.sessions.get(live).unwrap().is_live());
}

#[tokio::test]
async fn terminating_by_user_ends_only_that_users_live_sessions() {
    let h = harness(16);
    let a1 = h.admit("alice@corp.example", "198.51.100.7").await;
    let a2 = h.admit("alice@corp.example", "198.51.100.9").await;
    let b = h.admit("bob@corp.example", "198.51.100.8").await;
    let mut ended: Vec<SessionId> = h
        .sessions
        .terminate(&Target::User("ALICE@corp.example".into()), "uid 0", "test")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    ended.sort();
    let mut expected = vec![a1, a2];
    expected.sort();
    assert_eq!(ended, expected);
    assert!(h.sessions.get(b).unwrap().is_live());
    assert_eq!(h.ssh_grant_of("198.51.100.8"), Some(b));
    assert_eq!(h.ssh_grant_of("198.51.100.7"), None);
}

#[tokio::test]
async fn a_full_session_table_refuses_the_admission_with_its_own_error_and_a_record() {
    // Two slots, slot 0 never handed out: one session fits.
    let h = harness(2);
    let first = h.admit("alice@corp.example", "198.51.100.7").await;
    let err = h
        .sessions
        .admit(
            test_identity("bob@corp.example", &["staff"]),
            addr("198.51.100.8"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::SessionTableFull { capacity: 1 }),
        "expected the full-table refusal, got {err}"
    );
    assert!(err.to_string().contains("session_slots"), "{err}");
    assert_eq!(h.sessions.all().len(), 1, "the refused session was kept");
    assert_eq!(
        h.ssh_grant_of("198.51.100.8"),
        None,
        "a grant was left behind"
    );
    assert_eq!(
        h.ssh_grant_of("198.51.100.7"),
        Some(first),
        "nothing overwritten"
    );
    let refused = h.audit_kinds("admission_rejected");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].user.as_deref(), Some("bob@corp.example"));
    let json = serde_json::to_string(&refused[0]).unwrap();
    assert!(json.contains(SESSION_TABLE_FULL), "{json}");
}

#[tokio::test]
async fn an_ended_sessions_slot_comes_back_once_its_flows_are_gone() {
    let h = harness(2);
    let first = h.admit("alice@corp.example", "198.51.100.7").await;
    let key = h.open_flow(first, "198.51.100.7", 40_000);
    h.sessions
        .terminate(&Target::Sessions(vec![first]), "uid 0", "test")
        .await
        .unwrap();
    let swept = h.sessions.sweep().await.unwrap();
    assert_eq!(swept.revocations_dropped, 0, "released under a live flow");
    assert!(
        h.enforcer.revocation(first).is_some(),
        "the revocation must hold while a flow of the session is in the table"
    );
    assert_eq!(h.enforcer.session_slots_fill().0, 1);

    // The flow goes (idle, or removed): the next sweep gives the slot back, and the table
    // that was full admits again.
    let removed = h.enforcer.remove_flows(|k, _| *k == key);
    assert_eq!(removed.len(), 1);
    let swept = h.sessions.sweep().await.unwrap();
    assert_eq!(swept.revocations_dropped, 1);
    assert_eq!(h.enforcer.session_slots_fill().0, 0);
    h.admit("bob@corp.example", "198.51.100.8").await;
}

#[tokio::test]
async fn reconciliation_removes_what_no_stored_session_explains_and_frees_its_slot() {
    let h = harness(16);
    let known = h.admit("alice@corp.example", "198.51.100.7").await;
    // A session the store never acknowledged (the agent crashed before the commit).
    let orphan = SessionId(0x0bad);
    h.enforcer
        .grant(
            orphan,
            addr("198.51.100.9"),
            &[SessionGrant {
                resource: "ssh".into(),
                resource_id: h.ssh,
                rule: "staff".into(),
            }],
        )
        .unwrap();
    h.open_flow(orphan, "198.51.100.9", 40_001);
    assert_eq!(h.enforcer.session_slots_fill().0, 2);

    let r = h.sessions.reconcile().await.unwrap();
    assert_eq!(r.live, 1);
    assert_eq!(r.orphan_grants_removed, 1);
    assert_eq!(r.orphan_flows_removed, 1);
    assert_eq!(r.orphan_slots_released, 1);
    assert_eq!(h.enforcer.session_slots_fill().0, 1);
    assert_eq!(h.ssh_grant_of("198.51.100.9"), None);
    assert_eq!(h.ssh_grant_of("198.51.100.7"), Some(known));
}
