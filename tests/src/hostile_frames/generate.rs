//! The generator of the sweep's frames: well-formed specs (VLAN tags, IPv4 options and
//! fragments, IPv6 extension-header chains, TCP options), their mirror images, and the
//! byte-level mutations aimed at what the parser reads.

use super::*;

/// One frame of the sweep, its mirror image (addresses and ports swapped, same mutations),
/// and what the generator knows about it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub frame: Vec<u8>,
    /// The reply direction, for the egress program.
    pub mirror: Vec<u8>,
    /// For an unmutated frame that the stack would deliver to a transport socket by itself
    /// (TCP or UDP, not a later fragment, with any number of VLAN tags or extension
    /// headers): where to. `None` when mutations made it unknowable or it is not deliverable.
    pub delivers_to: Option<Tuple>,
    /// How the frame was made, for failure messages.
    pub recipe: String,
}

/// A spec of a well-formed frame, before any mutation.
#[derive(Debug, Clone)]
struct Spec {
    /// TPIDs, outermost first.
    tags: Vec<u16>,
    net: Net,
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// TCP options, in 32-bit words (data offset 5 + this).
    tcp_option_words: usize,
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Net {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        option_words: usize,
        /// Flags and fragment offset, as on the wire.
        frag: u16,
    },
    V6 {
        src: Addr,
        dst: Addr,
        chain: Vec<Ext>,
    },
    /// Another ethertype, with these bytes after it.
    Other(u16),
}

#[derive(Debug, Clone, Copy)]
struct Ext {
    kind: u8,
    /// The header's length byte (HBH/routing/dstopts: 8-octet units minus one; AH: 4-octet
    /// units minus two), or the fragment header's offset and M flag.
    len_or_frag: u16,
}

impl Ext {
    fn size(self) -> usize {
        match self.kind {
            FRAGMENT => 8,
            AH => (usize::from(self.len_or_frag) + 2) * 4,
            _ => (usize::from(self.len_or_frag) + 1) * 8,
        }
    }
}

/// Where the generator put things in a built frame, for targeted mutations.
#[derive(Debug, Default)]
struct Layout {
    /// Offset of the last ethertype field.
    ethertype: usize,
    ip: Option<usize>,
    ext: Vec<usize>,
    tcp: Option<usize>,
}

impl Spec {
    fn random(rng: &mut Rng) -> Spec {
        let tags = {
            let n = rng.pick(&[0, 0, 0, 0, 0, 1, 1, 2, 2, 3]);
            (0..n)
                .map(|_| rng.pick(&[ETH_P_8021Q, ETH_P_8021AD]))
                .collect()
        };
        let revoked_flow = rng.chance(5);
        let family6 = !revoked_flow && rng.chance(40);
        let net = if rng.chance(3) {
            Net::Other({
                let wild = rng.next_u64() as u16;
                rng.pick(&[0x0806, 0x8847, 0x8864, 0x88cc, wild])
            })
        } else if family6 {
            let src = {
                let wild = random6(rng);
                rng.pick(&[GRANTED6, STRANGER6, v4(GRANTED4), v4(STRANGER4), wild])
            };
            let dst = {
                let wild = random6(rng);
                rng.pick(&[SERVER6, OTHER6, v4(SERVER4), wild])
            };
            let n = rng.pick(&[0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 7, 8]);
            let chain = (0..n)
                .map(|_| {
                    let kind = rng.pick(&[HOP_BY_HOP, ROUTING, DST_OPTS, DST_OPTS, AH, FRAGMENT]);
                    let len_or_frag = match kind {
                        FRAGMENT => {
                            let wild = rng.next_u64() as u16 & 0xfff9;
                            rng.pick(&[0, 1, 8, 9, wild])
                        }
                        AH => rng.pick(&[0u16, 2, 4]),
                        _ => rng.pick(&[0u16, 0, 1, 2, 7, 40]),
                    };
                    Ext { kind, len_or_frag }
                })
                .collect();
            Net::V6 { src, dst, chain }
        } else {
            let src = if revoked_flow {
                REVOKED4
            } else {
                {
                    let wild = random4(rng);
                    rng.pick(&[GRANTED4, GRANTED4, STRANGER4, REVOKED4, wild])
                }
            };
            let dst = if revoked_flow {
                SERVER4
            } else {
                {
                    let wild = random4(rng);
                    rng.pick(&[SERVER4, SERVER4, OTHER4, wild])
                }
            };
            let frag = match rng.below(10) {
                0 => 0x2000,                                  // first fragment, more follow
                1 => 0x2000 | (1 + rng.below(0x1ffe) as u16), // a middle fragment
                2 => 1 + rng.below(0x1ffe) as u16,            // the last fragment
                3 => 0x4000,                                  // don't fragment
                _ => 0,
            };
            let option_words = rng.pick(&[0, 0, 0, 0, 1, 3, 10]);
            Net::V4 {
                src,
                dst,
                option_words,
                frag,
            }
        };
        let proto = if revoked_flow {
            TCP
        } else {
            match rng.below(20) {
                0 => rng.pick(&[1, 47, 50, 58, 59, 132, 4, 41]),
                1..=12 => TCP,
                _ => UDP,
            }
        };
        let dport = if revoked_flow {
            22
        } else {
            {
                let wild = rng.next_u64() as u16;
                rng.pick(&[22, 22, 22, 53, 53, 8443, 8443, 80, 443, wild])
            }
        };
        let sport = if revoked_flow {
            rng.pick(&REVOKED_SPORTS)
        } else {
            // A small pool, so that flows opened earlier are met again.
            {
                let wild = 1 + rng.below(65_535) as u16;
                rng.pick(&[40_000, 40_001, wild])
            }
        };
        let tcp_flags = {
            let wild = rng.byte();
            rng.pick(&[0x02, 0x10, 0x18, 0x12, 0x04, 0x14, 0x11, wild])
        };
        let tcp_option_words = rng.pick(&[0, 0, 0, 1, 3, 10]);
        let payload_len = rng.pick(&[0, 0, 1, 7, 32, 100]);
        let payload = rng.bytes(payload_len);
        Spec {
            tags,
            net,
            proto,
            sport,
            dport,
            tcp_flags,
            tcp_option_words,
            payload,
        }
    }

