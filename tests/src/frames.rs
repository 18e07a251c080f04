//! Builders of synthetic Ethernet frames fed to the programs through BPF_PROG_TEST_RUN.
//!
//! Only what the parser looks at is filled in faithfully: Ethernet and VLAN tags, the IPv4
//! header (IHL 5, total length, header checksum), the IPv6 header (payload length, next-header
//! chain), the TCP header (20 bytes) and the UDP header (8 bytes, length).
//!
//! TCP and UDP checksums are left at zero: BPF_PROG_TEST_RUN hands the bytes to the program
//! without validating any L4 checksum, and the parser never reads it, so computing it (over
//! a pseudo-header that fragments would make meaningless anyway) would test nothing.

use std::net::{IpAddr, Ipv4Addr};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Destination MAC of every built frame (locally administered, so it can never be a real NIC).
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Source MAC of every built frame.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// Size of each IPv6 destination-options header added by [`Frame::ipv6_ext_headers`].
pub const IPV6_EXT_HLEN: usize = 8;
pub const IPV6_FRAG_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// IPv4 identification / IPv6 fragment identification of every built packet. Fixed so that
/// frames are reproducible byte for byte; nothing reassembles them.
const IP_ID: u16 = 0x1234;
const TTL: u8 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
}

/// One TCP or UDP packet in an Ethernet frame; configure it with the chained methods, then
/// [`build`](Frame::build) its bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    l4: L4,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flags: u8,
    payload: Vec<u8>,
    vlans: Vec<u16>,
    ext_headers: usize,
    fragment: Option<(u16, bool)>,
}

