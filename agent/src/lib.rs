//! flowwarden: an identity-aware flow enforcement agent. The library behind the `flowwarden`
//! binary, also used by the integration tests.

pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod policy;
