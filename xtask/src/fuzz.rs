//! `cargo xtask fuzz`: builds the cargo-fuzz targets of fuzz/ and runs each for a fixed time,
//! reporting executions and CPU time per target in target/bench/fuzz.json (fuzz-<targets>.json
//! when only some run).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, banner, workspace_root};

/// Every target in fuzz/fuzz_targets, in the order they run.
pub const TARGETS: &[&str] = &["token", "jsonrpc", "policy", "admission"];
/// What `cargo xtask test` gives each target: enough to build, load the seeds and mutate a
/// while, so that CI catches a target that no longer builds or crashes at once.
pub const CI_SECONDS: u32 = 10;
/// Where `cargo fuzz build` puts the targets (it builds for the host triple explicitly).
const BIN_DIR: &str = "fuzz/target/x86_64-unknown-linux-gnu/release";

pub struct FuzzArgs<'a> {
    pub seconds: u32,
    /// Only these targets; all of them when empty.
    pub targets: &'a [String],
}

/// The figures of one target's run.
#[derive(Debug, Default, Clone, PartialEq)]
struct Figures {
    executions: u64,
    /// libFuzzer's own count of seconds ("Done N runs in S second(s)").
    seconds: u64,
    exec_per_sec: u64,
    /// Units in the corpus in memory at the end, and coverage features.
    corpus_units: u64,
    coverage: u64,
    features: u64,
    new_units: u64,
    peak_rss_mb: u64,
    /// Where libFuzzer wrote the input that crashed, timed out or ran out of memory.
    artifact: Option<String>,
}

struct Outcome {
    target: String,
    wall_secs: f64,
    cpu_secs: f64,
    figures: Figures,
    failed: Option<String>,
    log: PathBuf,
}

pub fn fuzz(args: &FuzzArgs<'_>) -> Result<()> {
    let targets = select(args.targets)?;
    let root = workspace_root();
    ensure_cargo_fuzz()?;

    // The fuzz targets never load the kernel programs, so they are built without them
    // (agent/build.rs): no nightly BPF build inside the sanitizer build.
    let mut build = Command::new("cargo");
    build
        .args(["+nightly", "fuzz", "build", "--debug-assertions"])
        .env("AYA_BUILD_SKIP", "1")
        .current_dir(&root);
    banner(
        1,
        2,
        "build the fuzz targets (nightly, AddressSanitizer)",
        &build,
    );
    let started = Instant::now();
    cmd::run(&mut build)?;
    println!(
        "xtask fuzz: built in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let logs = root.join("target/fuzz-logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    println!();
    println!(
        "==> [2/2] run {} target(s) for {} s each (logs in {})",
        targets.len(),
        args.seconds,
        logs.display()
    );
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(&root, target, args.seconds, &logs)?;
        let f = &outcome.figures;
        println!(
            "  {target:<10} {:>6.0} s wall {:>7.1} s CPU {:>11} runs {:>7} exec/s  corpus {:>5}  {}",
            outcome.wall_secs,
            outcome.cpu_secs,
            f.executions,
            f.exec_per_sec,
            f.corpus_units,
            outcome.failed.as_deref().unwrap_or("ok")
        );
        outcomes.push(outcome);
    }

    // A run of some targets gets its own file, so runs of different targets at once (one
    // process per target, to use every core) do not overwrite each other's figures.
    let name = if targets.len() == TARGETS.len() {
        "fuzz.json".to_owned()
    } else {
        format!("fuzz-{}.json", targets.join("-"))
    };
    let out = root.join("target/bench").join(name);
    write_report(&out, args.seconds, &outcomes)?;
    let total_cpu: f64 = outcomes.iter().map(|o| o.cpu_secs).sum();
    let total_runs: u64 = outcomes.iter().map(|o| o.figures.executions).sum();
    println!(
        "\nxtask fuzz: {total_runs} executions in {total_cpu:.0} CPU seconds; results in {}",
        out.display()
    );

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let mut message = String::new();
    for o in &failed {
        let _ = write!(
            message,
            "\n  {}: {}; input: {}; log: {}\n    reproduce: cargo +nightly fuzz run {} {}",
            o.target,
            o.failed.as_deref().unwrap_or_default(),
            o.figures.artifact.as_deref().unwrap_or("(none written)"),
            o.log.display(),
            o.target,
            o.figures.artifact.as_deref().unwrap_or("<input>"),
        );
    }
    bail!("{} fuzz target(s) failed:{message}", failed.len())
}

