//! `cargo xtask bench scale`: `sessions.list` as the status socket answers it (through the
//! socket), with 100,000 sessions in the table and 1,000,000 flows in the kernel's flow map,
//! with and without filters; the flow walks it rests on; and the memory the agent holds
//! meanwhile (peak above resting per query); as JSON.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flowwarden::{
    api::{
        core::{AgentInfo, Core},
        jsonrpc::Call,
        peer::{Access, AccessPolicy, Peer},
        transport::{Caller, Handler as _, Reply, SocketOptions, serve},
    },
    audit::event::{AuditEvent, AuditKind},
    config::SessionsConfig,
    datapath::{FLOW_CHUNK, Flow, FlowKey, Walk, addr_bytes, maps_dir, monotonic_ns},
    identity::Identity,
    sessions::{Target, model::SessionId},
};
use flowwarden_tests::{
    bench::{
        self, BenchArgs, HasBenchArgs, IdleArgs, Knob, Spec, Stats, bench_identity, bench_source,
        bench_user, command_output, cpu_model, inproc::InProcessAgent, loadavg, memory,
    },
    privileged,
};
use serde_json::{Value, json};

/// "Well under a second" for a filtered list; the issue gives no sharper figure.
const TARGET_FILTERED_P99_MS: f64 = 500.0;
/// Issue 13: an unfiltered `sessions.list` of 100,000 sessions.
const TARGET_UNFILTERED_MS: f64 = 500.0;
const TARGET_UNFILTERED_PEAK_MIB: f64 = 64.0;
/// The sessions issue's memory target with 100,000 sessions.
const TARGET_RSS_MIB: f64 = 256.0;
/// Every this many sessions is in the `ops` group too (granted `admin`), and every this many
/// (offset by half) is terminated: the selective filters pick 1 % of the table each.
const EVERY: usize = 100;
/// Answers with more rows than this take seconds; they get HEAVY_CALLS timed calls.
const HEAVY_ROWS: usize = 10_000;
const HEAVY_CALLS: usize = 5;
/// Sessions terminated one by one at the end, with every flow still resident: enough calls
/// for a p99 that is not just the maximum of a handful.
const TERMINATIONS: usize = 200;
/// Sessions whose flows are looked up through the flow index and by a full walk (the way
/// before it), compared, and timed.
const WALK_COMPARISONS: usize = 3;
/// Issue 13, P7: one termination among 1,000,000 flows and 100,000 sessions, call to answer,
/// and call to its revocation being in the kernel.
const TARGET_TERMINATE_P99_MS: f64 = 5.0;
const TARGET_REVOKED_P99_MS: f64 = 1.0;

const POLICY: &str = "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
                      [[resource]]\nname = \"web\"\nprotocol = \"tcp\"\nports = [443]\n\n\
                      [[resource]]\nname = \"admin\"\nprotocol = \"tcp\"\nports = [8443]\n\n\
                      [[rule]]\nname = \"staff\"\ngroups = [\"bench\"]\n\
                      resources = [\"ssh\", \"web\"]\n\n\
                      [[rule]]\nname = \"ops\"\ngroups = [\"ops\"]\nresources = [\"admin\"]\n";

const SPEC: Spec = Spec {
    name: "scale",
    runs: Knob::Ignored("one run (use --repeat for calls per filter)"),
    repeat: Knob::Means {
        help: "Timed calls per filter (at most 5 for answers of more than 10,000 rows)",
        default: 20,
    },
};

/// `sessions.list`, one session's flows and termination with a large table, in-process.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    #[command(flatten)]
    idle: IdleArgs,
    /// Sessions in the table (fewer if the kernel's grant map cannot hold their grants).
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Flows written into the kernel's flow table, spread over the sessions.
    #[arg(long, default_value_t = 1_000_000)]
    flows: usize,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

/// Synthetic user `i`, in `ops` for every hundredth.
fn identity(i: usize, now: u64) -> Identity {
    let ops: &[&str] = if i.is_multiple_of(EVERY) {
        &["ops"]
    } else {
        &[]
    };
    bench_identity(i, now, ops)
}

