//! `cargo xtask bench admission`: durable admissions per second over TLS keep-alive with ES256
//! tokens against a real agent process, latency under a paced open-loop load, and where the
//! time goes (token verification and store commits measured alone in the same run), as JSON.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use flowwarden::{
    admission::client::{Client, Trust},
    audit::event::{AuditEvent, AuditKind},
    auth::{Verifier, dev},
    config::Config,
    sessions::model::{Session, SessionId, now_ms},
    store::{Store, Write},
};
use flowwarden_tests::{
    agent_proc::{AgentProcess, Scratch},
    bench::{
        self, BenchArgs, HasBenchArgs, IdleArgs, Knob, Spec, Stats,
        admissions::{admit, drive, mint},
        cpu::{machine_ticks, process_cpu, stat_ticks, ticks_per_sec},
        loadavg,
        stats::median_index,
    },
    loaded::private_pin_dir,
    netns::NetnsPair,
    privileged::require_root,
    stack::{ADMISSION_PORT, AUDIENCE, ISSUER, cli},
};
use serde_json::{Value, json};

const POLICY: &str = "[[resource]]\nname = \"echo\"\nprotocol = \"tcp\"\nports = [7000]\n\n\
                      [[rule]]\nname = \"bench\"\ngroups = [\"bench\"]\nresources = [\"echo\"]\n";
const TARGET_PER_SEC: f64 = 5_000.0;
const TARGET_P99_MS: f64 = 10.0;
/// Commits per caller in the store-alone reference.
const STORE_COMMITS: usize = 500;
const VERIFIES: usize = 2_000;
/// The paced run: admissions per second, for how long.
const RATE: u32 = 1_000;
const SECS: u32 = 10;
/// Connections of the paced run: enough that a slow answer never holds back the next send.
const PACED_CONNECTIONS: usize = 32;

const SPEC: Spec = Spec {
    name: "admission",
    runs: Knob::Means {
        help: "Throughput rounds; the median round is reported",
        default: 3,
    },
    repeat: Knob::Means {
        help: "Admissions per throughput round",
        default: 20_000,
    },
};

/// Durable admissions per second over TLS keep-alive against a real agent, and latency under
/// a paced load.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    #[command(flatten)]
    idle: IdleArgs,
    /// Client threads of the throughput rounds, one connection each.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

/// The agent under test, its namespaces and pins; everything goes away on drop.
struct Bench {
    agent: Option<AgentProcess>,
    pair: NetnsPair,
    scratch: Scratch,
    pin_dir: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill9();
        }
        let _ = flowwarden::datapath::detach_all(&self.pin_dir);
    }
}

impl Bench {
    /// Like `Stack`, with its own config: every admission comes from the one client address,
    /// so the per-source limiter (20/s by default) is raised out of the way.
    fn start() -> anyhow::Result<Self> {
        let pair = NetnsPair::new("badm")?;
        let scratch = Scratch::new("badm");
        let pin_dir = private_pin_dir("badm");
        dev::keygen(&scratch.dir.join("keys"))?;
        let config = scratch.dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[datapath]\ninterfaces = [\"{iface}\"]\npin_dir = \"{pin}\"\n\n\
                 [policy]\ndir = \"policies\"\n\n[state]\ndir = \"state\"\n\n\
                 [admission]\nlisten = \"{addr}:{ADMISSION_PORT}\"\n\
                 rate_per_sec = 1000000\nrate_burst = 1000000\n\
                 max_connections_per_source = 1024\nrequest_timeout_ms = 600000\n\n\
                 [api]\nsocket = \"agent.sock\"\n\n\
                 [[auth.issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\n\
                 algorithms = [\"ES256\"]\njwks_file = \"keys/{jwks}\"\n",
                iface = pair.server_if,
                pin = pin_dir.display(),
                addr = pair.server_addr,
                jwks = dev::JWKS_FILE,
            ),
        )?;
        std::fs::write(scratch.dir.join("policies/bench.toml"), POLICY)?;
        let agent = Some(AgentProcess::start(&pair.server, &config));
        Ok(Self {
            agent,
            pair,
            scratch,
            pin_dir,
        })
    }

    fn status(&self) -> anyhow::Result<Value> {
        let socket = self.scratch.dir.join("agent.sock");
        let (ok, out) = cli(&["--socket", socket.to_str().unwrap(), "status", "--json"]);
        if !ok {
            bail!("flowwarden status failed: {out}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// The agent is the only process in the server namespace (nsenter execs it).
    fn agent_pid(&self) -> anyhow::Result<u32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &self.pair.server.name])
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .context("no process in the server namespace")
    }
}

