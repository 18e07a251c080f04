//! `cargo xtask bench datapath`: ns per packet of the kernel programs through
//! BPF_PROG_TEST_RUN, next to two reference programs measured in the same run, written as JSON.

use std::{net::IpAddr, time::Duration};

use agent_common::program_names::{BENCH_FLOOR, BENCH_PASS, TC_EGRESS, XDP_INGRESS};
use anyhow::bail;
use clap::Parser;
use flowwarden::datapath::{FlowKey, addr_bytes};
use flowwarden_tests::{
    bench::{self, BenchArgs, HasBenchArgs, Knob, Spec, stats::median},
    frames::Frame,
    loaded::LoadedDatapath,
    privileged::require_root,
};
use serde::Serialize;
use serde_json::Value;

const CLIENT: &str = "192.0.2.10";
const SERVER: &str = "10.9.0.2";
const SESSION: u64 = 0xbe7c_0000_0000_0001;
const REVOKED_SESSION: u64 = 0xbe7c_0000_0000_0002;
/// Single runs per round for the new-flow path, which must delete its flow between runs.
const SINGLE_RUNS: usize = 20_000;

/// Issue 13, P1: an established flow and a revoked drop against the one-lookup floor.
const TARGET_ESTABLISHED_RATIO: f64 = 1.25;
const TARGET_REVOKED_RATIO: f64 = 1.4;

const SPEC: Spec = Spec {
    name: "datapath",
    runs: Knob::Means {
        help: "Rounds; each case is measured once per round and the median is reported",
        default: 5,
    },
    repeat: Knob::Means {
        help: "Packets per BPF_PROG_TEST_RUN call of the repeated cases",
        default: 1_000_000,
    },
};

/// ns per packet of the kernel programs, against reference programs in the same run.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    date: String,
    machine: Value,
    repeat: u32,
    runs: usize,
    method: &'static str,
    floor: &'static str,
    results: Vec<Measured>,
    target: Target,
}

#[derive(Serialize)]
struct Measured {
    name: &'static str,
    program: &'static str,
    /// Median over the runs of the mean ns per packet in each run.
    median_ns: f64,
    runs_ns: Vec<f64>,
    /// Median over the rounds of this path's ns divided by the floor's ns in the same round.
    ratio_to_floor: f64,
    /// Which floor the ratio uses: `floor` (repeat N) or `floor_single` (repeat 1).
    compared_with: &'static str,
}

#[derive(Serialize)]
struct Target {
    established_flow_max_ratio: f64,
    established_flow_ratio: f64,
    revoked_drop_max_ratio: f64,
    revoked_drop_ratio: f64,
    met: bool,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn main() -> anyhow::Result<()> {
    let args: Args = bench::args::parse(SPEC);
    let (runs, repeat) = (
        args.common.runs(),
        u32::try_from(args.common.repeat()).unwrap_or(u32::MAX),
    );
    if !require_root("bench-datapath") {
        bail!("the datapath benchmark loads BPF programs: run it as root");
    }
    // The level the agent loads its programs with by default (`info`): their log records
    // stay in the program, as in production, instead of being pruned by the verifier.
    log::set_max_level(log::LevelFilter::Info);
    let mut dp = LoadedDatapath::new("bench");
    dp.datapath.prime_bench_floor()?;
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, SESSION)?;
    let revoked_client = ip("192.0.2.66");
    dp.datapath
        .maps
        .grant(revoked_client, ssh, REVOKED_SESSION)?;

