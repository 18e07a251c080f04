//! The status socket: JSON-RPC 2.0 over a Unix socket. Transport, envelope and peer checks
//! move bytes; the method list types every call and answer, the core answers them, and the
//! client serves the CLI.

pub mod answers;
pub mod calls;
pub mod client;
pub mod core;
mod errors;
pub mod jsonrpc;
pub mod methods;
pub mod peer;
pub mod request;
pub mod transport;
pub mod views;
