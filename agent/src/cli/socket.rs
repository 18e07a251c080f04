//! The CLI's way to the agent: the `--socket` flag, one connection, and client errors turned
//! into messages and exit codes.

use std::path::PathBuf;

use super::output::{EXIT_BUSY, EXIT_NOT_FOUND, EXIT_PERMISSION, EXIT_UNREACHABLE, Failure};
use crate::{
    api::{
        client::{ClientError, RpcClient, SOCKET_ENV},
        jsonrpc::{BUSY, NOT_FOUND, PERMISSION_DENIED},
    },
    config::DEFAULT_SOCKET,
};

#[derive(Debug, clap::Args)]
pub struct SocketArg {
    /// The agent's status socket.
    #[arg(long, env = SOCKET_ENV, default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}

impl SocketArg {
    /// One connection to the agent.
    ///
    /// # Errors
    /// A [`Failure`] saying what to do, with its exit code.
    pub fn connect(&self) -> anyhow::Result<RpcClient> {
        RpcClient::connect(&self.socket).map_err(fail)
    }
}

/// Maps client errors to messages and exit codes.
pub fn fail(e: ClientError) -> anyhow::Error {
    let code = match &e {
        ClientError::Rpc { code, .. } if *code == NOT_FOUND => EXIT_NOT_FOUND,
        ClientError::Rpc { code, .. } if *code == PERMISSION_DENIED => EXIT_PERMISSION,
        ClientError::Rpc { code, .. } if *code == BUSY => EXIT_BUSY,
        ClientError::Rpc { .. } => 1,
        ClientError::PermissionDenied { .. } => EXIT_PERMISSION,
        _ => EXIT_UNREACHABLE,
    };
    Failure {
        message: e.to_string(),
        code,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::exit_code;

    #[test]
    fn client_errors_get_their_exit_codes() {
        let rpc = |code| ClientError::Rpc {
            code,
            message: "m".into(),
            data: None,
        };
        assert_eq!(exit_code(&fail(rpc(NOT_FOUND))), Some(EXIT_NOT_FOUND));
        assert_eq!(
            exit_code(&fail(rpc(PERMISSION_DENIED))),
            Some(EXIT_PERMISSION)
        );
        assert_eq!(exit_code(&fail(rpc(-32000))), Some(1));
        let path = PathBuf::from("/x");
        let denied = ClientError::PermissionDenied {
            path: path.clone(),
            group: "the fw group".into(),
        };
        assert_eq!(exit_code(&fail(denied)), Some(EXIT_PERMISSION));
        assert_eq!(
            exit_code(&fail(ClientError::NoSocket { path })),
            Some(EXIT_UNREACHABLE)
        );
    }
}
