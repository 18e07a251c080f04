//! `cargo xtask bench policy`: time from a policy change to every one of 100,000 live sessions
//! re-evaluated, its grants updated in the kernel and the change durable, and the memory those
//! sessions take, with the agent's own library in-process; written as JSON.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flowwarden::{
    audit::event::{AuditEvent, AuditKind},
    datapath::maps_dir,
    policy::Reload,
    store::Write,
};
use flowwarden_tests::{
    bench::{
        self, BenchArgs, HasBenchArgs, Knob, Spec, bench_identity, cpu::process_cpu,
        inproc::InProcessAgent, loadavg, memory, stats::ms,
    },
    privileged,
};
use serde_json::json;

const TARGET_MS: f64 = 200.0;
const TARGET_RSS_MIB: f64 = 256.0;
/// One change per run: a policy change never widens live sessions, so the grants it removes
/// cannot be given back without admitting everyone again.
const SPEC: Spec = Spec {
    name: "policy",
    runs: Knob::Ignored("one change per run"),
    repeat: Knob::Ignored("one change per run"),
};

/// Every session is granted both resources; the edit takes `web` from everyone's rule, so each
/// session loses one grant and keeps one (none is terminated).
fn policy_text(granted: &str) -> String {
    format!(
        "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
         [[resource]]\nname = \"web\"\nprotocol = \"tcp\"\nports = [443]\n\n\
         [[rule]]\nname = \"staff\"\ngroups = [\"bench\"]\nresources = [{granted}]\n"
    )
}

/// Time from a policy change to every live session re-evaluated, in-process.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Live sessions when the policy changes (fewer if the kernel's grant map cannot hold two
    /// grants for each).
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

/// Counts live heap bytes, so that RSS can be split into the session records and the rest
/// (the store's page cache, allocator overhead). An atomic add per allocation is all it costs.
struct Counting;

static HEAP: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static COUNTING: Counting = Counting;

// SAFETY: every call is passed on unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP.fetch_add(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which got it from `System`.
        unsafe { System.dealloc(ptr, layout) };
        HEAP.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; on failure the old block stays, and so does its count.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP.fetch_add(new_size, Relaxed);
            HEAP.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

