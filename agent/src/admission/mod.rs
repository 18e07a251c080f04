//! The admission endpoint (HTTPS) where clients present tokens, its certificate, and the
//! client side used by `flowwarden login`.

mod budget;
pub mod client;
mod rate;
mod refusal;
pub mod request;
mod server;
pub mod tls;
pub mod wire;

pub use budget::{Budget, RESERVED_DESCRIPTORS, affordable, open_files, raise_open_files};
pub use rate::RateLimiter;
pub use refusal::MAX_HEAD_BYTES;
pub use server::{Admission, http1_builder, serve};
