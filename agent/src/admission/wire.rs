//! The admission protocol's JSON bodies, shared by the endpoint and `flowwarden login`.

use serde::{Deserialize, Serialize};

pub const SESSIONS_PATH: &str = "/v1/sessions";
pub const RECONNECT_PATH: &str = "/v1/sessions/reconnect";
/// `Authorization: Reconnect <token>` carries a reconnect token.
pub const RECONNECT_SCHEME: &str = "Reconnect";

/// 201 answer to an admission or a reconnect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionResponse {
    pub session: String,
    pub user: String,
    /// The source address the agent saw, which the grants are for.
    pub source: String,
    pub expires_at_ms: u64,
    pub grants: Vec<GrantedResource>,
    /// Present after an admission with reconnect enabled; never sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<ReconnectMaterial>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedResource {
    pub resource: String,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectMaterial {
    /// Secret; the client keeps it (mode 0600) to mint short-lived reconnect tokens.
    pub seed: String,
    /// How far a token's timestamp may be from the agent's clock.
    pub token_lifetime_secs: u64,
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Stable code: `expired`, `wrong_audience`, `denied`, `rate_limited`, …
    pub error: String,
    /// For people: what was wrong and what to do.
    pub message: String,
}
