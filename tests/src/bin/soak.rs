//! `cargo xtask soak`: the crash-consistency harness with many kills (1,000 by default), its
//! counts and figures written as JSON. Exits non-zero if anything acknowledged was lost or any
//! invariant broke.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use flowwarden_tests::{
    bench::{cpu_model, loadavg},
    crash::{self, Options},
    privileged::require_root,
};
use serde_json::json;

struct Args {
    kills: usize,
    out: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        kills: 1000,
        out: PathBuf::from("target/bench/soak.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--kills" => a.kills = value.parse().with_context(|| format!("--kills {value}"))?,
            "--out" => a.out = PathBuf::from(value),
            other => bail!("unknown argument {other}: use --kills N --out FILE"),
        }
    }
    if a.kills == 0 {
        bail!("--kills must be at least 1");
    }
    Ok(a)
}

fn main() -> anyhow::Result<ExitCode> {
    let args = parse_args()?;
    if !require_root("soak") {
        bail!("the soak needs root (network namespaces, bpffs)");
    }
    let loadavg_before = loadavg();
    let report = crash::run(&Options::new("soak", args.kills));
    let out = json!({
        "harness": "crash consistency (tests/src/crash.rs)",
        "agent": flowwarden_tests::agent_proc::agent_bin(),
        "cpu": cpu_model(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "report": report,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    println!("soak: results in {}", args.out.display());
    if report.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "soak: seed {}: lost {:?}, {} violations",
            report.seed, report.lost, report.violation_count
        );
        Ok(ExitCode::FAILURE)
    }
}
