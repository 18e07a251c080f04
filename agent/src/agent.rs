//! The agent daemon: brings the datapath up (adopting what an earlier agent pinned), loads
//! the store and reconciles the kernel with it, then serves admissions, sweeps sessions,
//! follows policy edits and records kernel events until told to stop. Stopping leaves
//! enforcement in place: a stopped agent opens nothing.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::{
    admission::{self, Admission, RateLimiter},
    api::{peer::AccessPolicy, transport::SocketOptions},
    audit::{
        Audit,
        event::{AuditEvent, AuditKind},
    },
    auth::Verifier,
    config::Config,
    datapath::{Datapath, DatapathEvent, LoadOptions},
    enforce::Enforcer,
    metrics::Metrics,
    policy::{Policy, PolicyError, PolicyHandle},
    sessions::{Sessions, model::SessionId},
    store::Store,
};

/// Allocations from this size on are mapped on their own, and unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MAPPED_ALLOCATION: libc::c_int = 1 << 20;

/// Has the C allocator (glibc) map every allocation of [`MAPPED_ALLOCATION`] or more on its
/// own and unmap it when freed. By default it raises that threshold to the largest block freed
/// so far (up to 32 MiB): once the first census of a large flow table has been replaced, each
/// later census's table (7 MiB at 100,000 sessions, built every few seconds while the one
/// before it still serves reads) is carved from the heap, and stays resident there as free
/// memory once replaced: 13 MiB more RSS in `bench scale`. A no-op with other C libraries.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes one setting of the allocator, under its own lock; any
    // threshold is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MAPPED_ALLOCATION);
    }
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// # Errors
/// Invalid config or policy, an unreadable state file, or a datapath that cannot be
/// brought up. Nothing is changed in the kernel when the config or the state is bad.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    map_large_allocations();
    let config = Config::load(config_path)?;
    if config.datapath.interfaces.is_empty() {
        anyhow::bail!(
            "{}: datapath.interfaces is empty: list the interfaces to enforce on, \
             e.g. interfaces = [\"eth0\"]",
            config_path.display()
        );
    }
    config
        .auth
        .validate()
        .with_context(|| format!("{}: [auth]", config_path.display()))?;
    config
        .signals
        .validate()
        .with_context(|| format!("{}: [signals]", config_path.display()))?;
    let verifier = Arc::new(Verifier::new(&config.auth).context("loading issuer keys")?);
    verifier.report_status();
    if config.auth.issuers.is_empty() {
        tracing::warn!("no [[auth.issuer]] configured: every admission will be rejected");
    }
    let policy = Arc::new(
        PolicyHandle::new(&config.policy.dir)
            .with_context(|| format!("loading policies from {}", config.policy.dir.display()))?,
    );
    // The store before the kernel: a corrupt state file must stop us before we touch anything.
    let store = Store::open(&config.state.store_path())?;
    let stored = store.sessions()?;
    let fleet = config
        .fleet
        .clone()
        .map(|f| crate::fleet::Membership::prepare(f, &store))
        .transpose()
        .with_context(|| format!("{}: [fleet]", config_path.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, verifier, policy, store, stored, fleet))
}

