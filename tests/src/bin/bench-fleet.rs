//! `cargo xtask bench fleet`: N real agents (each in its own namespaces with its own datapath,
//! small maps) on one NATS JetStream server: a fleet-wide `terminate --user` to each agent's
//! revocation, a policy push to the last agent running it, an agent catching up on 10,000
//! commands it missed before it admits, and the admission rate of a fleet member against a
//! standalone agent in the same run, as JSON.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use flowwarden::{
    admission::client::{Client, Trust},
    api::client::RpcClient,
    audit::{
        AuditQuery,
        event::{AuditEvent, AuditKind},
    },
    fleet::{
        FleetConfig,
        admin::{Admin, connected},
        command::{Action, Envelope, PolicyBundle, Target},
        keys::AdminKey,
    },
};
use flowwarden_tests::{
    admit::{AdmitClient, AdmitOutcome},
    agent_proc::AgentProcess,
    bench::{
        self, BenchArgs, HasBenchArgs, IdleArgs, Knob, Spec, Stats,
        admissions::{admit, drive, mint},
        cpu::{machine_ticks, stat_ticks, ticks_per_sec},
        loadavg,
        stats::median,
    },
    nats::{FleetAdmin, FleetHost, NatsServer},
    privileged::require_root,
    stack::{ADMISSION_PORT, Stack},
};
use serde_json::json;

const POLICY: &str = "[[resource]]\nname = \"echo\"\nprotocol = \"tcp\"\nports = [7000]\n\n\
                      [[rule]]\nname = \"bench\"\ngroups = [\"bench\"]\nresources = [\"echo\"]\n";
const TERMINATE_P99_TARGET_MS: f64 = 50.0;
const PUSH_TARGET_MS: f64 = 1_000.0;
const CATCH_UP_TARGET_MS: f64 = 2_000.0;
const RATE_TARGET: f64 = 0.95;
/// The smallest maps the agent accepts: a fleet member of this bench holds a few sessions.
const SMALL_MAPS: &str = "flow_table_size = 1024\nsession_slots = 1024\n";
/// The two agents whose admission rates are compared hold every admission of their rounds.
const ADMISSION_MAPS: &str = "flow_table_size = 65536\nsession_slots = 65536\n";
const ADMISSION_SLOTS: usize = 65_536;
/// Every admission of the bench comes from one client address per agent: the per-source
/// limiter (20/s by default) is raised out of the way, as in the admission bench.
const LIMITS: &str =
    "rate_per_sec = 1000000\nrate_burst = 1000000\nmax_connections_per_source = 1024\n";
/// The agent's default intervals, in place of the test stack's 100 ms ones: a fleet of idle
/// agents sweeping and watching ten times a second would load the machine for nothing.
const SWEEP: &str = "sweep_interval_ms = 1000\n";
const WATCH: &str = "watch_interval_ms = 250\n";
/// How long the idle fleet's CPU use is sampled once it is up.
const IDLE_SAMPLE: Duration = Duration::from_secs(10);
/// Agents started (and awaited) at once: their eBPF loads share the machine's two cores.
const START_WAVE: usize = 10;
/// How long anything a bench waits for may take before the run is called failed.
const PATIENCE: Duration = Duration::from_secs(120);

const SPEC: Spec = Spec {
    name: "fleet",
    runs: Knob::Means {
        help: "fleet-wide terminations, and policy pushes, timed (each on every agent)",
        default: 10,
    },
    repeat: Knob::Means {
        help: "admissions per rate round (rounds alternate fleet member and standalone agent)",
        // A round of 2,000 lasted 0.3 s, and single rounds of either agent then varied by
        // ±10 % on this 2-vCPU machine, more than the 5 % being measured.
        default: 8000,
    },
};

/// N agents on one NATS server: terminate, policy push, catch-up, and what membership costs.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    #[command(flatten)]
    idle: IdleArgs,
    /// Agents in the fleet, each in its own namespaces with its own datapath.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=1000))]
    agents: u64,
    /// Commands issued while the catching-up agent is down.
    #[arg(long, default_value_t = 10_000)]
    missed: usize,
    /// Times the catch-up is measured (each with `--missed` new commands).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    catch_ups: u64,
    /// Rate rounds per agent (fleet member and standalone, alternating).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rate_rounds: u64,
    /// Admission client threads of the rate rounds, one keep-alive connection each.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

/// The time now, Unix milliseconds with the fraction: the clock the agents' audit events
/// read (`at_ms`), shared on one machine.
fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3
}

