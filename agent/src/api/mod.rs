//! The status socket: JSON-RPC 2.0 over a Unix socket. Transport, envelope and peer checks
//! move bytes; the typed request enum and the core answer them; the client serves the CLI.

pub mod client;
pub mod core;
pub mod jsonrpc;
pub mod peer;
pub mod request;
pub mod transport;
pub mod views;
