//! The admission endpoint's connection budget: at most so many connections at once from one
//! source address and in all, so that idle or slow clients can never use up the descriptors
//! the status socket, the store, the policy watcher and key refresh need.
//!
//! Over its source's share a new connection is refused (closed at once). Over the global
//! limit the oldest idle connection (one not in the middle of a request) is closed to make
//! room, so a legitimate client still gets in while a flood from many sources holds the
//! endpoint; with none idle, the new one is refused.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Descriptors kept out of the admission endpoint's reach, beyond the status socket's own
/// connections: the store, the pinned maps and links, ring buffers, the policy watcher,
/// key refresh (HTTPS), metrics, logging and the runtime.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft open-files limit to the hard one (a unit's `LimitNOFILE`, or the
/// system's); returns the soft limit in force afterwards.
///
/// # Errors
/// The limit cannot be read or set.
pub fn raise_open_files() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit from `lim`; a soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(open_files())
}

/// The soft open-files limit in force (1,024, the usual default, when it cannot be read).
pub fn open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 1_024;
    }
    lim.rlim_cur
}

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source already has its share of connections open.
    SourceLimit,
    /// The endpoint is full and every open connection is in the middle of a request.
    GlobalLimit,
}

/// The connection limit the admission endpoint can afford under `nofile` open descriptors,
/// keeping `status_connections` (the status socket's limit) and [`RESERVED_DESCRIPTORS`]
/// for everything else; never above `configured`, and at least 16.
pub fn affordable(configured: usize, nofile: u64, status_connections: usize) -> usize {
    let reserve = RESERVED_DESCRIPTORS + status_connections as u64;
    let room = usize::try_from(nofile.saturating_sub(reserve)).unwrap_or(usize::MAX);
    configured.min(room).max(16)
}

/// The budget shared by every admission connection.
pub struct Budget {
    limit: usize,
    per_source: usize,
    epoch: Instant,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next: u64,
    /// By admission order: the first idle one is the oldest idle one.
    slots: BTreeMap<u64, (IpAddr, Arc<Connection>)>,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection's state, shared between its task and the budget.
pub struct Connection {
    epoch: Instant,
    /// Requests being handled now.
    busy: AtomicU32,
    /// When it last became idle, in ms since the budget's epoch.
    idle_since_ms: AtomicU64,
    evict: Notify,
}

impl Connection {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts the idle clock again (end of the handshake).
    pub fn idle_from_now(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long it has waited for a request; `None` while one is being handled.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(self.now_ms().saturating_sub(since)))
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// Resolves when the budget closed this connection to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

/// A request in progress on a connection.
pub struct Busy(Arc<Connection>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle_from_now();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in the budget, given back on drop.
pub struct Ticket {
    budget: Arc<Budget>,
    id: u64,
    pub connection: Arc<Connection>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.budget.lock();
        if let Some((source, _)) = open.slots.remove(&self.id) {
            open.release(source);
        }
    }
}

impl Open {
    fn release(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// What [`Budget::admit`] did.
pub struct Admitted {
    pub ticket: Ticket,
    /// True when the oldest idle connection was closed to make room.
    pub evicted: bool,
}

impl Budget {
    pub fn new(limit: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            per_source: per_source.max(1),
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().slots.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `source`.
    ///
    /// # Errors
    /// The source has its share open, or the endpoint is full of busy connections.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refused> {
        let mut open = self.lock();
        if open.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(Refused::SourceLimit);
        }
        let mut evicted = false;
        if open.slots.len() >= self.limit {
            let oldest_idle = open
                .slots
                .iter()
                .find(|(_, (_, c))| c.idle_for().is_some())
                .map(|(id, _)| *id);
            let Some(id) = oldest_idle else {
                return Err(Refused::GlobalLimit);
            };
            if let Some((old_source, conn)) = open.slots.remove(&id) {
                open.release(old_source);
                // notify_one keeps a permit: a task not yet waiting still sees it.
                conn.evict.notify_one();
                evicted = true;
            }
        }
        let id = open.next;
        open.next += 1;
        let connection = Arc::new(Connection {
            epoch: self.epoch,
            busy: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            evict: Notify::new(),
        });
        open.slots.insert(id, (source, Arc::clone(&connection)));
        *open.by_source.entry(source).or_default() += 1;
        Ok(Admitted {
            ticket: Ticket {
                budget: Arc::clone(self),
                id,
                connection,
            },
            evicted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_over_its_share_is_refused_and_others_are_not() {
        let b = Budget::new(100, 2);
        let held: Vec<_> = (0..2).map(|_| b.admit(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(
            b.admit(ip("10.0.0.1")).err(),
            Some(Refused::SourceLimit),
            "a third connection from the same source"
        );
        assert!(b.admit(ip("10.0.0.2")).is_ok(), "another source");
        drop(held);
        assert!(
            b.admit(ip("10.0.0.1")).is_ok(),
            "closed connections give their place back"
        );
        assert_eq!(b.open(), 0);
    }

    #[test]
    fn a_full_endpoint_closes_its_oldest_idle_connection_and_never_a_busy_one() {
        let b = Budget::new(2, 10);
        let first = b.admit(ip("10.0.0.1")).unwrap();
        let second = b.admit(ip("10.0.0.2")).unwrap();
        let _working = first.ticket.connection.busy();
        let third = b.admit(ip("10.0.0.3")).unwrap();
        assert!(third.evicted, "a full endpoint makes room");
        assert_eq!(b.open(), 2);
        // The oldest connection was busy: the second (idle) one went.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), second.ticket.connection.evicted())
                .await
                .expect("the idle connection is told to close");
        });
        drop(second);
        assert_eq!(
            b.open(),
            2,
            "an evicted connection's drop frees nothing twice"
        );
        let _busy_third = third.ticket.connection.busy();
        assert_eq!(
            b.admit(ip("10.0.0.4")).err(),
            Some(Refused::GlobalLimit),
            "with every connection busy, a new one is refused"
        );
    }

    #[test]
    fn the_limit_leaves_the_reserve_free() {
        assert_eq!(affordable(4096, 1024, 256), 512);
        assert_eq!(affordable(1024, 1 << 20, 256), 1024);
        assert_eq!(affordable(1024, 100, 256), 16, "never below a usable floor");
    }
}
