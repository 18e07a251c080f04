//! Gates for tests that need root (BPF programs, network namespaces) and the bpffs they pin into.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Where the agent pins its maps and links; the kernel only allows pinning on a bpf filesystem.
pub const BPFFS_PATH: &str = "/sys/fs/bpf";

/// Whether a privileged test may run: true when the effective uid is 0.
///
/// Without root the test is skipped (a note goes to stderr) so that `cargo test` stays usable
/// on a developer machine — except when `CI` is `true` or `1`: a CI job that silently skipped
/// every privileged test would report green while testing nothing, so there it panics.
///
/// Use it as `if !require_root("name") { return; }`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    let is_root = unsafe { libc::geteuid() } == 0;
    decide(is_root, std::env::var("CI").ok().as_deref(), test)
}

/// The policy of [`require_root`], apart from the process state so that it can be unit-tested.
fn decide(is_root: bool, ci: Option<&str>, test: &str) -> bool {
    if is_root {
        return true;
    }
    let in_ci = ci.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if in_ci {
        panic!("privileged test {test} needs root (CI=true: failing instead of skipping)");
    }
    eprintln!("skipping {test}: needs root");
    false
}

/// Whether a bpf filesystem is mounted at [`BPFFS_PATH`] in this mount namespace.
pub fn bpffs_mounted() -> bool {
    // An unreadable /proc/mounts means we cannot tell; "no" makes ensure_bpffs try to mount,
    // and that attempt reports the real problem.
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| mounts_have_bpffs(&m))
}

/// Looks for a `bpf` entry at [`BPFFS_PATH`] in the text of /proc/mounts.
fn mounts_have_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        // Fields: source, mount point, fs type, options, dump, pass.
        let mut fields = line.split_whitespace();
        let (_, mount_point, fs_type) = (fields.next(), fields.next(), fields.next());
        mount_point == Some(BPFFS_PATH) && fs_type == Some("bpf")
    })
}

/// Mounts a bpf filesystem at [`BPFFS_PATH`] unless one is already there (needs root).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    if bpffs_mounted() {
        return Ok(());
    }
    if !Path::new(BPFFS_PATH).is_dir() {
        std::fs::create_dir_all(BPFFS_PATH)
            .with_context(|| format!("creating mount point {BPFFS_PATH}"))?;
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS_PATH])
        .output()
        .context("running mount")?;
    if !out.status.success() {
        bail!(
            "`mount -t bpf bpf {BPFFS_PATH}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // mount can succeed yet leave the entry invisible to us (another mount namespace, a mount
    // stacked over it); callers rely on pinning working, so check what we can see.
    if !bpffs_mounted() {
        bail!("mounted bpffs at {BPFFS_PATH} but /proc/mounts does not show it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_runs() {
        assert!(decide(true, None, "t"));
        assert!(decide(true, Some("true"), "t"));
    }

    #[test]
    fn non_root_skips_outside_ci() {
        assert!(!decide(false, None, "t"));
        assert!(!decide(false, Some("false"), "t"));
        assert!(!decide(false, Some(""), "t"));
    }

    #[test]
    #[should_panic(
        expected = "privileged test t needs root (CI=true: failing instead of skipping)"
    )]
    fn non_root_fails_in_ci() {
        decide(false, Some("true"), "t");
    }

    #[test]
    #[should_panic(expected = "needs root")]
    fn non_root_fails_in_ci_numeric() {
        decide(false, Some("1"), "t");
    }

    #[test]
    fn parses_proc_mounts() {
        let with = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n";
        assert!(mounts_have_bpffs(with));
        // Right mount point, wrong type, and the reverse.
        let without = "tmpfs /sys/fs/bpf tmpfs rw 0 0\nbpf /mnt/bpf bpf rw 0 0\n";
        assert!(!mounts_have_bpffs(without));
        assert!(!mounts_have_bpffs(""));
    }

    #[test]
    fn ensure_bpffs_mounts_it() {
        if !require_root("ensure_bpffs_mounts_it") {
            return;
        }
        ensure_bpffs().unwrap();
        assert!(bpffs_mounted());
        // A second call must see the mount and do nothing.
        ensure_bpffs().unwrap();
    }
}
