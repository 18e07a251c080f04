//! `cargo xtask soak`: the crash-consistency harness with many kills (1,000 by default), its
//! counts and figures written as JSON. Exits non-zero if anything acknowledged was lost or any
//! invariant broke.
//!
//! The kills run in generations (100 kills each by default), each on a fresh stack and state
//! file: every check after a kill re-reads everything acknowledged so far, so one stack for
//! 1,000 kills spent most of its time re-checking (8 s a kill by kill 300, growing linearly).
//! The JSON is rewritten after every generation, so an interrupted soak keeps its figures.

use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use flowwarden_tests::{
    bench::{self, BenchArgs, HasBenchArgs, Knob, Spec, cpu_model, loadavg},
    crash::{self, Options},
    privileged::require_root,
};
use serde_json::json;

const SPEC: Spec = Spec {
    name: "soak",
    runs: Knob::Ignored("the soak's size is --kills"),
    repeat: Knob::Ignored("the soak's size is --kills"),
};

/// The crash-consistency soak: SIGKILLs of a real agent at random moments of admissions,
/// terminations and reloads, in generations on fresh stacks.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: BenchArgs,
    /// Kills in the middle of operations (kills during restarts come on top).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    kills: u64,
    /// Kills per fresh stack.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    generation: u64,
}

impl HasBenchArgs for Args {
    fn bench_args(&mut self) -> &mut BenchArgs {
        &mut self.common
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let args: Args = bench::args::parse(SPEC);
    let (kills, generation) = (args.kills as usize, args.generation as usize);
    // The agent as it ships: a debug agent's start is several times slower, and `status`
    // within 1 s of the start is one of the figures.
    flowwarden_tests::agent_proc::release_agent()?;
    if !require_root("soak") {
        bail!("the soak needs root (network namespaces, bpffs)");
    }
    let loadavg_before = loadavg();
    let base = Options::new("soak", kills);
    let started = std::time::Instant::now();
    let mut reports: Vec<crash::Report> = Vec::new();
    while reports.iter().map(|r| r.kills).sum::<usize>() < kills {
        let done: usize = reports.iter().map(|r| r.kills).sum();
        let g = reports.len() as u64;
        let opts = Options {
            kills: generation.min(kills - done),
            // Each generation its own sequence, all reproducible from the one seed.
            seed: base.seed ^ g.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            tag: base.tag.clone(),
        };
        println!(
            "soak: generation {} ({} kills, seed {})",
            g + 1,
            opts.kills,
            opts.seed
        );
        reports.push(crash::run(&opts));
        let out = summary(&reports, &loadavg_before, started.elapsed().as_secs_f64());
        bench::write_json(args.common.out(), &out)?;
        println!("soak: after generation {}: {}", g + 1, out["totals"]);
    }
    let out = summary(&reports, &loadavg_before, started.elapsed().as_secs_f64());
    println!("{}", serde_json::to_string_pretty(&out)?);
    println!("soak: results in {}", args.common.out().display());
    if reports.iter().all(crash::Report::is_clean) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("soak: seed {}: {}", base.seed, out["totals"]);
        Ok(ExitCode::FAILURE)
    }
}

/// Totals over the generations so far, and each generation's own report.
fn summary(reports: &[crash::Report], loadavg_before: &str, wall_secs: f64) -> serde_json::Value {
    let sum = |f: &dyn Fn(&crash::Report) -> usize| reports.iter().map(f).sum::<usize>();
    let count = |field: &str| {
        reports
            .iter()
            .filter_map(|r| serde_json::to_value(&r.counts).ok()?[field].as_u64())
            .sum::<u64>()
    };
    json!({
        "harness": "crash consistency (tests/src/crash.rs), a fresh stack per generation",
        "agent": flowwarden_tests::agent_proc::agent_bin(),
        "cpu": cpu_model(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "wall_secs": wall_secs,
        "totals": {
            "generations": reports.len(),
            "kills": sum(&|r| r.kills),
            "kills_during_start": sum(&|r| r.kills_during_start),
            "admissions_acked": count("admissions_acked"),
            "terminations_acked": count("terminations_acked"),
            "reloads_acked": count("reloads_acked"),
            "audit_records_seen": count("audit_records_seen"),
            "lost_admissions": sum(&|r| r.lost.admissions),
            "lost_terminations": sum(&|r| r.lost.terminations),
            "lost_audit_records": sum(&|r| r.lost.audit_records),
            "violations": sum(&|r| r.violation_count),
            "status_within_1s": sum(&|r| r.status_within_1s),
            "status_after_start_p50_ms_by_generation":
                reports.iter().map(|r| r.status_after_start.p50_ms).collect::<Vec<_>>(),
            "status_after_start_max_ms_by_generation":
                reports.iter().map(|r| r.status_after_start.max_ms).collect::<Vec<_>>(),
        },
        "generations": reports,
    })
}
