//! Attaching, pinning and adopting the programs' links, and removing everything on request.
//!
//! Links are pinned as `<pin dir>/links/<interface>/<hook>`. A pinned link keeps its program
//! attached after the agent exits, so a crash or restart opens nothing; a restarted agent
//! finds the pin and adopts it instead of attaching a second time. Needs bpf_link support:
//! XDP links (Linux 5.9) and TCX (Linux 6.6); on older kernels TC falls back to clsact.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::{map_names, program_names};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
    },
    util::KernelVersion,
};

use super::{DatapathError, links_dir, maps_dir};
use crate::config::{IngressHook, XdpModeChoice};

/// What `attach` did on one hook of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    /// `xdp`, `tc_ingress` or `tc_egress`.
    pub hook: &'static str,
    /// True when a pinned link from an earlier agent was found and kept.
    pub adopted: bool,
    /// How it is attached (`xdp driver`, `xdp generic`, `tcx`, `clsact`), or `adopted`.
    pub how: String,
    /// Why this hook (ingress only; empty for egress, which is always TC).
    pub why: String,
}

/// The ingress hook chosen for one interface, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressChoice {
    /// `xdp` or `tc`.
    pub hook: IngressHook,
    /// The interface's driver as ethtool reports it (empty when it reports none).
    pub driver: String,
    pub why: String,
}

/// Drivers whose native XDP path costs throughput, so that `ingress = "auto"` checks ingress
/// with TC on them:
/// - `veth`: native XDP on one end makes the peer stop sending GSO super-packets (every
///   segment crosses the pair on its own); iperf3 over a veth pair fell to 0.3× with a
///   trivial XDP_PASS program, and stays at 1.0× with TC.
/// - `virtio_net`: attaching XDP turns off the guest's receive offloads (LRO, guest TSO).
/// - `tun` (tap devices of VMs and VPNs): XDP there runs per packet on a copied buffer.
///
/// Devices with no hardware behind them (no bus address: bridges, tunnels, dummies) have no
/// native XDP path to win from either.
const TC_DRIVERS: [&str; 3] = ["veth", "virtio_net", "tun"];

/// Decides the ingress hook for `interface`: the configured one, or for `auto` the one its
/// driver is fast with.
pub fn choose_ingress(interface: &str, configured: IngressHook) -> IngressChoice {
    let info = driver_info(interface);
    let driver = info.as_ref().map(|i| i.driver.clone()).unwrap_or_default();
    let (hook, why) = match configured {
        IngressHook::Xdp => (
            IngressHook::Xdp,
            "configured (ingress = \"xdp\")".to_owned(),
        ),
        IngressHook::Tc => (IngressHook::Tc, "configured (ingress = \"tc\")".to_owned()),
        IngressHook::Auto => match &info {
            None => (
                IngressHook::Tc,
                "auto: the interface reports no driver (virtual): TC".to_owned(),
            ),
            Some(i) if TC_DRIVERS.contains(&i.driver.as_str()) => (
                IngressHook::Tc,
                format!(
                    "auto: driver {}: its native XDP path costs throughput, TC does not",
                    i.driver
                ),
            ),
            Some(i) if i.bus.is_empty() => (
                IngressHook::Tc,
                format!(
                    "auto: driver {} has no hardware behind it (no bus address): TC",
                    i.driver
                ),
            ),
            Some(i) => (
                IngressHook::Xdp,
                format!("auto: driver {} on {}: native XDP", i.driver, i.bus),
            ),
        },
    };
    IngressChoice { hook, driver, why }
}

struct DriverInfo {
    driver: String,
    bus: String,
}

/// ETHTOOL_GDRVINFO through an ioctl on a socket of the current network namespace (sysfs may
/// show another namespace's interfaces).
fn driver_info(interface: &str) -> Option<DriverInfo> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    #[repr(C)]
    struct Drvinfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut libc::c_void,
        pad: [u8; 16],
    }
    let name = interface.as_bytes();
    if name.len() >= 16 {
        return None;
    }
    let mut info = Drvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let mut req = Ifreq {
        name: [0; 16],
        data: (&raw mut info).cast(),
        pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: a plain datagram socket, closed by OwnedFd below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name in `req` and writes at most
    // sizeof(struct ethtool_drvinfo) bytes to `info`, which both outlive the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL as _, &raw mut req) };
    if rc != 0 {
        return None;
    }
    let text = |b: &[u8]| {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let driver = text(&info.driver);
    (!driver.is_empty()).then(|| DriverInfo {
        driver,
        bus: text(&info.bus_info),
    })
}

type Result<T> = std::result::Result<T, DatapathError>;

fn attach_err(interface: &str, action: &'static str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Attach {
        interface: interface.to_owned(),
        action,
        message: e.to_string(),
    }
}

