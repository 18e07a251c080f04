//! The web console (`flowwarden console`): live sessions, a session's detail, terminate,
//! audit and policy pages in a browser. It is one more client of the status socket, like the
//! CLI: it adds no path to the kernel or the store. Administrators sign in through OpenID
//! Connect; their groups make them read-only or admin. With `[fleet]` it also shows the
//! fleet's hosts and every host's live sessions, read from the fleet's view over NATS.

mod access;
mod agent;
mod audit;
pub mod config;
mod fleet_sessions;
mod hosts;
mod html;
mod live;
mod locks;
mod oidc;
mod policy;
mod routes;
mod serve;
mod sessions;

use std::sync::Arc;

use tokio::sync::broadcast;

pub use access::{Access, Admin, Role};
pub use agent::AgentLink;
pub use config::{ConsoleConfig, ConsoleFleet, ConsoleOidc};
pub use routes::router;
pub use serve::{Console, run, serve_plain};

use crate::api::client::ClientError;

/// What can go wrong in the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console config: {0}")]
    Config(#[from] config::ConsoleConfigError),
    #[error("identity provider: {0}")]
    Idp(String),
    #[error("the agent: {0}")]
    Agent(#[source] ClientError),
    #[error("console TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the fleet link for the Hosts page: {0}")]
    Fleet(#[source] crate::fleet::FleetError),
    #[error("{0}")]
    Internal(String),
}

/// Everything the handlers share.
pub struct State {
    pub agent: AgentLink,
    pub access: Access,
    oidc: Option<oidc::Oidc>,
    audit: broadcast::Sender<agent::Heard>,
    /// The fleet's view, when the config has `[fleet]`: the Hosts page.
    fleet: Option<hosts::FleetView>,
}

pub type Shared = Arc<State>;

impl State {
    fn heard(&self) -> broadcast::Receiver<agent::Heard> {
        self.audit.subscribe()
    }
}
