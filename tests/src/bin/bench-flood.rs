//! `cargo xtask bench flood`: legitimate admissions from a few sources while many other
//! sources flood the real agent far beyond their rate limit with valid and forged tokens:
//! the legitimate clients' success and latency with and without the flood, the flooders'
//! answers and the agent's CPU, as JSON.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flowwarden_tests::{
    bench::{
        self, BenchArgs, HasBenchArgs, Knob, Spec, Stats,
        cpu::{machine_ticks, stat_ticks, ticks_per_sec},
        loadavg,
    },
    flood::{FloodStack, MAX_SOURCES, Tally, forged, hammer, mint, paced},
    privileged::require_root,
};
use serde_json::{Value, json};

const POLICY: &str = "[[resource]]\nname = \"echo\"\nprotocol = \"tcp\"\nports = [7000]\n\n\
                      [[rule]]\nname = \"bench\"\ngroups = [\"bench\"]\nresources = [\"echo\"]\n";
/// The agent's default limit per source (`[admission] rate_per_sec`, `rate_burst`).
const LIMIT_PER_SEC: f64 = 20.0;
const LIMIT_BURST: f64 = 40.0;
/// Legitimate admissions each flooding source's valid tokens cycle through (a stolen token
/// replayed is as good as many).
const FLOOD_TOKENS: usize = 8;
/// The flood starts this long before the legitimate clients are measured.
const RAMP: Duration = Duration::from_secs(1);

const SPEC: Spec = Spec {
    name: "flood",
    runs: Knob::Ignored("one run"),
    repeat: Knob::Means {
        help: "Seconds each phase (without, then with the flood) measures",
        default: 15,
    },
};

/// Legitimate admissions from a few sources while many other sources flood the agent.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Flooding sources.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    flooders: usize,
    /// Threads (connections at a time) of each flooding source.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    threads: usize,
    /// Legitimate sources.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    legit: usize,
    /// Admissions per second of each legitimate source (at most the per-source limit, 20).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    rate: u32,
    /// The same as --repeat: seconds each phase measures.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    secs: Option<u32>,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The agent's and the machine's CPU over a window.
struct Cpu {
    agent: u64,
    busy: u64,
    total: u64,
    at: Instant,
}

impl Cpu {
    fn sample(pid: u32) -> Self {
        let (busy, total) = machine_ticks();
        Self {
            agent: stat_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))),
            busy,
            total,
            at: Instant::now(),
        }
    }

    fn since(&self, pid: u32) -> Value {
        let now = Self::sample(pid);
        let hz = ticks_per_sec();
        let secs = now.at.duration_since(self.at).as_secs_f64();
        json!({
            "agent_percent_of_one_core": 100.0 * (now.agent - self.agent) as f64 / hz / secs,
            "machine_busy_percent":
                100.0 * (now.busy - self.busy) as f64 / (now.total - self.total).max(1) as f64,
        })
    }
}

fn tally_json(t: &Tally, secs: f64) -> Value {
    json!({
        "attempts": t.attempts(),
        "attempts_per_sec": t.attempts() as f64 / secs,
        "admitted": t.admitted,
        "rate_limited_429": t.rate_limited,
        "rejected_401": t.rejected,
        "failed": t.failed,
        "first_failure": t.first_failure,
    })
}

