//! `cargo xtask bench console`: the web console's first screen with 100,000 sessions: the
//! sessions page (its first 100 rows, a window the status socket cuts), a filtered page, a
//! session's detail page and the first live update, each fetched over HTTP from a console
//! that talks to the agent's status socket, as JSON under target/bench/console.json.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use flowwarden::{
    api::{
        client::RpcClient,
        core::{AgentInfo, Core},
        peer::AccessPolicy,
        request::SessionFilter,
        transport::{SocketOptions, serve},
    },
    console::{Console, ConsoleConfig, Role, serve_plain},
    identity::Identity,
};
use flowwarden_tests::{
    bench::{
        self, BenchArgs, HasBenchArgs, Knob, Spec, bench_identity, bench_user,
        inproc::InProcessAgent, loadavg, stats::Stats,
    },
    privileged,
};
use serde_json::json;

/// The target: the first screen within a second at 100,000 sessions.
const TARGET_MS: f64 = 1000.0;
const SPEC: Spec = Spec {
    name: "console",
    runs: Knob::Ignored("one table of sessions per run"),
    repeat: Knob::Means {
        help: "page loads timed per page",
        default: 50,
    },
};
const POLICY: &str = "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
                      [[rule]]\nname = \"staff\"\ngroups = [\"bench\"]\nresources = [\"ssh\"]\n";

/// Time to the console's first screen with many sessions.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Sessions in the agent's table (fewer if the kernel's grant map cannot hold them).
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

fn identity(i: usize, now: u64) -> Identity {
    bench_identity(i, now, &[])
}

/// One HTTP/1.1 GET on a fresh connection, read to its end: the status line and the body.
fn get(addr: SocketAddr, path: &str, cookie: &str) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let status = all.lines().next().unwrap_or_default().to_owned();
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Opens a live stream and reads until its first `event` has arrived whole.
fn first_event(addr: SocketAddr, path: &str, cookie: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 65_536];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("{path}: the stream ended before its first event");
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(at) = text.find("event: ")
            && text[at..].contains("\n\n")
        {
            return Ok(text[at..].lines().next().unwrap_or_default().to_owned());
        }
    }
}

fn timed<T>(repeat: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(Stats, T)> {
    let mut samples = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat {
        let t = Instant::now();
        let v = f()?;
        samples.push(t.elapsed());
        last = Some(v);
    }
    Ok((Stats::of_ms(&samples), last.context("at least one call")?))
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    let repeat = args.common.repeat();
    if !privileged::require_root("bench-console") {
        bail!("the console benchmark loads BPF maps: run it as root");
    }
    let load_before = loadavg();
    let agent = InProcessAgent::start("bconsole", POLICY, 262_144)?;
    let n = args
        .sessions
        .min(agent_common::map_sizes::GRANTS as usize * 9 / 10);
    eprintln!("admitting {n} sessions…");
    let admit = agent.admit_many(n, identity)?;

    // The agent's status socket, as the agent serves it.
    let socket = agent.scratch.dir.join("agent.sock");
    let core = Arc::new(Core {
        sessions: Arc::clone(&agent.sessions),
        enforcer: Arc::clone(&agent.enforcer),
        policy: Arc::clone(&agent.policy),
        info: AgentInfo {
            interfaces: Vec::new(),
            ingress: Vec::new(),
            pin_dir: agent.pins.0.display().to_string(),
            admission_listen: "127.0.0.1:7443".into(),
            admission_fingerprint: String::new(),
            started: Instant::now(),
            groups: Default::default(),
            fleet: None,
        },
    });
    let _server = agent.rt.spawn(serve(
        SocketOptions::new(&socket),
        AccessPolicy::from_names("", "")?,
        core,
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while RpcClient::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("the status socket did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // The console, on a runtime of its own as its own process would have.
    let console_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = console_rt.block_on(Console::state(
        &ConsoleConfig::default(),
        None,
        None,
        socket.clone(),
        false,
    ))?;
    let listener = console_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (name, value) =
        Console::sign_in_in_process(&state, "bench-admin@corp.example", Role::Admin);
    let cookie = format!("{name}={value}");
    console_rt.spawn(serve_plain(listener, Arc::clone(&state)));

    // What the page shows must be real: 100 rows of the table's newest sessions.
    let (status, body) = get(addr, "/", &cookie)?;
    let rows = body.matches("<tr id=\"s-").count();
    if !status.contains("200") || rows != 100.min(n) {
        bail!("the first screen answered {status} with {rows} rows");
    }
    let pick = n / 2;
    let user_path = format!("/?user={}", bench_user(pick));
    let (_, body) = get(addr, &user_path, &cookie)?;
    if body.matches("<tr id=\"s-").count() != 1 {
        bail!(
            "the page for {} does not show exactly their session",
            bench_user(pick)
        );
    }
    let id = RpcClient::connect(&socket)?
        .sessions_list(&SessionFilter {
            user: Some(bench_user(pick)),
            ..SessionFilter::default()
        })?
        .first()
        .context("the picked session")?
        .id
        .clone();
    let detail_path = format!("/sessions/{id}");

    eprintln!("timing {repeat} loads of each page…");
    let (first_screen, _) = timed(repeat, || get(addr, "/", &cookie))?;
    let (filtered, _) = timed(repeat, || get(addr, &user_path, &cookie))?;
    let (page_50, _) = timed(repeat, || get(addr, "/?page=50", &cookie))?;
    let (detail, _) = timed(repeat, || get(addr, &detail_path, &cookie))?;
    let (live, event) = timed(repeat, || first_event(addr, "/live/sessions", &cookie))?;
    if event != "event: rows" {
        bail!("the live stream's first event is {event:?}");
    }
    // For contrast: the whole list, unwindowed, as `flowwarden sessions list --json` reads it.
    let (whole, count) = timed(3.min(repeat), || {
        Ok(RpcClient::connect(&socket)?
            .sessions_list(&SessionFilter::default())?
            .len())
    })?;
    let load_after = loadavg();

    let report = json!({
        "benchmark": "console",
        "date": bench::utc_date(),
        "machine": bench::machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "method": "the agent's library in process (private datapath, redb store, Sessions, the \
                   status socket served by api::transport as the agent serves it, 2 workers); \
                   the console's router (flowwarden::console) on a 2-worker runtime of its own, \
                   plain HTTP on loopback, one signed-in admin. Each page load is one HTTP/1.1 \
                   GET on a fresh connection read to its end (the server-rendered HTML, which \
                   is what the browser paints first). Sessions admitted with Sessions::admit, \
                   no flows.",
        "sessions": n,
        "admissions_per_sec": n as f64 / admit.as_secs_f64(),
        "target_ms": TARGET_MS,
        "first_screen": first_screen.ms_json(),
        "first_screen_meets_target": first_screen.p99 <= TARGET_MS,
        "filtered_user_one_match": filtered.ms_json(),
        "page_50_older": page_50.ms_json(),
        "session_detail": detail.ms_json(),
        "live_stream_first_rows": live.ms_json(),
        "whole_list_unwindowed_for_contrast": {"rows": count, "latency": whole.ms_json()},
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.common.out(), &text)
        .with_context(|| format!("writing {}", args.common.out().display()))?;
    println!("{text}");
    drop(console_rt);
    Ok(())
}