async fn serve(
    config: Config,
    verifier: Arc<Verifier>,
    policy: Arc<PolicyHandle>,
    store: Store,
    stored: Vec<crate::sessions::model::Session>,
    fleet: Option<crate::fleet::Membership>,
) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: config.datapath.pin_dir.clone(),
        flow_table_size: config.datapath.flow_table_size,
        session_slots: config.datapath.session_slots,
        session_flow_limit: config.datapath.session_flow_limit,
    })?;
    // Resources and mode go in before any attachment, so the programs never run unconfigured.
    datapath
        .maps
        .install_resources(&policy.current().resources)?;
    datapath.maps.set_mode(config.datapath.mode)?;
    let mut ingress = Vec::new();
    for interface in &config.datapath.interfaces {
        for a in datapath.attach(interface, config.datapath.ingress, config.datapath.xdp_mode)? {
            tracing::info!(interface = %a.interface, hook = a.hook, how = %a.how, adopted = a.adopted, why = %a.why, "attached");
            if a.hook != "tc_egress" {
                ingress.push(crate::api::views::IngressView {
                    interface: a.interface,
                    hook: a.hook.to_owned(),
                    how: a.how,
                    why: a.why,
                });
            }
        }
    }
    let Datapath {
        maps,
        events,
        kernel_log,
        ..
    } = datapath;
    forward_kernel_logs(kernel_log);
    let enforcer = Arc::new(Enforcer::new(maps));
    let audit = Audit::new(store.clone());
    let sessions = Arc::new(Sessions::new(
        Arc::clone(&enforcer),
        store.clone(),
        audit.clone(),
        Arc::clone(&policy),
        config.sessions.clone(),
        stored,
    ));
    // The policy may have been edited while the agent was down (or the last change was
    // enforced and not yet recorded when it stopped): restored sessions are held to the
    // policy in force now, not the one they were admitted under. Before the reconciliation,
    // so that it never writes back to the kernel a grant the policy took away.
    let outcome = sessions.apply_policy(&policy.current()).await?;
    if outcome.grants_removed > 0 {
        tracing::info!(
            ?outcome,
            "policy edited while the agent was down: applied to restored sessions"
        );
    }
    let reconciled = sessions.reconcile().await?;
    tracing::info!(?reconciled, "store and kernel reconciled");
    // Fail closed: an agent that cannot read its locks does not start (it would forget them).
    sessions.locks().health()?;
    let locked = sessions.enforce_locks("agent").await?;
    tracing::info!(counts = ?sessions.locks().counts(), ended = locked.len(), "locks restored");
    // The flow index learns the flows opened before this start (under an earlier agent, or
    // while none ran) from one walk; until it completes, lookups walk the table themselves.
    // Kernel events are read from here on, so no flow opened meanwhile is missed either.
    {
        let enforcer = Arc::clone(&enforcer);
        tokio::task::spawn_blocking(move || {
            let census = enforcer.census();
            tracing::info!(
                flows = census.flows,
                "flow index reconciled with the kernel"
            );
        });
    }
    sessions
        .record(vec![AuditEvent::new(AuditKind::AgentStarted)])
        .await?;

    let tls = admission::tls::load_or_generate(
        config.admission.cert_file.as_deref(),
        config.admission.key_file.as_deref(),
        &config.state.dir,
    )?;
    if tls.generated {
        tracing::info!(cert = %tls.cert_path.display(), "generated a self-signed admission certificate");
    }
    let listener = tokio::net::TcpListener::bind(config.admission.listen)
        .await
        .with_context(|| format!("binding the admission endpoint {}", config.admission.listen))?;
    tracing::info!(
        listen = %config.admission.listen,
        fingerprint = %format!("sha256:{}", tls.fingerprint),
        "admission endpoint (clients pin this fingerprint with `flowwarden login --fingerprint`)"
    );
    let metrics = Arc::new(Metrics::default());
    let fleet_state = fleet.as_ref().map(|f| Arc::clone(&f.state));
    if let Some(state) = &fleet_state {
        let _ = metrics.fleet.set(Arc::clone(state));
    }
    let nofile = admission::open_files();
    let admission_limit = admission::affordable(
        config.admission.max_connections,
        nofile,
        config.api.max_connections,
    );
    tracing::info!(
        open_files = nofile,
        admission_connections = admission_limit,
        per_source = config.admission.max_connections_per_source,
        status_connections = config.api.max_connections,
        reserved = admission::RESERVED_DESCRIPTORS,
        "descriptor budget"
    );
    // Shared Signals: identity-provider events end and narrow sessions (see docs/signals.md).
    // With a fleet, the SETs this agent accepts go to every other agent too.
    let signal_outbox = fleet.as_ref().map(|f| f.outbox.clone());
    let signals = if config.signals.transmitters.is_empty() {
        None
    } else {
        let receiver = Arc::new(
            crate::signals::Receiver::new(
                &config.signals,
                &config.auth,
                Arc::clone(&sessions),
                store.clone(),
            )
            .context("starting the Shared Signals receiver")?
            .with_fleet(signal_outbox.clone()),
        );
        receiver.report_status();
        receiver.spawn_key_refresh();
        Some(receiver)
    };
    let _pollers = signals
        .as_ref()
        .map(|r| crate::signals::poll::start(r, store.clone(), tokio::runtime::Handle::current()))
        .transpose()
        .context("starting the Shared Signals poll loops")?;
    let _streams = signals
        .as_ref()
        .map(crate::signals::stream::start)
        .transpose()
        .context("starting Shared Signals stream management")?;
    let admission = Arc::new(Admission {
        sessions: Arc::clone(&sessions),
        verifier,
        limiter: RateLimiter::new(config.admission.rate_per_sec, config.admission.rate_burst),
        metrics: Arc::clone(&metrics),
        budget: admission::Budget::new(
            admission_limit,
            config.admission.max_connections_per_source,
        ),
        request_timeout: Duration::from_millis(config.admission.request_timeout_ms),
        signals: signals.clone(),
        fleet: fleet_state.clone(),
    });
    let core = Arc::new(crate::api::core::Core {
        sessions: Arc::clone(&sessions),
        enforcer: Arc::clone(&enforcer),
        policy: Arc::clone(&policy),
        info: crate::api::core::AgentInfo {
            interfaces: config.datapath.interfaces.clone(),
            ingress,
            pin_dir: config.datapath.pin_dir.display().to_string(),
            admission_listen: config.admission.listen.to_string(),
            admission_fingerprint: tls.fingerprint.clone(),
            started: std::time::Instant::now(),
            groups: crate::api::peer::Groups {
                admin: config.api.admin_group.clone(),
                read: config.api.read_group.clone(),
            },
            fleet: fleet_state,
        },
    });
    let access = AccessPolicy::from_names(&config.api.admin_group, &config.api.read_group)?;
    let mut socket = SocketOptions::new(&config.api.socket);
    socket.read_group = access.read_gid;
    socket.max_connections = config.api.max_connections;
    socket.idle_timeout = Duration::from_secs(config.api.idle_timeout_secs);
    socket.max_per_uid = config.api.max_connections_per_uid;
    socket.admin_reserve = config.api.admin_reserve;
    socket.pressure_idle_timeout = Duration::from_secs(
        config
            .api
            .pressure_idle_timeout_secs
            .min(config.api.idle_timeout_secs),
    );
    // Bound here, and served on as it is: a taken or unusable socket path stops the start
    // with its reason.
    let status_socket = crate::api::transport::bind(&socket)?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(fleet) = fleet {
        fleet
            .start(
                Arc::clone(&core),
                Arc::clone(&sessions),
                store.clone(),
                config.state.dir.clone(),
                signals,
                &mut tasks,
            )
            .await?;
    }
    tasks.spawn(crate::api::transport::serve_listener(
        status_socket,
        socket,
        access,
        core,
    ));
    tasks.spawn(admission::serve(
        listener,
        Arc::clone(&tls.config),
        admission,
    ));
    if config.metrics.enabled {
        let listener = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("binding the metrics endpoint {}", config.metrics.listen))?;
        tracing::info!(listen = %config.metrics.listen, "metrics at /metrics");
        tasks.spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&sessions),
            Arc::clone(&enforcer),
        ));
    }
    // Dropped when `serve` returns, which ends the sweep thread.
    let _sweeper = start_sweeper(
        Arc::clone(&sessions),
        Duration::from_millis(config.sessions.sweep_interval_ms),
    )?;
    tasks.spawn(event_loop(Arc::clone(&sessions), events));
    tasks.spawn(crate::locks::sweep_loop(
        Arc::clone(&sessions),
        config.locks.clone(),
        Duration::from_millis(config.sessions.sweep_interval_ms),
    ));
    tasks.spawn(crate::enforce::pressure::watch(
        Arc::clone(&enforcer),
        Duration::from_millis(config.sessions.sweep_interval_ms),
    ));
    let _watch = (config.policy.watch_interval_ms > 0).then(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(policy_loop(Arc::clone(&sessions), Arc::clone(&metrics), rx));
        crate::policy::watch(
            Arc::clone(&policy),
            Duration::from_millis(config.policy.watch_interval_ms),
            move |change| {
                let _ = tx.send(change);
            },
        )
    });

    tracing::info!(
        interfaces = ?config.datapath.interfaces,
        resources = policy.current().resources.resources.len(),
        live_sessions = sessions.live_count(),
        mode = ?config.datapath.mode,
        pin_dir = %config.datapath.pin_dir.display(),
        "ready"
    );
    wait_for_stop().await;
    tasks.abort_all();
    if let Err(e) = sessions
        .record(vec![AuditEvent::new(AuditKind::AgentStopped)])
        .await
    {
        tracing::warn!(error = %e, "cannot record the stop");
    }
    tracing::info!(
        "stopping; enforcement stays in place (`flowwarden datapath detach` removes it)"
    );
    Ok(())
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Starts the sweep on a thread of its own, which stops (after the pass under way) when the
/// returned guard is dropped.
///
/// A sweep looks at every session (a few milliseconds of CPU with 70,000 of them) once per
/// interval. On one of the runtime's two workers that burst held up every admission queued
/// behind it: at 1,000 admissions a second the slowest ones came once a second, 5–14 ms late,
/// each right at a sweep. On its own thread, the kernel's scheduler shares the CPU with the
/// admissions instead.
fn start_sweeper(sessions: Arc<Sessions>, every: Duration) -> anyhow::Result<Sweeper> {
    let runtime = tokio::runtime::Handle::current();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sweep".into())
        .spawn(move || {
            let mut next = std::time::Instant::now() + every;
            // Nothing is ever sent: the guard's drop disconnects the channel.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(next.saturating_duration_since(std::time::Instant::now()))
            {
                match runtime.block_on(sessions.sweep()) {
                    Ok(out) if out != Default::default() => tracing::debug!(?out, "sweep"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "sweep failed"),
                }
                // A sweep that overran its interval is followed by a whole one, not a burst.
                next += every;
                let now = std::time::Instant::now();
                if next < now {
                    next = now + every;
                }
            }
        })
        .context("starting the sweep thread")?;
    Ok(Sweeper {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Stops the sweep thread when dropped, and waits for it: while the runtime (whose timer the
/// sweep uses between slices) is still there.
struct Sweeper {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the sweep thread panicked");
        }
    }
}

/// Kernel events arrive on a blocking reader thread (the ring buffer is polled with poll(2))
/// and are recorded from here.
async fn event_loop(sessions: Arc<Sessions>, mut events: crate::datapath::EventReader) {
    let (tx, mut rx) = mpsc::channel::<DatapathEvent>(4096);
    let enforcer = Arc::clone(sessions.enforcer());
    std::thread::spawn(move || {
        loop {
            events.wait(Duration::from_millis(200));
            while let Some(e) = events.try_next() {
                // Into the flow index at once, on this thread: a termination finds the flow
                // even while the audit record is still queued.
                if e.kind == crate::datapath::EventKind::FlowOpened {
                    enforcer.flow_opened(SessionId(e.session_id), &flow_key(&e));
                }
                if tx.blocking_send(e).is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    while let Some(e) = rx.recv().await {
        if let Err(err) = sessions.on_datapath_event(&e).await {
            tracing::error!(error = %err, "cannot record a datapath event");
        }
    }
}

/// The kernel's key of the flow an event is about (the source is the client).
fn flow_key(e: &DatapathEvent) -> crate::datapath::FlowKey {
    crate::datapath::FlowKey {
        src: crate::datapath::addr_bytes(e.source.ip()),
        dst: crate::datapath::addr_bytes(e.destination.ip()),
        sport: e.source.port(),
        dport: e.destination.port(),
        proto: e.proto,
        _pad: [0; 3],
    }
}

/// The kernel programs' log records go into the agent's log, from a blocking reader thread
/// (poll(2) on aya-log's ring buffer) that lives as long as the process.
fn forward_kernel_logs(mut kernel_log: crate::datapath::KernelLog) {
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || {
            loop {
                kernel_log.wait(Duration::from_millis(500));
                kernel_log.flush();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the kernel log reader: kernel log records are not shown");
    }
}

/// Applies each policy change ([`Sessions::install_policy`]). A bad edit is recorded and the
/// last good policy stays.
async fn policy_loop(
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    mut changes: mpsc::UnboundedReceiver<Result<Arc<Policy>, PolicyError>>,
) {
    while let Some(change) = changes.recv().await {
        match change {
            Ok(policy) => {
                let applied = sessions.install_policy(policy).await;
                metrics.policy_reloaded(applied.is_ok());
                if let Err(e) = applied {
                    tracing::error!(error = %e, "applying the new policy failed");
                }
            }
            Err(e) => {
                metrics.policy_reloaded(false);
                tracing::error!(error = %e, "policy edit refused; the last good policy stays in force");
                let ev = AuditEvent::new(AuditKind::PolicyRejected {
                    error: e.to_string(),
                });
                if let Err(err) = sessions.record(vec![ev]).await {
                    tracing::error!(error = %err, "cannot record the refused policy");
                }
            }
        }
    }
}
