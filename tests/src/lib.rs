//! Shared helpers of the integration tests: synthetic frames, network namespaces, root checks.

pub mod admit;
pub mod agent_proc;
pub mod attachments;
pub mod bench;
pub mod console;
pub mod crash;
pub mod flood;
pub mod frames;
pub mod hostile_frames;
pub mod loaded;
pub mod nats;
pub mod netns;
pub mod oidc;
pub mod privileged;
pub mod ssh;
pub mod stack;
pub mod tcp;
