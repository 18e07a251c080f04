//! Real TCP across the namespace pair: listeners in the server namespace, clients in the
//! client namespace, with timeouts so a dropped packet shows as "did not arrive", not a hang.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use crate::netns::Netns;

pub fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

pub fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = ns.run(|| TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Accepts one connection within `timeout`.
pub fn accept(listener: &TcpListener, timeout: Duration) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "accept timed out",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes `msg` on `from` and reads it back on `to`: whether it arrived whole within the
/// read timeout of `to`.
pub fn carries(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) -> bool {
    if from.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    let mut got = 0;
    while got < msg.len() {
        match to.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    buf == msg
}

/// Sets a short read timeout for "does not arrive" checks.
pub fn read_timeout(s: &TcpStream, timeout: Duration) {
    s.set_read_timeout(Some(timeout)).expect("set_read_timeout");
}

/// Connects to `to` from the local address `from` (an address of the calling thread's
/// namespace), giving up after `timeout`: for "another source of the same host" checks.
pub fn connect_from(
    from: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        return Err(std::io::Error::other("connect_from takes IPv4 addresses"));
    };
    let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: socket(2) returns a new fd we own at once through TcpStream.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sa(from);
    // SAFETY: bind reads a sockaddr_in that lives for the call.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A send timeout bounds connect(2) on a blocking socket.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads a timeval that lives for the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let remote = sa(to);
    // SAFETY: connect reads a sockaddr_in that lives for the call.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}
