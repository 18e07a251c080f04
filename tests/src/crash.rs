//! Crash consistency: a driver issues admissions, terminations and policy reloads against a real
//! agent, which is killed with SIGKILL at seeded random moments in the middle of them and
//! restarted; after each kill nothing acknowledged may be lost, nothing unacknowledged may be
//! half-present, the store must pass its integrity check and the kernel must match the store.
//!
//! Used by `tests/tests/crash_consistency.rs` (≥ 100 kills) and by the `soak` binary behind
//! `cargo xtask soak` (1,000 by default).

mod check;
mod driver;
mod policy;

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

pub use self::{
    check::Findings,
    driver::{Counts, Ledger},
    policy::{USERS, User, Variant},
};
use crate::{
    admit::AdmitClient,
    attachments::attached_programs,
    stack::{ADMISSION_PORT, Stack},
};

/// The restarted agent must answer `status` within this, or the run fails. The target is 1 s;
/// this bound only tells "slow" from "never" on a loaded machine.
const STATUS_BOUND: Duration = Duration::from_secs(30);
/// How long the driver runs before the kill: long enough for every kind of operation to be
/// under way, short enough that restarts, not driving, set the pace.
const KILL_AFTER_MS: (u64, u64) = (20, 500);
/// One restart in this many is itself killed while the agent starts (during store open,
/// datapath adoption or reconciliation), before the restart that is checked.
const START_KILL_ONE_IN: u64 = 8;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kills in the middle of operations (kills during a start come on top).
    pub kills: usize,
    pub seed: u64,
    /// Names the namespaces and pins.
    pub tag: String,
}

impl Options {
    /// `kills` kills, with the seed from `FLOWWARDEN_CRASH_SEED` or else a fresh one.
    pub fn new(tag: &str, kills: usize) -> Self {
        let seed = std::env::var("FLOWWARDEN_CRASH_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                Rng::new(t ^ u64::from(std::process::id())).next_u64()
            });
        Self {
            kills,
            seed,
            tag: tag.to_owned(),
        }
    }
}

/// splitmix64: small, seedable, good enough to pick moments and operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// A distribution of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub samples: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            samples: ms.len(),
            min_ms: at(0.0),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    /// SIGKILLs in the middle of operations.
    pub kills: usize,
    /// SIGKILLs while a restarted agent was still starting.
    pub kills_during_start: usize,
    pub counts: Counts,
    /// Acknowledged things missing or changed after a restart: must all be 0.
    pub lost: Lost,
    /// Every broken invariant, one sentence each (at most 100 listed).
    pub violations: Vec<String>,
    pub violation_count: usize,
    /// Spawn of the restarted agent to its first answer to `status`.
    pub status_after_start: Spread,
    pub status_within_1s: usize,
    /// SIGKILL to the restarted agent's first `status` answer (offline check included).
    pub kill_to_status: Spread,
    /// Where an iteration's time goes: driving until the kill, the offline store check, the
    /// kernel check after the restart.
    pub drive: Spread,
    pub offline_check: Spread,
    pub kernel_check: Spread,
    /// Sessions, revocations and audit events in the store at the end.
    pub final_sessions: usize,
    pub final_revocations: u64,
    pub final_audit_events: u64,
    pub wall_secs: f64,
    #[serde(skip)]
    lost_ids: (BTreeSet<u64>, BTreeSet<u64>, BTreeSet<u64>),
    #[serde(skip)]
    seen: HashSet<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Lost {
    pub admissions: usize,
    pub terminations: usize,
    pub audit_records: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violation_count == 0
            && self.lost.admissions == 0
            && self.lost.terminations == 0
            && self.lost.audit_records == 0
    }

    fn absorb(&mut self, f: Findings) {
        self.lost_ids.0.extend(f.lost_admissions);
        self.lost_ids.1.extend(f.lost_terminations);
        self.lost_ids.2.extend(f.lost_audit);
        self.lost = Lost {
            admissions: self.lost_ids.0.len(),
            terminations: self.lost_ids.1.len(),
            audit_records: self.lost_ids.2.len(),
        };
        for v in f.violations {
            // The same broken thing is seen again after every later kill: report it once.
            if !self.seen.insert(v.clone()) {
                continue;
            }
            self.violation_count += 1;
            eprintln!("crash harness: VIOLATION: {v}");
            if self.violations.len() < 100 {
                self.violations.push(v);
            }
        }
    }
}