fn heap_mib() -> f64 {
    HEAP.load(Relaxed) as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    if !privileged::require_root("bench-policy") {
        bail!("the policy benchmark loads BPF maps: run it as root");
    }
    let load_before = loadavg();
    let agent = InProcessAgent::start(
        "bpol",
        &policy_text("\"ssh\", \"web\""),
        agent_common::map_sizes::FLOWS,
    )?;
    let InProcessAgent {
        rt,
        sessions,
        store,
        enforcer,
        policy,
        pins,
        scratch,
    } = &agent;
    let policy_file = agent.policy_file();
    let grant_capacity =
        aya::maps::MapData::from_pin(maps_dir(&pins.0).join(agent_common::map_names::GRANTS))?
            .info()?
            .max_entries() as usize;
    // Two grants per session must fit in the kernel's grant map.
    let n = args.sessions.min(grant_capacity / 2);
    if n < args.sessions {
        eprintln!(
            "the kernel grant map holds {grant_capacity} entries: measuring {n} sessions, \
             not {}",
            args.sessions
        );
    }
    let (rss_empty, _) = memory();
    let heap_empty = heap_mib();

    eprintln!("admitting {n} sessions…");
    let admit_secs = agent
        .admit_many(n, |i, now| bench_identity(i, now, &[]))?
        .as_secs_f64();
    // The store writer frees each group's writes after answering: let it finish first.
    std::thread::sleep(Duration::from_millis(200));
    let (rss_sessions, hwm_sessions) = memory();
    let heap_sessions = heap_mib();
    // A copy of every session has the heap of the records in the table (less its index).
    let (records_mib, claims_mib) = {
        // Deep copies: the table shares its records, a plain `all()` would copy nothing.
        let copies: Vec<flowwarden::sessions::model::Session> =
            sessions.all().iter().map(|s| (**s).clone()).collect();
        let records = heap_mib() - heap_sessions;
        // Kept alive (not `_`) until measured: how much of a record is the raw claims map.
        let _claims: Vec<_> = copies.iter().map(|s| s.identity.claims.clone()).collect();
        (records, heap_mib() - heap_sessions - records)
    };
    if sessions.live_count() != n {
        bail!(
            "{} live sessions after {n} admissions",
            sessions.live_count()
        );
    }
    let web = policy
        .current()
        .resources
        .by_name("web")
        .context("no web resource")?
        .id;

    // The change: the file edited, read and validated, resources installed, every session
    // re-evaluated, the removed grants deleted from the kernel, everything committed.
    // The deep copies above were freed into malloc's bins; the allocator's next large request
    // would consolidate them (tens of ms on this allocator) inside the timed change. The agent
    // makes no such copies: consolidate now.
    // SAFETY: malloc_trim only reorganises the allocator's free memory.
    unsafe { libc::malloc_trim(0) };
    eprintln!("changing the policy…");
    let tmp = scratch.dir.join("policies/.bench.toml.tmp");
    std::fs::write(&tmp, policy_text("\"ssh\""))?;
    std::fs::rename(&tmp, &policy_file)?;
    let t0 = Instant::now();
    let cpu0 = process_cpu();
    let Reload::Changed(new) = policy.reload()? else {
        bail!("the policy edit was not noticed");
    };
    let reload = t0.elapsed();
    let t = Instant::now();
    enforcer.install_resources(&new.resources)?;
    let install = t.elapsed();
    let t = Instant::now();
    let change = sessions.enforce_policy(&new)?;
    let enforce = t.elapsed();
    let enforced = t0.elapsed();
    let enforced_cpu = process_cpu() - cpu0;
    let outcome = change.outcome;
    let t = Instant::now();
    rt.block_on(sessions.record_policy_change(change))?;
    let record = t.elapsed();
    let total = t0.elapsed();
    let (_, hwm_change) = memory();
    // Copies for the phases measured alone, taken after the peak was read; apply_policy clones
    // each changed session the same way, for its store write.
    let t = Instant::now();
    let copies = sessions.all();
    let clone = t.elapsed();
    if outcome.grants_removed != n || outcome.sessions_terminated != 0 {
        bail!("unexpected outcome of the change: {outcome:?}");
    }
    let kernel_grants = enforcer.grants();
    if kernel_grants.len() != n || kernel_grants.iter().any(|g| g.1 == web) {
        bail!(
            "{} grants left in the kernel, expected {n} (ssh only)",
            kernel_grants.len()
        );
    }

    // The phases of apply_policy, each alone on the same sessions (it has no timers inside).
    eprintln!("measuring the phases alone…");
    let t = Instant::now();
    for s in &copies {
        // What re-evaluation asks of each session: which of its grants a matching rule keeps.
        let applicable = new.applicable(&s.identity, s.source);
        black_box(
            s.grants
                .iter()
                .filter(|g| applicable.reaches(g.resource_id))
                .count(),
        );
    }
    let evaluate = t.elapsed();
    let t = Instant::now();
    let web_grant = flowwarden::sessions::model::SessionGrant {
        resource: "web".into(),
        resource_id: web,
        rule: String::new(),
    };
    copies
        .iter()
        .try_for_each(|s| enforcer.grant(s.id, s.source, std::slice::from_ref(&web_grant)))?;
    let regrant = t.elapsed();
    // What enforce_policy does with the removed grants: one batch delete.
    let keys: Vec<(IpAddr, u32)> = copies.iter().map(|s| (s.source, web)).collect();
    let t = Instant::now();
    let withdrawn = enforcer.withdraw_all(&keys)?;
    let withdraw = t.elapsed();
    if withdrawn != n {
        bail!("the batch withdrew {withdrawn} grants of {n}");
    }
    // Not part of the change: one sweep (expiry, idle flows, dormancy) over all the sessions,
    // which the agent runs every sweep interval, locking the table a slice at a time with a
    // pause between slices (so this is wall time, most of it the pauses).
    let t = Instant::now();
    rt.block_on(sessions.sweep())?;
    let sweep = t.elapsed();
    let writes: Vec<Write> = copies
        .iter()
        .flat_map(|s| {
            let mut e = AuditEvent::new(AuditKind::GrantRemoved {
                reason: "policy change".into(),
            });
            e.session = Some(s.id);
            e.user = Some(s.identity.user().to_owned());
            e.source = Some(s.source);
            e.resource = Some("web".into());
            e.detail = "web is no longer granted by policy".into();
            [Write::Audit(e), Write::PutSession(Arc::clone(s))]
        })
        .collect();
    let t = Instant::now();
    rt.block_on(store.submit(writes))??;
    let commit = t.elapsed();
    let load_after = loadavg();

    // Table walk, copy-on-write of the changed sessions and the audit events' texts.
    let rest = enforce.saturating_sub(evaluate + withdraw);
    let report = json!({
        "benchmark": "policy",
        "date": bench::utc_date(),
        "machine": bench::machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "method": "in-process, the agent's library as the agent wires it: a private datapath \
                   (pinned maps, no interface attached), a redb store on the local disk, \
                   Enforcer, Audit, PolicyHandle, Sessions, a 2-worker tokio runtime. Sessions \
                   admitted with Sessions::admit from 512 tasks, distinct IPv4 sources, \
                   identities shaped like verified development tokens, granted ssh and web. The \
                   policy file is rewritten to take web away; timed from PolicyHandle::reload \
                   through resource install to Sessions::enforce_policy returning (every session \
                   re-evaluated, table and kernel updated: the target), then on to \
                   Sessions::record_policy_change returning (audit events and session records \
                   committed with fsync, in slices); no flows, so none severed. Phases then timed \
                   alone on the same sessions: the applicable rules of each (one thread), one \
                   batch withdrawal of all (grants re-written first), sharing all sessions \
                   (Sessions::all), one commit of the same writes. RSS: /proc/self/status; this process holds what the agent holds \
                   (table, store and cache, policy, maps) but not its TLS and socket servers",
        "grant_map_capacity": grant_capacity,
        "sessions_requested": args.sessions,
        "sessions": n,
        "limited_by_grant_map": n < args.sessions,
        "admissions_per_sec": n as f64 / admit_secs,
        "outcome": outcome,
        "change_ms": {
            "enforced": ms(enforced),
            "enforced_cpu": ms(enforced_cpu),
            "durable": ms(total),
            "reload_and_validate": ms(reload),
            "install_resources": ms(install),
            "enforce_policy": ms(enforce),
            "record_policy_change": ms(record),
        },
        "phases_alone_ms": {
            "evaluate_all": ms(evaluate),
            "kernel_withdraw_all": ms(withdraw),
            "share_all_sessions": ms(clone),
            "store_commit": ms(commit),
            "enforce_policy_unattributed": ms(rest),
            "kernel_grant_write_all": ms(regrant),
        },
        "one_sweep_ms": ms(sweep),
        "memory_mib": {
            "rss_before_sessions": rss_empty,
            "rss_with_sessions": rss_sessions,
            "hwm_with_sessions": hwm_sessions,
            "hwm_after_change": hwm_change,
            "per_session_kib": (rss_sessions - rss_empty) * 1024.0 / n as f64,
            "heap_live_before_sessions": heap_empty,
            "heap_live_with_sessions": heap_sessions,
            "session_records_heap": records_mib,
            "session_record_kib": records_mib * 1024.0 / n as f64,
            "of_which_raw_token_claims_heap": claims_mib,
            "state_file": std::fs::metadata(store.path()).map_or(0, |m| m.len()) as f64
                / (1024.0 * 1024.0),
        },
        "targets": {
            "max_change_ms": TARGET_MS,
            "change_ms": ms(enforced),
            "change_met": ms(enforced) <= TARGET_MS && n == args.sessions,
            "max_rss_mib": TARGET_RSS_MIB,
            "rss_mib": rss_sessions,
            "rss_met": rss_sessions <= TARGET_RSS_MIB && n == args.sessions,
        },
    });
    let met = |m: bool| if m { "met" } else { "NOT met" };
    println!(
        "{n} sessions ({:.0} admissions/s in-process), {} grants removed by the change",
        n as f64 / admit_secs,
        outcome.grants_removed
    );
    println!(
        "change: enforced after {:.1} ms ({:.1} ms CPU) = reload {:.1} + resources {:.1} + \
         enforce_policy {:.1} (target ≤ {TARGET_MS} ms: {}); durable after {:.1} ms \
         (record_policy_change {:.1})",
        ms(enforced),
        ms(enforced_cpu),
        ms(reload),
        ms(install),
        ms(enforce),
        met(report["targets"]["change_met"] == true),
        ms(total),
        ms(record),
    );
    println!(
        "  alone: evaluate {:.1} ms, kernel batch withdraw {:.1} ms, sharing the sessions {:.1} ms, \
         store commit {:.1} ms, unattributed {:.1} ms (writing the grants: {:.1} ms); one sweep \
         over all sessions: {:.1} ms",
        ms(evaluate),
        ms(withdraw),
        ms(clone),
        ms(commit),
        ms(rest),
        ms(regrant),
        ms(sweep)
    );
    println!(
        "memory: RSS {rss_empty:.0} MiB empty, {rss_sessions:.0} MiB with the sessions \
         ({:.2} KiB each; target ≤ {TARGET_RSS_MIB} MiB: {}), peak {hwm_change:.0} MiB after \
         the change",
        (rss_sessions - rss_empty) * 1024.0 / n as f64,
        met(report["targets"]["rss_met"] == true)
    );
    println!(
        "  live heap {heap_sessions:.0} MiB, of which session records {records_mib:.0} MiB \
         ({:.2} KiB each, raw token claims {claims_mib:.0} MiB of it); load {load_before} → \
         {load_after}",
        records_mib * 1024.0 / n as f64
    );
    args.common.write_report(&report)
}
