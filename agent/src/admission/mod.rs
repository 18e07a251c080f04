//! The admission endpoint (HTTPS) where clients present tokens, its certificate, and the
//! client side used by `flowwarden login`.

pub mod client;
mod rate;
mod refusal;
pub mod request;
mod server;
pub mod tls;
pub mod wire;

pub use rate::RateLimiter;
pub use refusal::MAX_HEAD_BYTES;
pub use server::{Admission, http1_builder, serve};
