//! Types and constants that cross the kernel boundary, shared by the eBPF programs and user space.
//!
//! Every map value here is `#[repr(C)]`, `Copy`, padded explicitly and made of integers only
//! (no `bool`, `Option` or enums), so both sides agree on the bytes. Map names and sizes live
//! here too, so the kernel programs and the `datapath` module cannot drift apart.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

/// Names of the maps, as pinned under `<pin dir>/maps/`. The eBPF side's `#[map(name = ...)]`
/// takes only a literal, so a test of the agent parses the built object and holds its map
/// names to [`map_names::IN_OBJECT`].
///
/// BPF object names are limited to 15 characters; these stay inside that limit.
pub mod map_names {
    pub const RESOURCE_PORTS: &str = "FW_RES_PORTS";
    pub const RESOURCE_DSTS: &str = "FW_RES_DSTS";
    pub const GRANTS: &str = "FW_GRANTS";
    pub const FLOWS: &str = "FW_FLOWS";
    /// One slot per live session: its revocation state and its counters.
    pub const SESSIONS: &str = "FW_SESSIONS";
    pub const STATS: &str = "FW_STATS";
    pub const EVENTS: &str = "FW_EVENTS";
    pub const CONFIG: &str = "FW_CONFIG";
    pub const DENY_RATE: &str = "FW_DENY_RATE";
    /// aya-log's ring buffer (its name is aya-log-ebpf's). The agent pins it too, so that a
    /// restarted agent reads the log records of the programs it adopted.
    pub const KERNEL_LOGS: &str = "AYA_LOGS";
    /// Per-CPU pacing of log records; never pinned.
    pub const LOG_RATE: &str = "FW_LOG_RATE";
    /// The benchmark floor program's map; never pinned.
    pub const BENCH_FLOOR: &str = "FW_BENCH";

    /// Every pinned map, for adoption and for `datapath detach`.
    pub const ALL: [&str; 10] = [
        RESOURCE_PORTS,
        RESOURCE_DSTS,
        GRANTS,
        FLOWS,
        SESSIONS,
        STATS,
        EVENTS,
        CONFIG,
        DENY_RATE,
        KERNEL_LOGS,
    ];

    /// Every map the kernel programs define, pinned or not.
    pub const IN_OBJECT: [&str; 12] = [
        RESOURCE_PORTS,
        RESOURCE_DSTS,
        GRANTS,
        FLOWS,
        SESSIONS,
        STATS,
        EVENTS,
        CONFIG,
        DENY_RATE,
        KERNEL_LOGS,
        LOG_RATE,
        BENCH_FLOOR,
    ];

    /// Maps of the layout before session slots (revocations and session counters in two
    /// hashes keyed by session id). Finding one pinned means the pins are of that layout.
    pub const LEGACY: [&str; 2] = ["FW_REVOKED", "FW_SESS_STATS"];
}

/// The kernel programs' log records (aya-log): rare events, never one per packet.
pub mod kernel_log {
    /// The `tracing` target the records arrive under in user space, so that
    /// `FLOWWARDEN_LOG=flowwarden::kernel=debug` selects them.
    pub const TARGET: &str = "flowwarden::kernel";
    /// Each CPU logs a kind of drop at most once in this long; the counters count every one.
    pub const INTERVAL_NS: u64 = 60 * 1_000_000_000;
    /// Slots of the per-CPU rate map: one per drop reason (`stat::DROP_*`).
    pub const RATE_SLOTS: u32 = super::stat::DROP_REASONS;
}

/// Names of the programs in the object file.
pub mod program_names {
    pub const XDP_INGRESS: &str = "fw_xdp_ingress";
    pub const TC_INGRESS: &str = "fw_tc_ingress";
    pub const TC_EGRESS: &str = "fw_tc_egress";
    /// Benchmark reference: returns XDP_PASS and nothing else.
    pub const BENCH_PASS: &str = "fw_bench_pass";
    /// Benchmark reference: one hash lookup and one counter add.
    pub const BENCH_FLOOR: &str = "fw_bench_floor";
}

/// Map sizes. The flow table can be resized at load time from the agent's config.
pub mod map_sizes {
    /// One slot per (protocol, port): TCP ports first, then UDP ports.
    pub const RESOURCE_PORTS: u32 = 2 * 65_536;
    pub const RESOURCE_DSTS: u32 = 4_096;
    /// Grants are preallocated
    /// (24 MiB of kernel memory): a policy change that withdraws 100,000 of them deletes
    /// twice as fast without the allocator's frees (35 ms instead of 70–90).
    pub const GRANTS: u32 = 262_144;
    pub const FLOWS: u32 = 262_144;
    /// Session slots, preallocated (64 bytes each: 16 MiB). Resized at load time from
    /// `[datapath] session_slots`. Slot 0 is never handed out, so a zeroed grant or flow
    /// names no session.
    pub const SESSIONS: u32 = 262_144;
    /// Live flows one session may hold unless `[datapath] session_flow_limit` says otherwise.
    pub const SESSION_FLOW_LIMIT: u32 = 4_096;
    pub const STATS: u32 = super::stat::COUNT;
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    pub const CONFIG: u32 = 4;
    pub const BENCH_FLOOR: u32 = 1_024;
}