/// The admission client of an agent, pinned to its certificate.
fn admit_client(stack: &Stack) -> AdmitClient {
    AdmitClient::new(
        SocketAddr::new(stack.pair.server_addr.into(), ADMISSION_PORT),
        &stack.fingerprint(),
    )
}

/// Admits each token from the stack's client namespace; every one must be admitted.
fn admit_all(stack: &Stack, tokens: &[String]) -> anyhow::Result<()> {
    let client = admit_client(stack);
    let source = stack.pair.client_addr.into();
    stack.pair.client.run(|| {
        for t in tokens {
            match client.admit(source, t) {
                AdmitOutcome::Admitted(_) => {}
                other => bail!("admission refused: {other:?}"),
            }
        }
        Ok(())
    })
}

/// Polls `f` every 2 ms until it answers something, for at most [`PATIENCE`].
fn poll<T>(what: &str, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The agent's audit events matching `q`, newest first.
fn audit(stack: &Stack, q: &AuditQuery) -> anyhow::Result<Vec<AuditEvent>> {
    let mut rpc = RpcClient::connect(&stack.socket)?;
    Ok(rpc.audit_query(q)?)
}

/// When (Unix ms) each host wrote `user`'s termination: its `session_terminated` audit event,
/// stamped right after the revocation's store into the kernel's session table.
fn terminated_at(hosts: &[FleetHost], user: &str) -> anyhow::Result<Vec<u64>> {
    let q = AuditQuery {
        kind: Some("session_terminated".into()),
        user: Some(user.into()),
        limit: Some(10),
        ..AuditQuery::default()
    };
    hosts
        .iter()
        .map(|h| {
            poll(&format!("{user} terminated on {}", h.name), || {
                Ok(audit(&h.stack, &q)?.first().map(|e| e.at_ms))
            })
        })
        .collect()
}

/// When (Unix ms) each host applied command `id`, from its `fleet_command_applied` event,
/// and what it said.
fn applied_at(hosts: &[FleetHost], id: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let q = AuditQuery {
        kind: Some("fleet_command_applied".into()),
        limit: Some(20),
        ..AuditQuery::default()
    };
    hosts
        .iter()
        .map(|h| {
            poll(&format!("command {id} applied on {}", h.name), || {
                Ok(audit(&h.stack, &q)?.into_iter().find_map(|e| match e.kind {
                    AuditKind::FleetCommandApplied {
                        command, outcome, ..
                    } if command == id => Some((e.at_ms, outcome)),
                    _ => None,
                }))
            })
        })
        .collect()
}

/// Publishes a signed command on the control stream and waits for the server to store it;
/// answers the Unix ms just before the publish.
fn publish(
    rt: &tokio::runtime::Runtime,
    admin: &Admin,
    key: &AdminKey,
    target: Target,
    action: Action,
) -> anyhow::Result<(String, f64)> {
    let subject = match &target {
        Target::All => admin.names.control_all(),
        Target::Host(h) => admin.names.control_host(h),
    };
    let envelope =
        Envelope::new(key, target, action).map_err(|e| anyhow!("the random source failed: {e}"))?;
    let signed = envelope.sign(key);
    let t0 = unix_ms();
    rt.block_on(async {
        admin
            .js
            .publish(subject, signed.into())
            .await
            .map_err(|e| anyhow!("publishing the command: {e}"))?
            .await
            .map_err(|e| anyhow!("the server did not store the command: {e}"))
    })?;
    Ok((envelope.id, t0))
}

/// The idle fleet over [`IDLE_SAMPLE`]: how busy the machine was, and the agents' share,
/// in cores.
fn idle_cpu(pids: &[u32]) -> serde_json::Value {
    let agents = || -> u64 {
        pids.iter()
            .map(|p| stat_ticks(Path::new(&format!("/proc/{p}/stat"))))
            .sum()
    };
    let (a0, (busy0, total0)) = (agents(), machine_ticks());
    std::thread::sleep(IDLE_SAMPLE);
    let (a1, (busy1, total1)) = (agents(), machine_ticks());
    let hz = ticks_per_sec();
    let secs = IDLE_SAMPLE.as_secs_f64();
    json!({
        "secs": secs,
        "machine_busy_percent": 100.0 * (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
        "agents_cores": (a1 - a0) as f64 / hz / secs,
        "agent_mean_cpu_percent": 100.0 * (a1 - a0) as f64 / hz / secs / pids.len().max(1) as f64,
    })
}

/// VmRSS of a process, MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// MemAvailable of the machine, MiB.
fn available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    let (runs, per_round) = (args.common.runs(), args.common.repeat());
    let (rounds, clients_n) = (
        usize::try_from(args.rate_rounds)?,
        usize::try_from(args.clients)?,
    );
    if clients_n + rounds * per_round > ADMISSION_SLOTS {
        bail!(
            "--rate-rounds {rounds} × --repeat {per_round} (+ {clients_n} warm-ups) admissions \
             would overflow the measured agents' {ADMISSION_SLOTS} session slots: fewer or \
             smaller rounds"
        );
    }
    let n = usize::try_from(args.agents)?;
    if !require_root("bench-fleet") {
        bail!("the fleet benchmark runs agents in network namespaces: run it as root");
    }
    flowwarden_tests::agent_proc::release_agent()?;
    let _idle = args.idle.idle.hold()?;
    let load_before = loadavg();
    let mem_before = available_mib();

    let nats = NatsServer::single("bfleet")?;
    let admin = FleetAdmin::new("bfleet", vec![nats.url()]);
    let (ok, out) = admin.cli(&["init"]);
    if !ok {
        bail!("fleet init: {out}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let link = rt.block_on(Admin::connect(
        &FleetConfig::for_admin(admin.servers.clone(), admin.prefix.clone()),
        1,
    ))?;
    let key = AdminKey::load(&admin.key)?;

    // The fleet. Host 0 is the member whose admission rate is measured (maps sized for its
    // rounds); the last one is the agent that misses commands.
    eprintln!("starting {n} agents…");
    let started = Instant::now();
    let mut hosts: Vec<FleetHost> = Vec::with_capacity(n);
    for wave in (0..n).collect::<Vec<_>>().chunks(START_WAVE) {
        for &i in wave {
            let h = FleetHost::prepare(
                &admin,
                &format!("bf{i}"),
                POLICY,
                &[nats.port],
                "policy = \"fleet\"",
            );
            h.stack
                .set_in_table("datapath", if i == 0 { ADMISSION_MAPS } else { SMALL_MAPS });
            h.stack.set_in_table("admission", LIMITS);
            h.stack.set_in_table("sessions", SWEEP);
            h.stack.set_in_table("policy", WATCH);
            hosts.push(h);
        }
        for h in &mut hosts[wave[0]..] {
            h.stack.agent = Some(AgentProcess::spawn(&h.stack.pair.server, &h.stack.config));
        }
        for h in &mut hosts[wave[0]..] {
            h.stack.agent_mut().wait_ready(PATIENCE);
        }
        eprintln!("  {} agents ready", hosts.len());
    }
    // The standalone agent: the same config without [fleet].
    let solo = Stack::prepare("bfsolo", POLICY, "", "");
    solo.set_in_table("datapath", ADMISSION_MAPS);
    solo.set_in_table("admission", LIMITS);
    solo.set_in_table("sessions", SWEEP);
    solo.set_in_table("policy", WATCH);
    let mut solo = solo;
    solo.start_agent();
    poll("every host current and connected in the fleet view", || {
        let view = rt.block_on(link.hosts())?;
        Ok((view.len() == n && view.iter().all(|h| h.current && connected(h))).then_some(()))
    })?;
    let start_secs = started.elapsed().as_secs_f64();
    let agent_rss: Vec<f64> = hosts
        .iter()
        .filter_map(|h| h.stack.agent().pid())
        .map(rss_mib)
        .collect();
    let mem_fleet = available_mib();
    let pids: Vec<u32> = hosts.iter().filter_map(|h| h.stack.agent().pid()).collect();
    let idle = idle_cpu(&pids);
    let load_fleet = loadavg();
    eprintln!("fleet of {n} up in {start_secs:.0} s (load {load_fleet})");

    // 1. terminate --user: one user per run, with a live session on every host.
    eprintln!("admitting the terminated users on every host…");
    for h in &hosts {
        admit_all(&h.stack, &mint(&h.stack.keys, "fleet-run", runs)?)
            .with_context(|| format!("admitting on {}", h.name))?;
    }
    let mut terminate_ms = Vec::new();
    let mut terminate_runs = Vec::new();
    let mut view_read_ms = Vec::new();
    for r in 0..runs {
        let user = format!("fleet-run-{r:07}@corp.example");
        // What the CLI does before it publishes: it reads the fleet view (to report who has
        // not answered). Timed apart: the figure counts from the publish.
        let t = Instant::now();
        rt.block_on(link.hosts())?;
        view_read_ms.push(bench::stats::ms(t.elapsed()));
        let action = Action::Call {
            method: "sessions.terminate".into(),
            params: json!({ "user": user }),
        };
        let (_, t0) = publish(&rt, &link, &key, Target::All, action)?;
        let at = terminated_at(&hosts, &user)?;
        let lat: Vec<f64> = at.iter().map(|&a| a as f64 - t0.floor()).collect();
        let s = Stats::of(lat.iter().copied());
        eprintln!(
            "terminate {}/{runs}: p50 {:.0} ms, max {:.0} ms",
            r + 1,
            s.p50,
            s.max
        );
        terminate_runs.push(json!({ "p50_ms": s.p50, "p99_ms": s.p99, "max_ms": s.max }));
        terminate_ms.extend(lat);
    }
    let terminate = Stats::of(terminate_ms.iter().copied());

    // 2. Policy push: version r + 1 on every host (`policy = "fleet"`).
    let mut push_last_ms = Vec::new();
    let mut push_each_ms = Vec::new();
    for r in 0..runs {
        let version = u64::try_from(r)? + 1;
        let mut files = BTreeMap::new();
        files.insert(
            "bench.toml".to_owned(),
            format!("{POLICY}# version {version}\n"),
        );
        let action = Action::Policy(PolicyBundle { version, files });
        let (id, t0) = publish(&rt, &link, &key, Target::All, action)?;
        let at = applied_at(&hosts, &id)?;
        let in_force = format!("version {version} in force");
        if let Some((_, o)) = at.iter().find(|(_, o)| !o.starts_with(&in_force)) {
            bail!("policy version {version} not in force everywhere: {o}");
        }
        let lat: Vec<f64> = at.iter().map(|(a, _)| *a as f64 - t0.floor()).collect();
        let last = lat.iter().copied().fold(f64::NAN, f64::max);
        eprintln!("policy push {}/{runs}: last agent at {last:.0} ms", r + 1);
        push_last_ms.push(last);
        push_each_ms.extend(lat);
    }
    let push_last = Stats::of(push_last_ms.iter().copied());

    // 3. Catch-up: the last host down while `--missed` commands are issued for it, then
    // started; timed from its spawn to its first admission (503 fleet_not_current before).
    let catch_ups = usize::try_from(args.catch_ups)?;
    let mut catch_up_runs = Vec::new();
    let mut catch_up_ms = Vec::new();
    {
        let h = hosts.last_mut().context("no hosts")?;
        let tokens = mint(&h.stack.keys, "catch-up", catch_ups)?;
        let client = admit_client(&h.stack);
        let source = h.stack.pair.client_addr.into();
        for (c, token) in tokens.iter().enumerate() {
            h.stack.agent_mut().kill9();
            let t = Instant::now();
            let target = Target::Host(h.name.clone());
            let mut envelopes = Vec::with_capacity(args.missed);
            for j in 0..args.missed {
                let action = Action::Call {
                    method: "sessions.terminate".into(),
                    params: json!({ "user": format!("missed-{c}-{j:05}@corp.example") }),
                };
                let envelope = Envelope::new(&key, target.clone(), action)
                    .map_err(|e| anyhow!("the random source failed: {e}"))?;
                envelopes.push(envelope.sign(&key));
            }
            let subject = link.names.control_host(&h.name);
            rt.block_on(async {
                for chunk in envelopes.chunks(500) {
                    let mut acks = Vec::with_capacity(chunk.len());
                    for e in chunk {
                        acks.push(
                            link.js
                                .publish(subject.clone(), e.clone().into())
                                .await
                                .map_err(|e| anyhow!("publishing: {e}"))?,
                        );
                    }
                    for a in acks {
                        a.await.map_err(|e| anyhow!("not stored: {e}"))?;
                    }
                }
                anyhow::Ok(())
            })?;
            let publish_secs = t.elapsed().as_secs_f64();
            let spawned = Instant::now();
            h.stack.agent = Some(AgentProcess::spawn(&h.stack.pair.server, &h.stack.config));
            let (first_answer, admitted, held) = h.stack.pair.client.run(|| {
                let mut first_answer = None;
                let mut held = 0usize;
                let deadline = spawned + PATIENCE;
                loop {
                    match client.admit(source, token) {
                        AdmitOutcome::Admitted(_) => {
                            return Ok((first_answer, spawned.elapsed(), held));
                        }
                        AdmitOutcome::Refused { status: 503, .. } => {
                            first_answer.get_or_insert(spawned.elapsed());
                            held += 1;
                        }
                        AdmitOutcome::Refused { status, body } => {
                            bail!("admission refused with {status}: {body}")
                        }
                        AdmitOutcome::NoAnswer(_) => {}
                    }
                    if Instant::now() > deadline {
                        bail!("not admitting within {PATIENCE:?}");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })?;
            let agent_cpu_ms = h.stack.agent().pid().map_or(f64::NAN, |pid| {
                stat_ticks(Path::new(&format!("/proc/{pid}/stat"))) as f64 * 1e3 / ticks_per_sec()
            });
            let status = h.fleet_status();
            let applied = status["commands_applied"].as_u64().unwrap_or(0);
            if applied < args.missed as u64 {
                bail!(
                    "admitted after applying {applied} of {} missed commands: {status}",
                    args.missed
                );
            }
            let ms = bench::stats::ms(admitted);
            eprintln!(
                "catch-up {}/{catch_ups}: admitting {ms:.0} ms after spawn ({held} admissions \
                 held meanwhile)",
                c + 1
            );
            catch_up_ms.push(ms);
            catch_up_runs.push(json!({
                "published_in_secs": publish_secs,
                "first_answer_ms": first_answer.map(bench::stats::ms),
                "admitting_ms": ms,
                "admissions_held": held,
                "agent_cpu_ms_until_admitting": agent_cpu_ms,
                "commands_applied": applied,
            }));
        }
    }
    let catch_up = Stats::of(catch_up_ms.iter().copied());

    // 4. Admission rate: host 0 (a fleet member) against the standalone agent, rounds
    // alternating, the rest of the fleet idle in the background.
    let measured = [(&hosts[0].stack, "fleet"), (&solo, "standalone")];
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut prepared = Vec::new();
    for (stack, name) in measured {
        let tokens = mint(
            &stack.keys,
            &format!("rate-{name}"),
            clients_n + rounds * per_round,
        )?;
        let addr = format!("{}:{ADMISSION_PORT}", stack.pair.server_addr);
        let trust = Trust::Fingerprint(stack.fingerprint());
        let clients = stack.pair.client.run(|| -> anyhow::Result<Vec<Client>> {
            let clients: Vec<Client> = (0..clients_n)
                .map(|_| Client::new(&addr, &trust))
                .collect::<Result<_, _>>()?;
            for (c, t) in clients.iter().zip(&tokens) {
                admit(c, t).map_err(|e| anyhow!("warm-up admission on {name}: {e}"))?;
            }
            Ok(clients)
        })?;
        prepared.push((stack, name, clients, tokens));
    }
    for r in 0..rounds {
        for (stack, name, clients, tokens) in &prepared {
            let from = clients_n + r * per_round;
            let chunk = &tokens[from..from + per_round];
            let out = stack.pair.client.run(|| drive(clients, chunk, None));
            errors += out.errors;
            first_error = first_error.or(out.first_error.clone());
            eprintln!(
                "rate round {}/{rounds} {name}: {:.0} admissions/s",
                r + 1,
                out.per_sec()
            );
            rates.entry(name).or_default().push(out.per_sec());
        }
    }
    let (fleet_rate, solo_rate) = (median(&rates["fleet"]), median(&rates["standalone"]));
    let ratio = fleet_rate / solo_rate;
    let load_after = loadavg();

    let mut machine = bench::machine();
    machine["idle"] = args.idle.idle.describe();
    let report = json!({
        "benchmark": "fleet",
        "date": bench::utc_date(),
        "machine": machine,
        "loadavg_before": load_before,
        "loadavg_fleet_up": load_fleet,
        "loadavg_after": load_after,
        "method": "release agents, each in its own netns pair with its own datapath (TC on its \
                   veth; flow_table_size and session_slots 1024), state on the local disk, all \
                   joined over a veth to one nats-server (JetStream, file storage) on this \
                   machine, `policy = \"fleet\"`. Times are Unix ms on the one machine clock: \
                   t0 is taken just before the signed command is published on the control \
                   stream (the CLI first reads the fleet view: timed apart as view_read); an \
                   agent's time is the at_ms of its own audit event (ms resolution, so ±1 ms): \
                   for a termination `session_terminated`, stamped right after the revocation's \
                   store into the kernel's session table; for a push, `fleet_command_applied`, \
                   stamped after the bundle was swapped in and reloaded. Catch-up: the last \
                   agent SIGKILLed, `missed` terminate --user commands for it published (stored \
                   by the server), then spawned; time from spawn to its first 201 admission, \
                   polled every 2 ms from its client namespace (503 fleet_not_current before). \
                   Rate: closed loop over TLS keep-alive, distinct ES256 tokens, fleet member \
                   (host 0) and standalone agent with the same config but [fleet], rounds \
                   alternating, the rest of the fleet running",
        "agents": n,
        "fleet_start": {
            "secs": start_secs,
            "agent_rss_mib": Stats::of(agent_rss.iter().copied()),
            "agents_rss_total_mib": agent_rss.iter().sum::<f64>(),
            "mem_available_mib_before": mem_before,
            "mem_available_mib_fleet_up": mem_fleet,
            "idle_cpu": idle,
        },
        "terminate_user": {
            "runs": runs,
            "map_write_after_publish": terminate.ms_json(),
            "per_run": terminate_runs,
            "view_read": Stats::of(view_read_ms.iter().copied()).ms_json(),
        },
        "policy_push": {
            "runs": runs,
            "last_agent_after_publish": push_last.ms_json(),
            "each_agent_after_publish": Stats::of(push_each_ms.iter().copied()).ms_json(),
        },
        "catch_up": {
            "missed": args.missed,
            "runs": catch_up_runs,
            "admitting_after_spawn": catch_up.ms_json(),
        },
        "admission_rate": {
            "admissions_per_round": per_round,
            "clients": clients_n,
            "rounds_per_sec": rates,
            "fleet_median_per_sec": fleet_rate,
            "standalone_median_per_sec": solo_rate,
            "ratio": ratio,
            "errors": errors,
            "first_error": first_error,
        },
        "targets": {
            "terminate_p99_ms": terminate.p99,
            "terminate_max_p99_ms": TERMINATE_P99_TARGET_MS,
            "terminate_met": terminate.p99 <= TERMINATE_P99_TARGET_MS,
            "push_last_agent_max_ms": push_last.max,
            "push_target_ms": PUSH_TARGET_MS,
            "push_met": push_last.max <= PUSH_TARGET_MS,
            "catch_up_max_ms": catch_up.max,
            "catch_up_target_ms": CATCH_UP_TARGET_MS,
            "catch_up_met": catch_up.max <= CATCH_UP_TARGET_MS,
            "rate_ratio": ratio,
            "rate_min_ratio": RATE_TARGET,
            "rate_met": ratio >= RATE_TARGET && errors == 0,
        },
    });
    let met = |m: bool| if m { "met" } else { "NOT met" };
    println!(
        "{n} agents up in {start_secs:.0} s; agent RSS p50 {:.0} MiB; idle fleet: machine \
         {:.0}% busy, agents {:.2} cores; load {load_fleet}",
        Stats::of(agent_rss.iter().copied()).p50,
        idle["machine_busy_percent"].as_f64().unwrap_or(f64::NAN),
        idle["agents_cores"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "terminate --user → each agent's revocation: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
         over {} agent-runs (target p99 ≤ {TERMINATE_P99_TARGET_MS} ms: {}); the CLI's view \
         read before it publishes: p50 {:.0} ms",
        terminate.p50,
        terminate.p99,
        terminate.max,
        terminate.n,
        met(terminate.p99 <= TERMINATE_P99_TARGET_MS),
        Stats::of(view_read_ms.iter().copied()).p50
    );
    println!(
        "policy push → last agent running it: p50 {:.0} ms, max {:.0} ms over {runs} pushes \
         (target ≤ {PUSH_TARGET_MS} ms: {})",
        push_last.p50,
        push_last.max,
        met(push_last.max <= PUSH_TARGET_MS)
    );
    println!(
        "catch-up on {} missed commands → admitting: p50 {:.0} ms, max {:.0} ms after spawn \
         (target ≤ {CATCH_UP_TARGET_MS} ms: {})",
        args.missed,
        catch_up.p50,
        catch_up.max,
        met(catch_up.max <= CATCH_UP_TARGET_MS)
    );
    println!(
        "admissions/s: fleet member {fleet_rate:.0}, standalone {solo_rate:.0}, ratio {ratio:.3} \
         (target ≥ {RATE_TARGET}: {}); errors {errors}; load {load_before} → {load_after}",
        met(ratio >= RATE_TARGET && errors == 0)
    );
    args.common.write_report(&report)?;
    Ok(())
}