fn select(wanted: &[String]) -> Result<Vec<String>> {
    if wanted.is_empty() {
        return Ok(TARGETS.iter().map(|t| (*t).to_owned()).collect());
    }
    for t in wanted {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target `{t}`; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    Ok(wanted.to_vec())
}

/// Installs cargo-fuzz unless `cargo fuzz` already answers. The targets themselves build with
/// the nightly toolchain that `cargo xtask setup` installs (sanitizers need nightly).
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    let mut install = Command::new("cargo");
    install.args(["install", "cargo-fuzz", "--locked"]);
    println!("\n==> install cargo-fuzz: {}", cmd::display(&install));
    cmd::run(&mut install).context("installing cargo-fuzz")
}

fn run_target(root: &Path, target: &str, seconds: u32, logs: &Path) -> Result<Outcome> {
    let bin = root.join(BIN_DIR).join(target);
    // New units go to the first directory, so the committed seeds stay as they are.
    let grown = root.join("fuzz/target/corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    for dir in [&grown, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let log_file =
        fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;

    let mut run = Command::new(&bin);
    run.arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        // A single input running this long is a hang, not a slow machine.
        .arg("-timeout=30")
        .arg("-rss_limit_mb=4096")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&grown)
        .arg(&seeds)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let before = children_cpu_secs();
    let started = Instant::now();
    let status = run
        .status()
        .with_context(|| format!("could not start {} (was it built?)", bin.display()))?;
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_secs = children_cpu_secs() - before;

    let text = fs::read_to_string(&log).unwrap_or_default();
    let figures = parse_log(&text);
    let failed = if status.success() {
        None
    } else {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("--- last lines of {} ---", log.display());
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        Some(failure_kind(&text, &status.to_string()))
    };
    Ok(Outcome {
        target: target.to_owned(),
        wall_secs,
        cpu_secs,
        figures,
        failed,
        log,
    })
}

/// User plus system CPU seconds of every child this process has waited for.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// What kind of failure libFuzzer reported.
fn failure_kind(log: &str, status: &str) -> String {
    let kinds = [
        ("ERROR: libFuzzer: timeout", "timeout"),
        ("ERROR: libFuzzer: out-of-memory", "out of memory"),
        ("ERROR: libFuzzer: deadly signal", "crash (panic or signal)"),
        ("ERROR: AddressSanitizer", "crash (AddressSanitizer)"),
        ("ERROR: libFuzzer: fuzz target exited", "the target exited"),
        ("ERROR: libFuzzer: leak", "leak"),
    ];
    kinds
        .iter()
        .find(|(needle, _)| log.contains(needle))
        .map_or_else(
            || format!("failed ({status})"),
            |(_, kind)| (*kind).to_owned(),
        )
}

/// Reads libFuzzer's closing lines (`-print_final_stats=1`):
/// `stat::number_of_executed_units: N`, `Done N runs in S second(s)`, `#N DONE cov: C ft: F
/// corp: U/B ...` and, on failure, `Test unit written to PATH`.
fn parse_log(text: &str) -> Figures {
    let mut f = Figures::default();
    let stat =
        |line: &str, name: &str| -> Option<u64> { line.strip_prefix(name)?.trim().parse().ok() };
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = stat(line, "stat::number_of_executed_units:") {
            f.executions = n;
        } else if let Some(n) = stat(line, "stat::average_exec_per_sec:") {
            f.exec_per_sec = n;
        } else if let Some(n) = stat(line, "stat::new_units_added:") {
            f.new_units = n;
        } else if let Some(n) = stat(line, "stat::peak_rss_mb:") {
            f.peak_rss_mb = n;
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123 runs in 10 second(s)"
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [runs, "runs", "in", secs, ..] = words.as_slice() {
                if f.executions == 0 {
                    f.executions = runs.parse().unwrap_or(0);
                }
                f.seconds = secs.parse().unwrap_or(0);
            }
        } else if let Some(rest) = line.split_once("Test unit written to ").map(|(_, r)| r) {
            f.artifact = Some(rest.trim().to_owned());
        }
        if line.starts_with('#') && (line.contains("DONE ") || line.contains("pulse ")) {
            let value = |key: &str| -> Option<u64> {
                let rest = line.split_once(key)?.1.trim_start();
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            f.coverage = value("cov:").unwrap_or(f.coverage);
            f.features = value("ft:").unwrap_or(f.features);
            f.corpus_units = value("corp:").unwrap_or(f.corpus_units);
        }
    }
    f
}

