//! A datapath loaded into the real kernel under a private pin directory, removed on drop, so
//! tests never touch a running agent's pins.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use flowwarden::{
    datapath::{Counters, Datapath, LoadOptions, detach_all},
    policy::{ResourceTable, parse_resources},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A pin directory unique to this process and call.
pub fn private_pin_dir(tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/fwtest-{tag}-{}-{n}",
        std::process::id()
    ))
}

/// The resources most tests protect: ssh (tcp/22), dns (udp/53), and admin (tcp/8443, only
/// towards 10.9.0.0/16 and fd09::/16).
pub const TEST_POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "dns"
protocol = "udp"
ports = [53]

[[resource]]
name = "admin"
protocol = "tcp"
ports = [8443]
destinations = ["10.9.0.0/16", "fd09::/16"]
"#;

pub fn test_resources() -> ResourceTable {
    parse_resources([(Path::new("test-policy.toml"), TEST_POLICY)]).expect("test policy parses")
}

pub struct LoadedDatapath {
    pub datapath: Datapath,
    pub resources: ResourceTable,
    pin_dir: PathBuf,
}

impl LoadedDatapath {
    /// Loads the programs with the test resources installed, enforce mode.
    pub fn new(tag: &str) -> Self {
        Self::with_flow_table(tag, agent_common_flows())
    }

    pub fn with_flow_table(tag: &str, flow_table_size: u32) -> Self {
        crate::privileged::ensure_bpffs().expect("bpffs");
        let pin_dir = private_pin_dir(tag);
        let mut datapath = Datapath::load(&LoadOptions {
            pin_dir: pin_dir.clone(),
            flow_table_size,
            ..LoadOptions::default()
        })
        .unwrap_or_else(|e| panic!("loading the datapath under {}: {e}", pin_dir.display()));
        let resources = test_resources();
        datapath
            .maps
            .install_resources(&resources)
            .expect("installing resources");
        Self {
            datapath,
            resources,
            pin_dir,
        }
    }

    pub fn resource_id(&self, name: &str) -> u32 {
        self.resources
            .by_name(name)
            .unwrap_or_else(|| panic!("no resource {name}"))
            .id
    }

    /// Where the maps are pinned: a second `Datapath::load` there adopts them, as a
    /// restarted agent does.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn counters(&self) -> Counters {
        self.datapath.maps.counters().expect("reading counters")
    }
}

impl Drop for LoadedDatapath {
    fn drop(&mut self) {
        let _ = detach_all(&self.pin_dir);
    }
}

fn agent_common_flows() -> u32 {
    flowwarden::config::Config::parse("", Path::new("defaults"))
        .expect("defaults parse")
        .datapath
        .flow_table_size
}
