//! The fleet: many agents joined over NATS JetStream. Signed control commands (terminate,
//! policy, and every other admin method of the status socket) reach every host, each applied
//! once; each host publishes its audit events and its live view; identity signals (SETs)
//! accepted by any host are applied on every host. Without `[fleet]` in `agent.toml` none of
//! this runs.

pub mod admin;
pub mod command;
pub mod config;
mod control;
pub mod events;
pub mod keys;
pub mod link;
pub mod policy;
pub mod signals;
pub mod state;
pub mod view;

use std::{path::PathBuf, sync::Arc};

pub use config::{FleetConfig, PolicySource};
pub use state::{FleetState, FleetStatus};

use crate::{api::core::Core, sessions::Sessions, store::Store};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("[fleet] {0}")]
    Config(String),
    #[error("admin public key {key:?}: {why}")]
    BadPublicKey { key: String, why: String },
    #[error("admin key {path}: {why}")]
    BadPrivateKey { path: PathBuf, why: String },
    #[error("cannot generate a key pair: the system's random source failed")]
    KeyGeneration,
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {what}: {detail}")]
    Nats { what: &'static str, detail: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the store stopped before recording a fleet command")]
    StoreGone,
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
}

/// The error of a NATS call that failed doing `what`, from its message.
pub(crate) fn nats(what: &'static str) -> impl FnOnce(String) -> FleetError {
    move |detail| FleetError::Nats { what, detail }
}

/// A configured fleet membership, checked, before the agent starts serving.
pub struct Membership {
    pub config: FleetConfig,
    pub keys: Vec<keys::AdminPublicKey>,
    pub state: Arc<FleetState>,
    /// Where this agent's signals receiver leaves the SETs it accepted, for the fleet.
    pub outbox: signals::Outbox,
}

impl Membership {
    /// Checks `[fleet]` and reads this agent's position from its store.
    ///
    /// # Errors
    /// The section is invalid, or the store cannot be read.
    pub fn prepare(config: FleetConfig, store: &Store) -> Result<Self, FleetError> {
        let keys = config.validate()?;
        let position = store
            .fleet_value::<u64>(crate::store::fleet::CONTROL_POSITION)?
            .unwrap_or(0);
        let state = Arc::new(FleetState::new(
            config.host_name(),
            config.strict,
            config.current_within_secs,
            position,
        ));
        if let Some(v) = store.fleet_value::<u64>(crate::store::fleet::POLICY_VERSION)? {
            state
                .policy_version
                .store(v, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Self {
            config,
            keys,
            state,
            outbox: signals::Outbox::new(store.clone()),
        })
    }

    /// Connects (in the background, with backoff) and starts the control, events, view and
    /// signals tasks on `tasks`. `receiver` is this agent's Shared Signals receiver, if it
    /// has one (built [`with_fleet`](crate::signals::Receiver::with_fleet) with this
    /// membership's `outbox`).
    ///
    /// # Errors
    /// A credential file cannot be read.
    pub async fn start(
        self,
        core: Arc<Core>,
        sessions: Arc<Sessions>,
        store: Store,
        state_dir: PathBuf,
        receiver: Option<Arc<crate::signals::Receiver>>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> Result<(), FleetError> {
        let state = Arc::clone(&self.state);
        let events_state = Arc::clone(&state);
        let client = link::connect(
            &self.config,
            format!("flowwarden-agent {}", state.host),
            false,
            move |event| {
                let connected = matches!(event, async_nats::Event::Connected);
                match event {
                    async_nats::Event::Connected | async_nats::Event::Disconnected => {
                        tracing::info!(%event, "fleet: link {event}");
                        events_state
                            .connected
                            .store(connected, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => tracing::debug!(event = %other, "fleet: link event"),
                }
            },
        )
        .await?;
        let server = {
            let info = client.server_info();
            if info.server_name.is_empty() {
                self.config.servers.join(", ")
            } else {
                format!("{} ({}:{})", info.server_name, info.host, info.port)
            }
        };
        state.set_server(server);
        let names = link::Names::new(&self.config.subject_prefix);
        let js = async_nats::jetstream::new(client);
        tracing::info!(host = %state.host, servers = ?self.config.servers, keys = self.keys.len(), strict = self.config.strict, "fleet: joining");
        let relay = Arc::new(signals::Relay {
            receiver,
            outbox: self.outbox,
            store: store.clone(),
            state: Arc::clone(&state),
            names: names.clone(),
        });
        tasks.spawn(Arc::clone(&relay).publish(js.clone()));
        tasks.spawn(relay.consume(js.clone()));
        let control = control::Control {
            core,
            store: store.clone(),
            state: Arc::clone(&state),
            keys: self.keys,
            names: names.clone(),
            policy_source: self.config.policy,
            state_dir,
        };
        tasks.spawn(control.run(js.clone()));
        tasks.spawn(events::publish(
            js.clone(),
            names.clone(),
            Arc::clone(&state),
            store,
        ));
        tasks.spawn(view::publish_view(js, names, state, sessions));
        Ok(())
    }
}
