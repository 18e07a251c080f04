//! The datapath: loads the kernel programs, attaches and pins them, adopts what a previous
//! agent pinned, and hands out typed map handles. The only code in the agent that touches aya.

mod attach;
mod batch;
mod events;
mod logs;
mod maps;
mod slots;
mod test_run;
mod walk;

use std::path::{Path, PathBuf};

pub use agent_common::{Event, Flow, FlowKey, ResourceEntries, addr_bytes, addr_from_bytes};
use aya::{Ebpf, EbpfLoader};

pub use attach::{Attachment, IngressChoice, choose_ingress, detach_all};
pub use events::{DatapathEvent, EventKind, EventReader};
pub use logs::KernelLog;
pub use maps::{Counters, DropReason, Maps};
pub use slots::{Revocation, SessionStats, SlotTable};
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
    #[error(
        "the session table is full ({capacity} sessions hold a slot): admission refused; raise \
         [datapath] session_slots in the agent's config (a new size takes effect when the maps \
         are created: `flowwarden datapath detach`, then start the agent)"
    )]
    SessionTableFull { capacity: u32 },
    #[error("session table {name}: {message}")]
    SlotTable { name: &'static str, message: String },
    #[error(
        "maps of an older flowwarden layout are pinned under {maps_dir} ({found}): this agent \
         keeps revocations and session counters in session slots and cannot adopt them. Run \
         `flowwarden datapath detach --pin-dir {pin_dir}` (it removes the old programs and \
         pins: enforcement stops until the agent starts again), then start this agent: it \
         restores sessions, grants and revocations from its store"
    )]
    OldLayout {
        pin_dir: PathBuf,
        maps_dir: PathBuf,
        found: String,
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
    /// Slots of the session table: sessions that may hold grants, flows or a revocation at
    /// once. Like `flow_table_size`, it takes effect when the maps are created.
    pub session_slots: u32,
    /// Live flows one session may hold (zero: no budget but the flow table's size).
    pub session_flow_limit: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/flowwarden"),
            flow_table_size: agent_common::map_sizes::FLOWS,
            session_slots: agent_common::map_sizes::SESSIONS,
            session_flow_limit: agent_common::map_sizes::SESSION_FLOW_LIMIT,
        }
    }
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
        refuse_old_layout(&opts.pin_dir)?;
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
            .map_max_entries(agent_common::map_names::SESSIONS, opts.session_slots)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: opts.pin_dir.clone(),
                source: Box::new(source),
            })?;
        let mut maps = Maps::take(&mut ebpf, &opts.pin_dir)?;
        maps.set_session_flow_limit(opts.session_flow_limit)?;
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

/// Refuses pins of the layout before session slots (see [`DatapathError::OldLayout`]): the
/// programs of this build would fail to load against them, with a verifier message that
/// says nothing of what to do.
fn refuse_old_layout(pin_dir: &Path) -> Result<(), DatapathError> {
    let maps_dir = maps_dir(pin_dir);
    let found: Vec<&str> = agent_common::map_names::LEGACY
        .into_iter()
        .filter(|name| maps_dir.join(name).exists())
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(DatapathError::OldLayout {
        pin_dir: pin_dir.to_owned(),
        maps_dir,
        found: found.join(", "),
    })
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

    /// The eBPF side names its maps with literals (`#[map(name = ...)]` takes no constant):
    /// the built object must define exactly the maps `agent_common::map_names` lists.
    #[test]
    fn map_names_match_the_object() {
        if EBPF_OBJECT.is_empty() {
            // AYA_BUILD_SKIP builds have no object; `Datapath::load` refuses them anyway.
            return;
        }
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut in_object: Vec<&str> = object.maps.keys().map(String::as_str).collect();
        // Sections the loader makes maps of (.bss, .rodata of aya-log's level) are not ours.
        in_object.retain(|name| !name.starts_with('.'));
        in_object.sort_unstable();
        let mut listed: Vec<&str> = agent_common::map_names::IN_OBJECT.to_vec();
        listed.sort_unstable();
        assert_eq!(
            in_object, listed,
            "maps in the built object (left) differ from agent_common::map_names::IN_OBJECT (right)"
        );
        for name in agent_common::map_names::ALL {
            assert!(
                listed.contains(&name),
                "pinned map {name} is not in IN_OBJECT"
            );
        }
    }
}
