//! Hostile frames for the datapath sweep: a seeded generator of well-formed, mutated and random
//! frames, and a reference classifier that says, from the bytes alone, what the kernel
//! programs must make of each one.
//!
//! The classifier is the intended parsing policy written out a second time, on byte slices and
//! independently of `agent-ebpf/src/parse.rs`:
//!
//! - Fewer than 14 bytes, or an ethertype other than IPv4/IPv6 after the VLAN tags: not IP,
//!   never touched.
//! - Up to two VLAN tags (802.1Q or 802.1ad, in any order) are walked. A third tag is deeper
//!   than the parser goes while the stack may still deliver the frame (nested VLAN devices),
//!   so it is malformed: fail closed.
//! - IPv4: a header that does not fit, a version other than 4, or an IHL under 5 is
//!   malformed. A protocol other than TCP/UDP, or a non-first fragment (offset ≠ 0), is
//!   not touched: a later fragment carries no ports and is useless without its first one,
//!   which is checked. The total length is not the parser's business: the stack drops a
//!   packet whose total length does not fit, and otherwise reads the same ports.
//! - IPv6: a header that does not fit or a version other than 6 is malformed. Hop-by-hop,
//!   routing, destination options, fragment and AH headers are walked, at most six of
//!   them; a seventh, a header that does not fit, or a transport header past byte 512 of the
//!   frame is malformed. Another next header (ICMPv6, no next header, ESP, ...) is not
//!   touched, nor is a non-first fragment.
//! - TCP needs 20 bytes and a data offset of at least 5 words; UDP needs 8 bytes. Otherwise
//!   malformed.

/// A small deterministic PRNG (xorshift64*): the sweep must be reproducible from its seed, and
/// the workspace has no random-number crate to lean on.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // SplitMix64 of the seed, so that small seeds do not start in a low-entropy state;
        // xorshift's one forbidden state is zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DST_OPTS: u8 = 60;
/// The parser's limits, restated (see the module docs).
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 6;
const MAX_L4_OFFSET: usize = 512;

/// An address as every map key holds it: IPv6, or IPv4 mapped into IPv6.
pub type Addr = [u8; 16];

pub const fn v4(a: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

pub const fn v6(groups: [u16; 8]) -> Addr {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        out[2 * i] = (groups[i] >> 8) as u8;
        out[2 * i + 1] = groups[i] as u8;
        i += 1;
    }
    out
}

/// The server: inside the admin resource's prefixes (10.9.0.0/16, fd09::/16).
pub const SERVER4: [u8; 4] = [10, 9, 0, 2];
pub const SERVER6: Addr = v6([0xfd09, 0, 0, 0, 0, 0, 0, 2]);
/// Another local address, outside the admin resource's prefixes.
pub const OTHER4: [u8; 4] = [10, 8, 0, 2];
pub const OTHER6: Addr = v6([0xfd08, 0, 0, 0, 0, 0, 0, 2]);
/// The one client with a live grant to every resource (one address per family).
pub const GRANTED4: [u8; 4] = [192, 0, 2, 10];
pub const GRANTED6: Addr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10]);
/// A client whose session was revoked; it still has a grant and a few lingering flows.
pub const REVOKED4: [u8; 4] = [192, 0, 2, 66];
/// Source ports of the revoked session's lingering flows to SERVER4 tcp/22.
pub const REVOKED_SPORTS: [u16; 4] = [50_000, 50_001, 50_002, 50_003];
pub const STRANGER4: [u8; 4] = [192, 0, 2, 99];
pub const STRANGER6: Addr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99]);

/// What the classifier makes of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Ignore,
    Malformed,
    Packet(Tuple),
}

/// The 5-tuple and TCP flags the programs must read out of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

/// The reference classifier (policy in the module docs).
pub fn classify(f: &[u8]) -> Class {
    let Some(mut ethertype) = be16(f, 12) else {
        return Class::Ignore;
    };
    let mut off = 14;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return Class::Malformed;
        }
        let Some(inner) = be16(f, off + 2) else {
            return Class::Malformed;
        };
        ethertype = inner;
        off += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => classify_ipv4(f, off),
        ETH_P_IPV6 => classify_ipv6(f, off),
        _ => Class::Ignore,
    }
}

fn classify_ipv4(f: &[u8], off: usize) -> Class {
    let Some(h) = f.get(off..off + 20) else {
        return Class::Malformed;
    };
    let ihl = usize::from(h[0] & 0x0f);
    if h[0] >> 4 != 4 || ihl < 5 {
        return Class::Malformed;
    }
    let proto = h[9];
    let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if (proto != TCP && proto != UDP) || fragment_offset != 0 {
        return Class::Ignore;
    }
    let src = v4([h[12], h[13], h[14], h[15]]);
    let dst = v4([h[16], h[17], h[18], h[19]]);
    classify_l4(f, off + 4 * ihl, proto, src, dst)
}

