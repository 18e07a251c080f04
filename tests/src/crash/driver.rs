//! The harness's driver: threads that admit (over HTTPS, several users and sources), terminate
//! (status socket) and reload the policy (rewrite + `policy.reload`) while another follows the
//! audit log, all recording what the agent ACKNOWLEDGED in a shared ledger.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use flowwarden::{
    api::client::{ClientError, RpcClient},
    auth::dev,
    sessions::model::{SessionId, now_ms},
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Rng, Target,
    policy::{self, USERS, Variant},
};
use crate::admit::AdmitOutcome;

/// A token the driver presented: who, from where. Keyed by its tag (the `device_id` claim),
/// which makes every token, and so every session, traceable to one request.
#[derive(Debug, Clone)]
pub struct Presented {
    pub user: usize,
    pub source: IpAddr,
}

/// An admission the agent answered 201 to.
#[derive(Debug, Clone)]
pub struct Acked {
    pub tag: String,
    pub user: usize,
    pub source: IpAddr,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    pub admissions_attempted: u64,
    pub admissions_acked: u64,
    /// Answered, but not 201 (policy denied, rate limited).
    pub admissions_refused: u64,
    /// In flight when the agent died: no answer.
    pub admissions_unanswered: u64,
    pub terminate_calls: u64,
    /// Sessions that acknowledged terminate answers listed as ended.
    pub terminations_acked: u64,
    pub terminate_calls_unanswered: u64,
    pub reloads_attempted: u64,
    pub reloads_acked: u64,
    pub reloads_unanswered: u64,
    /// Audit records read through `audit.query` before a kill.
    pub audit_records_seen: u64,
    pub locks_acked: u64,
    pub lock_removals_acked: u64,
    pub lock_calls_unanswered: u64,
}

/// What the agent acknowledged, across every kill of a run.
#[derive(Debug, Default)]
pub struct Ledger {
    pub presented: HashMap<String, Presented>,
    pub admitted: BTreeMap<u64, Acked>,
    pub terminated: BTreeSet<u64>,
    /// Admitted sessions not yet picked for termination.
    candidates: Vec<u64>,
    pub audit: BTreeMap<u64, Value>,
    /// The policy last written to disk, and how many writes there were.
    pub written: Option<Variant>,
    pub generation: u64,
    pub counts: Counts,
    /// Wrong answers seen while driving (checked with the rest after each kill).
    pub violations: Vec<String>,
    /// Locks the agent acknowledged (id → the device tag each one locks), still in force.
    pub locks: BTreeMap<String, String>,
    /// Locks whose removal the agent acknowledged.
    pub locks_removed: BTreeSet<String>,
    /// The token of every acknowledged admission: once its session is terminated, presenting
    /// it again must be refused, across every kill.
    pub tokens: HashMap<u64, String>,
}

/// What a driver thread runs: until told to stop, or until the agent stops answering.
type Body = fn(&Target, &Mutex<Ledger>, &AtomicBool, Rng);

/// The driver threads of one stretch between two kills.
pub(crate) struct Driver {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Driver {
    /// Starts two admitters, a terminator, a policy reloader, an audit reader and a locker.
    pub(crate) fn start(target: Arc<Target>, ledger: Arc<Mutex<Ledger>>, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bodies: [Body; 6] = [
            admitter,
            admitter,
            terminator,
            reloader,
            audit_reader,
            locker,
        ];
        let threads = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| {
                let (target, ledger, stop) =
                    (Arc::clone(&target), Arc::clone(&ledger), Arc::clone(&stop));
                let rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x5851_f42d_4c95_7f2d));
                std::thread::spawn(move || body(&target, &ledger, &stop, rng))
            })
            .collect();
        Self { stop, threads }
    }

    /// Tells the threads to start nothing new, runs `kill` at once (so that what is under way
    /// stays in flight), then waits for them; returns when the kill happened.
    pub(crate) fn kill_in_flight(self, kill: impl FnOnce()) -> Instant {
        self.stop.store(true, Ordering::SeqCst);
        let at = Instant::now();
        kill();
        for t in self.threads {
            t.join().expect("a driver thread panicked");
        }
        at
    }
}

