//! The `auth` room: bearer-token (JWT) verification against configured issuers, their keys,
//! reconnect tokens, and development key/token tools.
//!
//! A token is verified in one pass ([`Verifier::verify`]): size limit, header and unverified
//! `iss` (only to pick the issuer's config), algorithm allow-list, key lookup by `kid`,
//! signature, then the required claims, and only then the [`Identity`](crate::identity::Identity)
//! the rest of the agent sees. Bearer tokens are never logged, stored or put in an error: only
//! their claims and their SHA-256 fingerprint leave this room.

mod alg;
mod claims;
mod config;
mod fetch;
mod json;
mod jwks;
mod source;
pub mod trust;
mod verify;

pub mod dev;
pub mod reconnect;

#[cfg(test)]
mod tests;

pub use config::{AuthConfig, AuthConfigError, ClaimMapping, DEFAULT_TOKEN_TYPES, IssuerConfig};
pub use source::IssuerKeyStatus;
pub use verify::{MAX_TOKEN_BYTES, Rejection, Verifier, key_status};

// A Shared Signals transmitter's keys are fetched, cached and checked as an issuer's are.
pub(crate) use self::{
    alg::Alg,
    fetch::{Fetched, agent as http_agent, check_url, get as fetch_get},
    json::object as strict_object,
    jwks::KeyOutcome,
    source::{IssuerKeys, JwksLocator, OnDemand, Tuning},
};
