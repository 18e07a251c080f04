//! flowwarden: an identity-aware flow enforcement agent. The library behind the `flowwarden`
//! binary, also used by the integration tests.

pub mod admission;
pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod datapath;
pub mod enforce;
pub mod fleet;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod policy;
pub mod sessions;
pub mod signals;
pub mod store;
