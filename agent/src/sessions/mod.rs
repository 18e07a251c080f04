//! Sessions: the state machine of DESIGN.md (authenticating → active ↔ dormant → expired,
//! terminated from any live state), admission, reconnect, termination, continuous evaluation
//! on policy changes, and the sweeps that age sessions and flows.

pub mod by_identity;
mod lifecycle;
mod manager;
pub mod model;
mod reevaluation;
mod signals;

pub use by_identity::{Lookup, Name};
pub use lifecycle::{Reconciled, SweepOutcome};
pub use manager::{Admitted, Ended, Ending, SESSION_TABLE_FULL, SessionError, Sessions, Target};
pub use reevaluation::{PolicyApplyError, PolicyChange, PolicyOutcome};
pub use signals::IdentityChange;
#[cfg(test)]
pub(crate) mod tests;
