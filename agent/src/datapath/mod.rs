//! The datapath: loads the kernel programs, attaches and pins them, adopts what a previous
//! agent pinned, and hands out typed map handles. The only code in the agent that touches aya.

mod attach;
mod batch;
mod events;
mod logs;
mod maps;
mod test_run;
mod walk;

use std::{
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

pub use agent_common::{Event, Flow, FlowKey, Revocation, SessionStats};
use aya::{Ebpf, EbpfLoader};

pub use attach::{Attachment, IngressChoice, choose_ingress, detach_all};
pub use events::{DatapathEvent, EventKind, EventReader};
pub use logs::KernelLog;
pub use maps::{Counters, DropReason, Maps};
pub use test_run::TestRunOutcome;
pub use walk::{FLOW_CHUNK, FlowTable, Walk};

use crate::config::{IngressHook, Mode, XdpModeChoice};

/// The compiled kernel programs, built by `build.rs` with aya-build.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowwarden"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed: {source}")]
    Bpffs { source: std::io::Error },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "this build has no kernel programs: it was built with AYA_BUILD_SKIP set; rebuild \
         without it"
    )]
    NotBuilt,
    #[error("cannot load the kernel programs (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the object file")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing (pinned under {pin_dir}?)")]
    MissingMap {
        name: &'static str,
        pin_dir: PathBuf,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("interface {interface}: {action}: {message}")]
    Attach {
        interface: String,
        action: &'static str,
        message: String,
    },
    #[error("map {name}: {action}: {source}")]
    Map {
        name: &'static str,
        action: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot open pinned map {path}: {source} (is the agent's datapath loaded?)")]
    OpenPinned {
        path: PathBuf,
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot read the kernel programs' log records (maps pinned under {pin_dir}): {source}")]
    KernelLog {
        pin_dir: PathBuf,
        source: Box<aya_log::Error>,
    },
    #[error("cannot remove {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How to load the datapath.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub pin_dir: PathBuf,
    pub flow_table_size: u32,
}

/// Loaded programs plus the handles of their (pinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub maps: Maps,
    pub events: EventReader,
    pub kernel_log: KernelLog,
}

impl Datapath {
    /// Loads the programs. Maps already pinned under `pin_dir/maps` are reused as they are
    /// (counters, grants and revocations continue); missing ones are created and pinned.
    ///
    /// The programs log at most at the `log` crate's level in force at load time (for the
    /// agent: its `FLOWWARDEN_LOG` filter's most verbose level); records above it are not even
    /// written. Programs adopted through pinned links keep the level they were loaded with.
    ///
    /// # Errors
    /// The build has no kernel programs (`AYA_BUILD_SKIP`), bpffs cannot be mounted, the pin
    /// directory cannot be created, or the kernel refuses the programs or maps.
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        ensure_bpffs()?;
        let maps_dir = maps_dir(&opts.pin_dir);
        for dir in [&maps_dir, &links_dir(&opts.pin_dir)] {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let kernel_logs_pin = maps_dir.join(agent_common::map_names::KERNEL_LOGS);
        // aya-log numbers its levels as `log` does (error 1 … trace 5, off 0).
        let log_level = log::max_level() as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            // aya-log-ebpf defines its ring buffer unpinned; pinned, it is shared with the
            // programs a restarted agent adopts instead of loading.
            .map_pin_path(
                agent_common::map_names::KERNEL_LOGS,
                kernel_logs_pin.as_path(),
            )
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .map_max_entries(agent_common::map_names::FLOWS, opts.flow_table_size)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: opts.pin_dir.clone(),
                source: Box::new(source),
            })?;
        let maps = Maps::take(&mut ebpf, &opts.pin_dir)?;
        let events = EventReader::take(&mut ebpf, &opts.pin_dir)?;
        let kernel_log = KernelLog::take(&mut ebpf, &opts.pin_dir)?;
        Ok(Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
            maps,
            events,
            kernel_log,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches ingress (XDP or TC) and TC egress to `interface`, or adopts the links a
    /// previous agent pinned there.
    ///
    /// # Errors
    /// The interface does not exist or the kernel refuses the attachment.
    pub fn attach(
        &mut self,
        interface: &str,
        ingress: IngressHook,
        xdp_mode: XdpModeChoice,
    ) -> Result<Vec<Attachment>, DatapathError> {
        attach::attach(&mut self.ebpf, &self.pin_dir, interface, ingress, xdp_mode)
    }

    /// Runs a program once per `repeat` on `frame` with BPF_PROG_TEST_RUN (tests, benchmarks).
    ///
    /// # Errors
    /// The program is unknown or the kernel refuses the run.
    pub fn test_run(
        &mut self,
        program: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        test_run::run(&mut self.ebpf, program, frame, repeat)
    }

    /// The benchmark floor program's map, so a benchmark can give it an entry to hit.
    ///
    /// # Errors
    /// The map is missing or refuses the write.
    pub fn prime_bench_floor(&mut self) -> Result<(), DatapathError> {
        test_run::prime_bench_floor(&mut self.ebpf)
    }
}

/// Maps the agent pins, `<pin dir>/maps/<NAME>`.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// Links the agent pins, `<pin dir>/links/<interface>/<hook>`.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The form every map key uses: IPv6, or IPv4 mapped into IPv6.
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => agent_common::ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr_bytes`]: IPv4-mapped addresses come back as IPv4.
pub fn addr_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The kernel's CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Mounts bpffs at /sys/fs/bpf when it is not there, so pins survive the agent.
fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .map_err(|source| DatapathError::Bpffs { source })?;
    if status.success() {
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        Ok(())
    } else {
        Err(DatapathError::Bpffs {
            source: std::io::Error::other(format!("mount exited with {status}")),
        })
    }
}

impl From<Mode> for u32 {
    fn from(mode: Mode) -> u32 {
        match mode {
            Mode::Enforce => agent_common::config::MODE_ENFORCE,
            Mode::Monitor => agent_common::config::MODE_MONITOR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for a in ["10.1.2.3", "::1", "fd00::7", "::ffff:10.0.0.1"] {
            let addr: IpAddr = a.parse().unwrap();
            let back = addr_from_bytes(addr_bytes(addr));
            match addr {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    assert_eq!(back, IpAddr::V4(v6.to_ipv4_mapped().unwrap()))
                }
                _ => assert_eq!(back, addr),
            }
        }
        assert_eq!(
            addr_bytes("10.1.2.3".parse().unwrap())[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
    }
}
