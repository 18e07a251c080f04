//! Launchers for the test suite, benchmarks, demo and lints; each runs setup first where the
//! step needs the eBPF toolchain or the test machine's packages.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    cmd::{self, banner, cargo, workspace_root},
    fuzz,
    setup::setup,
};

/// The eBPF crate builds only for the BPF target (the agent's build.rs does that), and
/// `--workspace` would select it despite it not being a default member.
const EBPF_CRATE: &str = "agent-ebpf";
/// Privileged integration tests: they share interfaces and bpffs, so they run one at a time.
const TESTS_CRATE: &str = "flowwarden-tests";

/// Benchmarks `cargo xtask bench` knows about.
const BENCHES: &[&str] = &[
    "datapath",
    "admission",
    "policy",
    "revoke",
    "scale",
    "flood",
    "throughput",
    "locks",
    "console",
    "fleet",
    "signals",
];

pub fn test(filter: Option<&str>) -> Result<()> {
    setup()?;

    let mut build = cargo(["build", "--workspace", "--exclude", EBPF_CRATE]);

    let mut unit = cargo([
        "test",
        "--workspace",
        "--exclude",
        TESTS_CRATE,
        "--exclude",
        EBPF_CRATE,
    ]);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }

    let mut integration = cargo(["test", "-p", TESTS_CRATE, "--", "--test-threads=1"]);
    integration.args(filter);

    // Stop at the first failure: later steps would only repeat the build error or run
    // privileged tests against a tree whose unit tests already fail.
    let steps = [
        ("build", &mut build),
        ("unit tests", &mut unit),
        (
            "integration tests (privileged, single-threaded)",
            &mut integration,
        ),
    ];
    let total = steps.len();
    let mut tally = cmd::Tally::default();
    let mut result = Ok(());
    for (i, (what, command)) in steps.into_iter().enumerate() {
        banner(i + 1, total, what, command);
        if let Err(e) = cmd::run_counting(command, &mut tally) {
            result = Err(e.context(format!("test step {}/{total} ({what}) failed", i + 1)));
            break;
        }
    }
    // A short fuzz pass last: it catches a target that no longer builds or crashes on its
    // seeds. A filtered run is for a subset of tests, so it skips it.
    if result.is_ok() && filter.is_none() {
        result = fuzz::fuzz(&fuzz::FuzzArgs {
            seconds: fuzz::CI_SECONDS,
            targets: &[],
        })
        .context("fuzz pass failed");
    }
    // One closing line with the totals of every step, for people and for CI.
    println!(
        "\nflowwarden: {} passed, {} failed",
        tally.passed, tally.failed
    );
    result
}

pub fn bench(name: &str, repeat: Option<u32>, runs: Option<u32>, args: &[OsString]) -> Result<()> {
    if !BENCHES.contains(&name) {
        bail!(
            "unknown bench `{name}`; known benches: {}",
            BENCHES.join(", ")
        );
    }
    setup()?;

    let out_dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let out = out_dir.join(format!("{name}.json"));

    let agent = release_agent(1, 2)?;
    let mut run = cargo([
        "run",
        "--release",
        "-p",
        TESTS_CRATE,
        "--bin",
        &format!("bench-{name}"),
        "--",
    ]);
    run.env(AGENT_BIN_ENV, &agent);
    // An `--out` among the bench's own arguments wins: the bench takes the last one given.
    let own_out = args.iter().any(|a| a == "--out");
    if !own_out {
        run.arg("--out").arg(&out);
    }
    if let Some(n) = repeat {
        run.args(["--repeat", &n.to_string()]);
    }
    if let Some(n) = runs {
        run.args(["--runs", &n.to_string()]);
    }
    run.args(args);
    banner(2, 2, &format!("bench {name}"), &run);
    cmd::run(&mut run)?;
    if !own_out {
        println!("\nxtask bench: results in {}", out.display());
    }
    Ok(())
}

/// Where the benches find the agent they measure (tests/src/agent_proc.rs reads it).
const AGENT_BIN_ENV: &str = "FLOWWARDEN_BIN";

/// The agent as it ships, which the benches and the soak measure: `$FLOWWARDEN_BIN` when the
/// caller names one, otherwise the release build, built now (step `step` of `total`) so the
/// bench process never runs cargo itself.
fn release_agent(step: usize, total: usize) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(AGENT_BIN_ENV) {
        println!("xtask: measuring the agent ${AGENT_BIN_ENV} names: {bin:?}");
        return Ok(bin.into());
    }
    let mut build = cargo([
        "build",
        "--release",
        "-p",
        "flowwarden",
        "--bin",
        "flowwarden",
    ]);
    banner(step, total, "release agent", &build);
    cmd::run(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |d| workspace_root().join(d),
    );
    Ok(target.join("release/flowwarden"))
}

/// The crash harness of tests/src/crash.rs with `kills` SIGKILLs of the release agent; fails
/// if anything acknowledged was lost or any invariant broke.
pub fn soak(kills: u32) -> Result<()> {
    setup()?;
    let out = workspace_root().join("target/bench/soak.json");
    let agent = release_agent(1, 2)?;
    let mut run = cargo(["run", "--release", "-p", TESTS_CRATE, "--bin", "soak", "--"]);
    run.args(["--kills", &kills.to_string()])
        .arg("--out")
        .arg(&out)
        .env(AGENT_BIN_ENV, &agent);
    banner(2, 2, "soak", &run);
    cmd::run(&mut run)?;
    println!("\nxtask soak: results in {}", out.display());
    Ok(())
}

pub fn demo(args: &[OsString]) -> Result<()> {
    setup()?;
    let mut run = cargo(["run", "-p", TESTS_CRATE, "--bin", "demo", "--"]);
    run.args(args);
    banner(1, 1, "demo", &run);
    cmd::run(&mut run)
}

pub fn clippy() -> Result<()> {
    let mut host = cargo([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    // The eBPF crate is no_std and uses nightly features, so it is linted for its own target
    // with a core built from rust-src.
    let mut ebpf = Command::new("cargo");
    ebpf.args([
        "+nightly",
        "clippy",
        "-p",
        EBPF_CRATE,
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    .current_dir(workspace_root());
    // The fuzz targets are their own workspace (cargo-fuzz builds them with nightly and a
    // sanitizer), so the workspace lint above never sees them; lint them here so an API change
    // that breaks a target fails now, not in CI's fuzz pass.
    let mut fuzz = Command::new("cargo");
    fuzz.args([
        "+nightly",
        "clippy",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--bins",
        "--",
        "-D",
        "warnings",
    ])
    .env("AYA_BUILD_SKIP", "1")
    .current_dir(workspace_root());

    // Run all so one pass reports every lint, then fail naming what failed.
    let steps = [
        ("clippy (user space, stable)", &mut host),
        ("clippy (eBPF, nightly)", &mut ebpf),
        ("clippy (fuzz targets, nightly)", &mut fuzz),
    ];
    let total = steps.len();
    let mut failed = Vec::new();
    for (i, (what, command)) in steps.into_iter().enumerate() {
        banner(i + 1, total, what, command);
        if let Err(e) = cmd::run(command) {
            eprintln!("xtask clippy: {e:#}");
            failed.push(what);
        }
    }
    if failed.is_empty() {
        println!("\nxtask clippy: clean");
        Ok(())
    } else {
        let hint = if failed.iter().any(|what| what.ends_with("nightly)")) {
            " (if the eBPF step failed for toolchain reasons, not lints, run `cargo xtask setup`)"
        } else {
            ""
        };
        Err(anyhow!("clippy failed: {}{hint}", failed.join("; ")))
    }
}