    fn mirror(&self) -> Spec {
        let mut m = self.clone();
        m.net = match &self.net {
            Net::V4 {
                src,
                dst,
                option_words,
                frag,
            } => Net::V4 {
                src: *dst,
                dst: *src,
                option_words: *option_words,
                frag: *frag,
            },
            Net::V6 { src, dst, chain } => Net::V6 {
                src: *dst,
                dst: *src,
                chain: chain.clone(),
            },
            Net::Other(t) => Net::Other(*t),
        };
        (m.sport, m.dport) = (self.dport, self.sport);
        m
    }

    /// Where the stack would deliver this frame by itself, if anywhere.
    fn delivers_to(&self) -> Option<Tuple> {
        if self.proto != TCP && self.proto != UDP {
            return None;
        }
        let (src, dst) = match &self.net {
            Net::V4 { src, dst, frag, .. } => {
                if frag & 0x1fff != 0 {
                    return None;
                }
                (v4(*src), v4(*dst))
            }
            Net::V6 { src, dst, chain } => {
                if chain
                    .iter()
                    .any(|e| e.kind == FRAGMENT && e.len_or_frag >> 3 != 0)
                {
                    return None;
                }
                (*src, *dst)
            }
            Net::Other(_) => return None,
        };
        Some(Tuple {
            proto: self.proto,
            src,
            dst,
            sport: self.sport,
            dport: self.dport,
            tcp_flags: if self.proto == TCP { self.tcp_flags } else { 0 },
        })
    }

