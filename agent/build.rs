//! Builds the kernel programs (agent-ebpf) with the nightly toolchain through aya-build.
//!
//! `AYA_BUILD_SKIP=1` (aya-build's own switch) builds the agent without them, for builds that
//! never load the datapath (the fuzz targets): the embedded object is then empty, and
//! `Datapath::load` refuses it with an error that says so.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The file `datapath` embeds, under OUT_DIR; aya-build names it after the eBPF binary.
const OBJECT: &str = "flowwarden";

fn main() -> anyhow::Result<()> {
    if skipped() {
        // aya-build prints the warning and registers the variable; the library still needs a
        // file to embed.
        aya_build::build_ebpf([], Toolchain::default())?;
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?).join(OBJECT);
        fs::write(&out, b"").with_context(|| format!("writing {}", out.display()))?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default()).map_err(|e| {
        anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` to install the nightly rust-src and bpf-linker"
        )
    })
}

/// Mirrors aya-build's reading of `AYA_BUILD_SKIP`.
fn skipped() -> bool {
    env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