impl Frame {
    /// A TCP segment with only ACK set. Panics if `src` and `dst` are of different families.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
        Frame::new(L4::Tcp, src, sport, dst, dport)
    }

    /// A UDP datagram. Panics if `src` and `dst` are of different families.
    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
        Frame::new(L4::Udp, src, sport, dst, dport)
    }

    fn new(l4: L4, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Frame {
        assert_eq!(
            src.is_ipv4(),
            dst.is_ipv4(),
            "frame addresses of different families: {src} -> {dst}"
        );
        Frame {
            l4,
            src,
            sport,
            dst,
            dport,
            flags: TCP_ACK,
            payload: Vec::new(),
            vlans: Vec::new(),
            ext_headers: 0,
            fragment: None,
        }
    }

    /// Sets the TCP flags byte (`TCP_SYN | TCP_ACK`, ...). Ignored for UDP.
    pub fn flags(mut self, flags: u8) -> Frame {
        self.flags = flags;
        self
    }

    /// Sets the bytes after the L4 header.
    pub fn payload(mut self, payload: &[u8]) -> Frame {
        self.payload = payload.to_vec();
        self
    }

    /// Adds a VLAN tag with VLAN ID `vid` (priority and DEI zero). Tags are written in call
    /// order, outermost first. The innermost tag has TPID 0x8100 (802.1Q) and any outer one
    /// 0x88a8 (802.1ad), so one call gives a plain 802.1Q frame and two give QinQ.
    pub fn vlan(mut self, vid: u16) -> Frame {
        assert!(vid <= 0x0fff, "VLAN ID {vid} does not fit in 12 bits");
        self.vlans.push(vid);
        self
    }

    /// Inserts `n` IPv6 destination-options headers (8 bytes each, one PadN option) between the
    /// IPv6 header and the L4 header (before the fragment header if there is one).
    /// Panics on an IPv4 frame when built.
    pub fn ipv6_ext_headers(mut self, n: usize) -> Frame {
        self.ext_headers = n;
        self
    }

    /// Makes the packet a fragment at `offset_units` × 8 bytes, with more fragments to follow if
    /// `more`. IPv4: sets the header's fragment offset and MF bit. IPv6: adds a Fragment header
    /// right before the L4 header.
    ///
    /// The L4 header is written even when the offset is non-zero, where a real fragment would
    /// carry the middle of the datagram instead: a parser that wrongly reads ports from a
    /// non-first fragment then sees plausible ones, so the mistake shows up as a wrong verdict.
    pub fn fragment(mut self, offset_units: u16, more: bool) -> Frame {
        assert!(
            offset_units <= 0x1fff,
            "fragment offset {offset_units} does not fit in 13 bits"
        );
        self.fragment = Some((offset_units, more));
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut frame = Vec::with_capacity(ETH_HLEN + 4 * self.vlans.len() + IPV6_HLEN + 64);
        let ethertype = match self.src {
            IpAddr::V4(_) => ETH_P_IP,
            IpAddr::V6(_) => ETH_P_IPV6,
        };
        push_eth(&mut frame, DST_MAC, SRC_MAC, &self.vlans, ethertype);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => self.push_ipv4(&mut frame, src, dst, l4.len()),
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let proto = self.l4_proto();
                let mut ext = Vec::new();
                // Each header names the one after it, so build the chain from the front and
                // patch the "next header" byte of the last one when the next is known.
                let frag = self.fragment;
                for i in 0..self.ext_headers {
                    let next = if i + 1 < self.ext_headers {
                        IPPROTO_DSTOPTS
                    } else if frag.is_some() {
                        IPPROTO_FRAGMENT
                    } else {
                        proto
                    };
                    // Hdr Ext Len 0 (8 bytes), then a PadN option filling the remaining 6.
                    ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
                if let Some((offset, more)) = frag {
                    let off_flags = (offset << 3) | u16::from(more);
                    ext.extend_from_slice(&[proto, 0]);
                    ext.extend_from_slice(&off_flags.to_be_bytes());
                    ext.extend_from_slice(&u32::from(IP_ID).to_be_bytes());
                }
                let first_next = if self.ext_headers > 0 {
                    IPPROTO_DSTOPTS
                } else if frag.is_some() {
                    IPPROTO_FRAGMENT
                } else {
                    proto
                };
                let payload_len =
                    u16::try_from(ext.len() + l4.len()).expect("IPv6 payload too long");
                // Version 6, traffic class and flow label zero.
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&payload_len.to_be_bytes());
                frame.extend_from_slice(&[first_next, TTL]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                frame.extend_from_slice(&ext);
            }
            _ => unreachable!("families checked in Frame::new"),
        }
        frame.extend_from_slice(&l4);
        frame
    }

    fn l4_proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        }
    }

    fn push_ipv4(&self, frame: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) {
        assert!(
            self.ext_headers == 0,
            "IPv6 extension headers requested on an IPv4 frame"
        );
        let total_len = u16::try_from(IPV4_HLEN + l4_len).expect("IPv4 packet too long");
        let frag_field = match self.fragment {
            Some((offset, more)) => offset | if more { 0x2000 } else { 0 },
            None => 0,
        };
        let start = frame.len();
        // Version 4, IHL 5; DSCP/ECN zero.
        frame.extend_from_slice(&[0x45, 0]);
        frame.extend_from_slice(&total_len.to_be_bytes());
        frame.extend_from_slice(&IP_ID.to_be_bytes());
        frame.extend_from_slice(&frag_field.to_be_bytes());
        frame.extend_from_slice(&[TTL, self.l4_proto(), 0, 0]);
        frame.extend_from_slice(&src.octets());
        frame.extend_from_slice(&dst.octets());
        let csum = ipv4_checksum(&frame[start..]);
        frame[start + 10..start + 12].copy_from_slice(&csum.to_be_bytes());
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(TCP_HLEN + self.payload.len());
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        match self.l4 {
            L4::Tcp => {
                // Sequence 1, acknowledgment 1 (only meaningful with ACK, harmless without).
                l4.extend_from_slice(&1u32.to_be_bytes());
                l4.extend_from_slice(&1u32.to_be_bytes());
                // Data offset 5 words, then flags; window 65535; checksum 0 (see module docs);
                // urgent pointer 0.
                l4.extend_from_slice(&[5 << 4, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            L4::Udp => {
                let len = u16::try_from(UDP_HLEN + self.payload.len()).expect("UDP too long");
                l4.extend_from_slice(&len.to_be_bytes());
                // Checksum 0 (see module docs).
                l4.extend_from_slice(&[0, 0]);
            }
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

fn push_eth(frame: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], vlans: &[u16], ethertype: u16) {
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    for (i, vid) in vlans.iter().enumerate() {
        let tpid = if i + 1 == vlans.len() {
            ETH_P_8021Q
        } else {
            ETH_P_8021AD
        };
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&vid.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

/// The RFC 791 header checksum: the ones' complement of the ones' complement sum of the
/// header's 16-bit words. Over a header whose checksum field is filled in, the result is 0.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request (who-has 10.0.0.2, tell 10.0.0.1), broadcast like a real one: a frame the
/// parser must classify as not IP.
pub fn non_ip_frame() -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + 28);
    push_eth(&mut frame, [0xff; 6], SRC_MAC, &[], ETH_P_ARP);
    // Hardware type Ethernet, protocol IPv4, address sizes 6 and 4, operation 1 (request).
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&[10, 0, 0, 1]);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&[10, 0, 0, 2]);
    frame
}

/// The first `len` bytes of `frame` (all of it if shorter), to test the parser's bounds checks.
pub fn truncate(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    const V4_SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    const V4_DST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 7, 9));
    const V6_SRC: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    const V6_DST: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn check_eth(f: &[u8], ethertype: u16) {
        assert_eq!(f[0..6], DST_MAC);
        assert_eq!(f[6..12], SRC_MAC);
        assert_eq!(be16(f, 12), ethertype);
    }

    #[test]
    fn ipv4_tcp() {
        let f = Frame::tcp(V4_SRC, 40000, V4_DST, 443).build();
        assert_eq!(f.len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN);
        check_eth(&f, ETH_P_IP);
        let ip = &f[ETH_HLEN..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(be16(ip, 2) as usize, IPV4_HLEN + TCP_HLEN);
        assert_eq!(be16(ip, 6), 0, "no fragmentation by default");
        assert_eq!(ip[9], IPPROTO_TCP);
        assert_eq!(ip[12..16], [10, 1, 2, 3]);
        assert_eq!(ip[16..20], [192, 168, 7, 9]);
        assert_eq!(
            ipv4_checksum(&ip[..IPV4_HLEN]),
            0,
            "header checksum verifies"
        );
        let tcp = &ip[IPV4_HLEN..];
        assert_eq!(be16(tcp, 0), 40000);
        assert_eq!(be16(tcp, 2), 443);
        assert_eq!(tcp[12], 0x50, "data offset 5");
        assert_eq!(tcp[13], TCP_ACK, "default flags");
    }

    #[test]
    fn ipv4_checksum_known_vector() {
        // The classic example header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&hdr), 0xb861);
    }

    #[test]
    fn tcp_flags_and_payload() {
        let f = Frame::tcp(V4_SRC, 1, V4_DST, 2)
            .flags(TCP_SYN | TCP_PSH | TCP_RST)
            .payload(b"hello")
            .build();
        assert_eq!(f.len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN + 5);
        assert_eq!(be16(&f, ETH_HLEN + 2) as usize, IPV4_HLEN + TCP_HLEN + 5);
        assert_eq!(f[ETH_HLEN + IPV4_HLEN + 13], 0x0e);
        assert_eq!(&f[f.len() - 5..], b"hello");
        assert_eq!(ipv4_checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);
    }

    #[test]
    fn ipv4_udp() {
        let f = Frame::udp(V4_SRC, 5353, V4_DST, 53)
            .payload(&[7; 3])
            .build();
        assert_eq!(f.len(), ETH_HLEN + IPV4_HLEN + UDP_HLEN + 3);
        let ip = &f[ETH_HLEN..];
        assert_eq!(ip[9], IPPROTO_UDP);
        assert_eq!(be16(ip, 2) as usize, IPV4_HLEN + UDP_HLEN + 3);
        let udp = &ip[IPV4_HLEN..];
        assert_eq!(be16(udp, 0), 5353);
        assert_eq!(be16(udp, 2), 53);
        assert_eq!(be16(udp, 4) as usize, UDP_HLEN + 3);
    }

    #[test]
    fn ipv6_tcp_and_udp() {
        let f = Frame::tcp(V6_SRC, 1234, V6_DST, 80).flags(TCP_SYN).build();
        assert_eq!(f.len(), ETH_HLEN + IPV6_HLEN + TCP_HLEN);
        check_eth(&f, ETH_P_IPV6);
        let ip = &f[ETH_HLEN..];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(be16(ip, 4) as usize, TCP_HLEN);
        assert_eq!(ip[6], IPPROTO_TCP);
        assert_eq!(
            ip[8..24],
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets()
        );
        assert_eq!(
            ip[24..40],
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets()
        );
        let tcp = &ip[IPV6_HLEN..];
        assert_eq!(be16(tcp, 0), 1234);
        assert_eq!(be16(tcp, 2), 80);
        assert_eq!(tcp[13], TCP_SYN);

        let f = Frame::udp(V6_SRC, 9, V6_DST, 10).payload(b"xy").build();
        assert_eq!(f.len(), ETH_HLEN + IPV6_HLEN + UDP_HLEN + 2);
        assert_eq!(f[ETH_HLEN + 6], IPPROTO_UDP);
        assert_eq!(be16(&f, ETH_HLEN + 4) as usize, UDP_HLEN + 2);
        assert_eq!(be16(&f, ETH_HLEN + IPV6_HLEN + 4) as usize, UDP_HLEN + 2);
    }

    #[test]
    fn vlan_and_qinq() {
        let f = Frame::tcp(V4_SRC, 1, V4_DST, 2).vlan(100).build();
        assert_eq!(f.len(), ETH_HLEN + VLAN_HLEN + IPV4_HLEN + TCP_HLEN);
        assert_eq!(be16(&f, 12), ETH_P_8021Q);
        assert_eq!(be16(&f, 14), 100);
        assert_eq!(be16(&f, 16), ETH_P_IP);
        assert_eq!(f[18], 0x45);

        let f = Frame::udp(V6_SRC, 1, V6_DST, 2).vlan(10).vlan(20).build();
        assert_eq!(f.len(), ETH_HLEN + 2 * VLAN_HLEN + IPV6_HLEN + UDP_HLEN);
        assert_eq!(be16(&f, 12), ETH_P_8021AD);
        assert_eq!(be16(&f, 14), 10);
        assert_eq!(be16(&f, 16), ETH_P_8021Q);
        assert_eq!(be16(&f, 18), 20);
        assert_eq!(be16(&f, 20), ETH_P_IPV6);
        assert_eq!(f[22] >> 4, 6);
    }

    #[test]
    fn ipv6_ext_headers_chain() {
        let f = Frame::tcp(V6_SRC, 1, V6_DST, 2).ipv6_ext_headers(3).build();
        assert_eq!(f.len(), ETH_HLEN + IPV6_HLEN + 3 * IPV6_EXT_HLEN + TCP_HLEN);
        let ip = &f[ETH_HLEN..];
        assert_eq!(be16(ip, 4) as usize, 3 * IPV6_EXT_HLEN + TCP_HLEN);
        assert_eq!(ip[6], IPPROTO_DSTOPTS);
        let ext = &ip[IPV6_HLEN..];
        for i in 0..3 {
            let h = &ext[i * IPV6_EXT_HLEN..];
            let want = if i < 2 { IPPROTO_DSTOPTS } else { IPPROTO_TCP };
            assert_eq!(h[0], want, "next header of ext header {i}");
            assert_eq!(h[1], 0, "8-byte header");
        }
        let tcp = &ext[3 * IPV6_EXT_HLEN..];
        assert_eq!(be16(tcp, 0), 1);
        assert_eq!(be16(tcp, 2), 2);
    }

    #[test]
    #[should_panic(expected = "IPv6 extension headers requested on an IPv4 frame")]
    fn ext_headers_on_ipv4_panic() {
        Frame::tcp(V4_SRC, 1, V4_DST, 2).ipv6_ext_headers(1).build();
    }

    #[test]
    #[should_panic(expected = "different families")]
    fn mixed_families_panic() {
        Frame::tcp(V4_SRC, 1, V6_DST, 2);
    }

    #[test]
    fn ipv4_fragment() {
        let f = Frame::udp(V4_SRC, 1, V4_DST, 2).fragment(0, true).build();
        assert_eq!(be16(&f, ETH_HLEN + 6), 0x2000, "MF, offset 0");
        assert_eq!(ipv4_checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);

        let f = Frame::tcp(V4_SRC, 1, V4_DST, 2)
            .fragment(185, false)
            .build();
        assert_eq!(be16(&f, ETH_HLEN + 6), 185);
        assert_eq!(f.len(), ETH_HLEN + IPV4_HLEN + TCP_HLEN);
        assert_eq!(ipv4_checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0);
    }

    #[test]
    fn ipv6_fragment() {
        let f = Frame::udp(V6_SRC, 1, V6_DST, 2).fragment(185, true).build();
        assert_eq!(f.len(), ETH_HLEN + IPV6_HLEN + IPV6_FRAG_HLEN + UDP_HLEN);
        let ip = &f[ETH_HLEN..];
        assert_eq!(ip[6], IPPROTO_FRAGMENT);
        assert_eq!(be16(ip, 4) as usize, IPV6_FRAG_HLEN + UDP_HLEN);
        let frag = &ip[IPV6_HLEN..];
        assert_eq!(frag[0], IPPROTO_UDP);
        assert_eq!(be16(frag, 2), (185 << 3) | 1);
        assert_eq!(
            be16(frag, 2) & 0xfff8,
            185 << 3,
            "offset as the parser reads it"
        );

        // Destination options come first, the fragment header last before L4.
        let f = Frame::tcp(V6_SRC, 1, V6_DST, 2)
            .ipv6_ext_headers(2)
            .fragment(0, true)
            .build();
        let ip = &f[ETH_HLEN..];
        assert_eq!(
            be16(ip, 4) as usize,
            2 * IPV6_EXT_HLEN + IPV6_FRAG_HLEN + TCP_HLEN
        );
        assert_eq!(ip[6], IPPROTO_DSTOPTS);
        assert_eq!(ip[IPV6_HLEN], IPPROTO_DSTOPTS);
        assert_eq!(ip[IPV6_HLEN + IPV6_EXT_HLEN], IPPROTO_FRAGMENT);
        let frag = &ip[IPV6_HLEN + 2 * IPV6_EXT_HLEN..];
        assert_eq!(frag[0], IPPROTO_TCP);
        assert_eq!(be16(frag, 2), 1, "offset 0, M set");
    }

    #[test]
    fn arp_and_truncate() {
        let f = non_ip_frame();
        assert_eq!(f.len(), ETH_HLEN + 28);
        assert_eq!(f[0..6], [0xff; 6]);
        assert_eq!(be16(&f, 12), ETH_P_ARP);
        assert_eq!(be16(&f, ETH_HLEN + 6), 1, "request");

        let full = Frame::tcp(V4_SRC, 1, V4_DST, 2).build();
        assert_eq!(truncate(full.clone(), 20), full[..20]);
        assert_eq!(truncate(full.clone(), 1000), full);
    }
}
