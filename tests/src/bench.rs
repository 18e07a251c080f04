//! What the benchmarks share: their arguments, quantiles, CPU readings and in-process agent
//! (in the submodules), what every report says about the machine (CPU, load, this process's
//! memory), and the synthetic sessions the in-process benchmarks admit.

pub mod admissions;
pub mod args;
pub mod cpu;
pub mod inproc;
pub mod stats;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use flowwarden::{
    datapath::detach_all,
    identity::{Device, Identity},
};
use serde_json::{Value, json};

pub use self::{
    args::{BenchArgs, HasBenchArgs, Knob, Spec},
    stats::Stats,
};

/// How idle CPUs wait while a latency benchmark runs.
///
/// On this VM (cpuidle driver haltpoll, no guest halt polling) an idle vCPU halts, and waking
/// it took up to several milliseconds while the host ran other guests. A kernel trace of the
/// revoke benchmark showed payloads queued on the server's socket, `sk_data_ready` fired, and
/// the reader's vCPU asleep for 3 ms: the machine's wake-up, not the product, set the tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Idle {
    /// Holds `/dev/cpu_dma_latency` at 0 µs for the run, as cyclictest and tuned's
    /// latency-performance profile do: idle CPUs poll instead of halting.
    Poll,
    /// The machine's own idle policy.
    Default,
}

impl Idle {
    /// Makes the request; it lasts as long as the returned file stays open.
    ///
    /// # Errors
    /// `/dev/cpu_dma_latency` cannot be opened or written (not root, or no PM QoS).
    pub fn hold(self) -> anyhow::Result<Option<std::fs::File>> {
        use std::io::Write as _;
        if self == Self::Default {
            return Ok(None);
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .context("opening /dev/cpu_dma_latency (or run with --idle default)")?;
        f.write_all(&0i32.to_ne_bytes())
            .context("asking /dev/cpu_dma_latency for 0 µs")?;
        Ok(Some(f))
    }

    /// For the report's `machine`: this setting and the kernel's cpuidle driver.
    pub fn describe(self) -> Value {
        let driver = std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver")
            .map_or_else(|_| "none".to_owned(), |d| d.trim().to_owned());
        json!({ "idle": self, "cpuidle_driver": driver })
    }
}

/// `--idle`, for the latency benches that hold an idle policy for their run.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct IdleArgs {
    /// How idle vCPUs wait during the run: poll (hold /dev/cpu_dma_latency at 0 µs) or the
    /// machine's default (they halt, and waking them adds to the tail).
    #[arg(long, value_enum, default_value_t = Idle::Poll)]
    pub idle: Idle,
}

/// What every report says about the machine: kernel, CPU model, CPU count.
pub fn machine() -> Value {
    json!({
        "kernel": command_output("uname", &["-r"]),
        "cpu": cpu_model(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

/// The time now, UTC, as the reports' `date` (2026-12-04T03:50:00Z).
pub fn utc_date() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

/// Writes `value` as pretty JSON and a newline to `path`, creating its directory.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The first three fields of /proc/loadavg ("1.20 0.80 0.50").
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command's trimmed stdout, or empty when it cannot run.
pub fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default()
}

/// VmRSS and VmHWM of this process, MiB.
pub fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Removes the private pins (and so the maps) on the way out, whatever happened.
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = detach_all(&self.0);
    }
}

/// The e-mail of synthetic user `i`.
pub fn bench_user(i: usize) -> String {
    format!("bench-user-{i:07}@corp.example")
}

/// Synthetic user `i` as `auth` builds it from a development token of the admission bench:
/// the same claims (a real identity provider's tokens usually carry more, and memory grows
/// with them), in groups `staff`, `bench` and `extra_groups`.
pub fn bench_identity(i: usize, now: u64, extra_groups: &[&str]) -> Identity {
    let email = bench_user(i);
    let sub = email.trim_end_matches("@corp.example").to_owned();
    let mut groups = vec!["staff".to_owned(), "bench".to_owned()];
    groups.extend(extra_groups.iter().map(|g| (*g).to_owned()));
    let exp = now + 8 * 3600;
    let claims: BTreeMap<String, Value> = [
        ("iss", json!("https://idp.flowwarden.dev")),
        ("aud", json!("flowwarden")),
        ("sub", json!(sub)),
        ("iat", json!(now)),
        ("exp", json!(exp)),
        ("email", json!(email)),
        ("groups", json!(groups)),
        ("device_managed", json!(true)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Identity {
        issuer: "https://idp.flowwarden.dev".into(),
        subject: sub,
        email: Some(email),
        groups,
        device: Device {
            managed: Some(true),
            ..Device::default()
        },
        claims: claims.into(),
        token_sha256: format!("{:064x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        token_expires_at: exp,
        token_issued_at: Some(now),
    }
}

/// Distinct sources for synthetic sessions (grants are keyed by source and resource):
/// 10.0.0.1 upwards.
pub fn bench_source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + u32::try_from(i).unwrap()))
}
