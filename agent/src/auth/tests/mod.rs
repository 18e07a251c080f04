//! Tests of the auth room that span its modules: verification, hostile tokens, key files and
//! rotation, and OIDC discovery against a local HTTP server.

pub(crate) mod fixtures;

mod discovery;
mod hostile;
mod keys;
mod verify;
