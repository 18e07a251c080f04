//! The agent's library wired in-process as the agent wires it (private pinned datapath, store,
//! enforcer, audit, policy, sessions, a 2-worker runtime), for benches that measure the core
//! without a process or a network in front of it.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use flowwarden::{
    audit::Audit,
    config::SessionsConfig,
    datapath::{Datapath, LoadOptions},
    enforce::Enforcer,
    identity::Identity,
    policy::PolicyHandle,
    sessions::{Sessions, model::now_ms},
    store::Store,
};

use super::{Pins, bench_source};
use crate::{agent_proc::Scratch, loaded::private_pin_dir, privileged};

/// Concurrent admissions of [`InProcessAgent::admit_many`]: enough for the store to commit
/// large groups, as a busy agent does.
pub const ADMIT_TASKS: usize = 512;

/// The wired core. Fields drop in order: the runtime and sessions first, the pins (and so the
/// kernel maps) and the scratch directory last.
pub struct InProcessAgent {
    /// As the agent runs: two async workers.
    pub rt: tokio::runtime::Runtime,
    pub sessions: Arc<Sessions>,
    pub store: Store,
    pub enforcer: Arc<Enforcer>,
    pub policy: Arc<PolicyHandle>,
    pub pins: Pins,
    pub scratch: Scratch,
}

impl InProcessAgent {
    /// Loads a private datapath with a flow table of `flow_table_size` entries, installs the
    /// resources of `policy` (written to `policies/bench.toml` of a fresh scratch directory)
    /// and wires the rest on a store in that directory.
    ///
    /// # Errors
    /// Not root, no bpffs, the policy does not parse, or the datapath does not load.
    pub fn start(tag: &str, policy: &str, flow_table_size: u32) -> anyhow::Result<Self> {
        flowwarden::agent::map_large_allocations();
        privileged::ensure_bpffs()?;
        let scratch = Scratch::new(tag);
        let pins = Pins(private_pin_dir(tag));
        std::fs::write(scratch.dir.join("policies/bench.toml"), policy)?;
        let policy = Arc::new(PolicyHandle::new(scratch.dir.join("policies"))?);
        let datapath = Datapath::load(&LoadOptions {
            pin_dir: pins.0.clone(),
            flow_table_size,
            ..LoadOptions::default()
        })
        .with_context(|| format!("loading the datapath with a flow table of {flow_table_size}"))?;
        let mut maps = datapath.maps;
        maps.install_resources(flowwarden::datapath::ResourceEntries::from(
            &policy.current().resources,
        ))?;
        let enforcer = Arc::new(Enforcer::new(maps));
        let store = Store::open(&scratch.dir.join("state/state.redb"))?;
        let sessions = Arc::new(Sessions::new(
            Arc::clone(&enforcer),
            store.clone(),
            Audit::new(store.clone()),
            Arc::clone(&policy),
            SessionsConfig::default(),
            Vec::new(),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        // The agent's first sweep, within a second of its start, completes the flow index's
        // first walk; until one has, finding a session's flows walks the whole flow table
        // (see `enforce::flow_index`), which no running agent does after its first second.
        rt.block_on(sessions.sweep())
            .context("the first sweep, which completes the flow index")?;
        Ok(Self {
            rt,
            sessions,
            store,
            enforcer,
            policy,
            pins,
            scratch,
        })
    }

    /// The policy file the agent reads: a bench edits it to change the policy.
    pub fn policy_file(&self) -> PathBuf {
        self.scratch.dir.join("policies/bench.toml")
    }

    /// Admits sessions `0..n` through `Sessions::admit` from [`ADMIT_TASKS`] tasks, session
    /// `i` as `identity(i, now)` from [`bench_source`]`(i)`; returns how long it took.
    ///
    /// # Errors
    /// The first admission that fails.
    pub fn admit_many(
        &self,
        n: usize,
        identity: fn(usize, u64) -> Identity,
    ) -> anyhow::Result<Duration> {
        let now = now_ms() / 1000;
        let started = Instant::now();
        self.rt.block_on(async {
            let tasks: Vec<_> = (0..ADMIT_TASKS)
                .map(|task| {
                    let sessions = Arc::clone(&self.sessions);
                    tokio::spawn(async move {
                        for i in (task..n).step_by(ADMIT_TASKS) {
                            sessions.admit(identity(i, now), bench_source(i)).await?;
                        }
                        anyhow::Ok(())
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })?;
        Ok(started.elapsed())
    }
}