fn admitter(target: &Target, ledger: &Mutex<Ledger>, stop: &AtomicBool, mut rng: Rng) {
    target.client_ns.run(|| {
        while !stop.load(Ordering::SeqCst) {
            let user = rng.below(USERS.len() as u64) as usize;
            let source = target.sources[rng.below(target.sources.len() as u64) as usize];
            let tag = format!("t{:016x}", rng.next_u64());
            let token = mint(target, user, &tag);
            {
                let mut l = ledger.lock().unwrap();
                l.presented.insert(tag.clone(), Presented { user, source });
                l.counts.admissions_attempted += 1;
            }
            let outcome = target.admit.admit(source, &token);
            let mut l = ledger.lock().unwrap();
            match outcome {
                AdmitOutcome::Admitted(r) => {
                    let id = r.session.parse::<SessionId>();
                    match id {
                        Ok(id) if r.user == USERS[user].email && r.source == source.to_string() => {
                            l.counts.admissions_acked += 1;
                            l.admitted.insert(id.0, Acked { tag, user, source });
                            l.candidates.push(id.0);
                            l.tokens.insert(id.0, token.clone());
                        }
                        _ => l.violations.push(format!(
                            "admission of {} from {source} answered with a wrong session: {r:?}",
                            USERS[user].email
                        )),
                    }
                }
                AdmitOutcome::Refused { status, body } => {
                    l.counts.admissions_refused += 1;
                    // 401 `issued_before_cutoff`: a `terminate --user` of this user set a
                    // cut-off in the second this token was minted in (refused, as it must be).
                    let cut_off = status == 401 && body.contains("issued_before_cutoff");
                    if ![403, 429].contains(&status) && !cut_off {
                        l.violations.push(format!(
                            "admission of {} from {source} refused with {status}: {body}",
                            USERS[user].email
                        ));
                    }
                }
                AdmitOutcome::NoAnswer(_) => {
                    l.counts.admissions_unanswered += 1;
                    return;
                }
            }
        }
    });
}

pub(super) fn mint(target: &Target, user: usize, tag: &str) -> String {
    let u = &USERS[user];
    let mut c = dev::DevClaims::new(u.email);
    c.email = Some(u.email.into());
    c.groups = u.groups.iter().map(|g| (*g).to_owned()).collect();
    c.managed = Some(true);
    c.device_id = Some(tag.to_owned());
    c.lifetime_secs = u.lifetime_secs;
    dev::token(&target.signing_key, &target.kid, &c, now_ms() / 1000).expect("minting a token")
}

fn connect(target: &Target) -> Option<RpcClient> {
    let mut rpc = RpcClient::connect(&target.socket).ok()?;
    rpc.set_call_timeout(Some(Duration::from_secs(20)));
    Some(rpc)
}

fn terminator(target: &Target, ledger: &Mutex<Ledger>, stop: &AtomicBool, mut rng: Rng) {
    let Some(mut rpc) = connect(target) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(rng.millis((3, 15)));
        let by_user = rng.below(8) == 0;
        let params = {
            let mut l = ledger.lock().unwrap();
            if l.candidates.is_empty() {
                continue;
            }
            let i = rng.below(l.candidates.len() as u64) as usize;
            let id = l.candidates.swap_remove(i);
            l.counts.terminate_calls += 1;
            if by_user {
                let user = USERS[l.admitted[&id].user].email;
                json!({ "user": user, "reason": "crash harness" })
            } else {
                json!({ "ids": [SessionId(id).to_string()], "reason": "crash harness" })
            }
        };
        let answer = rpc.call("sessions.terminate", params.clone());
        let mut l = ledger.lock().unwrap();
        match answer {
            Ok(v) => {
                for e in v["terminated"].as_array().into_iter().flatten() {
                    if let Some(id) = e["id"].as_str().and_then(|s| s.parse::<SessionId>().ok())
                        && l.terminated.insert(id.0)
                    {
                        l.counts.terminations_acked += 1;
                    }
                }
            }
            // An admitted session the agent does not know: an acknowledged admission lost.
            Err(ClientError::Rpc { message, .. }) => l
                .violations
                .push(format!("sessions.terminate {params} refused: {message}")),
            Err(_) => {
                l.counts.terminate_calls_unanswered += 1;
                return;
            }
        }
    }
}

fn reloader(target: &Target, ledger: &Mutex<Ledger>, stop: &AtomicBool, mut rng: Rng) {
    let Some(mut rpc) = connect(target) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(rng.millis((20, 80)));
        let next = {
            let l = ledger.lock().unwrap();
            l.written.unwrap_or(Variant::Wide).flipped()
        };
        if !reload_with(target, ledger, &mut rpc, next) {
            return;
        }
    }
}

