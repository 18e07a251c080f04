//! The kernel programs' log records (aya-log), forwarded into the agent's `log`/`tracing`
//! stream under the target `flowwarden::kernel`.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use aya::Ebpf;
use aya_log::EbpfLogger;

use super::DatapathError;

/// Reads the records the programs write to aya-log's ring buffer.
pub struct KernelLog {
    logger: EbpfLogger<&'static dyn log::Log>,
}

impl KernelLog {
    pub(super) fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self, DatapathError> {
        let logger = EbpfLogger::init(ebpf).map_err(|source| DatapathError::KernelLog {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
        Ok(Self { logger })
    }

    /// Waits up to `timeout` for records to arrive.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.logger.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own; a failure just means we return early.
        unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
    }

    /// Hands every record waiting in the ring to the global `log` logger, which the agent
    /// bridges into `tracing`.
    pub fn flush(&mut self) {
        // aya-log panics on a record it cannot decode. Each record is consumed from the ring
        // before it is decoded, so reading on past a bad one is safe, and better than losing
        // every later record with the reader thread.
        let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.logger.flush();
        }));
        if flushed.is_err() {
            tracing::error!(
                target: agent_common::kernel_log::TARGET,
                "skipped a kernel log record that could not be decoded"
            );
        }
    }
}
