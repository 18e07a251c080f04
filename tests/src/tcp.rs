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
