//! The harness's checks after each kill: the crashed store read offline (a copy, so that the
//! restarted agent still repairs the real file itself), then the restarted agent's sessions
//! against the pinned kernel maps.
//!
//! "Half-present" has a precise meaning here. One commit is one redb transaction, so a session
//! row, its revocation row and the audit records of the same transition are all there or all
//! absent. Unacknowledged work may therefore appear (the commit landed, the answer did not), but
//! only whole: a session is never without its `session_admitted` record, an ended session never
//! without its revocation and its end record, a revocation never without its ended session, the
//! audit seqs never with a gap, and no session exists that the driver did not ask for from that
//! source. In the kernel, after reconciliation: no grant for a session the store does not hold
//! as live, every grant of a live session present, every ended session revoked, and no live
//! session holding a grant the policy on disk does not allow.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use flowwarden::{
    api::client::RpcClient,
    audit::event::AuditEvent,
    datapath::{Maps, addr_from_bytes},
    policy::load_resources,
    sessions::model::{Session, SessionId, SessionState, now_ms},
    store::{IntegrityReport, RevocationRecord, Store},
};
use serde_json::{Value, json};

use super::{
    Target,
    driver::Ledger,
    policy::{self, USERS},
};

/// The agent forgets a revocation an hour after its session ended and its last flow went away
/// (`REVOCATION_LINGER_MS` in sessions/lifecycle.rs); a long soak must not count that as an open
/// door. Five minutes of margin for the sweep's timing.
const REVOCATION_KEPT_MS: u64 = 55 * 60 * 1000;

/// What one check found. Lost things are named (session ids, audit seqs) so that one loss seen
/// again after later kills counts once.
#[derive(Debug, Default)]
pub struct Findings {
    pub lost_admissions: BTreeSet<u64>,
    pub lost_terminations: BTreeSet<u64>,
    pub lost_audit: BTreeSet<u64>,
    pub violations: Vec<String>,
}

impl Findings {
    pub fn violation(v: String) -> Self {
        Self {
            violations: vec![v],
            ..Self::default()
        }
    }
}

/// The store as the killed agent left it.
pub struct Snapshot {
    pub integrity: IntegrityReport,
    pub sessions: BTreeMap<u64, Session>,
    pub revocations: BTreeMap<u64, RevocationRecord>,
    pub audit: Vec<AuditEvent>,
}

/// Opens the state file (or a copy of it at `copy`) with the agent's own store code, runs the
/// integrity check and reads every row.
///
/// # Errors
/// The file cannot be copied, opened or read.
pub fn snapshot(state: &Path, copy: Option<&Path>) -> anyhow::Result<Snapshot> {
    let path = match copy {
        Some(copy) => {
            let _ = std::fs::remove_file(copy);
            std::fs::copy(state, copy)?;
            copy
        }
        None => state,
    };
    let store = Store::open(path)?;
    let integrity = store.check_integrity()?;
    let sessions = store.sessions()?.into_iter().map(|s| (s.id.0, s)).collect();
    let revocations = store
        .revocations()?
        .into_iter()
        .map(|(id, r)| (id.0, r))
        .collect();
    let mut audit: Vec<AuditEvent> = Vec::new();
    loop {
        let after = audit.last().map_or(0, |e| e.seq);
        let page = store.audit_range(after, 10_000)?;
        if page.is_empty() {
            break;
        }
        audit.extend(page);
    }
    store.close();
    drop(store);
    if let Some(copy) = copy {
        let _ = std::fs::remove_file(copy);
    }
    Ok(Snapshot {
        integrity,
        sessions,
        revocations,
        audit,
    })
}

