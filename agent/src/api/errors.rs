//! How the errors of the rooms behind the core reach a caller: each as the JSON-RPC error
//! that says what failed, so the core writes `?` instead of mapping errors by hand.

use super::jsonrpc::{APP_ERROR, NOT_FOUND, RpcError};
use crate::{
    datapath::DatapathError, enforce::EnforceError, policy::PolicyError, sessions::SessionError,
    store::StoreError,
};

impl From<SessionError> for RpcError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::NotFound(id) => Self::new(NOT_FOUND, format!("no session {id}")),
            other => Self::new(APP_ERROR, other.to_string()),
        }
    }
}

impl From<PolicyError> for RpcError {
    fn from(e: PolicyError) -> Self {
        Self::new(APP_ERROR, e.to_string())
    }
}

impl From<StoreError> for RpcError {
    fn from(e: StoreError) -> Self {
        Self::new(APP_ERROR, e.to_string())
    }
}

impl From<EnforceError> for RpcError {
    fn from(e: EnforceError) -> Self {
        Self::new(APP_ERROR, e.to_string())
    }
}

impl From<DatapathError> for RpcError {
    fn from(e: DatapathError) -> Self {
        Self::new(APP_ERROR, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::model::SessionId;

    #[test]
    fn a_missing_session_is_not_found_and_the_rest_are_application_errors() {
        let e = RpcError::from(SessionError::NotFound(SessionId(0xab)));
        assert_eq!(
            (e.code, e.message.as_str()),
            (NOT_FOUND, "no session 00000000000000ab")
        );
        let e = RpcError::from(SessionError::Denied {
            reason: "no rule".into(),
        });
        assert_eq!(
            (e.code, e.message.as_str()),
            (APP_ERROR, "policy denies access: no rule")
        );
    }
}