    fn build(&self) -> (Vec<u8>, Layout) {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        let mut layout = Layout::default();
        for (i, &tpid) in self.tags.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            // Priority 0, VID from the tag's position: any value is fine.
            f.extend_from_slice(&(100 + i as u16).to_be_bytes());
        }
        layout.ethertype = f.len();
        let l4 = self.l4_bytes();
        match &self.net {
            Net::Other(ethertype) => {
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(&l4);
            }
            Net::V4 {
                src,
                dst,
                option_words,
                frag,
            } => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let ip = f.len();
                layout.ip = Some(ip);
                let hlen = 20 + 4 * option_words;
                let total = u16::try_from(hlen + l4.len()).expect("fits");
                f.push(0x40 | (5 + *option_words as u8));
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&0x1234u16.to_be_bytes());
                f.extend_from_slice(&frag.to_be_bytes());
                f.extend_from_slice(&[64, self.proto, 0, 0]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                // NOP options: valid, and they move the transport header.
                f.extend(std::iter::repeat_n(1u8, 4 * option_words));
                let csum = crate::frames::ipv4_checksum(&f[ip..ip + hlen]);
                f[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
                self.note_tcp(&mut layout, f.len());
                f.extend_from_slice(&l4);
            }
            Net::V6 { src, dst, chain } => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ip = f.len();
                layout.ip = Some(ip);
                let ext_len: usize = chain.iter().map(|e| e.size()).sum();
                let payload_len = u16::try_from(ext_len + l4.len()).expect("fits");
                let first = chain.first().map_or(self.proto, |e| e.kind);
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&payload_len.to_be_bytes());
                f.extend_from_slice(&[first, 64]);
                f.extend_from_slice(src);
                f.extend_from_slice(dst);
                for (i, e) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).map_or(self.proto, |n| n.kind);
                    layout.ext.push(f.len());
                    let start = f.len();
                    match e.kind {
                        FRAGMENT => {
                            f.extend_from_slice(&[next, 0]);
                            f.extend_from_slice(&e.len_or_frag.to_be_bytes());
                            f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                        }
                        _ => {
                            f.extend_from_slice(&[next, e.len_or_frag as u8]);
                            f.resize(start + e.size(), 0);
                        }
                    }
                }
                self.note_tcp(&mut layout, f.len());
                f.extend_from_slice(&l4);
            }
        }
        (f, layout)
    }

    fn note_tcp(&self, layout: &mut Layout, at: usize) {
        if self.proto == TCP {
            layout.tcp = Some(at);
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
            let doff = 5 + self.tcp_option_words as u8;
            l4.extend_from_slice(&[doff << 4, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
            l4.extend(std::iter::repeat_n(1u8, 4 * self.tcp_option_words));
        } else {
            let len = u16::try_from(8 + self.payload.len()).expect("fits");
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

fn random4(rng: &mut Rng) -> [u8; 4] {
    [rng.byte(), rng.byte(), rng.byte(), rng.byte()]
}

fn random6(rng: &mut Rng) -> Addr {
    rng.bytes(16).try_into().expect("16 bytes")
}

/// A byte-level edit, applied alike to a frame and its mirror (same length, same layout).
#[derive(Debug, Clone, Copy)]
enum Edit {
    Truncate(usize),
    /// `byte = byte & !mask | value & mask`.
    Set {
        at: usize,
        mask: u8,
        value: u8,
    },
}

impl Edit {
    fn apply(self, f: &mut Vec<u8>) {
        match self {
            Edit::Truncate(len) => f.truncate(len),
            Edit::Set { at, mask, value } => {
                if let Some(b) = f.get_mut(at) {
                    *b = (*b & !mask) | (value & mask);
                }
            }
        }
    }
}

fn set(at: usize, value: u8) -> Edit {
    Edit::Set {
        at,
        mask: 0xff,
        value,
    }
}

/// A random edit aimed at what the parser reads.
fn random_edit(rng: &mut Rng, len: usize, layout: &Layout, v6: bool) -> (Edit, &'static str) {
    let ip = layout.ip;
    match rng.below(10) {
        0 => (
            Edit::Truncate(14 + rng.below(len.saturating_sub(14).max(1))),
            "truncated",
        ),
        1 if ip.is_some() && !v6 => (
            Edit::Set {
                at: ip.unwrap(),
                mask: 0x0f,
                value: {
                    let wild = rng.byte();
                    rng.pick(&[0, 1, 4, 6, 15, wild])
                },
            },
            "IHL",
        ),
        2 if ip.is_some() => (
            Edit::Set {
                at: ip.unwrap(),
                mask: 0xf0,
                value: {
                    let wild = rng.byte();
                    rng.pick(&[0x40, 0x60, 0x00, 0xf0, wild])
                },
            },
            "IP version",
        ),
        3 if ip.is_some() => {
            // IPv4 total length, or IPv6 payload length.
            let at = ip.unwrap() + if v6 { 4 } else { 2 };
            let v = {
                let wild = rng.next_u64() as u16;
                rng.pick(&[0u16, 1, 19, 20, 21, 0xffff, wild])
            };
            let [hi, lo] = v.to_be_bytes();
            let which = rng.below(2);
            (set(at + which, [hi, lo][which]), "IP length")
        }
        4 if layout.tcp.is_some() => (
            Edit::Set {
                at: layout.tcp.unwrap() + 12,
                mask: 0xf0,
                value: {
                    let wild = rng.byte();
                    rng.pick(&[0x00, 0x10, 0x40, 0x50, 0xf0, wild])
                },
            },
            "TCP data offset",
        ),
        5 if !layout.ext.is_empty() => {
            let at = rng.pick(&layout.ext) + rng.below(2);
            (
                set(at, {
                    let wild = rng.byte();
                    rng.pick(&[0, 6, 17, 43, 44, 51, 59, 60, 255, wild])
                }),
                "IPv6 ext header",
            )
        }
        6 if v6 && ip.is_some() => (
            set(ip.unwrap() + 6, {
                let wild = rng.byte();
                rng.pick(&[0, 6, 17, 43, 44, 51, 59, 60, wild])
            }),
            "IPv6 next header",
        ),
        7 => {
            let at = layout.ethertype + rng.below(2);
            (
                set(at, {
                    let wild = rng.byte();
                    rng.pick(&[0x08, 0x86, 0x81, 0x88, 0x00, wild])
                }),
                "ethertype",
            )
        }
        _ => (
            Edit::Set {
                at: rng.below(len),
                mask: 0xff,
                value: rng.byte(),
            },
            "random byte",
        ),
    }
}

impl Sample {
    /// A well-formed frame, then (usually) one to three mutations; sometimes pure noise.
    pub fn random(rng: &mut Rng) -> Sample {
        if rng.chance(4) {
            return Sample::noise(rng);
        }
        let spec = Spec::random(rng);
        let (mut frame, layout) = spec.build();
        let (mut mirror, _) = spec.mirror().build();
        let mut recipe = format!("{spec:?}");
        let mut delivers_to = spec.delivers_to();
        if rng.chance(65) {
            let v6 = matches!(spec.net, Net::V6 { .. });
            for _ in 0..1 + rng.below(3) {
                let (edit, what) = random_edit(rng, frame.len(), &layout, v6);
                edit.apply(&mut frame);
                edit.apply(&mut mirror);
                recipe.push_str(&format!(" + {what} {edit:?}"));
            }
            delivers_to = None;
        }
        Sample {
            frame,
            mirror,
            delivers_to,
            recipe,
        }
    }

    /// Random bytes; half the time behind a plausible ethertype and IP version, so that the
    /// noise reaches the IP and transport parsers.
    fn noise(rng: &mut Rng) -> Sample {
        let len = 14 + rng.below(150);
        let mut frame = rng.bytes(len);
        if rng.chance(50) {
            let (ethertype, version) =
                rng.pick(&[(ETH_P_IP, 0x45), (ETH_P_IPV6, 0x60), (ETH_P_8021Q, 0x00)]);
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            if len > 14 {
                frame[14] = version | (frame[14] & 0x0f);
            }
        }
        Sample {
            mirror: frame.clone(),
            frame,
            delivers_to: None,
            recipe: "random bytes".into(),
        }
    }

    /// Every truncation (from 14 bytes, the least BPF_PROG_TEST_RUN accepts, to whole) of a
    /// well-formed random frame.
    pub fn truncations(rng: &mut Rng) -> Vec<Sample> {
        let spec = Spec::random(rng);
        let (frame, _) = spec.build();
        let (mirror, _) = spec.mirror().build();
        (14..=frame.len())
            .map(|len| Sample {
                frame: frame[..len].to_vec(),
                mirror: mirror[..len].to_vec(),
                delivers_to: (len == frame.len()).then(|| spec.delivers_to()).flatten(),
                recipe: format!("{spec:?} truncated to {len} of {}", frame.len()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_frames_say_where_they_go() {
        let mut rng = Rng::new(7);
        let mut checked = 0;
        for _ in 0..5_000 {
            let spec = Spec::random(&mut rng);
            let (frame, _) = spec.build();
            let Some(to) = spec.delivers_to() else {
                continue;
            };
            // A deliverable frame is read as its own tuple, or refused as too deep.
            match classify(&frame) {
                Class::Packet(t) => assert_eq!(t, to, "{spec:?}"),
                Class::Malformed => {
                    let deep = spec.tags.len() > MAX_VLAN_TAGS
                        || matches!(&spec.net, Net::V6 { chain, .. }
                            if chain.len() > MAX_IPV6_EXT_HEADERS
                                || 14 + 4 * spec.tags.len() + 40
                                    + chain.iter().map(|e| e.size()).sum::<usize>()
                                    > MAX_L4_OFFSET);
                    assert!(deep, "{spec:?}");
                }
                Class::Ignore => panic!("a deliverable frame is ignored: {spec:?}"),
            }
            let (mirror, _) = spec.mirror().build();
            if let Class::Packet(m) = classify(&mirror) {
                assert_eq!((m.src, m.sport), (to.dst, to.dport), "{spec:?}");
            }
            checked += 1;
        }
        assert!(checked > 1_000, "only {checked} deliverable frames");
    }
}
