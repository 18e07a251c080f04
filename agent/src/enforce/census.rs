//! A census of the flow table: how many flows it holds and each session's live traffic, from
//! one walk. A walk over a million flows costs about half a second of CPU, most of it in the
//! kernel, so reads of a large table reuse the sweep's recent census instead of walking again,
//! and the sweep itself walks a large table only as often as it can afford.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    time::{Duration, Instant},
};

use crate::{datapath::Flow, sessions::model::SessionId};

/// A census this recent stands in for a fresh walk of a large table: the sweep takes one
/// every second by default, so this leaves room for one late sweep.
pub const CENSUS_MAX_AGE: Duration = Duration::from_secs(2);
/// From this many flows a walk takes tens of milliseconds or more, and reads reuse a recent
/// census; below it every read walks, and shows traffic to the packet.
pub const LARGE_TABLE: usize = 65_536;
/// The sweep spends at most about 1/WALK_DUTY of its time walking a large table: a census is
/// kept for WALK_DUTY times as long as its walk took. A million flows take about half a second
/// of CPU to walk; walked every second, they would keep a core busy.
pub const WALK_DUTY: u32 = 10;

/// Live traffic of one session, summed over its flows in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub flows: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// CLOCK_MONOTONIC_COARSE ns of the newest packet of any flow; 0 without flows.
    pub last_seen_ns: u64,
}

/// Session ids are random 64-bit numbers from the OS's CSPRNG, written into flows by the
/// agent itself (through grants), so they serve as their own hash: summing a million flows
/// into a map keyed by session then costs a memory access per flow, not a SipHash.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Traffic per session.
pub type TrafficMap = HashMap<SessionId, Traffic, BuildHasherDefault<IdHasher>>;

/// One walk's worth of the flow table.
#[derive(Debug, Clone)]
pub struct FlowCensus {
    /// When the walk ended.
    pub taken: Instant,
    /// How long the walk took.
    pub walk_time: Duration,
    pub flows: usize,
    pub traffic: TrafficMap,
}

impl FlowCensus {
    pub(super) fn new() -> Self {
        Self {
            taken: Instant::now(),
            walk_time: Duration::ZERO,
            flows: 0,
            traffic: TrafficMap::default(),
        }
    }

    pub(super) fn add(&mut self, f: &Flow) {
        self.flows += 1;
        let t = self.traffic.entry(SessionId(f.session_id)).or_default();
        t.flows += 1;
        t.rx_packets += f.rx_packets;
        t.rx_bytes += f.rx_bytes;
        t.tx_packets += f.tx_packets;
        t.tx_bytes += f.tx_bytes;
        t.last_seen_ns = t.last_seen_ns.max(f.last_seen_ns);
    }

    /// Takes a removed flow out again, so that a census kept for reads does not show flows
    /// the agent itself removed (a terminated session's, say). The newest-packet stamp of
    /// the flows that remain cannot be recovered and stays as it was.
    pub(super) fn remove(&mut self, f: &Flow) {
        let id = SessionId(f.session_id);
        let Some(t) = self.traffic.get_mut(&id) else {
            return;
        };
        self.flows = self.flows.saturating_sub(1);
        t.flows = t.flows.saturating_sub(1);
        if t.flows == 0 {
            self.traffic.remove(&id);
            return;
        }
        t.rx_packets = t.rx_packets.saturating_sub(f.rx_packets);
        t.rx_bytes = t.rx_bytes.saturating_sub(f.rx_bytes);
        t.tx_packets = t.tx_packets.saturating_sub(f.tx_packets);
        t.tx_bytes = t.tx_bytes.saturating_sub(f.tx_bytes);
    }

    pub(super) fn done(mut self) -> Self {
        let now = Instant::now();
        self.walk_time = now.saturating_duration_since(self.taken);
        self.taken = now;
        self
    }

    /// How long this census stands in for a walk: [`CENSUS_MAX_AGE`], or longer when the
    /// walk was so slow that walking again sooner would take more than 1/[`WALK_DUTY`] of the
    /// time; never for a small table.
    pub fn lifetime(&self) -> Duration {
        if self.flows < LARGE_TABLE {
            return Duration::ZERO;
        }
        CENSUS_MAX_AGE.max(self.walk_time * WALK_DUTY)
    }

    /// Whether a read (or a sweep) may use this census instead of walking the table again.
    pub fn stands_in(&self, now: Instant) -> bool {
        self.flows >= LARGE_TABLE && now.saturating_duration_since(self.taken) <= self.lifetime()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(session: u64, rx: u64, seen: u64) -> Flow {
        Flow {
            session_id: session,
            rx_packets: rx,
            rx_bytes: rx * 100,
            tx_packets: 1,
            tx_bytes: 50,
            last_seen_ns: seen,
            ..Flow::default()
        }
    }

    #[test]
    fn a_census_sums_each_sessions_flows() {
        let mut c = FlowCensus::new();
        c.add(&flow(7, 2, 10));
        c.add(&flow(9, 1, 5));
        c.add(&flow(7, 3, 30));
        let c = c.done();
        assert_eq!(c.flows, 3);
        assert_eq!(
            c.traffic[&SessionId(7)],
            Traffic {
                flows: 2,
                rx_packets: 5,
                rx_bytes: 500,
                tx_packets: 2,
                tx_bytes: 100,
                last_seen_ns: 30,
            }
        );
        assert_eq!(c.traffic[&SessionId(9)].flows, 1);
        assert!(!c.traffic.contains_key(&SessionId(8)));
    }

    #[test]
    fn removed_flows_leave_the_census() {
        let mut c = FlowCensus::new();
        c.add(&flow(7, 2, 10));
        c.add(&flow(7, 3, 30));
        c.add(&flow(9, 1, 5));
        c.remove(&flow(7, 3, 30));
        assert_eq!(c.flows, 2);
        assert_eq!(
            (
                c.traffic[&SessionId(7)].flows,
                c.traffic[&SessionId(7)].rx_packets
            ),
            (1, 2)
        );
        c.remove(&flow(9, 1, 5));
        assert!(
            !c.traffic.contains_key(&SessionId(9)),
            "a session without flows is gone"
        );
        c.remove(&flow(4, 1, 5));
        assert_eq!(c.flows, 1, "a flow the census never saw changes nothing");
    }

    #[test]
    fn only_a_recent_census_of_a_large_table_stands_in_for_a_walk() {
        let mut c = FlowCensus::new().done();
        c.walk_time = Duration::from_millis(10);
        let now = c.taken;
        assert!(!c.stands_in(now), "a small table is always walked");
        c.flows = LARGE_TABLE;
        assert!(c.stands_in(now + CENSUS_MAX_AGE));
        assert!(!c.stands_in(now + CENSUS_MAX_AGE + Duration::from_millis(1)));
        // A slow walk is not repeated sooner than WALK_DUTY times its length.
        c.walk_time = Duration::from_millis(800);
        assert!(c.stands_in(now + Duration::from_millis(800) * WALK_DUTY));
        assert!(!c.stands_in(now + Duration::from_millis(801) * WALK_DUTY));
    }
}