/// Store-level checks: nothing acknowledged lost, nothing half-present, the file sound.
pub fn store(snap: &Snapshot, ledger: &Ledger) -> Findings {
    let mut f = Findings::default();
    let v = &mut f.violations;
    if !snap.integrity.is_healthy() {
        v.push(format!("the integrity check failed: {:?}", snap.integrity));
    }
    for (i, e) in snap.audit.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            v.push(format!("audit seq {} sits at position {}", e.seq, i + 1));
            break;
        }
    }
    let by_seq: HashMap<u64, &AuditEvent> = snap.audit.iter().map(|e| (e.seq, e)).collect();
    for (seq, seen) in &ledger.audit {
        let now = by_seq
            .get(seq)
            .map(|e| serde_json::to_value(e).expect("an audit event encodes"));
        if now.as_ref() != Some(seen) {
            f.lost_audit.insert(*seq);
            v.push(format!(
                "LOST: audit record {seq} was {seen} before the kill, now {now:?}"
            ));
        }
    }
    // Which sessions each kind of record names.
    let mut records: HashMap<u64, HashSet<&'static str>> = HashMap::new();
    for e in &snap.audit {
        if let Some(id) = e.session {
            records.entry(id.0).or_default().insert(e.kind.name());
        }
    }
    for (id, acked) in &ledger.admitted {
        let user = &USERS[acked.user];
        match snap.sessions.get(id) {
            Some(s)
                if s.identity.email.as_deref() == Some(user.email)
                    && s.identity.subject == user.email
                    && s.identity
                        .groups
                        .iter()
                        .map(String::as_str)
                        .eq(user.groups.iter().copied())
                    && s.identity.device.id.as_deref() == Some(acked.tag.as_str())
                    && s.source == acked.source => {}
            other => {
                f.lost_admissions.insert(*id);
                v.push(format!(
                    "LOST: acknowledged admission {} of {} from {} is {other:?}",
                    SessionId(*id),
                    user.email,
                    acked.source
                ));
            }
        }
    }
    for id in &ledger.terminated {
        let s = snap.sessions.get(id);
        if s.is_none_or(|s| s.state != SessionState::Terminated)
            || !snap.revocations.contains_key(id)
        {
            f.lost_terminations.insert(*id);
            v.push(format!(
                "LOST: acknowledged termination of {} is {:?}, revocation {:?}",
                SessionId(*id),
                s.map(|s| s.state),
                snap.revocations.get(id)
            ));
        }
    }
    for (id, s) in &snap.sessions {
        let sid = SessionId(*id);
        let named = records.get(id);
        let has = |kind: &str| named.is_some_and(|k| k.contains(kind));
        if !has("session_admitted") {
            v.push(format!(
                "HALF-PRESENT: session {sid} has no session_admitted record"
            ));
        }
        let tag = s.identity.device.id.as_deref().unwrap_or_default();
        match ledger.presented.get(tag) {
            Some(p)
                if p.source == s.source
                    && s.identity.email.as_deref() == Some(USERS[p.user].email) => {}
            other => v.push(format!(
                "session {sid} ({} from {}, token {tag}) matches no request: {other:?}",
                s.identity.user(),
                s.source
            )),
        }
        if s.is_live() {
            if snap.revocations.contains_key(id) {
                v.push(format!(
                    "HALF-PRESENT: live session {sid} has a revocation record"
                ));
            }
        } else {
            if !snap.revocations.contains_key(id) {
                v.push(format!(
                    "HALF-PRESENT: {} session {sid} has no revocation record",
                    s.state
                ));
            }
            if !has("session_terminated") && !has("session_expired") {
                v.push(format!(
                    "HALF-PRESENT: {} session {sid} has no end record",
                    s.state
                ));
            }
            if s.ended.is_none() {
                v.push(format!(
                    "HALF-PRESENT: {} session {sid} says nothing of its end",
                    s.state
                ));
            }
        }
    }
    for id in snap.revocations.keys() {
        if snap.sessions.get(id).is_none_or(Session::is_live) {
            v.push(format!(
                "HALF-PRESENT: revocation of {} without an ended session",
                SessionId(*id)
            ));
        }
    }
    f
}

/// A session as the restarted agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: String,
    /// When it ended (Unix ms), for ended sessions.
    ended_ms: Option<u64>,
    source: IpAddr,
    groups: Vec<String>,
    grants: BTreeSet<String>,
}

impl Seen {
    fn live(&self) -> bool {
        self.state == "active" || self.state == "dormant"
    }

    /// Whether the kernel must still hold its revocation.
    fn revocation_kept(&self, now_ms: u64) -> bool {
        self.ended_ms
            .is_none_or(|at| now_ms.saturating_sub(at) < REVOCATION_KEPT_MS)
    }
}