/// `<pin dir>/links/<interface>/<hook>`. bpffs refuses names with '.', which interface names
/// may contain (`eth0.100`); ':' never appears in one, so it stands in for '.'.
fn link_pin(pin_dir: &Path, interface: &str, hook: &str) -> PathBuf {
    links_dir(pin_dir)
        .join(interface.replace('.', ":"))
        .join(hook)
}

pub(super) fn attach(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
    ingress: IngressHook,
    xdp_mode: XdpModeChoice,
) -> Result<Vec<Attachment>> {
    let c_name = CString::new(interface).map_err(|e| attach_err(interface, "name", e))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(attach_err(
            interface,
            "lookup",
            "no such interface in this network namespace",
        ));
    }
    let dir = link_pin(pin_dir, interface, "x");
    let dir = dir.parent().expect("link pins live in a directory");
    std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut done = Vec::new();
    let choice = choose_ingress(interface, ingress);
    // Ingress first, then egress; a hook switched in the config is detached only after the new
    // one is in place, so the interface is never unguarded in between.
    let mut ingress = match choice.hook {
        IngressHook::Xdp | IngressHook::Auto => {
            let a = attach_xdp(ebpf, pin_dir, interface, xdp_mode)?;
            remove_link(&link_pin(pin_dir, interface, "tc_ingress"))?;
            a
        }
        IngressHook::Tc => {
            let a = attach_tc(
                ebpf,
                pin_dir,
                interface,
                TcAttachType::Ingress,
                program_names::TC_INGRESS,
                "tc_ingress",
            )?;
            remove_link(&link_pin(pin_dir, interface, "xdp"))?;
            a
        }
    };
    ingress.why = choice.why;
    done.push(ingress);
    done.push(attach_tc(
        ebpf,
        pin_dir,
        interface,
        TcAttachType::Egress,
        program_names::TC_EGRESS,
        "tc_egress",
    )?);
    Ok(done)
}

/// A pinned link from an earlier agent, if there is one.
fn adopt(path: &Path, interface: &str, hook: &'static str) -> Option<Attachment> {
    let link = PinnedLink::from_pin(path).ok()?;
    // Holding the fd is not needed: the pin keeps the link alive.
    drop(link);
    Some(Attachment {
        interface: interface.to_owned(),
        hook,
        adopted: true,
        how: "adopted".into(),
        why: String::new(),
    })
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
    choice: XdpModeChoice,
) -> Result<Attachment> {
    let path = link_pin(pin_dir, interface, "xdp");
    if let Some(a) = adopt(&path, interface, "xdp") {
        return Ok(a);
    }
    let prog: &mut Xdp = program(ebpf, program_names::XDP_INGRESS)?;
    let (link_id, how) = match choice {
        XdpModeChoice::Driver => (
            prog.attach(interface, XdpMode::Driver)
                .map_err(|e| attach_err(interface, "attach xdp (driver mode)", e))?,
            "xdp driver",
        ),
        XdpModeChoice::Generic => (
            prog.attach(interface, XdpMode::Skb)
                .map_err(|e| attach_err(interface, "attach xdp (generic mode)", e))?,
            "xdp generic",
        ),
        XdpModeChoice::Auto => match prog.attach(interface, XdpMode::Driver) {
            Ok(id) => (id, "xdp driver"),
            Err(e) => {
                tracing::warn!(
                    interface,
                    error = %e,
                    "XDP driver mode unavailable; falling back to generic mode (slower)"
                );
                (
                    prog.attach(interface, XdpMode::Skb)
                        .map_err(|e| attach_err(interface, "attach xdp (generic mode)", e))?,
                    "xdp generic",
                )
            }
        },
    };
    let link = prog
        .take_link(link_id)
        .map_err(|e| attach_err(interface, "take xdp link", e))?;
    let fd_link = FdLink::try_from(link).map_err(|e| {
        attach_err(
            interface,
            "pin xdp link",
            format!("{e}: this kernel lacks XDP bpf_link (Linux 5.9+ needed)"),
        )
    })?;
    fd_link
        .pin(&path)
        .map_err(|e| attach_err(interface, "pin xdp link", e))?;
    Ok(Attachment {
        interface: interface.to_owned(),
        hook: "xdp",
        adopted: false,
        how: how.into(),
        why: String::new(),
    })
}

fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    interface: &str,
    attach_type: TcAttachType,
    name: &'static str,
    hook: &'static str,
) -> Result<Attachment> {
    let path = link_pin(pin_dir, interface, hook);
    if let Some(a) = adopt(&path, interface, hook) {
        return Ok(a);
    }
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        // clsact is only needed for netlink attachment; an existing one is fine.
        match tc::qdisc_add_clsact(interface) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            Err(e) if e.to_string().contains("exists") => {}
            Err(e) => return Err(attach_err(interface, "add clsact qdisc", e)),
        }
    }
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    let link_id = prog
        .attach(interface, attach_type)
        .map_err(|e| attach_err(interface, "attach tc", e))?;
    let link = prog
        .take_link(link_id)
        .map_err(|e| attach_err(interface, "take tc link", e))?;
    if !tcx {
        // A clsact filter is not a bpf_link and cannot be pinned; it stays attached after we
        // exit as long as its link object is not dropped (dropping would detach it).
        std::mem::forget(link);
        return Ok(Attachment {
            interface: interface.to_owned(),
            hook,
            adopted: false,
            how: "clsact".into(),
            why: String::new(),
        });
    }
    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(interface, "pin tc link", e))?;
    fd_link
        .pin(&path)
        .map_err(|e| attach_err(interface, "pin tc link", e))?;
    Ok(Attachment {
        interface: interface.to_owned(),
        hook,
        adopted: false,
        how: "tcx".into(),
        why: String::new(),
    })
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    T: Loadable,
{
    let prog: &mut T = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
    prog.ensure_loaded()
        .map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
    Ok(prog)
}

/// Programs are verified and loaded on first use.
pub(super) trait Loadable {
    fn ensure_loaded(&mut self) -> std::result::Result<(), aya::programs::ProgramError>;
}

impl Loadable for Xdp {
    fn ensure_loaded(&mut self) -> std::result::Result<(), aya::programs::ProgramError> {
        match self.fd() {
            Ok(_) => Ok(()),
            Err(_) => self.load(),
        }
    }
}

impl Loadable for SchedClassifier {
    fn ensure_loaded(&mut self) -> std::result::Result<(), aya::programs::ProgramError> {
        match self.fd() {
            Ok(_) => Ok(()),
            Err(_) => self.load(),
        }
    }
}

/// Detaches a pinned link at once (even if some process still holds it) and removes its pin.
fn remove_link(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    if let Some(fd) = bpf_obj_get(path) {
        // BPF_LINK_DETACH: unlike closing the fd, this takes effect even while other
        // processes (a running agent) hold the link.
        bpf_link_detach(&fd);
    }
    std::fs::remove_file(path).map_err(|source| DatapathError::Unpin {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Removes everything the agent pinned under `pin_dir`: links (detaching the programs) and
/// maps (forgetting grants, flows and revocations). Returns what it removed.
///
/// # Errors
/// A pin cannot be removed.
pub fn detach_all(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = links_dir(pin_dir);
    if let Ok(interfaces) = std::fs::read_dir(&links) {
        for interface in interfaces.flatten() {
            let hooks = std::fs::read_dir(interface.path()).into_iter().flatten();
            for hook in hooks.flatten() {
                let path = hook.path();
                if remove_link(&path)? {
                    removed.push(path);
                }
            }
            let _ = std::fs::remove_dir(interface.path());
        }
    }
    let maps = maps_dir(pin_dir);
    // The legacy names too: detaching is how an agent's pins of an older layout are cleared.
    for name in map_names::ALL.iter().chain(&map_names::LEGACY) {
        let path = maps.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| DatapathError::Unpin {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    for dir in [links, maps, pin_dir.to_owned()] {
        // Only empty directories go; anything else there is not ours to delete.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}

fn bpf_obj_get(path: &Path) -> Option<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET (7) reads `pathname` (a NUL-terminated string that outlives the
    // call) from a zeroed bpf_attr of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    // SAFETY: a non-negative return is a new fd that we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf_link_detach(fd: &OwnedFd) {
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64;
    // SAFETY: BPF_LINK_DETACH (34) reads `link_fd` from a zeroed bpf_attr of the size we pass.
    // Failure (already detached) leaves nothing to do.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            34,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
}