/// Resets VmHWM to the current RSS (Linux 4.0+), so the next peak is one phase's own.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU time of the calling thread: what a call cost whatever else the machine ran.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank quantiles of durations, in ms (the shared [`Stats`]).
fn quantiles(v: Vec<Duration>) -> Value {
    Stats::of_ms(&v).ms_json()
}

/// CLOCK_MONOTONIC_COARSE, the kernel programs' clock for flow stamps.
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The flow table the run needs: the agent's default, or the next power of two that holds
/// every flow (the kernel rounds its buckets up to one anyway).
fn table_size(flows: usize) -> u32 {
    let needed = u32::try_from(flows.next_power_of_two()).unwrap_or(u32::MAX);
    needed.max(agent_common::map_sizes::FLOWS)
}

/// What the kernel charges for a map (`memlock` in its fdinfo), MiB.
fn map_memlock_mib(pin_dir: &std::path::Path, name: &str) -> f64 {
    let Ok(data) = aya::maps::MapData::from_pin(maps_dir(pin_dir).join(name)) else {
        return f64::NAN;
    };
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = data.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |b| b / (1024.0 * 1024.0))
}

/// One call over a fresh connection to the status socket, as the CLI makes it: the bytes of
/// the answer line, read in 64 KiB pieces and kept only when `keep` (to check and count the
/// rows once, outside the measured calls).
fn call_socket(
    socket: &Path,
    method: &str,
    params: &Value,
    keep: bool,
) -> anyhow::Result<(usize, Option<Vec<u8>>)> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut kept) = (0usize, keep.then(Vec::new));
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("{method}: the agent closed after {total} bytes without ending the line");
        }
        total += n;
        if let Some(kept) = &mut kept {
            kept.extend_from_slice(&buf[..n]);
        }
        if buf[n - 1] == b'\n' {
            return Ok((total, kept));
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    if args.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    if !privileged::require_root("bench-scale") {
        bail!("the scale benchmark loads BPF maps: run it as root");
    }
    let _idle = args.idle.idle.hold()?;
    let load_before = loadavg();
    let flow_table = table_size(args.flows);
    let agent = InProcessAgent::start("bscale", POLICY, flow_table)?;
    let InProcessAgent {
        rt,
        sessions,
        enforcer,
        policy,
        pins,
        ..
    } = &agent;
    let flow_table_mib = map_memlock_mib(&pins.0, agent_common::map_names::FLOWS);
    let grant_capacity = agent_common::map_sizes::GRANTS as usize;
    // Up to three grants per session (every hundredth has admin) must fit the grant map.
    let n = args.sessions.min(grant_capacity * EVERY / (2 * EVERY + 1));
    if n < args.sessions {
        eprintln!(
            "the kernel grant map holds {grant_capacity} entries: measuring {n} sessions, not {}",
            args.sessions
        );
    }
    let ssh = policy.current().resources.by_name("ssh").context("ssh")?.id;
    let (rss_empty, _) = memory();

    eprintln!("admitting {n} sessions…");
    let admit_secs = agent.admit_many(n, identity)?.as_secs_f64();
    // One session in a hundred terminated, so `state = terminated` has something to find.
    let by_source: std::collections::HashMap<IpAddr, SessionId> =
        sessions.all().iter().map(|s| (s.source, s.id)).collect();
    let doomed: Vec<SessionId> = (EVERY / 2..n)
        .step_by(EVERY)
        .map(|i| by_source[&bench_source(i)])
        .collect();
    let terminated = rt
        .block_on(sessions.terminate(&Target::Sessions(doomed), "bench", "scale benchmark"))?
        .len();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: malloc_trim only hands free memory back to the system.
    unsafe { libc::malloc_trim(0) };
    let (rss_sessions, _) = memory();

    // The flows: spread evenly over the sessions, each from its session's source to ssh.
    eprintln!("inserting {} flows into the kernel flow map…", args.flows);
    let ids: Vec<(SessionId, IpAddr)> = (0..n)
        .map(|i| (by_source[&bench_source(i)], bench_source(i)))
        .collect();
    let mono = monotonic_coarse_ns();
    let started = Instant::now();
    let mut inserted = 0usize;
    let mut insert_error = None;
    {
        for j in 0..args.flows {
            let (id, src) = ids[j % n];
            let key = FlowKey {
                src: addr_bytes(src),
                dst: addr_bytes(Ipv4Addr::new(10, 255, 0, 1).into()),
                sport: 1024 + u16::try_from(j / n).unwrap_or(u16::MAX - 1024),
                dport: 22,
                proto: agent_common::IPPROTO_TCP,
                _pad: [0; 3],
            };
            let flow = Flow {
                session_id: id.0,
                resource_id: ssh,
                created_ns: mono,
                last_seen_ns: mono,
                rx_packets: 10 + j as u64 % 7,
                rx_bytes: 1_500 * (10 + j as u64 % 7),
                tx_packets: 8,
                tx_bytes: 12_000,
                ..Flow::default()
            };
            if let Err(e) = enforcer.insert_flow(key, flow) {
                insert_error = Some(format!("flow {j}: {e}"));
                break;
            }
            inserted += 1;
        }
    }
    let insert_secs = started.elapsed().as_secs_f64();
    if let Some(e) = &insert_error {
        eprintln!("stopped at {inserted} flows: {e}");
    }
    std::thread::sleep(Duration::from_millis(100));
    let (rss_flows, _) = memory();
    // Terminated sessions' flows were inserted too; the index must not have them yet.
    let indexed_before_walk = enforcer.indexed_flows();

    // The walks `sessions.list` rests on, alone: batched (what the agent now does), key by
    // key (what it did), and the aggregation into per-session traffic.
    eprintln!("timing the flow walks…");
    let mut batched = Vec::new();
    let mut walks = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut count = 0usize;
        walks.push(enforcer.for_each_flow_in_chunks(FLOW_CHUNK, |_, _| count += 1));
        batched.push(t.elapsed());
        if count != inserted {
            bail!("the batched walk saw {count} flows of {inserted}");
        }
    }
    let walk = walks.pop().unwrap_or(Walk::Failed);
    let key_by_key = {
        let path = maps_dir(&pins.0).join(agent_common::map_names::FLOWS);
        let map: aya::maps::HashMap<aya::maps::MapData, FlowKey, Flow> =
            aya::maps::Map::HashMap(aya::maps::MapData::from_pin(path)?).try_into()?;
        let t = Instant::now();
        let count = map.iter().filter_map(Result::ok).count();
        let d = t.elapsed();
        if count != inserted {
            bail!("the key-by-key walk saw {count} flows of {inserted}");
        }
        d
    };
    let mut aggregate = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let census = enforcer.census();
        aggregate.push(t.elapsed());
        if census.traffic.len() != n.min(inserted) || census.flows != inserted {
            bail!(
                "a census of {} flows of {} sessions, expected {inserted} of {}",
                census.flows,
                census.traffic.len(),
                n.min(inserted)
            );
        }
    }

    // The census walks above taught the flow index every flow (the bench writes flows
    // straight into the map: no flow-opened events). What it costs in memory:
    std::thread::sleep(Duration::from_millis(100));
    let (rss_indexed, _) = memory();
    let indexed = enforcer.indexed_flows();
    let indexed_bytes = enforcer.indexed_bytes();
    if indexed != inserted {
        bail!("the flow index holds {indexed} flows after a census of {inserted}");
    }

    // The agent sweeps every second (the default): expiry, idle flows, dormancy, and the
    // census of the flow table that reads of a large table reuse. The queries run with it.
    let sweep_every = Duration::from_millis(SessionsConfig::default().sweep_interval_ms);
    let sweeps = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sweeper = {
        let (sessions, sweeps) = (Arc::clone(sessions), Arc::clone(&sweeps));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            loop {
                tick.tick().await;
                let (t, cpu) = (Instant::now(), thread_cpu());
                if let Err(e) = sessions.sweep().await {
                    eprintln!("sweep failed: {e}");
                }
                sweeps
                    .lock()
                    .unwrap()
                    .push((t.elapsed(), thread_cpu().saturating_sub(cpu)));
            }
        })
    };
    std::thread::sleep(sweep_every * 2);

    // The status socket's core, called as the transport calls it, with the line it would
    // write (the JSON-RPC response) encoded too.
    let core = Core {
        sessions: Arc::clone(sessions),
        enforcer: Arc::clone(enforcer),
        policy: Arc::clone(policy),
        info: AgentInfo {
            interfaces: Vec::new(),
            ingress: Vec::new(),
            pin_dir: pins.0.display().to_string(),
            admission_listen: "127.0.0.1:7443".into(),
            admission_fingerprint: String::new(),
            started: Instant::now(),
            groups: Default::default(),
            fleet: None,
        },
    };
    let caller = || Caller {
        peer: Peer {
            pid: std::process::id() as i32,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        },
        access: Access::Read,
    };
    let pick = n / 2 + 1;
    let queries: Vec<(&str, &str, Value)> = vec![
        (
            "sessions.list",
            "user (1 match)",
            json!({"user": bench_user(pick)}),
        ),
        (
            "sessions.list",
            "source (1 match)",
            json!({"source": bench_source(pick)}),
        ),
        (
            "sessions.list",
            "resource admin (1 %)",
            json!({"resource": "admin"}),
        ),
        (
            "sessions.list",
            "state terminated (1 %)",
            json!({"state": "terminated"}),
        ),
        (
            "sessions.list",
            "user, no match",
            json!({"user": "nobody@corp.example"}),
        ),
        (
            "sessions.list",
            "state active (99 %)",
            json!({"state": "active"}),
        ),
        ("sessions.list", "none (all sessions)", json!({})),
        (
            "flows.list",
            "one session",
            json!({"session": ids[pick].0.to_string()}),
        ),
        ("status", "flow table fill", json!({})),
    ];
    // The same core, served on a socket as the agent serves it.
    let socket = agent.scratch.dir.join("bench.sock");
    let server = rt.spawn(serve(
        SocketOptions::new(&socket),
        AccessPolicy::from_names("", "")?,
        Arc::new(Core {
            sessions: Arc::clone(&core.sessions),
            enforcer: Arc::clone(&core.enforcer),
            policy: Arc::clone(&core.policy),
            info: core.info.clone(),
        }),
    ));
    while UnixStream::connect(&socket).is_err() {
        if server.is_finished() {
            bail!("the status socket did not start: {:?}", rt.block_on(server));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut results = Vec::new();
    for (method, label, params) in queries {
        eprintln!("{method} {label}…");
        let once = || -> anyhow::Result<(Duration, Duration, usize)> {
            let (t, cpu) = (Instant::now(), thread_cpu());
            let (bytes, _) = call_socket(&socket, method, &params, false)?;
            Ok((t.elapsed(), thread_cpu() - cpu, bytes))
        };
        // The warm-up call keeps its answer, to check it and count its rows.
        let (_, Some(line)) = call_socket(&socket, method, &params, true)? else {
            bail!("{method} {label}: no answer kept");
        };
        let answer: Value = serde_json::from_slice(&line)
            .with_context(|| format!("{method} {label}: the answer is not one JSON line"))?;
        if let Some(e) = answer.get("error") {
            bail!("{method} {label}: {e}");
        }
        let warm_rows = answer["result"].as_array().map_or(1, Vec::len);
        drop((line, answer));
        // Whole-table answers take seconds each: fewer calls of those.
        let calls = if warm_rows > HEAVY_ROWS {
            args.common.repeat().min(HEAVY_CALLS)
        } else {
            args.common.repeat()
        };
        // SAFETY: malloc_trim only hands free memory back to the system.
        unsafe { libc::malloc_trim(0) };
        reset_peak();
        let (rss_before, _) = memory();
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        let (rows, mut bytes) = (warm_rows, 0);
        for _ in 0..calls {
            let (d, c, b) = once()?;
            wall.push(d);
            cpu.push(c);
            bytes = b;
        }
        let (_, peak) = memory();
        let w = quantiles(wall);
        println!(
            "{method:<13} {label:<24} {rows:>7} rows {:>10.1} KiB: p50 {:>8.2} ms, p99 {:>8.2} ms; \
             peak RSS +{:.0} MiB",
            bytes as f64 / 1024.0,
            w["p50_ms"].as_f64().unwrap_or(f64::NAN),
            w["p99_ms"].as_f64().unwrap_or(f64::NAN),
            peak - rss_before
        );
        results.push(json!({
            "method": method,
            "filter": label,
            "params": params,
            "rows": rows,
            "response_bytes": bytes,
            "wall": w,
            "thread_cpu": quantiles(cpu),
            "rss_before_mib": rss_before,
            "peak_rss_during_mib": peak,
            "peak_rss_above_resting_mib": peak - rss_before,
        }));
    }
    // One session's flows: through the flow index (what terminate and `Enforcer::session_flows`
    // use now) and through a full walk (what both did before), in the same run.
    eprintln!("one session's flows: index vs full walk…");
    let mut by_index = Vec::new();
    let mut by_walk = Vec::new();
    // Live sessions after `pick` (the ones terminated at the start are skipped): the last few
    // for the comparison, the others terminated below.
    let live_after_pick: Vec<usize> = (pick + 1..n)
        .filter(|i| i % EVERY != EVERY / 2)
        .take(TERMINATIONS + WALK_COMPARISONS)
        .collect();
    if live_after_pick.len() < TERMINATIONS + WALK_COMPARISONS {
        bail!("too few sessions for {TERMINATIONS} terminations: use more --sessions");
    }
    for &i in &live_after_pick[TERMINATIONS..] {
        let id = ids[i].0;
        let t = Instant::now();
        let mut indexed = enforcer.session_flows(id);
        by_index.push(t.elapsed());
        let t = Instant::now();
        let mut walked = enforcer.flows_where(|f| f.session_id == id.0);
        by_walk.push(t.elapsed());
        indexed.sort_by_key(|(k, _)| (k.src, k.sport));
        walked.sort_by_key(|(k, _)| (k.src, k.sport));
        let keys = |v: &[(FlowKey, Flow)]| v.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        if keys(&indexed) != keys(&walked) || walked.is_empty() {
            bail!(
                "session {id}: the flow index gives {} flows, a full walk {}",
                indexed.len(),
                walked.len()
            );
        }
    }
    let (by_index, by_walk) = (quantiles(by_index), quantiles(by_walk));
    println!(
        "one session's flows: flow index p50 {:.3} ms, full walk p50 {:.0} ms",
        by_index["p50_ms"].as_f64().unwrap_or(f64::NAN),
        by_walk["p50_ms"].as_f64().unwrap_or(f64::NAN)
    );

    // Terminations, one session at a time as an operator would, with every flow resident and
    // the sweep running. Besides call to answer: call to the session's revocation being in
    // the kernel, seen by a thread that polls for it from just before the call.
    eprintln!("sessions.terminate, one session each, {TERMINATIONS} times…");
    let mut terminations = Vec::new();
    let mut revoked_after = Vec::new();
    let mut written_after = Vec::new();
    for &i in &live_after_pick[..TERMINATIONS] {
        let id = ids[i].0;
        let call = Call {
            id: json!(1),
            method: "sessions.terminate".into(),
            params: json!({"ids": [id.to_string()]}),
        };
        let admin = Caller {
            access: Access::Admin,
            ..caller()
        };
        let polling = std::sync::Barrier::new(2);
        let (took, seen) = std::thread::scope(|scope| {
            let poller = scope.spawn(|| {
                polling.wait();
                loop {
                    if enforcer.revocation(id).is_some() {
                        return Instant::now();
                    }
                    std::thread::yield_now();
                }
            });
            polling.wait();
            let t = Instant::now();
            let t_mono = monotonic_ns();
            let answer = rt
                .block_on(core.handle(call, admin))
                .and_then(Reply::into_value);
            let took = t.elapsed();
            let seen = poller.join().expect("revocation poller");
            // The revocation's own stamp (CLOCK_MONOTONIC when the agent wrote it): the write
            // itself, without the poller's scheduling delay on a loaded machine.
            if let Some(r) = enforcer.revocation(id) {
                written_after.push(Duration::from_nanos(r.revoked_at_ns.saturating_sub(t_mono)));
            }
            answer
                .map_err(|e| anyhow::anyhow!("sessions.terminate: {}", e.message))
                .and_then(|value| {
                    if value["count"] == 1 {
                        Ok((took, seen.saturating_duration_since(t)))
                    } else {
                        Err(anyhow::anyhow!(
                            "terminating one session ended {}",
                            value["count"]
                        ))
                    }
                })
        })?;
        terminations.push(took);
        revoked_after.push(seen);
    }
    let written_after = quantiles(written_after);
    // What the termination's answer waits for besides its own work: one durable commit of
    // the store (its fsync), alone, in the same conditions (sweep running, flows resident).
    eprintln!("durable commits alone, {TERMINATIONS} times…");
    let mut commits = Vec::new();
    for i in 0..TERMINATIONS {
        let mut e = AuditEvent::new(AuditKind::AdmissionDenied {
            reason: "bench: one durable commit".into(),
        });
        e.detail = format!("commit {i}");
        let t = Instant::now();
        rt.block_on(sessions.record(vec![e]))?;
        commits.push(t.elapsed());
    }
    let commits = quantiles(commits);
    let terminations = quantiles(terminations);
    let revoked_after = quantiles(revoked_after);
    let terminate_p99 = terminations["p99_ms"].as_f64().unwrap_or(f64::NAN);
    // The target is the write being reached (its own stamp); the poller's figure adds the
    // time another thread takes to be scheduled and see it.
    let revoked_p99 = written_after["p99_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "sessions.terminate, one session ({TERMINATIONS} calls): p50 {:.2} ms, p99 \
         {terminate_p99:.2} ms (target ≤ {TARGET_TERMINATE_P99_MS} ms); revocation written \
         after p50 {:.3} ms, p99 {revoked_p99:.3} ms (target ≤ {TARGET_REVOKED_P99_MS} ms), \
         seen by a polling thread after p50 {:.3} ms, p99 {:.3} ms",
        terminations["p50_ms"].as_f64().unwrap_or(f64::NAN),
        written_after["p50_ms"].as_f64().unwrap_or(f64::NAN),
        revoked_after["p50_ms"].as_f64().unwrap_or(f64::NAN),
        revoked_after["p99_ms"].as_f64().unwrap_or(f64::NAN),
    );
    sweeper.abort();
    server.abort();
    let load_after = loadavg();
    let (rss_end, _) = memory();
    let (sweep_wall, sweep_cpu): (Vec<Duration>, Vec<Duration>) =
        sweeps.lock().unwrap().iter().copied().unzip();
    let sweep_count = sweep_wall.len();
    let (sweep_wall, sweep_cpu) = (quantiles(sweep_wall), quantiles(sweep_cpu));

    let filtered_p99 = results
        .iter()
        .filter(|r| r["method"] == "sessions.list" && r["params"] != json!({}))
        .filter(|r| r["rows"].as_u64().unwrap_or(0) <= (n / 50) as u64)
        .map(|r| r["wall"]["p99_ms"].as_f64().unwrap_or(f64::NAN))
        .fold(0.0_f64, f64::max);
    let unfiltered = results
        .iter()
        .find(|r| r["method"] == "sessions.list" && r["params"] == json!({}))
        .cloned()
        .unwrap_or(Value::Null);
    let complete = n == args.sessions && inserted == args.flows;
    let unfiltered_met = complete
        && unfiltered["wall"]["p50_ms"]
            .as_f64()
            .is_some_and(|v| v <= TARGET_UNFILTERED_MS)
        && unfiltered["peak_rss_above_resting_mib"]
            .as_f64()
            .is_some_and(|v| v <= TARGET_UNFILTERED_PEAK_MIB);
    let batched_q = quantiles(batched);
    let aggregate_q = quantiles(aggregate);
    let targets = json!({
        "max_filtered_list_p99_ms": TARGET_FILTERED_P99_MS,
        "filtered_list_p99_ms": filtered_p99,
        "filtered_list_met": filtered_p99 <= TARGET_FILTERED_P99_MS && complete,
        "max_rss_mib": TARGET_RSS_MIB,
        "rss_mib": rss_flows,
        "rss_met": rss_flows <= TARGET_RSS_MIB && complete,
        "rss_with_flow_index_mib": rss_indexed,
        "max_unfiltered_list_ms": TARGET_UNFILTERED_MS,
        "unfiltered_list_p50_ms": unfiltered["wall"]["p50_ms"],
        "max_unfiltered_list_peak_above_resting_mib": TARGET_UNFILTERED_PEAK_MIB,
        "unfiltered_list_peak_above_resting_mib": unfiltered["peak_rss_above_resting_mib"],
        "unfiltered_list_met": unfiltered_met,
        "max_terminate_p99_ms": TARGET_TERMINATE_P99_MS,
        "terminate_p99_ms": terminate_p99,
        "terminate_met": terminate_p99 <= TARGET_TERMINATE_P99_MS && complete,
        "max_revoked_p99_ms": TARGET_REVOKED_P99_MS,
        "revoked_p99_ms": revoked_p99,
        "revoked_met": revoked_p99 <= TARGET_REVOKED_P99_MS && complete,
    });
    let report = json!({
        "benchmark": "scale",
        "date": command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "machine": {
            "kernel": command_output("uname", &["-r"]),
            "cpu": cpu_model(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "idle": args.idle.idle.describe(),
        },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "method": "in-process, the agent's library as the agent wires it: a private datapath \
                   (pinned maps, no interface attached) with a flow table sized for the flows, \
                   a redb store on the local disk, Enforcer, Audit, PolicyHandle, Sessions, a \
                   2-worker tokio runtime, and the status socket's Core served on a Unix socket by the \
                   agent's transport (transport::serve); each call is a fresh connection as \
                   the CLI makes one, timed from the request to the answer's newline, the \
                   answer read in 64 KiB pieces and not kept. Sessions admitted with \
                   Sessions::admit from 512 tasks (distinct IPv4 sources; every 100th in group \
                   ops, granted admin; every 100th, offset 50, terminated). Flows written into \
                   the kernel flow map with Maps::insert_flow, spread evenly over the sessions. \
                   Each query: one warm-up call, then N timed calls (at most 5 for answers \
                   of more than 10,000 rows); wall time and this \
                   the client thread's CPU time per call, nearest-rank quantiles; peak RSS per query from \
                   VmHWM reset through /proc/self/clear_refs. Walks alone: the batched walk \
                   (BPF_MAP_LOOKUP_BATCH), aya's key-by-key iteration of the same pinned map \
                   (the agent's walk before), and Enforcer::census (walk + per-session sums). \
                   The queries run while a task sweeps the sessions every second as the agent \
                   does (Sessions::sweep): with a large flow table, reads reuse the census of \
                   the last sweep instead of walking. Then one session's flows through the \
                   flow index (Enforcer::session_flows: index, then one lookup per flow) and \
                   through a full walk (Enforcer::flows_where, the way before the index), \
                   compared. Last, sessions.terminate of one session at a time (admin \
                   caller), 200 times, with the flows resident and the sweep running; \
                   revoked_after is call start to the revocation being visible in the kernel \
                   (Enforcer::revocation polled by a thread started before the call), \
                   revocation_written is call start (CLOCK_MONOTONIC) to the revocation's own \
                   CLOCK_MONOTONIC stamp, written with it; durable_commit_alone is one store \
                   commit of one audit record, 200 times, after the terminations",
        "sessions_requested": args.sessions,
        "sessions": n,
        "sessions_terminated": terminated,
        "admissions_per_sec": n as f64 / admit_secs,
        "flows_requested": args.flows,
        "flows": inserted,
        "flow_insert_error": insert_error,
        "flow_table_entries": flow_table,
        "flow_table_kernel_memlock_mib": flow_table_mib,
        "flow_insert_secs": insert_secs,
        "walks_ms": {
            "batched": batched_q,
            "batched_syscalls": match walk { Walk::Batched { syscalls } => json!(syscalls), other => json!(format!("{other:?}")) },
            "key_by_key": ms(key_by_key),
            "census": aggregate_q,
        },
        "sweeps_during_queries": {
            "interval_ms": ms(sweep_every),
            "count": sweep_count,
            "wall": sweep_wall,
            "thread_cpu": sweep_cpu,
        },
        "queries": results,
        "terminate_one_session": terminations,
        "terminate_revocation_in_kernel": revoked_after,
        "terminate_revocation_written": written_after,
        "durable_commit_alone": commits,
        "one_session_flows": {
            "flow_index": by_index,
            "full_walk": by_walk,
        },
        "flow_index": {
            "flows_before_any_walk": indexed_before_walk,
            "flows_after_census": indexed,
            "heap_bytes": indexed_bytes,
        },
        "memory_mib": {
            "rss_before_sessions": rss_empty,
            "rss_with_sessions": rss_sessions,
            "rss_with_sessions_and_flows": rss_flows,
            "rss_with_flow_index": rss_indexed,
            "rss_after_queries": rss_end,
        },
        "targets": targets,
    });
    let met = |m: bool| if m { "met" } else { "NOT met" };
    println!(
        "{n} sessions ({:.0} admissions/s in-process, {terminated} terminated), {inserted} flows \
         in a {flow_table}-entry table ({flow_table_mib:.0} MiB of kernel memory, inserted in \
         {insert_secs:.1} s)",
        n as f64 / admit_secs
    );
    println!(
        "walks: batched p50 {:.1} ms ({walk:?}), key by key {:.0} ms, census (walk + traffic \
         per session) p50 {:.1} ms; {sweep_count} sweeps during the queries: p50 {:.1} ms \
         ({:.1} ms CPU)",
        batched_q["p50_ms"].as_f64().unwrap_or(f64::NAN),
        ms(key_by_key),
        aggregate_q["p50_ms"].as_f64().unwrap_or(f64::NAN),
        sweep_wall["p50_ms"].as_f64().unwrap_or(f64::NAN),
        sweep_cpu["p50_ms"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "durable commit alone: p50 {:.2} ms, p99 {:.2} ms",
        commits["p50_ms"].as_f64().unwrap_or(f64::NAN),
        commits["p99_ms"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "unfiltered sessions.list: p50 {:.0} ms, peak +{:.0} MiB above resting (target ≤ \
         {TARGET_UNFILTERED_MS} ms, ≤ +{TARGET_UNFILTERED_PEAK_MIB} MiB: {})",
        unfiltered["wall"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        unfiltered["peak_rss_above_resting_mib"]
            .as_f64()
            .unwrap_or(f64::NAN),
        met(report["targets"]["unfiltered_list_met"] == true)
    );
    println!(
        "filtered sessions.list p99 {filtered_p99:.1} ms (target ≤ {TARGET_FILTERED_P99_MS} ms: \
         {})",
        met(report["targets"]["filtered_list_met"] == true)
    );
    println!(
        "memory: RSS {rss_empty:.0} MiB empty, {rss_sessions:.0} MiB with the sessions, \
         {rss_flows:.0} MiB with the flows too (target ≤ {TARGET_RSS_MIB} MiB: {}), \
         {rss_indexed:.0} MiB with the flow index ({:.1} MiB of heap in the index itself), \
         {rss_end:.0} MiB after the queries; load {load_before} → {load_after}",
        met(report["targets"]["rss_met"] == true),
        indexed_bytes as f64 / 1048576.0
    );
    args.common.write_report(&report)?;
    Ok(())
}
