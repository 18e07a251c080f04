//! The one bounds-checked parser: Ethernet (and up to two VLAN tags), IPv4, IPv6 with its
//! extension headers, TCP and UDP. Every program reads packets through it.

use core::mem::size_of;

use agent_common::{IPPROTO_TCP, IPPROTO_UDP, ipv4_mapped};

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HLEN: usize = 40;
/// Extension headers walked before giving up (the packet is then malformed: fail closed).
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Deepest L4 offset we accept; bounds the offset for the verifier too.
const MAX_L4_OFFSET: usize = 512;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What a frame is, as far as enforcement cares.
pub enum Parsed {
    /// Not IP, not TCP/UDP, or a non-first fragment (useless without its first fragment,
    /// which carries the ports and is checked): never touched.
    Ignore,
    /// Claims to be IP/TCP/UDP but its headers do not fit or make sense, or are nested deeper
    /// (VLAN tags, IPv6 extension headers) than the parser walks.
    Malformed,
    Packet(Packet),
}

/// The 5-tuple and TCP flags of a TCP or UDP packet. Addresses are IPv6 or IPv4-mapped.
pub struct Packet {
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

/// The readable bytes of a packet: `[start, end)`.
#[derive(Clone, Copy)]
pub struct Bytes {
    start: usize,
    end: usize,
}

impl Bytes {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// A pointer to a `T` at `offset`, if all of it lies inside the packet.
    #[inline(always)]
    fn at<T>(&self, offset: usize) -> Option<*const T> {
        let p = self.start + offset;
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *const T)
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: `at` checked that the whole `T` lies inside the packet.
        self.at::<T>(offset).map(|p| unsafe { p.read_unaligned() })
    }

    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        self.read::<[u8; 2]>(offset).map(u16::from_be_bytes)
    }
}

/// Parses a frame that starts with an Ethernet header.
#[inline(always)]
pub fn parse(b: Bytes) -> Parsed {
    let Some(mut ethertype) = b.be16(12) else {
        return Parsed::Ignore;
    };
    let mut off = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, 802.1ad): tagged traffic to a resource is still enforced.
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = b.be16(off + 2) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        off += 4;
    }
    // A third tag: deeper than we walk, yet nested VLAN devices would deliver what it
    // carries, perhaps to a resource. Fail closed.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Parsed::Malformed;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(b, off),
        ETH_P_IPV6 => parse_ipv6(b, off),
        _ => Parsed::Ignore,
    }
}

#[inline(always)]
fn parse_ipv4(b: Bytes, off: usize) -> Parsed {
    let Some(hdr) = b.read::<[u8; 20]>(off) else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = (hdr[0] & 0x0f) as usize;
    if ihl < 5 {
        return Parsed::Malformed;
    }
    let proto = hdr[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Ignore;
    }
    let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    if frag_offset != 0 {
        return Parsed::Ignore;
    }
    let src = ipv4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let dst = ipv4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    parse_l4(b, off + ihl * 4, proto, src, dst)
}

#[inline(always)]
fn parse_ipv6(b: Bytes, off: usize) -> Parsed {
    let Some(hdr) = b.read::<[u8; IPV6_HLEN]>(off) else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let mut next = hdr[6];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    dst.copy_from_slice(&hdr[24..40]);
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => return parse_l4(b, l4, next, src, dst),
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let Some(ext) = b.read::<[u8; 2]>(l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: only the first fragment carries the ports.
            44 => {
                let Some(ext) = b.read::<[u8; 4]>(l4) else {
                    return Parsed::Malformed;
                };
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Parsed::Ignore;
                }
                next = ext[0];
                l4 += 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let Some(ext) = b.read::<[u8; 2]>(l4) else {
                    return Parsed::Malformed;
                };
                next = ext[0];
                l4 += (ext[1] as usize + 2) * 4;
            }
            _ => return Parsed::Ignore,
        }
        if l4 > MAX_L4_OFFSET {
            return Parsed::Malformed;
        }
    }
    match next {
        IPPROTO_TCP | IPPROTO_UDP => parse_l4(b, l4, next, src, dst),
        0 | 43 | 44 | 51 | 60 => Parsed::Malformed,
        _ => Parsed::Ignore,
    }
}

#[inline(always)]
fn parse_l4(b: Bytes, off: usize, proto: u8, src: [u8; 16], dst: [u8; 16]) -> Parsed {
    if off > MAX_L4_OFFSET {
        return Parsed::Malformed;
    }
    let (ports, tcp_flags) = if proto == IPPROTO_TCP {
        let Some(hdr) = b.read::<[u8; 20]>(off) else {
            return Parsed::Malformed;
        };
        if (hdr[12] >> 4) < 5 {
            return Parsed::Malformed;
        }
        ([hdr[0], hdr[1], hdr[2], hdr[3]], hdr[13])
    } else {
        let Some(hdr) = b.read::<[u8; 8]>(off) else {
            return Parsed::Malformed;
        };
        ([hdr[0], hdr[1], hdr[2], hdr[3]], 0)
    };
    Parsed::Packet(Packet {
        proto,
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        tcp_flags,
    })
}
