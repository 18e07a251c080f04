//! The kernel's event ring buffer, decoded: flows opened, flows denied (rate limited), and the
//! first drop after a revocation.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use agent_common::{Event, event_kind, map_names};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};

use super::{DatapathError, DropReason, addr_from_bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    FlowOpened,
    FlowDenied(DropReason),
    FirstDropAfterRevoke,
}

/// One event, with addresses and ports in user-space form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathEvent {
    pub kind: EventKind,
    pub session_id: u64,
    pub resource_id: u32,
    pub proto: u8,
    pub source: std::net::SocketAddr,
    pub destination: std::net::SocketAddr,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Passed anyway because the datapath is in monitor mode.
    pub monitor: bool,
}

pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(super) fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self, DatapathError> {
        let map = ebpf
            .take_map(map_names::EVENTS)
            .ok_or(DatapathError::MissingMap {
                name: map_names::EVENTS,
                pin_dir: pin_dir.to_owned(),
            })?;
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map {
            name: map_names::EVENTS,
            action: "open",
            source: Box::new(source),
        })?;
        Ok(Self { ring })
    }

    /// The next event already in the ring, without waiting.
    pub fn try_next(&mut self) -> Option<DatapathEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `Event` (checked length); read_unaligned copes
            // with the ring's 8-byte alignment.
            let raw: Event = unsafe { (item.as_ptr() as *const Event).read_unaligned() };
            if let Some(event) = decode(&raw) {
                return Some(event);
            }
        }
    }

    /// Waits up to `timeout` for the ring to have data.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
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
}

fn decode(raw: &Event) -> Option<DatapathEvent> {
    let kind = match raw.kind {
        event_kind::FLOW_OPENED => EventKind::FlowOpened,
        event_kind::FLOW_DENIED => EventKind::FlowDenied(DropReason::from_index(raw.reason)?),
        event_kind::FIRST_DROP_AFTER_REVOKE => EventKind::FirstDropAfterRevoke,
        _ => return None,
    };
    Some(DatapathEvent {
        kind,
        session_id: raw.session_id,
        resource_id: raw.resource_id,
        proto: raw.flow.proto,
        source: (addr_from_bytes(raw.flow.src), raw.flow.sport).into(),
        destination: (addr_from_bytes(raw.flow.dst), raw.flow.dport).into(),
        ts_ns: raw.ts_ns,
        monitor: raw.monitor != 0,
    })
}
