//! Empty library target so the workspace can depend on this crate from the agent's build script.
#![no_std]