fn write_report(out: &Path, seconds: u32, outcomes: &[Outcome]) -> Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut json = format!("{{\n  \"seconds_per_target\": {seconds},\n  \"targets\": [\n");
    for (i, o) in outcomes.iter().enumerate() {
        let f = &o.figures;
        let _ = writeln!(
            json,
            "    {{\"target\": \"{}\", \"wall_secs\": {:.1}, \"cpu_secs\": {:.1}, \
             \"libfuzzer_secs\": {}, \"executions\": {}, \"exec_per_sec\": {}, \
             \"corpus_units\": {}, \
             \"new_units\": {}, \"coverage\": {}, \"features\": {}, \"peak_rss_mb\": {}, \
             \"crashes\": {}, \"failure\": {}, \"artifact\": {}}}{}",
            o.target,
            o.wall_secs,
            o.cpu_secs,
            f.seconds,
            f.executions,
            f.exec_per_sec,
            f.corpus_units,
            f.new_units,
            f.coverage,
            f.features,
            f.peak_rss_mb,
            u8::from(o.failed.is_some()),
            json_string(o.failed.as_deref()),
            json_string(f.artifact.as_deref()),
            if i + 1 < outcomes.len() { "," } else { "" }
        );
    }
    json.push_str("  ]\n}\n");
    fs::write(out, json).with_context(|| format!("cannot write {}", out.display()))
}

fn json_string(s: Option<&str>) -> String {
    match s {
        None => "null".into(),
        Some(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(out, "\\u{:04x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_closing_lines() {
        let log = "\
INFO: Seed: 42
#2\tINITED cov: 10 ft: 11 corp: 3/90b exec/s: 0 rss: 40Mb
#65536\tpulse  cov: 150 ft: 300 corp: 20/1Kb lim: 100 exec/s: 21845 rss: 50Mb
#90000\tDONE   cov: 170 ft: 333 corp: 24/1234b lim: 120 exec/s: 9000 rss: 52Mb
Done 90000 runs in 10 second(s)
stat::number_of_executed_units: 90001
stat::average_exec_per_sec:     9000
stat::new_units_added:          21
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              52
";
        assert_eq!(
            parse_log(log),
            Figures {
                executions: 90001,
                seconds: 10,
                exec_per_sec: 9000,
                corpus_units: 24,
                coverage: 170,
                features: 333,
                new_units: 21,
                peak_rss_mb: 52,
                artifact: None,
            }
        );
    }

    #[test]
    fn finds_the_artifact_and_names_the_failure() {
        let log = "\
==1== ERROR: libFuzzer: deadly signal
artifact_prefix='fuzz/artifacts/token/'; Test unit written to fuzz/artifacts/token/crash-da39a3ee
";
        assert_eq!(
            parse_log(log).artifact.as_deref(),
            Some("fuzz/artifacts/token/crash-da39a3ee")
        );
        assert_eq!(failure_kind(log, "exit 77"), "crash (panic or signal)");
        assert_eq!(failure_kind("", "exit 1"), "failed (exit 1)");
    }

    #[test]
    fn unknown_targets_are_named() {
        let err = select(&["tokens".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("unknown fuzz target `tokens`"), "{err}");
        assert!(err.contains("token, jsonrpc, policy, admission"), "{err}");
        assert_eq!(select(&[]).unwrap().len(), TARGETS.len());
    }
}
