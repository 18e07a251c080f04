//! Tests of the auth room that span its modules: verification, hostile tokens, key files and
//! rotation, OIDC discovery against a local HTTP server, and a hostile provider.

pub(crate) mod fixtures;

mod chaos;
mod discovery;
mod hostile;
mod keys;
mod provider;
mod tokens;
mod verify;