/// Everything the driver threads and checks share about the stack under test.
pub(crate) struct Target {
    pub client_ns: crate::netns::Netns,
    pub admit: AdmitClient,
    /// The client addresses admissions come from.
    pub sources: Vec<IpAddr>,
    /// The addresses the `dev` rule accepts.
    pub dev_sources: Vec<IpAddr>,
    pub signing_key: PathBuf,
    pub kid: String,
    pub socket: PathBuf,
    pub policy_file: PathBuf,
    pub pin_dir: PathBuf,
}

/// Runs the harness: one stack, `opts.kills` kills in the middle of operations.
///
/// # Panics
/// The stack cannot be set up, or a restarted agent exits or never answers `status`.
pub fn run(opts: &Options) -> Report {
    println!(
        "crash harness: seed {} ({} kills); rerun with FLOWWARDEN_CRASH_SEED={}",
        opts.seed, opts.kills, opts.seed
    );
    let started = Instant::now();
    let mut rng = Rng::new(opts.seed);
    let placeholder = [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))];
    let mut stack = Stack::start(&opts.tag, &policy::text(Variant::Wide, 0, &placeholder), "");
    let target = Arc::new(setup(&stack));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // The real first policy (the dev rule names the client addresses), as an acknowledged
    // reload like any other.
    driver::reload(&target, &ledger, Variant::Wide);

    let state = stack.scratch.dir.join("state/state.redb");
    // On tmpfs when there is one: the copy is thrown away, so the fsyncs of its repair and close
    // need not wait for a disk.
    let shm = std::path::Path::new("/dev/shm");
    let copy = if shm.is_dir() {
        shm
    } else {
        stack.scratch.dir.as_path()
    }
    .join(format!(
        "fw-crash-snapshot-{}-{}.redb",
        opts.tag,
        std::process::id()
    ));
    let mut report = Report {
        seed: opts.seed,
        kills: 0,
        kills_during_start: 0,
        counts: Counts::default(),
        lost: Lost::default(),
        violations: Vec::new(),
        violation_count: 0,
        status_after_start: Spread::default(),
        status_within_1s: 0,
        kill_to_status: Spread::default(),
        drive: Spread::default(),
        offline_check: Spread::default(),
        kernel_check: Spread::default(),
        final_sessions: 0,
        final_revocations: 0,
        final_audit_events: 0,
        wall_secs: 0.0,
        lost_ids: Default::default(),
        seen: HashSet::new(),
    };
    let (mut to_status, mut kill_to_status) = (Vec::new(), Vec::new());
    let (mut drive, mut offline, mut kernel) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.kills {
        let run = driver::Driver::start(Arc::clone(&target), Arc::clone(&ledger), rng.next_u64());
        let after = rng.millis(KILL_AFTER_MS);
        std::thread::sleep(after);
        drive.push(after);
        let killed = run.kill_in_flight(|| stack.agent_mut().kill9());
        report.kills += 1;
        let seen_live = std::mem::take(&mut ledger.lock().unwrap().violations);
        report.absorb(Findings {
            violations: seen_live,
            ..Findings::default()
        });

        let snap = check::snapshot(&state, Some(&copy)).expect("reading the crashed store");
        report.absorb(check::store(&snap, &ledger.lock().unwrap()));
        offline.push(killed.elapsed());

        if rng.below(START_KILL_ONE_IN) == 0 {
            // Killed somewhere between its first instruction and its first answer.
            let typical = to_status
                .last()
                .copied()
                .unwrap_or(Duration::from_millis(200));
            stack.agent = Some(crate::agent_proc::AgentProcess::spawn(
                &stack.pair.server,
                &stack.config,
            ));
            let limit = u64::try_from(typical.as_millis()).unwrap_or(200);
            std::thread::sleep(rng.millis((0, limit)));
            stack.agent_mut().kill9();
            report.kills_during_start += 1;
            let snap = check::snapshot(&state, Some(&copy)).expect("reading the store");
            report.absorb(check::store(&snap, &ledger.lock().unwrap()));
        }

        let took = stack.restart_timed(STATUS_BOUND);
        to_status.push(took);
        kill_to_status.push(killed.elapsed());
        let attached = attached_programs(&stack.pair.server, &stack.pair.server_if);
        if attached.len() != 2 {
            report.absorb(Findings::violation(format!(
                "after restart {i}: expected one XDP and one TCX egress program, found {attached:?}"
            )));
        }
        let checking = Instant::now();
        report.absorb(check::kernel(&target, &ledger.lock().unwrap()));
        report.absorb(check::locks(&target, &ledger.lock().unwrap()));
        kernel.push(checking.elapsed());
        if (i + 1) % 10 == 0 {
            let c = ledger.lock().unwrap().counts.clone();
            println!(
                "crash harness: {} kills ({} during start), {} admissions / {} terminations / \
                 {} reloads acknowledged, {} violations, {:.0} s",
                report.kills,
                report.kills_during_start,
                c.admissions_acked,
                c.terminations_acked,
                c.reloads_acked,
                report.violation_count,
                started.elapsed().as_secs_f64()
            );
        }
    }

    // A last graceful stop, and the real file (not a copy) checked as the agent left it.
    let stopped = stack.agent_mut().stop();
    if !stopped {
        report.absorb(Findings::violation(format!(
            "the final SIGTERM did not stop the agent cleanly:\n{}",
            stack.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        )));
    }
    let snap = check::snapshot(&state, None).expect("reading the final store");
    let ledger = ledger.lock().unwrap();
    report.absorb(check::store(&snap, &ledger));
    report.counts = ledger.counts.clone();
    report.final_sessions = snap.sessions.len();
    report.final_revocations = snap.integrity.revocations;
    report.final_audit_events = snap.integrity.audit_events;
    report.status_within_1s = to_status
        .iter()
        .filter(|d| **d <= Duration::from_secs(1))
        .count();
    report.status_after_start = Spread::of(&to_status);
    report.kill_to_status = Spread::of(&kill_to_status);
    report.drive = Spread::of(&drive);
    report.offline_check = Spread::of(&offline);
    report.kernel_check = Spread::of(&kernel);
    report.wall_secs = started.elapsed().as_secs_f64();
    report
}

/// Extra client addresses, keys and paths the driver needs.
fn setup(stack: &Stack) -> Target {
    let pair = &stack.pair;
    let o = pair.client_addr.octets();
    let sources: Vec<IpAddr> = (11..=14)
        .map(|h| IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], h)))
        .collect();
    for s in &sources {
        pair.client
            .ip(&["addr", "add", &format!("{s}/32"), "dev", &pair.client_if])
            .expect("adding a client address");
    }
    let keys = &stack.keys;
    let kid = flowwarden::auth::dev::kid_of(&keys.join(flowwarden::auth::dev::JWKS_FILE))
        .expect("the dev JWKS has a kid");
    Target {
        client_ns: pair.client.clone(),
        admit: AdmitClient::new(
            (pair.server_addr, ADMISSION_PORT).into(),
            &stack.fingerprint(),
        ),
        dev_sources: sources[..2].to_vec(),
        sources,
        signing_key: keys.join(flowwarden::auth::dev::KEY_FILE),
        kid,
        socket: stack.socket.clone(),
        policy_file: stack.policy_path(),
        pin_dir: stack.pin_dir.clone(),
    }
}
