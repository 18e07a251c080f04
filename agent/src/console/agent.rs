//! The console's way to the agent: the same typed status-socket client as the CLI, run on
//! blocking threads, and one audit subscription shared by every live page.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::broadcast;

use super::ConsoleError;
use crate::{
    api::{
        calls::AuditItem,
        client::{ClientError, RpcClient},
        request::AuditFilter,
    },
    audit::event::AuditEvent,
};

/// What the audit hub passes on to live pages.
#[derive(Debug, Clone)]
pub enum Heard {
    Event(Arc<AuditEvent>),
    /// The hub fell behind (or reconnected): pages refresh from scratch.
    Gap,
}

#[derive(Debug, Clone)]
pub struct AgentLink {
    socket: PathBuf,
}

impl AgentLink {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Runs `f` with a fresh connection on a blocking thread.
    ///
    /// # Errors
    /// The connection or the call fails ([`ConsoleError::Agent`]).
    pub async fn call<T, F>(&self, f: F) -> Result<T, ConsoleError>
    where
        T: Send + 'static,
        F: FnOnce(&mut RpcClient) -> Result<T, ClientError> + Send + 'static,
    {
        let socket = self.socket.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = RpcClient::connect(&socket)?;
            f(&mut client)
        })
        .await
        .map_err(|e| ConsoleError::Internal(format!("a blocking call failed: {e}")))?
        .map_err(ConsoleError::Agent)
    }

    /// Follows the agent's audit stream on a thread of its own, for as long as the process
    /// lives, reconnecting after a second when the agent goes away.
    pub fn spawn_audit_hub(&self, tx: broadcast::Sender<Heard>) {
        let socket = self.socket.clone();
        let spawned = std::thread::Builder::new()
            .name("console-audit".into())
            .spawn(move || {
                loop {
                    if let Ok(mut client) = RpcClient::connect(&socket)
                        && let Ok(stream) = client.audit_subscribe(&AuditFilter::default())
                    {
                        let _ = tx.send(Heard::Gap);
                        for item in stream {
                            let heard = match item {
                                Ok(AuditItem::Event(e)) => Heard::Event(Arc::from(e)),
                                Ok(AuditItem::Lagged(_)) => Heard::Gap,
                                Err(_) => break,
                            };
                            // No page listening is fine.
                            let _ = tx.send(heard);
                        }
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "console: cannot start the audit follower; pages update once a second only");
        }
    }
}
