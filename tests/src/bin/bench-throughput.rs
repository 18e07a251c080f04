//! `cargo xtask bench throughput`: iperf3 over a veth pair between two namespaces, with
//! nothing attached and with the programs attached at each ingress mode (auto, native XDP,
//! generic XDP, TC), in one run; each mode's throughput as a ratio to the unattached runs of
//! the same round, as JSON.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use flowwarden::config::{IngressHook, XdpModeChoice};
use flowwarden_tests::{
    bench::{cpu_model, loadavg},
    loaded::LoadedDatapath,
    netns::NetnsPair,
    privileged::require_root,
};
use serde_json::{Value, json};

/// Ingress modes measured, in order: `none` is the unattached baseline.
const MODES: [&str; 5] = ["none", "auto", "xdp", "xdp-generic", "tc"];

struct Args {
    out: PathBuf,
    /// Seconds of each iperf3 run.
    secs: u32,
    /// Rounds; each measures every mode once.
    rounds: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        out: PathBuf::from("target/bench/throughput.json"),
        secs: 5,
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().with_context(|| format!("{arg} needs a value"))?;
        let n = || value.parse::<u32>().with_context(|| arg.clone());
        match arg.as_str() {
            "--out" => a.out = PathBuf::from(&value),
            "--repeat" | "--secs" => a.secs = n()?,
            "--runs" | "--rounds" => a.rounds = n()?,
            other => bail!(
                "unknown argument {other}: use --out FILE --repeat SECS_PER_RUN --runs ROUNDS"
            ),
        }
    }
    if a.secs == 0 || a.rounds == 0 {
        bail!("--repeat and --runs must be at least 1");
    }
    Ok(a)
}

/// Attaches the programs to the server end at `mode` (None for `none`); returns the
/// datapath (detached on drop) and how ingress was attached.
fn attach(pair: &NetnsPair, mode: &str) -> anyhow::Result<Option<(LoadedDatapath, String)>> {
    let (hook, xdp_mode) = match mode {
        "none" => return Ok(None),
        "auto" => (IngressHook::Auto, XdpModeChoice::Auto),
        "xdp" => (IngressHook::Xdp, XdpModeChoice::Driver),
        "xdp-generic" => (IngressHook::Xdp, XdpModeChoice::Generic),
        "tc" => (IngressHook::Tc, XdpModeChoice::Auto),
        other => bail!("unknown mode {other}"),
    };
    let mut loaded = LoadedDatapath::new("tput");
    let iface = pair.server_if.clone();
    let attached = pair
        .server
        .run(|| loaded.datapath.attach(&iface, hook, xdp_mode))
        .with_context(|| format!("attaching at {mode}"))?;
    let how = attached
        .iter()
        .find(|a| a.hook != "tc_egress")
        .map(|a| format!("{} ({}) {}", a.hook, a.how, a.why))
        .unwrap_or_default();
    Ok(Some((loaded, how)))
}

/// One iperf3 run from the client end to the server end: received bits per second.
fn iperf(pair: &NetnsPair, secs: u32) -> anyhow::Result<f64> {
    let out = pair
        .client
        .command("iperf3")
        .args([
            "-c",
            &pair.server_addr.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()
        .context("running iperf3 (cargo xtask setup installs it)")?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's answer: {v}"))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if !require_root("bench-throughput") {
        bail!("bench-throughput needs root (namespaces, eBPF)");
    }
    let pair = NetnsPair::new("tput")?;
    let mut server = pair
        .server
        .command("iperf3")
        .args(["-s", "-B", &pair.server_addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (cargo xtask setup installs it)")?;
    std::thread::sleep(Duration::from_millis(500));
    let load_before = loadavg();
    let mut runs: Vec<Value> = Vec::new();
    let mut gbps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut ratios: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut hows: std::collections::BTreeMap<&str, String> = Default::default();
    let result = (|| -> anyhow::Result<()> {
        for round in 0..args.rounds {
            let mut baseline = None;
            for mode in MODES {
                let attached = match attach(&pair, mode) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("round {round}: {mode}: not measured: {e:#}");
                        runs.push(json!({"round": round, "mode": mode, "error": format!("{e:#}")}));
                        continue;
                    }
                };
                let bps = iperf(&pair, args.secs)?;
                let how = attached
                    .as_ref()
                    .map(|(_, h)| h.clone())
                    .unwrap_or_default();
                drop(attached);
                let g = bps / 1e9;
                if mode == "none" {
                    baseline = Some(g);
                }
                let ratio = baseline.map(|b| g / b);
                eprintln!("round {round}: {mode:<12} {g:6.2} Gbit/s  ratio {ratio:.3?}  {how}");
                gbps.entry(mode).or_default().push(g);
                if let Some(r) = ratio {
                    ratios.entry(mode).or_default().push(r);
                }
                hows.insert(mode, how.clone());
                runs.push(json!({"round": round, "mode": mode, "gbit_per_sec": g, "ratio": ratio, "ingress": how}));
            }
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let summary: serde_json::Map<String, Value> = MODES
        .iter()
        .map(|m| {
            (
                (*m).to_owned(),
                json!({
                    "gbit_per_sec": gbps.get(m).map(|v| v.as_slice()),
                    "ratio_median": ratios.get(m).and_then(|v| median(v)),
                    "ratios": ratios.get(m).map(|v| v.as_slice()),
                    "ingress": hows.get(m),
                }),
            )
        })
        .collect();
    let report = json!({
        "bench": "throughput",
        "what": "iperf3 (one TCP stream, client namespace -> server namespace) over a veth \
                 pair; programs attached to the server end with the test resources (ssh, dns, \
                 admin) installed, so iperf3's traffic is checked and passed as traffic to no \
                 resource; ratio = throughput / the unattached run of the same round",
        "secs_per_run": args.secs,
        "rounds": args.rounds,
        "cpu": cpu_model(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "modes": summary,
        "runs": runs,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report["modes"])?);
    Ok(())
}