/// The legitimate clients' phase: each source admits its tokens at `rate` per second.
fn legit_phase(
    stack: &FloodStack,
    sources: &[flowwarden_tests::flood::Source],
    tokens: &[Vec<String>],
    rate: u32,
) -> anyhow::Result<Tally> {
    let start = Instant::now() + Duration::from_millis(50);
    let every = Duration::from_secs(1) / rate;
    std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .zip(tokens)
            .map(|(src, toks)| s.spawn(move || paced(stack, src, toks, start, every)))
            .collect();
        let mut all = Tally::default();
        for h in handles {
            all.merge(h.join().unwrap()?);
        }
        Ok(all)
    })
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    // --secs is another name of --repeat, and wins when both are given.
    let secs = args
        .secs
        .map_or_else(|| args.common.repeat(), |s| s as usize);
    if args.flooders + args.legit > MAX_SOURCES {
        bail!("at most {MAX_SOURCES} sources in all (--flooders + --legit)");
    }
    if !require_root("bench-flood") {
        bail!("the flood benchmark runs an agent in network namespaces: run it as root");
    }
    flowwarden_tests::agent_proc::release_agent()?;
    let secs = u32::try_from(secs)?;
    let load_before = loadavg();
    // The product's default rate limit: what a flood meets on a stock agent.
    let stack = FloodStack::start("bflood", POLICY, "", args.flooders + args.legit)?;
    let pid = stack.agent_pid()?;
    let (legit_sources, flood_sources) = stack.sources.split_at(args.legit);
    let per_phase = (args.rate * secs) as usize;
    eprintln!("minting tokens…");
    let legit_tokens = mint(
        &stack,
        "legit",
        2 * args.legit * (per_phase + 1),
        &["bench"],
    )?;
    let flood_valid = mint(&stack, "flood", FLOOD_TOKENS, &["bench"])?;
    // Valid and forged in turn: the forged ones cost a verification when the limit lets
    // them through, the valid ones an admission.
    let flood_tokens: Vec<String> = flood_valid
        .iter()
        .flat_map(|t| [t.clone(), forged(t)])
        .collect();
    let mut legit_chunks = legit_tokens.chunks(per_phase);
    let mut next_tokens = || -> Vec<Vec<String>> {
        (0..args.legit)
            .map(|_| legit_chunks.next().unwrap_or_default().to_vec())
            .collect()
    };
    let (baseline_tokens, flood_phase_tokens) = (next_tokens(), next_tokens());

    let result = stack.pair.client.run(|| -> anyhow::Result<_> {
        // One admission per legitimate source first: the first connection's costs (the
        // client library's setup) are not what is measured.
        for (src, token) in legit_sources.iter().zip(legit_tokens.iter().rev()) {
            stack
                .client(src)?
                .login(token)
                .with_context(|| format!("warm-up admission from {}", src.client))?;
        }
        eprintln!(
            "baseline: {} legitimate sources at {}/s each for {} s…",
            args.legit, args.rate, secs
        );
        let cpu = Cpu::sample(pid);
        let baseline = legit_phase(&stack, legit_sources, &baseline_tokens, args.rate)?;
        let baseline_cpu = cpu.since(pid);

        eprintln!(
            "flood: {} sources × {} connections, half keep-alive, half reconnecting…",
            args.flooders, args.threads
        );
        let stop = AtomicBool::new(false);
        let (flood, during, during_cpu, flood_secs) = std::thread::scope(|s| {
            let started = Instant::now();
            let flooders: Vec<_> = (flood_sources.iter().enumerate())
                .flat_map(|(i, src)| std::iter::repeat_n((i % 2 == 1, src), args.threads))
                .map(|(reconnect, src)| {
                    let (stack, tokens, stop) = (&stack, &flood_tokens, &stop);
                    s.spawn(move || (reconnect, hammer(stack, src, tokens, reconnect, stop)))
                })
                .collect();
            std::thread::sleep(RAMP);
            let cpu = Cpu::sample(pid);
            let during = legit_phase(&stack, legit_sources, &flood_phase_tokens, args.rate);
            let during_cpu = cpu.since(pid);
            stop.store(true, Ordering::Relaxed);
            let (mut keep_alive, mut reconnecting) = (Tally::default(), Tally::default());
            for f in flooders {
                let (reconnects, tally) = f.join().unwrap();
                let tally = tally?;
                if reconnects {
                    reconnecting.merge(tally);
                } else {
                    keep_alive.merge(tally);
                }
            }
            anyhow::Ok((
                (keep_alive, reconnecting),
                during?,
                during_cpu,
                started.elapsed().as_secs_f64(),
            ))
        })?;
        Ok((
            baseline,
            baseline_cpu,
            flood,
            during,
            during_cpu,
            flood_secs,
        ))
    })?;
    let (baseline, baseline_cpu, (keep_alive, reconnecting), during, during_cpu, flood_secs) =
        result;
    let load_after = loadavg();

    // Nothing beyond the limit was admitted: the sessions from flooding sources are exactly
    // the admissions they were answered 201 for.
    let listed = stack.ctl_json(&["sessions", "list"])?;
    let flood_ips: Vec<String> = flood_sources.iter().map(|s| s.client.to_string()).collect();
    let flood_sessions = listed.as_array().map_or(0, |a| {
        a.iter()
            .filter(|s| {
                s["source"]
                    .as_str()
                    .is_some_and(|ip| flood_ips.iter().any(|f| f == ip))
            })
            .count()
    });
    let flood_admitted = keep_alive.admitted + reconnecting.admitted;
    let ceiling = flood_sources.len() as f64 * (LIMIT_BURST + LIMIT_PER_SEC * flood_secs);

    let phase = |t: &Tally, cpu: &Value| {
        let want = args.legit * per_phase;
        json!({
            "attempts": want,
            "admitted": t.admitted,
            "success_rate": t.admitted as f64 / want as f64,
            "rate_limited_429": t.rate_limited,
            "failed": t.failed + t.rejected,
            "first_failure": t.first_failure,
            "latency_from_scheduled_send": Stats::of_ms(&t.latencies).ms_json(),
            "cpu": cpu,
        })
    };
    let report = json!({
        "benchmark": "flood",
        "date": bench::utc_date(),
        "machine": bench::machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "method": "release agent in a netns pair with the default admission limit (20/s, burst \
                   40 per source), listening on every address; each client source is an extra \
                   address on the client veth, reached through its own server address with a \
                   route that names the source (ip route … src), so the product's admission \
                   client is used throughout. Legitimate sources: distinct ES256 tokens, one \
                   new TLS connection per admission (as flowwarden login), open loop at the \
                   given rate, latency from the scheduled send. Phase 1 without a flood, \
                   phase 2 with: every flooding source posts as fast as answers come from N \
                   threads, valid and forged tokens in turn, half the sources over keep-alive \
                   connections, half over a new TLS connection per attempt (handshake flood); \
                   the legitimate clients start 1 s into the flood. CPU: /proc ticks of the \
                   agent over each measured window, and the machine's busy share. Afterwards \
                   the sessions from flooding sources are counted",
        "limit": {"per_sec": LIMIT_PER_SEC, "burst": LIMIT_BURST},
        "legit": {
            "sources": args.legit,
            "rate_per_source_per_sec": args.rate,
            "secs_per_phase": secs,
            "without_flood": phase(&baseline, &baseline_cpu),
            "during_flood": phase(&during, &during_cpu),
        },
        "flood": {
            "sources": flood_sources.len(),
            "connections_per_source": args.threads,
            "secs": flood_secs,
            "keep_alive": tally_json(&keep_alive, flood_secs),
            "reconnecting": tally_json(&reconnecting, flood_secs),
            "admitted_total": flood_admitted,
            "admissions_allowed_by_limit_at_most": ceiling,
            "sessions_from_flooding_sources": flood_sessions,
        },
    });
    let q = |t: &Tally| {
        let v = Stats::of_ms(&t.latencies);
        format!(
            "{}/{} admitted, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            t.admitted,
            args.legit * per_phase,
            v.p50,
            v.p99,
            v.max
        )
    };
    let pct = |c: &Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "legitimate ({} sources × {}/s, new connection each): without flood {} (agent {:.0}% \
         of a core, machine {:.0}% busy)",
        args.legit,
        args.rate,
        q(&baseline),
        pct(&baseline_cpu, "agent_percent_of_one_core"),
        pct(&baseline_cpu, "machine_busy_percent"),
    );
    println!(
        "  during the flood: {} (agent {:.0}% of a core, machine {:.0}% busy)",
        q(&during),
        pct(&during_cpu, "agent_percent_of_one_core"),
        pct(&during_cpu, "machine_busy_percent"),
    );
    for (kind, t) in [("keep-alive", &keep_alive), ("reconnecting", &reconnecting)] {
        println!(
            "flood, {kind}: {} attempts ({:.0}/s): {} × 429, {} admitted, {} × 401, {} failed",
            t.attempts(),
            t.attempts() as f64 / flood_secs,
            t.rate_limited,
            t.admitted,
            t.rejected,
            t.failed
        );
    }
    println!(
        "flooding sources hold {flood_sessions} sessions for {flood_admitted} admissions \
         answered 201 (the limit allows at most {ceiling:.0}); load {load_before} → {load_after}"
    );
    args.common.write_report(&report)?;
    if flood_sessions != flood_admitted || flood_admitted as f64 > ceiling {
        bail!("the flood got more admitted than the limit allows, or sessions without a 201");
    }
    Ok(())
}
