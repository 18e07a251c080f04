//! The agent daemon: loads config and policy, brings the datapath up (adopting what an earlier
//! agent pinned), and reports kernel events until told to stop. Stopping leaves enforcement
//! in place: a stopped agent opens nothing.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    config::Config,
    datapath::{Datapath, DatapathEvent, EventKind, LoadOptions},
    policy::{self, ResourceTable},
};

/// Runs the agent until SIGTERM or SIGINT.
///
/// # Errors
/// Invalid config or policy, or a datapath that cannot be brought up.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    if config.datapath.interfaces.is_empty() {
        anyhow::bail!(
            "{}: datapath.interfaces is empty: list the interfaces to enforce on, \
             e.g. interfaces = [\"eth0\"]",
            config_path.display()
        );
    }
    let resources = policy::load_resources(&config.policy.dir)
        .with_context(|| format!("loading policies from {}", config.policy.dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }

    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: config.datapath.pin_dir.clone(),
        flow_table_size: config.datapath.flow_table_size,
    })?;
    // Resources and mode go in before any attachment, so the programs never run unconfigured.
    datapath.maps.install_resources(&resources)?;
    datapath.maps.set_mode(config.datapath.mode)?;
    for interface in &config.datapath.interfaces {
        for a in datapath.attach(interface, config.datapath.ingress, config.datapath.xdp_mode)? {
            tracing::info!(interface = %a.interface, hook = a.hook, how = %a.how, adopted = a.adopted, "attached");
        }
    }
    tracing::info!(
        interfaces = ?config.datapath.interfaces,
        resources = resources.resources.len(),
        mode = ?config.datapath.mode,
        pin_dir = %config.datapath.pin_dir.display(),
        "ready"
    );

    while !stop.load(Ordering::Relaxed) {
        datapath.events.wait(Duration::from_millis(200));
        while let Some(event) = datapath.events.try_next() {
            log_event(&event, &resources);
        }
    }
    tracing::info!(
        "stopping; enforcement stays in place (`flowwarden datapath detach` removes it)"
    );
    Ok(())
}

fn log_event(e: &DatapathEvent, resources: &ResourceTable) {
    let resource = resources
        .by_id(e.resource_id)
        .map_or("?", |r| r.name.as_str());
    match e.kind {
        EventKind::FlowOpened => tracing::info!(
            session = format_args!("{:016x}", e.session_id), resource, source = %e.source,
            destination = %e.destination, "flow opened"
        ),
        EventKind::FlowDenied(reason) => tracing::info!(
            resource, source = %e.source, destination = %e.destination,
            reason = reason.as_str(), monitor = e.monitor, "flow denied"
        ),
        EventKind::FirstDropAfterRevoke => tracing::info!(
            session = format_args!("{:016x}", e.session_id), resource, source = %e.source,
            destination = %e.destination, "first packet dropped after revocation"
        ),
    }
}