/// IP protocol numbers we enforce.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Index into the resource port table for a protocol and port, or `None` for other protocols.
#[inline(always)]
pub fn resource_port_index(proto: u8, port: u16) -> Option<u32> {
    match proto {
        IPPROTO_TCP => Some(port as u32),
        IPPROTO_UDP => Some(65_536 + port as u32),
        _ => None,
    }
}

/// Slots of the config map.
pub mod config {
    /// Index of the enforcement mode.
    pub const MODE: u32 = 0;
    /// Drop what policy does not allow. Zero, so a fresh map enforces (fail closed).
    pub const MODE_ENFORCE: u32 = 0;
    /// Count what would be dropped, and pass it.
    pub const MODE_MONITOR: u32 = 1;
    /// Index of the per-session flow budget: live flows one session may hold. Zero (a map the
    /// agent has not configured yet) means no budget; the table's own size still bounds it.
    pub const SESSION_FLOW_LIMIT: u32 = 1;
}

/// Indices of the global per-CPU counters. Drops are counted by reason; in monitor mode
/// the same reasons are counted at `MONITOR_OFFSET` + reason and the packet passes.
pub mod stat {
    pub const DROP_NO_GRANT: u32 = 0;
    pub const DROP_REVOKED: u32 = 1;
    pub const DROP_FLOW_TABLE_FULL: u32 = 2;
    pub const DROP_MALFORMED: u32 = 3;
    /// A new flow of a session that already holds its budget of live flows.
    pub const DROP_SESSION_FLOW_LIMIT: u32 = 4;
    /// Number of drop reasons.
    pub const DROP_REASONS: u32 = 5;
    pub const MONITOR_OFFSET: u32 = 5;
    pub const FLOWS_OPENED: u32 = 10;
    pub const EVENTS_LOST: u32 = 11;
    pub const DENIED_EVENTS_SUPPRESSED: u32 = 12;
    /// Replies of a revoked flow let out because they carry a TCP RST.
    pub const RST_PASSED_AFTER_REVOKE: u32 = 13;
    pub const COUNT: u32 = 16;
}

/// `ResourcePort::flags`: the resource is restricted to destination prefixes, look them up in
/// the destination trie.
pub const RESOURCE_HAS_DSTS: u32 = 1;

/// A slot of the resource port table: which resource owns this protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourcePort {
    /// Zero when the port is not protected.
    pub resource_id: u32,
    pub flags: u32,
}

/// The data of a destination-trie key: protocol and port are fully specified (the first 32
/// bits), the address is matched by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceDst {
    pub proto: u8,
    pub _pad: u8,
    /// Big-endian bytes, so that the trie's bitwise prefix covers it whole.
    pub port_be: [u8; 2],
    /// IPv6 address, or IPv4 mapped into IPv6 (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
}

/// Bits of a `ResourceDst` taken before the address starts.
pub const RESOURCE_DST_FIXED_BITS: u32 = 32;

/// Key of the grant table: which source may reach which resource.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub src: [u8; 16],
    pub resource_id: u32,
}

/// Value of the grant table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub session_id: u64,
    /// The session's slot in the session table; a flow opened through the grant records it.
    pub slot: u32,
    pub _pad: u32,
}

/// A 5-tuple as seen on ingress to the resource: `src` is the client, `dst` the resource.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// A flow's owner and counters. `rx` is client → resource, `tx` is resource → client.
/// Counters are added atomically: several CPUs may carry the same flow.
///
/// `slot` is the owner's slot in the session table and `session_id` is the generation the
/// slot must still carry: session ids are 64-bit and never reused, so a slot handed to
/// another session since never gives this flow that session's verdict (it is dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub session_id: u64,
    pub resource_id: u32,
    pub slot: u32,
    /// CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`, a tick's precision) at creation.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC_COARSE of the last packet either way.
    pub last_seen_ns: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// An element of the session table: one per live (or recently ended) session, preallocated,
/// so that an established packet reaches its session's verdict and counters with an array
/// lookup the verifier inlines, after its flow's hash lookup.
///
/// The agent maps the table into its memory (`BPF_F_MMAPABLE`): it claims a slot with a
/// compare-and-swap on `session_id`, revokes with one store to `revoked_at_ns`, and reads the
/// counters without a syscall. The kernel only adds to counters and stamps `first_drop_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionSlot {
    /// The session holding the slot; zero when the slot is free.
    pub session_id: u64,
    /// CLOCK_MONOTONIC when the agent revoked the session; zero while it is live.
    pub revoked_at_ns: u64,
    /// CLOCK_MONOTONIC of the first packet dropped after revocation; zero until then.
    pub first_drop_ns: u64,
    pub flows_opened: u64,
    /// Flows of the session in the flow table, for the per-session budget: the kernel adds
    /// the ones it opens, the agent the ones it writes, and the agent takes away the ones it
    /// removes.
    pub live_flows: u64,
    /// Packets of the session dropped after it was revoked, both directions.
    pub dropped_after_revoke_packets: u64,
    pub dropped_after_revoke_bytes: u64,
    /// New flows of the session denied because it held its budget of live flows.
    pub flow_limit_drops: u64,
}

