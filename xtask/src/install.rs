//! `cargo xtask install`: puts the agent on a host the way a package would. Binary, man page,
//! completions, systemd unit, a reference config (never over an existing one), an empty
//! policy directory and the example policies as documentation.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, cargo, workspace_root};

pub struct InstallArgs {
    /// Staging root (packaging); `/` for a real install.
    pub destdir: PathBuf,
    pub prefix: PathBuf,
    pub etc: PathBuf,
    pub unit_dir: PathBuf,
    /// Install this binary instead of building a release one.
    pub binary: Option<PathBuf>,
}

/// `destdir` + an absolute path.
fn under(destdir: &Path, path: &Path) -> PathBuf {
    destdir.join(path.strip_prefix("/").unwrap_or(path))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    println!("install: {}", to.display());
    Ok(())
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    println!("install: {}", to.display());
    Ok(())
}

/// Runs the just-built binary to generate a file (man page, completions).
fn generate(binary: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            binary.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

pub fn install(a: &InstallArgs) -> Result<()> {
    let root = workspace_root();
    let binary = match &a.binary {
        Some(b) => b.clone(),
        None => {
            crate::setup::setup()?;
            cmd::run(&mut cargo([
                "build",
                "--release",
                "-p",
                "flowwarden",
                "--bin",
                "flowwarden",
            ]))?;
            root.join("target/release/flowwarden")
        }
    };
    if !binary.is_file() {
        bail!(
            "no binary at {}: build it first or drop --binary",
            binary.display()
        );
    }
    let d = &a.destdir;
    let prefix = under(d, &a.prefix);
    let etc = under(d, &a.etc);
    copy(&binary, &prefix.join("bin/flowwarden"), 0o755)?;
    write(
        &prefix.join("share/man/man1/flowwarden.1"),
        &generate(&binary, &["man"])?,
        0o644,
    )?;
    for (shell, path) in [
        ("bash", "share/bash-completion/completions/flowwarden"),
        ("zsh", "share/zsh/site-functions/_flowwarden"),
        ("fish", "share/fish/vendor_completions.d/flowwarden.fish"),
    ] {
        write(
            &prefix.join(path),
            &generate(&binary, &["completions", shell])?,
            0o644,
        )?;
    }
    let doc = prefix.join("share/doc/flowwarden");
    copy(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    // The guides only: `docs/img` holds the README's screenshots, not documentation.
    for entry in fs::read_dir(root.join("docs"))?.flatten() {
        if entry.file_type()?.is_file() {
            copy(&entry.path(), &doc.join(entry.file_name()), 0o644)?;
        }
    }
    copy(
        &root.join("policies/example.toml"),
        &doc.join("examples/example.toml"),
        0o644,
    )?;

    // The config is the operator's: never overwritten.
    let config = etc.join("agent.toml");
    if config.exists() {
        println!("install: kept the existing {}", config.display());
    } else {
        copy(&root.join("packaging/agent.toml"), &config, 0o640)?;
    }
    // An empty policy directory protects nothing: installing never locks anyone out of a
    // service. Resources are protected once the operator writes a policy.
    let policies = etc.join("policies");
    fs::create_dir_all(&policies)?;
    // Whatever the umask: readable by the agent's users, writable by root only.
    for dir in [&etc, &policies] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    println!(
        "install: {} (empty: nothing is protected until you add a policy)",
        policies.display()
    );

    let unit = under(d, &a.unit_dir).join("flowwarden.service");
    let text = fs::read_to_string(root.join("packaging/flowwarden.service"))?
        .replace("/usr/local", &a.prefix.display().to_string())
        .replace("/etc/flowwarden", &a.etc.display().to_string());
    write(&unit, text.as_bytes(), 0o644)?;

    println!(
        "\nnext:\n  groupadd --system flowwarden; groupadd --system flowwarden-admin   # status socket access\n  \
         edit {}  (interfaces, [[auth.issuer]])\n  write a policy in {}  (see {})\n  \
         flowwarden config check --config {}\n  systemctl daemon-reload && systemctl enable --now flowwarden",
        a.etc.join("agent.toml").display(),
        a.etc.join("policies").display(),
        a.prefix
            .join("share/doc/flowwarden/examples/example.toml")
            .display(),
        a.etc.join("agent.toml").display(),
    );
    Ok(())
}
