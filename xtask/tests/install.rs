//! `cargo xtask install --destdir` with the debug binary: every file lands where the table in
//! docs/getting-started.md says, with the mode it says, and nothing else is written; an
//! existing config is kept; `--prefix` and friends move the files and the unit follows.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The workspace's debug `flowwarden`, built (or found up to date) once.
fn debug_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "flowwarden",
                "--bin",
                "flowwarden",
            ])
            .current_dir(workspace())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p flowwarden failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"))
            .join("debug/flowwarden")
    })
    .clone()
}

/// A scratch staging root, removed on drop.
struct Stage(PathBuf);

impl Stage {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fw-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn at(&self, path: &str) -> PathBuf {
        self.0.join(path.trim_start_matches('/'))
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cargo xtask install --destdir STAGE --binary DEBUG EXTRA...`: its stdout.
fn install(stage: &Stage, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("install")
        .arg("--destdir")
        .arg(&stage.0)
        .arg("--binary")
        .arg(debug_binary())
        .args(extra)
        .output()
        .expect("running xtask install");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "xtask install failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rows of the install table in docs/getting-started.md: (path, mode).
fn documented() -> Vec<(String, u32)> {
    let doc = read(&workspace().join("docs/getting-started.md"));
    let rows: Vec<(String, u32)> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `/"))
        .map(|rest| {
            let (path, rest) = rest.split_once("` | ").expect("| `PATH` | MODE | what |");
            let mode = rest.split(" | ").next().unwrap();
            let mode = u32::from_str_radix(mode.trim(), 8)
                .unwrap_or_else(|e| panic!("mode {mode:?} of /{path}: {e}"));
            (format!("/{path}"), mode)
        })
        .collect();
    assert!(
        rows.len() >= 10,
        "the install table was not found in docs/getting-started.md: {rows:?}"
    );
    rows
}

/// Every file and directory under `root`, as absolute paths inside the staging root.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let shown = format!("/{}", path.strip_prefix(root).unwrap().display());
            if path.is_dir() {
                seen.insert(format!("{shown}/"));
                todo.push(path);
            } else {
                seen.insert(shown);
            }
        }
    }
    seen
}

#[test]
fn every_file_lands_where_the_docs_say_with_the_documented_mode() {
    let stage = Stage::new("layout");
    install(&stage, &[]);
    let rows = documented();
    for (path, want) in &rows {
        let at = stage.at(path);
        assert!(at.exists(), "{path} was not installed");
        assert_eq!(
            path.ends_with('/'),
            at.is_dir(),
            "{path}: directory or file, as documented"
        );
        assert_eq!(
            mode(&at),
            *want,
            "{path}: mode {:o}, documented {want:o}",
            mode(&at)
        );
    }

    // Nothing that the table (and the guides next to the README) does not cover.
    let doc_dir = "/usr/local/share/doc/flowwarden/";
    let guides: BTreeSet<String> = std::fs::read_dir(workspace().join("docs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| format!("{doc_dir}{}", e.file_name().to_string_lossy()))
        .collect();
    for guide in &guides {
        assert_eq!(mode(&stage.at(guide)), 0o644, "{guide}");
    }
    for path in walk(&stage.0) {
        let covered = rows
            .iter()
            .any(|(p, _)| p == &path || (path.ends_with('/') && p.starts_with(&path)))
            || guides.contains(&path);
        assert!(covered, "{path} was installed but is not documented");
    }

    // The contents.
    assert_eq!(
        std::fs::read(stage.at("/usr/local/bin/flowwarden")).unwrap(),
        std::fs::read(debug_binary()).unwrap(),
        "the binary is the one given"
    );
    let man = read(&stage.at("/usr/local/share/man/man1/flowwarden.1"));
    assert!(man.contains(".TH flowwarden 1"), "not a man page:\n{man}");
    let bash = read(&stage.at("/usr/local/share/bash-completion/completions/flowwarden"));
    assert!(bash.contains("complete -F _flowwarden"), "{bash}");
    let zsh = read(&stage.at("/usr/local/share/zsh/site-functions/_flowwarden"));
    assert!(zsh.starts_with("#compdef flowwarden"), "{zsh}");
    let fish = read(&stage.at("/usr/local/share/fish/vendor_completions.d/flowwarden.fish"));
    assert!(fish.contains("complete -c flowwarden"), "{fish}");
    assert_eq!(
        read(&stage.at("/etc/flowwarden/agent.toml")),
        read(&workspace().join("packaging/agent.toml"))
    );
    assert_eq!(
        read(&stage.at(&format!("{doc_dir}examples/example.toml"))),
        read(&workspace().join("policies/example.toml"))
    );
    assert_eq!(
        read(&stage.at("/etc/systemd/system/flowwarden.service")),
        read(&workspace().join("packaging/flowwarden.service")),
        "with the default paths the unit is installed as shipped"
    );
    assert_eq!(
        std::fs::read_dir(stage.at("/etc/flowwarden/policies"))
            .unwrap()
            .count(),
        0,
        "the policy directory starts empty: nothing is protected until a policy is written"
    );
}

#[test]
fn an_existing_config_is_kept() {
    let stage = Stage::new("keep");
    install(&stage, &[]);
    let config = stage.at("/etc/flowwarden/agent.toml");
    let edited = "[datapath]\ninterfaces = [\"eth7\"]\n";
    std::fs::write(&config, edited).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = install(&stage, &[]);
    assert_eq!(
        read(&config),
        edited,
        "the operator's config was overwritten"
    );
    assert_eq!(mode(&config), 0o600, "the operator's mode was changed");
    assert!(
        out.contains(&format!("install: kept the existing {}", config.display())),
        "{out}"
    );
}

#[test]
fn prefix_etc_and_unit_dir_move_the_files_and_the_unit_follows() {
    let stage = Stage::new("paths");
    install(
        &stage,
        &[
            "--prefix",
            "/opt/flowwarden",
            "--etc",
            "/etc/fw",
            "--unit-dir",
            "/lib/systemd/system",
        ],
    );
    for path in [
        "/opt/flowwarden/bin/flowwarden",
        "/opt/flowwarden/share/man/man1/flowwarden.1",
        "/etc/fw/agent.toml",
        "/etc/fw/policies",
    ] {
        assert!(stage.at(path).exists(), "{path} was not installed");
    }
    assert!(!stage.at("/usr/local").exists() && !stage.at("/etc/flowwarden").exists());
    let unit = read(&stage.at("/lib/systemd/system/flowwarden.service"));
    assert!(
        unit.contains(
            "\nExecStart=/opt/flowwarden/bin/flowwarden agent --config /etc/fw/agent.toml\n"
        ),
        "{unit}"
    );
    assert!(
        unit.contains("\nExecStartPre=/opt/flowwarden/bin/flowwarden config check --config /etc/fw/agent.toml\n"),
        "{unit}"
    );
    assert!(
        !unit.contains("/usr/local") && !unit.contains("/etc/flowwarden"),
        "default paths left in the unit:\n{unit}"
    );
}