/// State of the per-CPU limiter for denied-flow events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub window_start_ns: u64,
    pub count: u64,
}

/// Denied-flow events each CPU may emit per second; the rest are counted as suppressed.
pub const DENIED_EVENTS_PER_SEC: u64 = 64;

/// `Event::kind` values.
pub mod event_kind {
    pub const FLOW_OPENED: u32 = 1;
    pub const FLOW_DENIED: u32 = 2;
    pub const FIRST_DROP_AFTER_REVOKE: u32 = 3;
}

/// A record of the event ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    /// A `stat::DROP_*` reason for denials, zero otherwise.
    pub reason: u32,
    pub session_id: u64,
    pub ts_ns: u64,
    pub flow: FlowKey,
    pub resource_id: u32,
    /// 1 when the agent is in monitor mode and the packet was passed anyway.
    pub monitor: u32,
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`), the form every map key uses.
#[inline(always)]
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The form every map key uses for an address: IPv6, or IPv4 mapped into IPv6.
pub fn addr_bytes(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr_bytes`]: IPv4-mapped addresses come back as IPv4.
pub fn addr_from_bytes(bytes: [u8; 16]) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// What the kernel's resource tables must hold, as plain entries: policy compiles its
/// resources into this, and the datapath writes the difference from what it installed last.
#[cfg(feature = "user")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceEntries {
    /// Port table index ([`resource_port_index`]) → owner.
    pub ports: alloc::collections::BTreeMap<u32, ResourcePort>,
    /// Destination trie entries: (prefix length in bits, key) → resource id.
    pub dsts: alloc::collections::BTreeMap<(u32, ResourceDstKey), u32>,
}

/// A [`ResourceDst`] as an ordered key (its bytes), for diffing trie contents.
#[cfg(feature = "user")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceDstKey(pub [u8; 20]);

#[cfg(feature = "user")]
impl ResourceDstKey {
    pub fn of(dst: &ResourceDst) -> Self {
        let mut b = [0u8; 20];
        b[0] = dst.proto;
        b[2..4].copy_from_slice(&dst.port_be);
        b[4..].copy_from_slice(&dst.addr);
        Self(b)
    }

    pub fn dst(&self) -> ResourceDst {
        let b = &self.0;
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&b[4..]);
        ResourceDst {
            proto: b[0],
            _pad: 0,
            port_be: [b[2], b[3]],
            addr,
        }
    }
}

#[cfg(feature = "user")]
impl From<&ResourceEntries> for ResourceEntries {
    fn from(entries: &ResourceEntries) -> Self {
        entries.clone()
    }
}

#[cfg(feature = "user")]
impl ResourceEntries {
    /// From a port table and trie entries as (prefix bits, key, resource id).
    pub fn new(
        ports: alloc::collections::BTreeMap<u32, ResourcePort>,
        dsts: impl IntoIterator<Item = (u32, ResourceDst, u32)>,
    ) -> Self {
        Self {
            ports,
            dsts: dsts
                .into_iter()
                .map(|(bits, dst, id)| ((bits, ResourceDstKey::of(&dst)), id))
                .collect(),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, made of integers and byte arrays only, with
    // padding spelled out as fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for ResourcePort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ResourceDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GrantKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Grant {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateWindow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ResourcePort>(), 8);
        assert_eq!(size_of::<ResourceDst>(), 20);
        assert_eq!(size_of::<GrantKey>(), 20);
        assert_eq!(size_of::<Grant>(), 16);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 64);
        // One cache line per session: CPUs counting different sessions never share one.
        assert_eq!(size_of::<SessionSlot>(), 64);
        assert_eq!(size_of::<Event>(), 72);
    }

    #[test]
    fn port_index_separates_tcp_and_udp() {
        assert_eq!(resource_port_index(IPPROTO_TCP, 22), Some(22));
        assert_eq!(resource_port_index(IPPROTO_UDP, 22), Some(65_558));
        assert_eq!(resource_port_index(1, 22), None);
        assert!(resource_port_index(IPPROTO_UDP, u16::MAX).unwrap() < map_sizes::RESOURCE_PORTS);
    }

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for a in ["10.1.2.3", "::1", "fd00::7"] {
            let addr: core::net::IpAddr = a.parse().unwrap();
            assert_eq!(addr_from_bytes(addr_bytes(addr)), addr);
        }
        let mapped: core::net::IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            addr_from_bytes(addr_bytes(mapped)),
            "10.0.0.1".parse::<core::net::IpAddr>().unwrap()
        );
        assert_eq!(
            addr_bytes("10.1.2.3".parse().unwrap())[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
    }

    #[test]
    fn enforce_is_the_zero_mode() {
        assert_eq!(config::MODE_ENFORCE, 0);
    }
}