/// Clock ticks of the agent, its store writer thread, this process (the clients), and the
/// machine's busy and total time.
fn cpu(agent: u32) -> [u64; 5] {
    let tasks = std::fs::read_dir(format!("/proc/{agent}/task"))
        .into_iter()
        .flatten();
    let writer = tasks.flatten().find(|t| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c == "store-writer\n")
    });
    let (busy, total) = machine_ticks();
    [
        stat_ticks(&PathBuf::from(format!("/proc/{agent}/stat"))),
        writer.map_or(0, |t| stat_ticks(&t.path().join("stat"))),
        stat_ticks(Path::new("/proc/self/stat")),
        busy,
        total,
    ]
}

/// CPU µs per admission between two samples, and how busy the machine was.
fn cpu_share(before: [u64; 5], after: [u64; 5], admissions: usize) -> Value {
    let hz = ticks_per_sec();
    let d: Vec<f64> = (0..5).map(|i| (after[i] - before[i]) as f64).collect();
    let us = |t: f64| t * 1e6 / hz / admissions.max(1) as f64;
    json!({
        "agent_us_per_admission": us(d[0]),
        "store_writer_us_per_admission": us(d[1]),
        "bench_clients_us_per_admission": us(d[2]),
        "machine_busy_percent": 100.0 * d[3] / d[4].max(1.0),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    let (per_round, rounds_n) = (args.common.repeat(), args.common.runs());
    let clients_n = usize::try_from(args.clients)?;
    if !require_root("bench-admission") {
        bail!("the admission benchmark runs an agent in network namespaces: run it as root");
    }
    flowwarden_tests::agent_proc::release_agent()?;
    // Held until main returns: the whole run measures with the same idle policy.
    let _idle = args.idle.idle.hold()?;
    let load_before = loadavg();
    let mut bench = Bench::start()?;
    let fingerprint = bench.status()?["admission"]["fingerprint"]
        .as_str()
        .context("no fingerprint in status")?
        .to_owned();
    let warmup = clients_n + PACED_CONNECTIONS;
    let paced_count = (RATE * SECS) as usize;
    let total = warmup + rounds_n * per_round + paced_count;
    eprintln!("minting {total} ES256 tokens…");
    let tokens = mint(&bench.scratch.dir.join("keys"), "bench-user", total)?;
    let pid = bench.agent_pid()?;
    let agent = format!("{}:{ADMISSION_PORT}", bench.pair.server_addr);

    // Every client thread runs in the client namespace, like `flowwarden login` would.
    let (rounds, (paced, paced_cpu)) = bench.pair.client.run(|| -> anyhow::Result<_> {
        let trust = Trust::Fingerprint(fingerprint.clone());
        let connect = |n| -> anyhow::Result<Vec<Client>> {
            (0..n).map(|_| Ok(Client::new(&agent, &trust)?)).collect()
        };
        let (clients, paced_clients) = (connect(clients_n)?, connect(PACED_CONNECTIONS)?);
        // One admission per connection first: TLS handshakes are not what is measured.
        let (warm, mut rest) = tokens.split_at(warmup);
        for (c, t) in clients.iter().chain(&paced_clients).zip(warm) {
            admit(c, t).map_err(|e| anyhow!("warm-up admission failed: {e}"))?;
        }
        let mut rounds = Vec::new();
        for r in 0..rounds_n {
            let (now, later) = rest.split_at(per_round);
            rest = later;
            let before = cpu(pid);
            let out = drive(&clients, now, None);
            rounds.push((out, cpu_share(before, cpu(pid), per_round)));
            eprintln!("throughput round {}/{} done", r + 1, rounds_n);
        }
        let before = cpu(pid);
        let out = drive(&paced_clients, rest, Some(Duration::from_secs(1) / RATE));
        Ok((rounds, (out, cpu_share(before, cpu(pid), rest.len()))))
    })?;
    let load_after = loadavg();
    // Killed as in a crash: every admission that was answered must be in the store.
    if let Some(mut a) = bench.agent.take() {
        a.kill9();
    }
    let stored = Store::open(&bench.scratch.dir.join("state/state.redb"))?.sessions()?;
    eprintln!("measuring token verification and store commits alone…");
    let alone = reference(&bench, &tokens, &stored[0], clients_n)?;

    let per_sec: Vec<f64> = (rounds.iter())
        .map(|(o, _)| o.ok as f64 / o.elapsed.as_secs_f64())
        .collect();
    // The median round (the upper of two middle ones): its CPU and latency go with the median.
    let mid = median_index(&per_sec).context("no throughput round")?;
    let med = per_sec[mid];
    let errors = rounds.iter().map(|(o, _)| o.errors).sum::<usize>() + paced.errors;
    let first_error = (rounds.iter().map(|(o, _)| &o.first_error))
        .chain([&paced.first_error])
        .find_map(Option::clone);
    let admitted = warmup + rounds.iter().map(|(o, _)| o.ok).sum::<usize>() + paced.ok;
    let paced_stats = Stats::of_ms(&paced.latencies);
    let (p50, p90, p99, max) = (
        paced_stats.p50,
        paced_stats.p90,
        paced_stats.p99,
        paced_stats.max,
    );
    let (throughput_met, latency_met) = (med >= TARGET_PER_SEC, p99 <= TARGET_P99_MS);
    let mut machine = bench::machine();
    machine["idle"] = args.idle.idle.describe();
    let report = json!({
        "benchmark": "admission",
        "date": bench::utc_date(),
        "machine": machine,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "method": "release agent in a netns pair, state on the local disk; distinct pre-minted \
                   ES256 tokens, one granted resource, TLS keep-alive (one warmed-up connection \
                   per client thread, on the agent's 2 cores); a 201 means committed with fsync. \
                   Throughput: closed loop, median round. Latency: open loop, admission i due at \
                   t0 + i/rate, measured from then. CPU: /proc ticks of the agent, its \
                   store-writer thread, the bench. Then SIGKILL: the store must hold every \
                   admitted session. Reference, in-process: Verifier::verify; Store::commit of a \
                   stored session under a new id + its audit event, from 1 and from N callers",
        "throughput": {
            "clients": clients_n,
            "admissions_per_round": per_round,
            "rounds_per_sec": per_sec,
            "median_per_sec": med,
            "closed_loop_latency_median_round": Stats::of_ms(&rounds[mid].0.latencies).ms_json(),
            "cpu_median_round": rounds[mid].1,
        },
        "paced": {
            "rate_per_sec": RATE,
            "secs": SECS,
            "connections": PACED_CONNECTIONS,
            "admitted": paced.ok,
            "achieved_per_sec": paced.ok as f64 / paced.elapsed.as_secs_f64(),
            "latency_from_scheduled_send": paced_stats.ms_json(),
            "cpu": paced_cpu,
        },
        "reference": alone,
        "errors": errors,
        "first_error": first_error,
        "admitted": admitted,
        "sessions_in_store_after_kill": stored.len(),
        "targets": {
            "min_admissions_per_sec": TARGET_PER_SEC,
            "admissions_per_sec": med,
            "throughput_met": throughput_met && errors == 0,
            "max_p99_ms_at_rate": TARGET_P99_MS,
            "p99_ms_at_rate": p99,
            "latency_met": latency_met && errors == 0,
        },
    });
    let met = |m: bool| if m && errors == 0 { "met" } else { "NOT met" };
    let cpu = |c: &Value| {
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        format!(
            "  CPU per admission: agent {:.0} µs (store writer {:.0} µs), bench clients {:.0} \
             µs; machine {:.0}% busy",
            f("agent_us_per_admission"),
            f("store_writer_us_per_admission"),
            f("bench_clients_us_per_admission"),
            f("machine_busy_percent")
        )
    };
    let rounds_text: Vec<String> = per_sec.iter().map(|v| format!("{v:.0}")).collect();
    println!(
        "throughput: {med:.0} admissions/s median, {} clients (rounds {}; target ≥ \
         {TARGET_PER_SEC}/s: {})\n{}",
        clients_n,
        rounds_text.join(", "),
        met(throughput_met),
        cpu(&rounds[mid].1)
    );
    println!(
        "paced {RATE}/s for {SECS} s: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max \
         {max:.2} ms (target p99 ≤ {TARGET_P99_MS} ms: {})\n{}",
        met(latency_met),
        cpu(&paced_cpu)
    );
    println!(
        "alone: verify {:.0} µs; store commits from 1 caller: p50 {:.2} ms, p99 {:.2} ms, {:.0}/s, \
         {:.0} µs CPU each; from {} callers: {:.0}/s, {:.0} µs CPU each",
        alone.verify_us_mean,
        alone.one_caller_p50_ms,
        alone.one_caller_p99_ms,
        alone.one_caller_commits_per_sec,
        alone.one_caller_cpu_us_per_commit,
        alone.callers,
        alone.concurrent_commits_per_sec,
        alone.concurrent_cpu_us_per_commit,
    );
    println!(
        "errors: {errors} (first: {}); {} of {admitted} admitted sessions in the store after \
         SIGKILL; load {load_before} → {load_after}",
        first_error.as_deref().unwrap_or("none"),
        stored.len()
    );
    args.common.write_report(&report)?;
    if errors > 0 || stored.len() != admitted {
        bail!("admissions failed or were lost: see above");
    }
    Ok(())
}

/// Token verification, and store commits (PutSession + Audit) from one caller and from many,
/// each alone; CPU is this process's (the store's writer thread and the callers).
#[derive(serde::Serialize)]
struct Alone {
    verify_us_mean: f64,
    one_caller_p50_ms: f64,
    /// The disk's fsync tail: an admission may wait for the group before its own.
    one_caller_p99_ms: f64,
    one_caller_commits_per_sec: f64,
    one_caller_cpu_us_per_commit: f64,
    callers: usize,
    concurrent_commits_per_sec: f64,
    concurrent_cpu_us_per_commit: f64,
}

/// CPU time of this process so far (all threads), µs.
fn process_cpu_us() -> f64 {
    process_cpu().as_secs_f64() * 1e6
}

/// Token verification and the store commit, each alone, on the same machine and disk.
fn reference(
    bench: &Bench,
    tokens: &[String],
    template: &Session,
    callers: usize,
) -> anyhow::Result<Alone> {
    let jwks = bench.scratch.dir.join("keys").join(dev::JWKS_FILE);
    let issuer = format!(
        "[[auth.issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\n\
         algorithms = [\"ES256\"]\njwks_file = \"{}\"\n",
        jwks.display()
    );
    let verifier = Verifier::new(&Config::parse(&issuer, Path::new("reference.toml"))?.auth)?;
    let now = now_ms() / 1000;
    let sample = &tokens[..VERIFIES.min(tokens.len())];
    let start = Instant::now();
    for t in sample {
        verifier.verify(t, now).map_err(|e| anyhow!("{e}"))?;
    }
    let verify_us = start.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;

    let store = Store::open(&bench.scratch.dir.join("reference/state.redb"))?;
    let commit = |n: usize| -> anyhow::Result<Vec<Duration>> {
        (0..n)
            .map(|_| {
                let mut session = template.clone();
                session.id = SessionId::random();
                let mut e = AuditEvent::new(AuditKind::SessionAdmitted);
                (e.session, e.source) = (Some(session.id), Some(session.source));
                e.user = Some(session.identity.user().to_owned());
                e.detail = "granted echo".into();
                let t = Instant::now();
                store.commit(vec![Write::PutSession(session.into()), Write::Audit(e)])?;
                Ok(t.elapsed())
            })
            .collect()
    };
    let (start, cpu) = (Instant::now(), process_cpu_us());
    let one = commit(STORE_COMMITS)?;
    let one_per_sec = STORE_COMMITS as f64 / start.elapsed().as_secs_f64();
    let one_cpu = (process_cpu_us() - cpu) / STORE_COMMITS as f64;
    let (start, cpu) = (Instant::now(), process_cpu_us());
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..callers)
            .map(|_| s.spawn(|| commit(STORE_COMMITS)))
            .collect();
        hs.into_iter().try_for_each(|h| h.join().unwrap().map(drop))
    })?;
    let n = (callers * STORE_COMMITS) as f64;
    Ok(Alone {
        verify_us_mean: verify_us,
        one_caller_p50_ms: Stats::of_ms(&one).p50,
        one_caller_p99_ms: Stats::of_ms(&one).p99,
        one_caller_commits_per_sec: one_per_sec,
        one_caller_cpu_us_per_commit: one_cpu,
        callers,
        concurrent_commits_per_sec: n / start.elapsed().as_secs_f64(),
        concurrent_cpu_us_per_commit: (process_cpu_us() - cpu) / n,
    })
}
