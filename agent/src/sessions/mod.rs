//! Sessions: the state machine of DESIGN.md (authenticating → active ↔ dormant → expired,
//! terminated from any live state), admission, reconnect, termination, continuous evaluation
//! on policy changes, and the sweeps that age sessions and flows.

mod lifecycle;
mod manager;
pub mod model;
mod reevaluation;
mod signals;

pub use lifecycle::{Reconciled, SweepOutcome};
pub use manager::{Admitted, Ended, SESSION_TABLE_FULL, SessionError, Sessions, Target};
pub use reevaluation::{PolicyApplyError, PolicyChange, PolicyOutcome};
pub use signals::IdentityChange;
#[cfg(test)]
pub(crate) mod tests;