fn classify_ipv6(f: &[u8], off: usize) -> Class {
    let Some(h) = f.get(off..off + 40) else {
        return Class::Malformed;
    };
    if h[0] >> 4 != 6 {
        return Class::Malformed;
    }
    let src: Addr = h[8..24].try_into().expect("16 bytes");
    let dst: Addr = h[24..40].try_into().expect("16 bytes");
    let mut next = h[6];
    let mut at = off + 40;
    let mut walked = 0;
    loop {
        match next {
            TCP | UDP => return classify_l4(f, at, next, src, dst),
            HOP_BY_HOP | ROUTING | DST_OPTS | FRAGMENT | AH if walked == MAX_IPV6_EXT_HEADERS => {
                return Class::Malformed;
            }
            HOP_BY_HOP | ROUTING | DST_OPTS => {
                let Some(ext) = f.get(at..at + 2) else {
                    return Class::Malformed;
                };
                next = ext[0];
                at += (usize::from(ext[1]) + 1) * 8;
            }
            FRAGMENT => {
                let Some(ext) = f.get(at..at + 4) else {
                    return Class::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    return Class::Ignore;
                }
                next = ext[0];
                at += 8;
            }
            AH => {
                let Some(ext) = f.get(at..at + 2) else {
                    return Class::Malformed;
                };
                next = ext[0];
                at += (usize::from(ext[1]) + 2) * 4;
            }
            _ => return Class::Ignore,
        }
        walked += 1;
        if at > MAX_L4_OFFSET {
            return Class::Malformed;
        }
    }
}

fn classify_l4(f: &[u8], at: usize, proto: u8, src: Addr, dst: Addr) -> Class {
    if at > MAX_L4_OFFSET {
        return Class::Malformed;
    }
    let need = if proto == TCP { 20 } else { 8 };
    let Some(h) = f.get(at..at + need) else {
        return Class::Malformed;
    };
    if proto == TCP && h[12] >> 4 < 5 {
        return Class::Malformed;
    }
    Class::Packet(Tuple {
        proto,
        src,
        dst,
        sport: u16::from_be_bytes([h[0], h[1]]),
        dport: u16::from_be_bytes([h[2], h[3]]),
        tcp_flags: if proto == TCP { h[13] } else { 0 },
    })
}

mod generate;

pub use generate::Sample;

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::frames::{Frame, non_ip_frame, truncate};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_classifier_reads_the_frames_the_builder_makes() {
        let f = Frame::tcp(ip("192.0.2.10"), 40000, ip("10.9.0.2"), 22)
            .vlan(7)
            .vlan(8)
            .flags(0x02)
            .build();
        let Class::Packet(t) = classify(&f) else {
            panic!("{:?}", classify(&f))
        };
        assert_eq!(
            (t.proto, t.src, t.dst, t.sport, t.dport, t.tcp_flags),
            (TCP, v4(GRANTED4), v4(SERVER4), 40000, 22, 0x02)
        );
        let f = Frame::udp(ip("2001:db8::10"), 5, ip("fd09::2"), 53)
            .ipv6_ext_headers(6)
            .build();
        assert!(matches!(classify(&f), Class::Packet(t) if t.dport == 53 && t.dst == SERVER6));
        let seven = Frame::udp(ip("2001:db8::10"), 5, ip("fd09::2"), 53)
            .ipv6_ext_headers(7)
            .build();
        assert_eq!(classify(&seven), Class::Malformed);
        let later = Frame::tcp(ip("192.0.2.10"), 1, ip("10.9.0.2"), 22)
            .fragment(3, false)
            .build();
        assert_eq!(classify(&later), Class::Ignore);
        assert_eq!(classify(&non_ip_frame()), Class::Ignore);
        let full = Frame::tcp(ip("192.0.2.10"), 1, ip("10.9.0.2"), 22).build();
        assert_eq!(
            classify(&truncate(full.clone(), 14 + 20 + 19)),
            Class::Malformed
        );
        assert_eq!(classify(&truncate(full, 13)), Class::Ignore);
        let triple = Frame::tcp(ip("192.0.2.10"), 1, ip("10.9.0.2"), 22)
            .vlan(1)
            .vlan(2)
            .vlan(3)
            .build();
        assert_eq!(classify(&triple), Class::Malformed);
    }

    #[test]
    fn the_rng_is_deterministic() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(42);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(42);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(Rng::new(0).next_u64(), 0);
    }
}
