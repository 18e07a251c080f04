//! The netlink sock_diag codec: SOCK_DIAG_BY_FAMILY and SOCK_DESTROY requests for one TCP
//! socket, and the kernel's answers, as bytes. No syscalls here: `sockets` sends and receives.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::sockets::FlowSockets;

// From linux/sock_diag.h and net/tcp_states.h; libc does not carry them.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub const SOCK_DESTROY: u16 = 21;
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_LISTEN: u8 = 10;
/// INET_DIAG_NOCOOKIE: match any socket with the 4-tuple.
pub const NO_COOKIE: [u8; 8] = [0xff; 8];

pub const NLMSG_HDRLEN: usize = 16;
/// struct nlmsghdr followed by struct inet_diag_req_v2.
pub const REQUEST_LEN: usize = NLMSG_HDRLEN + 56;
/// struct inet_diag_msg up to and including its id (family, state, timer, retrans, id).
pub const DIAG_MSG_MIN: usize = 52;

/// struct inet_diag_sockid in the kernel's byte order: ports and addresses big-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockId {
    pub family: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub cookie: [u8; 8],
}

impl SockId {
    pub fn v4(local: Ipv4Addr, lport: u16, remote: Ipv4Addr, rport: u16) -> Self {
        let (mut src, mut dst) = ([0; 16], [0; 16]);
        src[..4].copy_from_slice(&local.octets());
        dst[..4].copy_from_slice(&remote.octets());
        Self::new(libc::AF_INET, lport, rport, src, dst)
    }

    pub fn v6(local: Ipv6Addr, lport: u16, remote: Ipv6Addr, rport: u16) -> Self {
        Self::new(
            libc::AF_INET6,
            lport,
            rport,
            local.octets(),
            remote.octets(),
        )
    }

    pub fn new(family: i32, sport: u16, dport: u16, src: [u8; 16], dst: [u8; 16]) -> Self {
        Self {
            family: family as u8,
            sport,
            dport,
            src,
            dst,
            cookie: NO_COOKIE,
        }
    }
}

/// The kernel's id for the socket of a flow. `None` when the flow cannot name a connected
/// socket: such a 4-tuple would only ever resolve to a listener.
pub fn kernel_id(flow: &FlowSockets) -> Option<SockId> {
    let (remote, local) = (flow.remote, flow.local);
    if remote.port() == 0 || local.port() == 0 {
        return None;
    }
    if remote.ip().is_unspecified() || local.ip().is_unspecified() {
        return None;
    }
    let as_v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match (
        as_v4(local.ip()),
        as_v4(remote.ip()),
        local.ip(),
        remote.ip(),
    ) {
        // One AF_INET request also finds an IPv4 flow on a dual-stack socket: the kernel
        // hashes such connections by their IPv4 addresses, whatever the socket's family
        // (and answers a v4-mapped AF_INET6 request from the same table), so a second,
        // mapped request could only find what the first already did.
        (Some(l), Some(r), _, _) => Some(SockId::v4(l, local.port(), r, remote.port())),
        (None, None, IpAddr::V6(l), IpAddr::V6(r)) => {
            Some(SockId::v6(l, local.port(), r, remote.port()))
        }
        // One side IPv4, the other a plain IPv6 address: no socket has such a tuple.
        _ => None,
    }
}

pub fn encode(kind: u16, flags: i32, seq: u32, states: u32, id: &SockId) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&kind.to_ne_bytes());
    b[6..8].copy_from_slice(&(flags as u16).to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in ours.
    let r = &mut b[NLMSG_HDRLEN..];
    r[0] = id.family;
    r[1] = libc::IPPROTO_TCP as u8;
    // r[2] idiag_ext 0: no extensions, the answer only needs the state and the cookie.
    r[4..8].copy_from_slice(&states.to_ne_bytes());
    r[8..10].copy_from_slice(&id.sport.to_be_bytes());
    r[10..12].copy_from_slice(&id.dport.to_be_bytes());
    r[12..28].copy_from_slice(&id.src);
    r[28..44].copy_from_slice(&id.dst);
    // r[44..48] idiag_if 0: any interface.
    r[48..56].copy_from_slice(&id.cookie);
    b
}

/// The one socket the kernel answered a lookup with: its state and its identity.
pub struct Found {
    pub state: u8,
    pub id: SockId,
}

pub fn decode_found(payload: &[u8]) -> Option<Found> {
    if payload.len() < DIAG_MSG_MIN {
        return None;
    }
    let id = &payload[4..52];
    Some(Found {
        state: payload[1],
        id: SockId {
            family: payload[0],
            sport: u16::from_be_bytes([id[0], id[1]]),
            dport: u16::from_be_bytes([id[2], id[3]]),
            src: id[4..20].try_into().ok()?,
            dst: id[20..36].try_into().ok()?,
            cookie: id[40..48].try_into().ok()?,
        },
    })
}