fn agent_view(rpc: &mut RpcClient) -> anyhow::Result<BTreeMap<u64, Seen>> {
    let list = rpc.call("sessions.list", json!({}))?;
    let mut out = BTreeMap::new();
    for s in list.as_array().into_iter().flatten() {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let id: SessionId = text(&s["id"]).parse()?;
        let strings =
            |v: &Value| -> Vec<String> { v.as_array().into_iter().flatten().map(text).collect() };
        out.insert(
            id.0,
            Seen {
                state: text(&s["state"]),
                ended_ms: s["ended"]["at_ms"].as_u64(),
                source: text(&s["source"]).parse()?,
                groups: strings(&s["groups"]),
                grants: s["grants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| text(&g["resource"]))
                    .collect(),
            },
        );
    }
    Ok(out)
}

/// The restarted agent (reconciled, answering) against the pinned kernel maps and the ledger.
///
/// The sweep may end a session while this runs; the agent is read before and after the maps,
/// and only sessions whose state did not change in between are judged.
pub fn kernel(target: &Target, ledger: &Ledger) -> Findings {
    let mut f = Findings::default();
    let Ok(mut rpc) = RpcClient::connect(&target.socket) else {
        return Findings::violation("the restarted agent's socket refused a connection".into());
    };
    // The maps are read between two reads of the agent, so that a session the sweep ends
    // meanwhile shows as changed (and is left for a later check) instead of as a mismatch.
    let before = agent_view(&mut rpc);
    let known: Vec<u64> = before
        .as_ref()
        .map(|b| {
            b.iter()
                .filter(|(_, s)| !s.live())
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default();
    let kernel = Maps::open_pinned(&target.pin_dir).map(|maps| {
        let grants: HashMap<(IpAddr, u32), u64> = maps
            .grants()
            .into_iter()
            .map(|(k, s)| ((addr_from_bytes(k.src), k.resource_id), s))
            .collect();
        // A revocation lives in the ended session's slot, and the slot is released once the
        // session's last flow is gone (nothing left to drop; its grants are withdrawn first).
        // A released slot is not an open door; a held one must carry the revocation.
        let revoked: HashSet<u64> = maps
            .revoked_sessions()
            .into_iter()
            .map(|(id, _)| id)
            .chain(
                ledger
                    .terminated
                    .iter()
                    .copied()
                    .chain(known.iter().copied())
                    .filter(|id| maps.slot_of(*id).is_none()),
            )
            .collect();
        (grants, revoked)
    });
    let after = agent_view(&mut rpc);
    let (before, (grants, revoked), after) = match (before, kernel, after) {
        (Ok(b), Ok(k), Ok(a)) => (b, k, a),
        (b, k, a) => {
            return Findings::violation(format!(
                "cannot read the agent or the pins: {:?} {:?} {:?}",
                b.err(),
                k.err(),
                a.err()
            ));
        }
    };
    let policy_dir = target
        .policy_file
        .parent()
        .expect("the policy file's directory");
    let resources = load_resources(policy_dir).expect("the policy on disk loads");
    let rid = |name: &str| resources.by_name(name).map(|r| r.id);
    let name_of = |id: u32| resources.by_id(id).map(|r| r.name.clone());
    let variant = policy::on_disk(&target.policy_file);
    let stable: BTreeMap<u64, &Seen> = after
        .iter()
        .filter(|(id, s)| before.get(id) == Some(s))
        .map(|(id, s)| (*id, s))
        .collect();
    let v = &mut f.violations;

    for id in ledger.admitted.keys() {
        if !after.contains_key(id) {
            f.lost_admissions.insert(*id);
            v.push(format!(
                "LOST: the restarted agent does not know acknowledged session {}",
                SessionId(*id)
            ));
        }
    }
    let now = now_ms();
    for id in &ledger.terminated {
        let seen = after.get(id);
        let state = seen.map(|s| s.state.as_str());
        let kept = seen.is_none_or(|s| s.revocation_kept(now));
        if state != Some("terminated") || (kept && !revoked.contains(id)) {
            f.lost_terminations.insert(*id);
            v.push(format!(
                "OPEN DOOR: acknowledged termination of {} is {state:?} in the agent, revoked in \
                 the kernel: {}",
                SessionId(*id),
                revoked.contains(id)
            ));
        }
    }
    for (id, s) in &stable {
        let sid = SessionId(*id);
        if !s.live() {
            if s.revocation_kept(now) && !revoked.contains(id) {
                v.push(format!(
                    "OPEN DOOR: {} session {sid} is not revoked in the kernel",
                    s.state
                ));
            }
            continue;
        }
        if revoked.contains(id) {
            v.push(format!("live session {sid} is revoked in the kernel"));
        }
        let allowed = policy::allowed(variant, &s.groups, s.source, &target.dev_sources);
        for g in &s.grants {
            if !allowed.contains(g.as_str()) {
                v.push(format!(
                    "OPEN DOOR: live session {sid} holds {g}, which the {variant:?} policy on \
                     disk does not grant to {:?} from {}",
                    s.groups, s.source
                ));
            }
            let Some(r) = rid(g) else {
                v.push(format!(
                    "session {sid} holds {g}, which the policy does not define"
                ));
                continue;
            };
            match grants.get(&(s.source, r)).map(|o| (o, after.get(o))) {
                // The owner changed while we looked (the sweep ended it and handed its grant
                // to this session, found by the soak): judged on a later restart.
                Some((o, Some(_))) if !stable.contains_key(o) => {}
                Some((_, Some(o))) if o.live() && o.source == s.source && o.grants.contains(g) => {}
                other => v.push(format!(
                    "live session {sid}'s grant of {g} from {} is not in the kernel as a live \
                     session's: {other:?}",
                    s.source
                )),
            }
        }
    }
    for ((source, r), owner) in &grants {
        let what = name_of(*r).unwrap_or_else(|| format!("resource {r}"));
        match after.get(owner) {
            None => v.push(format!(
                "OPEN DOOR: the kernel grants {what} from {source} to session {}, unknown to the \
                 store",
                SessionId(*owner)
            )),
            // Changing while we looked: judged on a later restart.
            Some(_) if !stable.contains_key(owner) => {}
            Some(s) if s.live() && s.source == *source && s.grants.contains(&what) => {}
            Some(s) => v.push(format!(
                "OPEN DOOR: the kernel grants {what} from {source} to session {} which is {} \
                 from {} with {:?}",
                SessionId(*owner),
                s.state,
                s.source,
                s.grants
            )),
        }
    }
    f
}

/// The restarted agent holds every acknowledged lock (listed, and refusing a login from its
/// device), keeps every acknowledged removal, and refuses the tokens of acknowledged
/// terminations (a few of each are presented again, newest first).
pub fn locks(target: &Target, ledger: &Ledger) -> Findings {
    let mut f = Findings::default();
    let Ok(mut rpc) = RpcClient::connect(&target.socket) else {
        return Findings::violation("the restarted agent's socket refused a connection".into());
    };
    let listed: BTreeSet<String> = match rpc.call("lock.list", json!({})) {
        Ok(Value::Array(locks)) => locks
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect(),
        other => return Findings::violation(format!("lock.list after a restart: {other:?}")),
    };
    for (id, tag) in &ledger.locks {
        if !listed.contains(id) {
            f.violations.push(format!(
                "LOST: acknowledged lock {id} (device {tag}) is not listed after the restart"
            ));
        }
    }
    for id in &ledger.locks_removed {
        if listed.contains(id) {
            f.violations.push(format!(
                "acknowledged removal of lock {id} is undone after the restart"
            ));
        }
    }
    let source = target.sources[0];
    let present = |token: &str| target.client_ns.run(|| target.admit.admit(source, token));
    for (id, tag) in ledger.locks.iter().rev().take(2) {
        let mut outcome = present(&super::driver::mint(target, 0, tag));
        // A `terminate --user` just before the kill may have set this user's cut-off in the
        // current second, which refuses a token minted now first (and rightly): mint again
        // in the next second, so that it is the lock that is put to the test.
        if matches!(&outcome, crate::admit::AdmitOutcome::Refused { status: 401, body }
            if body.contains("issued_before_cutoff"))
        {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            outcome = present(&super::driver::mint(target, 0, tag));
        }
        match outcome {
            crate::admit::AdmitOutcome::Admitted(r) => f.violations.push(format!(
                "OPEN DOOR: acknowledged lock {id} on device {tag} let session {} in after the \
                 restart",
                r.session
            )),
            crate::admit::AdmitOutcome::Refused { status, body } => {
                if status != 429 && !(status == 403 && body.contains("locked")) {
                    f.violations.push(format!(
                        "acknowledged lock {id} on device {tag}: a login was refused {status} \
                         {body}, not locked"
                    ));
                }
            }
            crate::admit::AdmitOutcome::NoAnswer(e) => {
                f.violations
                    .push(format!("a login under lock {id} got no answer: {e}"));
            }
        }
    }
    for id in ledger.terminated.iter().rev().take(2) {
        let Some(token) = ledger.tokens.get(id) else {
            continue;
        };
        match present(token) {
            crate::admit::AdmitOutcome::Admitted(r) => {
                f.lost_terminations.insert(*id);
                f.violations.push(format!(
                    "OPEN DOOR: the token of acknowledged termination {} logged in again after \
                     the restart (session {})",
                    SessionId(*id),
                    r.session
                ));
            }
            crate::admit::AdmitOutcome::Refused { status, .. }
                if status == 401 || status == 429 => {}
            crate::admit::AdmitOutcome::Refused { status, body } => f.violations.push(format!(
                "the token of acknowledged termination {} was refused {status} {body}, not as \
                 revoked, cut off or expired",
                SessionId(*id)
            )),
            crate::admit::AdmitOutcome::NoAnswer(e) => f.violations.push(format!(
                "presenting the token of terminated session {} got no answer: {e}",
                SessionId(*id)
            )),
        }
    }
    f
}