    let payload = [0u8; 64];
    let unprotected = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 80)
        .payload(&payload)
        .build();
    let established = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .payload(&payload)
        .build();
    let new_flow = Frame::tcp(ip(CLIENT), 40001, ip(SERVER), 22)
        .payload(&payload)
        .build();
    let revoked = Frame::tcp(revoked_client, 40000, ip(SERVER), 22)
        .payload(&payload)
        .build();
    let reply = Frame::tcp(ip(SERVER), 22, ip(CLIENT), 40000)
        .payload(&payload)
        .build();
    // Open the established and the revoked flows, then revoke the second session.
    for frame in [&established, &revoked] {
        dp.datapath.test_run(XDP_INGRESS, frame, 1)?;
    }
    dp.datapath.maps.revoke(REVOKED_SESSION)?;
    let new_flow_key = FlowKey {
        src: addr_bytes(ip(CLIENT)),
        dst: addr_bytes(ip(SERVER)),
        sport: 40001,
        dport: 22,
        proto: 6,
        _pad: [0; 3],
    };

    let cases: [(&'static str, &'static str, &[u8]); 6] = [
        ("pass (trivial XDP program)", BENCH_PASS, &unprotected),
        (
            "floor (one hash lookup + one counter add)",
            BENCH_FLOOR,
            &unprotected,
        ),
        ("xdp: unprotected traffic", XDP_INGRESS, &unprotected),
        ("xdp: established flow", XDP_INGRESS, &established),
        ("xdp: revoked drop", XDP_INGRESS, &revoked),
        ("tc egress: reply of an established flow", TC_EGRESS, &reply),
    ];
    let mut repeated: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut new_flow_runs = Vec::new();
    let mut floor_single_runs = Vec::new();
    // Rounds interleave the cases, so a noisy moment of the machine hits them all alike.
    for round in 0..runs {
        for (i, (_, program, frame)) in cases.iter().enumerate() {
            let out = dp.datapath.test_run(program, frame, repeat)?;
            repeated[i].push(ns(out.duration));
        }
        let mut singles = Vec::with_capacity(SINGLE_RUNS);
        let mut floors = Vec::with_capacity(SINGLE_RUNS);
        for _ in 0..SINGLE_RUNS {
            dp.datapath.maps.remove_flow(&new_flow_key)?;
            let out = dp.datapath.test_run(XDP_INGRESS, &new_flow, 1)?;
            if out.return_value != 2 {
                bail!(
                    "the new-flow frame was not passed (verdict {})",
                    out.return_value
                );
            }
            singles.push(ns(out.duration));
            floors.push(ns(dp
                .datapath
                .test_run(BENCH_FLOOR, &unprotected, 1)?
                .duration));
        }
        new_flow_runs.push(median(&singles));
        floor_single_runs.push(median(&floors));
        eprintln!("round {}/{} done", round + 1, runs);
    }

    // Ratios are taken round by round (each against the floor measured moments apart), then
    // the median: a noisy round moves both numbers of a ratio together.
    let ratio = |runs: &[f64], floor: &[f64]| {
        median(
            &runs
                .iter()
                .zip(floor)
                .map(|(r, f)| r / f)
                .collect::<Vec<_>>(),
        )
    };
    let floor_runs = repeated[1].clone();
    let floor_single = median(&floor_single_runs);
    let mut results: Vec<Measured> = cases
        .iter()
        .zip(&repeated)
        .map(|((name, program, _), runs)| Measured {
            name,
            program,
            median_ns: median(runs),
            runs_ns: runs.clone(),
            ratio_to_floor: ratio(runs, &floor_runs),
            compared_with: "floor",
        })
        .collect();
    results.push(Measured {
        name: "floor, single runs (repeat 1)",
        program: BENCH_FLOOR,
        median_ns: floor_single,
        runs_ns: floor_single_runs.clone(),
        ratio_to_floor: 1.0,
        compared_with: "floor_single",
    });
    results.push(Measured {
        name: "xdp: new flow through a grant (repeat 1)",
        program: XDP_INGRESS,
        median_ns: median(&new_flow_runs),
        runs_ns: new_flow_runs.clone(),
        ratio_to_floor: ratio(&new_flow_runs, &floor_single_runs),
        compared_with: "floor_single",
    });
    let established_ratio = results[3].ratio_to_floor;
    let revoked_ratio = results[4].ratio_to_floor;
    let report = Report {
        benchmark: "datapath",
        date: bench::utc_date(),
        machine: bench::machine(),
        repeat,
        runs,
        method: "BPF_PROG_TEST_RUN; each run's kernel-measured mean ns per packet, median over \
                 rounds; ratios are per round against the floor of that round, then the \
                 median; the new-flow path deletes its flow before each single run, so it and its \
                 floor are measured with repeat 1 (median of 20,000 runs per round)",
        floor: "fw_bench_floor: one hash lookup on a flow-sized key and one atomic counter add",
        results,
        target: Target {
            established_flow_max_ratio: TARGET_ESTABLISHED_RATIO,
            established_flow_ratio: established_ratio,
            revoked_drop_max_ratio: TARGET_REVOKED_RATIO,
            revoked_drop_ratio: revoked_ratio,
            met: established_ratio <= TARGET_ESTABLISHED_RATIO
                && revoked_ratio <= TARGET_REVOKED_RATIO,
        },
    };

    println!("{:<48} {:>10} {:>9}", "path", "median ns", "× floor");
    for r in &report.results {
        println!(
            "{:<48} {:>10.1} {:>9.2}",
            r.name, r.median_ns, r.ratio_to_floor
        );
    }
    println!(
        "established flow: {established_ratio:.2}× the floor (target ≤ \
         {TARGET_ESTABLISHED_RATIO}×), revoked drop: {revoked_ratio:.2}× (target ≤ \
         {TARGET_REVOKED_RATIO}×): {}",
        if report.target.met { "met" } else { "NOT met" }
    );
    args.common.write_report(&report)?;
    Ok(())
}