pub fn malformed(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads the netlink messages of one `recv` for the request numbered `seq`, handing each data
/// message's payload to `on_data`. `Some(errno)` once the request's final message (an error
/// or done) is in, 0 for success; `None` when more is to be read. Messages of other requests
/// are skipped: nothing else may be credited to this request's flow.
///
/// # Errors
/// A message is truncated, its length is out of bounds, or an error carries no errno.
pub fn parse_answer(
    mut rest: &[u8],
    seq: u32,
    mut on_data: impl FnMut(&[u8]),
) -> io::Result<Option<i32>> {
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            return Err(malformed("truncated netlink header"));
        }
        let len = ne_u32(&rest[0..4]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed("netlink message length out of bounds"));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let answer_to = ne_u32(&rest[8..12]);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if answer_to != seq {
            continue;
        }
        match i32::from(kind) {
            // Both carry a negative errno first; only an old kernel's DONE may be empty, and
            // that means success. An ERROR without one is never success.
            libc::NLMSG_ERROR | libc::NLMSG_DONE => {
                let code = match payload.get(0..4) {
                    Some(b) => ne_u32(b) as i32,
                    None if i32::from(kind) == libc::NLMSG_DONE => 0,
                    None => return Err(malformed("netlink error without an errno")),
                };
                return Ok(Some(code.wrapping_neg()));
            }
            _ => on_data(payload),
        }
    }
    Ok(None)
}

