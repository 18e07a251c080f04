//! Starting the console: the agent link, the audit follower, the identity provider, and the
//! listener (plain HTTP on loopback, TLS with a configured or generated pair beyond).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;

use crate::fleet::{FleetConfig, keys::AdminKey};
use tokio::{net::TcpListener, sync::broadcast};

use super::{
    Access, ConsoleError, Shared, State,
    agent::AgentLink,
    config::{ConsoleConfig, ConsoleOidc},
    hosts::FleetView,
    oidc::Oidc,
    routes::router,
};

/// A TLS handshake not done within this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running console.
pub struct Console {
    pub state: Shared,
    pub addr: SocketAddr,
    /// The URL browsers use.
    pub url: String,
    pub tls_fingerprint: Option<String>,
}

impl Console {
    /// Builds the shared state. `oidc` absent: nobody can sign in through a browser (benches
    /// open console sessions in process with [`Console::sign_in_in_process`]). `fleet`
    /// present: the Hosts page, over a link that connects in the background.
    ///
    /// # Errors
    /// The identity provider cannot be discovered; a fleet credential file cannot be read.
    pub async fn state(
        cfg: &ConsoleConfig,
        oidc: Option<ConsoleOidc>,
        fleet: Option<(FleetConfig, Option<AdminKey>)>,
        socket: PathBuf,
        tls: bool,
    ) -> Result<Shared, ConsoleError> {
        let public_url = cfg.public_url();
        let (admin_groups, read_groups) = oidc.as_ref().map_or_else(
            || (Vec::new(), Vec::new()),
            |o| (o.admin_groups.clone(), o.read_groups.clone()),
        );
        let oidc = match oidc {
            Some(o) => Some(
                tokio::task::spawn_blocking(move || Oidc::discover(o, &public_url))
                    .await
                    .map_err(|e| ConsoleError::Internal(e.to_string()))??,
            ),
            None => None,
        };
        let fleet = match fleet {
            Some((f, key)) => Some(
                FleetView::connect(&f, key)
                    .await
                    .map_err(ConsoleError::Fleet)?,
            ),
            None => None,
        };
        let agent = AgentLink::new(socket);
        let (audit, _) = broadcast::channel(1024);
        agent.spawn_audit_hub(audit.clone());
        Ok(Arc::new(State {
            agent,
            access: Access::new(
                Duration::from_secs(cfg.session_secs),
                admin_groups,
                read_groups,
                tls,
            ),
            oidc,
            audit,
            fleet,
        }))
    }

    /// A console session opened without a browser, for benches and in-process tests: the
    /// cookie (name and value) to send.
    pub fn sign_in_in_process(state: &Shared, user: &str, role: super::Role) -> (String, String) {
        let value = state.access.sign_in_as(user, role);
        (state.access.cookie_name().to_owned(), value)
    }
}

/// Serves `state` on `listener` over plain HTTP until the task is dropped.
///
/// # Errors
/// The listener fails.
pub async fn serve_plain(listener: TcpListener, state: Shared) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

async fn serve_tls(listener: TcpListener, state: Shared, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(state);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "console: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "console: TLS handshake failed or timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs the console from the agent's config until SIGINT or SIGTERM. Blocking. `fleet` is
/// the config's `[fleet]`, if any: then the console also shows the fleet's hosts.
///
/// # Errors
/// The config, the identity provider, the certificate or the listener.
pub fn run(
    cfg: &ConsoleConfig,
    fleet: Option<&FleetConfig>,
    config_dir: &Path,
    socket: PathBuf,
    state_dir: &Path,
) -> Result<(), ConsoleError> {
    let fleet = cfg.fleet_link(fleet, config_dir)?;
    // Read now: a console configured to command the fleet with an unusable key stops here.
    let admin_key = cfg
        .fleet_admin_key(config_dir)
        .map(|path| AdminKey::load(&path))
        .transpose()
        .map_err(ConsoleError::Fleet)?;
    let (cfg, oidc) = cfg.checked(config_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ConsoleError::Internal(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let tls = if cfg.beyond_loopback() {
            let dir = state_dir.join("console");
            std::fs::create_dir_all(&dir)
                .map_err(|e| ConsoleError::Tls(format!("{}: {e}", dir.display())))?;
            let pair = crate::admission::tls::load_or_generate(
                cfg.cert_file.as_deref(),
                cfg.key_file.as_deref(),
                &dir,
            )
            .map_err(|e| ConsoleError::Tls(e.to_string()))?;
            Some(pair)
        } else {
            None
        };
        let issuer = oidc.issuer.clone();
        if let Some(f) = &fleet {
            tracing::info!(servers = ?f.servers, prefix = %f.subject_prefix, commands = admin_key.is_some(), "console: the Hosts and Fleet sessions pages read the fleet's view");
        }
        let fleet = fleet.map(|f| (f, admin_key));
        let state = Console::state(&cfg, Some(oidc), fleet, socket, tls.is_some()).await?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ConsoleError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ConsoleError::Listen {
                addr: cfg.listen,
                source,
            })?;
        match &tls {
            Some(pair) => tracing::info!(
                url = %cfg.public_url(), %addr, fingerprint = %pair.fingerprint,
                cert = %pair.cert_path.display(), %issuer,
                "console listening (TLS)"
            ),
            None => tracing::info!(url = %cfg.public_url(), %addr, %issuer, "console listening"),
        }
        let served = async move {
            match tls {
                Some(pair) => {
                    serve_tls(listener, state, pair.config).await;
                    Ok(())
                }
                None => serve_plain(listener, state).await,
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ConsoleError::Internal(e.to_string()))?;
        tokio::select! {
            r = served => r.map_err(|source| ConsoleError::Listen { addr, source }),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}