/// Writes `variant` and reloads with a fresh connection (setup, outside the driver).
///
/// # Panics
/// The agent does not acknowledge the reload.
pub(crate) fn reload(target: &Target, ledger: &Mutex<Ledger>, variant: Variant) {
    let mut rpc = connect(target).expect("connecting to the status socket");
    assert!(
        reload_with(target, ledger, &mut rpc, variant),
        "policy.reload went unanswered"
    );
    assert!(
        ledger.lock().unwrap().violations.is_empty(),
        "{:?}",
        ledger.lock().unwrap().violations
    );
}

/// Rewrites the policy file (atomically) and asks for a reload; false when unanswered.
fn reload_with(
    target: &Target,
    ledger: &Mutex<Ledger>,
    rpc: &mut RpcClient,
    variant: Variant,
) -> bool {
    let generation = {
        let mut l = ledger.lock().unwrap();
        l.generation += 1;
        l.written = Some(variant);
        l.counts.reloads_attempted += 1;
        l.generation
    };
    let tmp = target.policy_file.with_extension("toml.tmp");
    let text = policy::text(variant, generation, &target.dev_sources);
    std::fs::write(&tmp, text).expect("writing the policy");
    std::fs::rename(&tmp, &target.policy_file).expect("renaming the policy into place");
    let answer = rpc.call("policy.reload", json!({}));
    let mut l = ledger.lock().unwrap();
    match answer {
        Ok(_) => {
            l.counts.reloads_acked += 1;
            true
        }
        Err(ClientError::Rpc { message, .. }) => {
            l.violations.push(format!(
                "policy.reload of a valid policy refused: {message}"
            ));
            true
        }
        Err(_) => {
            l.counts.reloads_unanswered += 1;
            false
        }
    }
}

fn audit_reader(target: &Target, ledger: &Mutex<Ledger>, stop: &AtomicBool, _rng: Rng) {
    let Some(mut rpc) = connect(target) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
        let after = ledger
            .lock()
            .unwrap()
            .audit
            .last_key_value()
            .map_or(0, |(k, _)| *k);
        let Ok(events) = rpc.call("audit.query", json!({ "after_seq": after, "limit": 1000 }))
        else {
            return;
        };
        let mut l = ledger.lock().unwrap();
        for e in events.as_array().into_iter().flatten() {
            let Some(seq) = e["seq"].as_u64() else {
                l.violations
                    .push(format!("an audit record without a seq: {e}"));
                continue;
            };
            if l.audit.insert(seq, e.clone()).is_none() {
                l.counts.audit_records_seen += 1;
            }
        }
    }
}

/// Adds locks on device tags no admitter uses (`l…`), and removes some acknowledged ones.
fn locker(target: &Target, ledger: &Mutex<Ledger>, stop: &AtomicBool, mut rng: Rng) {
    let Some(mut rpc) = connect(target) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(rng.millis((10, 60)));
        let removal = {
            let l = ledger.lock().unwrap();
            (rng.below(4) == 0 && !l.locks.is_empty())
                .then(|| {
                    l.locks
                        .keys()
                        .nth(rng.below(l.locks.len() as u64) as usize)
                        .cloned()
                })
                .flatten()
        };
        if let Some(id) = removal {
            let answer = rpc.call("lock.remove", json!({ "id": id }));
            let mut l = ledger.lock().unwrap();
            // Unanswered or not, it is no longer known to hold.
            l.locks.remove(&id);
            match answer {
                Ok(_) => {
                    l.counts.lock_removals_acked += 1;
                    l.locks_removed.insert(id);
                }
                Err(ClientError::Rpc { message, .. }) => l.violations.push(format!(
                    "lock.remove of acknowledged lock {id} refused: {message}"
                )),
                Err(_) => {
                    l.counts.lock_calls_unanswered += 1;
                    return;
                }
            }
            continue;
        }
        let tag = format!("l{:016x}", rng.next_u64());
        let params = json!({ "target": { "device": tag }, "reason": "crash harness" });
        let answer = rpc.call("lock.add", params.clone());
        let mut l = ledger.lock().unwrap();
        match answer {
            Ok(v) => match v["lock"]["id"].as_str() {
                Some(id) => {
                    l.counts.locks_acked += 1;
                    l.locks.insert(id.to_owned(), tag);
                }
                None => l
                    .violations
                    .push(format!("lock.add {params} answered without a lock id: {v}")),
            },
            Err(ClientError::Rpc { message, .. }) => l
                .violations
                .push(format!("lock.add {params} refused: {message}")),
            Err(_) => {
                l.counts.lock_calls_unanswered += 1;
                return;
            }
        }
    }
}