/// A native-endian u32 from a slice of at least 4 bytes (checked by the caller).
fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

    fn flow(remote: (IpAddr, u16), local: (IpAddr, u16)) -> FlowSockets {
        FlowSockets {
            remote: remote.into(),
            local: local.into(),
        }
    }

    /// A netlink message as the kernel writes it: header, payload, padding to 4 bytes.
    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&4242u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(len.next_multiple_of(4), 0);
        b
    }

    /// struct inet_diag_msg for one socket, the way the kernel answers a lookup.
    fn diag_msg(state: u8, id: &SockId) -> Vec<u8> {
        let mut m = vec![0u8; 72];
        m[0] = id.family;
        m[1] = state;
        m[4..6].copy_from_slice(&id.sport.to_be_bytes());
        m[6..8].copy_from_slice(&id.dport.to_be_bytes());
        m[8..24].copy_from_slice(&id.src);
        m[24..40].copy_from_slice(&id.dst);
        m[40..44].copy_from_slice(&3u32.to_ne_bytes()); // interface
        m[44..52].copy_from_slice(&id.cookie);
        m
    }

    fn error(errno: i32) -> Vec<u8> {
        // struct nlmsgerr: the negative errno, then the offending request's header.
        let mut p = (-errno).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        p
    }

    #[test]
    fn a_destroy_request_is_the_kernels_layout_to_the_byte() {
        let id = kernel_id(&flow((CLIENT_V4.into(), 40000), (SERVER_V4.into(), 22))).expect("id");
        let pinned = SockId {
            cookie: [1, 2, 3, 4, 5, 6, 7, 8],
            ..id
        };
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
        let got = encode(SOCK_DESTROY, flags, 7, 0, &pinned);

        let mut want = Vec::new();
        // struct nlmsghdr: length, type SOCK_DESTROY, flags REQUEST|ACK, seq 7, pid 0.
        want.extend_from_slice(&72u32.to_ne_bytes());
        want.extend_from_slice(&21u16.to_ne_bytes());
        want.extend_from_slice(&0x0005u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        // struct inet_diag_req_v2: family, protocol, ext, pad, states.
        want.extend_from_slice(&[2, 6, 0, 0]);
        want.extend_from_slice(&0u32.to_ne_bytes());
        // struct inet_diag_sockid: ports big-endian (local first), addresses, interface, cookie.
        want.extend_from_slice(&[0, 22, 0x9c, 0x40]);
        want.extend_from_slice(&[10, 77, 0, 1]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&[10, 77, 0, 2]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(got.as_slice(), want.as_slice());
    }

    #[test]
    fn a_dump_request_asks_for_every_state_of_any_cookie() {
        let id = kernel_id(&flow((CLIENT_V6.into(), 50000), (SERVER_V6.into(), 443))).expect("id");
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_DUMP;
        let got = encode(SOCK_DIAG_BY_FAMILY, flags, 0x0102_0304, u32::MAX, &id);
        assert_eq!(got.len(), REQUEST_LEN);
        assert_eq!(got[0..4], 72u32.to_ne_bytes());
        assert_eq!(got[4..6], 20u16.to_ne_bytes(), "SOCK_DIAG_BY_FAMILY");
        assert_eq!(
            got[6..8],
            0x0301u16.to_ne_bytes(),
            "REQUEST|DUMP (ROOT|MATCH)"
        );
        assert_eq!(got[8..12], 0x0102_0304u32.to_ne_bytes());
        assert_eq!(got[12..16], [0; 4], "pid: the kernel fills it in");
        assert_eq!(got[16..20], [10, 6, 0, 0], "AF_INET6, TCP, no extensions");
        assert_eq!(got[20..24], [0xff; 4], "every state");
        assert_eq!(
            got[24..28],
            [0x01, 0xbb, 0xc3, 0x50],
            "ports in network order"
        );
        assert_eq!(got[28..44], SERVER_V6.octets());
        assert_eq!(got[44..60], CLIENT_V6.octets());
        assert_eq!(got[60..64], [0; 4], "any interface");
        assert_eq!(got[64..72], NO_COOKIE);
    }

    #[test]
    fn flows_map_to_kernel_ids() {
        let v4 = flow((CLIENT_V4.into(), 40000), (SERVER_V4.into(), 22));
        let id = kernel_id(&v4).expect("id");
        assert_eq!(
            (id.family, id.sport, id.dport),
            (libc::AF_INET as u8, 22, 40000)
        );
        assert_eq!(id.src[..4], SERVER_V4.octets());
        assert_eq!(id.dst[..4], CLIENT_V4.octets());
        let mapped = flow(
            (CLIENT_V4.to_ipv6_mapped().into(), 40000),
            (SERVER_V4.to_ipv6_mapped().into(), 22),
        );
        assert_eq!(
            kernel_id(&mapped),
            Some(id),
            "mapped addresses are the same flow"
        );
        // Tuples that could only name a listener, or no socket at all.
        for f in [
            flow((CLIENT_V4.into(), 0), (SERVER_V4.into(), 22)),
            flow((Ipv4Addr::UNSPECIFIED.into(), 1), (SERVER_V4.into(), 22)),
            flow((CLIENT_V4.into(), 40000), (SERVER_V6.into(), 22)),
        ] {
            assert_eq!(kernel_id(&f), None, "{f}");
        }
    }

    #[test]
    fn a_lookup_answer_decodes_to_the_socket_and_its_state() {
        let id = SockId {
            cookie: [9, 8, 7, 6, 5, 4, 3, 2],
            ..SockId::v6(SERVER_V6, 22, CLIENT_V6, 50000)
        };
        let mut buf = message(SOCK_DIAG_BY_FAMILY, 5, &diag_msg(1, &id));
        buf.extend(message(libc::NLMSG_ERROR as u16, 5, &error(0)));
        let mut found = None;
        let answer = parse_answer(&buf, 5, |p| found = decode_found(p)).expect("parse");
        assert_eq!(answer, Some(0), "acknowledged");
        let found = found.expect("a socket");
        assert_eq!((found.state, found.id), (1, id));
    }

    #[test]
    fn an_answer_carries_the_kernels_errno() {
        let buf = message(libc::NLMSG_ERROR as u16, 9, &error(libc::ENOENT));
        assert_eq!(
            parse_answer(&buf, 9, |_| panic!("no data")).unwrap(),
            Some(libc::ENOENT)
        );
        // An old kernel's empty DONE ends a dump successfully.
        let buf = message(libc::NLMSG_DONE as u16, 9, &[]);
        assert_eq!(parse_answer(&buf, 9, |_| {}).unwrap(), Some(0));
    }

    #[test]
    fn answers_to_other_requests_are_skipped() {
        let id = SockId::v4(SERVER_V4, 22, CLIENT_V4, 40000);
        let mut buf = message(SOCK_DIAG_BY_FAMILY, 4, &diag_msg(1, &id));
        buf.extend(message(libc::NLMSG_ERROR as u16, 4, &error(0)));
        let mut data = 0;
        assert_eq!(
            parse_answer(&buf, 5, |_| data += 1).unwrap(),
            None,
            "not finished: read on"
        );
        assert_eq!(data, 0, "nothing of request 4 is credited to request 5");
    }

    #[test]
    fn malformed_answers_are_errors() {
        let ok = message(libc::NLMSG_ERROR as u16, 1, &error(0));
        let mut long = ok.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let mut short = ok.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        for (what, buf) in [
            ("truncated header", ok[..10].to_vec()),
            ("length past the buffer", long),
            ("length below the header", short),
            (
                "error without errno",
                message(libc::NLMSG_ERROR as u16, 1, &[]),
            ),
        ] {
            let got = parse_answer(&buf, 1, |_| {});
            assert!(
                matches!(&got, Err(e) if e.kind() == io::ErrorKind::InvalidData),
                "{what}: expected InvalidData, saw {got:?}"
            );
        }
        assert!(
            decode_found(&[0; DIAG_MSG_MIN - 1]).is_none(),
            "short payload"
        );
    }
}
