//! How many status-socket connections who may hold: a cap per uid for everyone without admin
//! access, slots only administrators may take, the pressure signal that shortens idle
//! timeouts, and rate-limited warnings about all of it.

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{net::UnixStream, sync::watch};

use super::SocketOptions;
use crate::api::jsonrpc::{self, BUSY, RpcError};

/// One warning of a kind per this long; the ones in between are counted, not lost.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The limits, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// Slots everyone shares.
    pub shared: usize,
    /// Connections one uid without admin access may hold.
    pub per_uid: usize,
    /// Slots beyond the shared ones, for administrators only.
    pub admin_reserve: usize,
}

impl Limits {
    pub(super) fn of(opts: &SocketOptions) -> Self {
        Self {
            shared: opts.max_connections,
            per_uid: opts.max_per_uid,
            admin_reserve: opts.admin_reserve,
        }
    }

    /// From this many connections on, the socket is under pressure: three quarters of the
    /// shared slots, so that idle connections start closing before anyone is refused.
    fn pressure_from(self) -> usize {
        (self.shared * 3).div_ceil(4).max(1)
    }

    /// Pressure ends once no more than half the shared slots are taken: closing idle
    /// connections then frees room in one go instead of one slot at a time.
    fn pressure_until(self) -> usize {
        self.shared / 2
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The uid holds `max` connections already.
    PerUid { uid: u32, max: usize },
    /// Every shared slot is taken (and, for an administrator, every reserved one).
    Full { max: usize },
}

impl Refusal {
    pub(super) fn error(&self) -> RpcError {
        match self {
            Self::PerUid { uid, max } => RpcError::new(
                BUSY,
                format!(
                    "too many connections from uid {uid}: at most {max} at once per user; close \
                     some and try again"
                ),
            )
            .with_data(json!({ "limit": "per_uid", "uid": uid, "max": max })),
            Self::Full { max } => RpcError::new(
                BUSY,
                format!(
                    "too many connections: the agent serves at most {max} at once; try again \
                     shortly"
                ),
            )
            .with_data(json!({ "limit": "connections", "max": max })),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Connections of uids without admin access (administrators are not capped per uid).
    by_uid: HashMap<u32, usize>,
}

/// The connection budget of one status socket.
pub(super) struct Budget {
    limits: Limits,
    counts: Mutex<Counts>,
    pressure: watch::Sender<bool>,
    pub(super) refusals: Throttle,
    pub(super) long_lines: Throttle,
    pub(super) slow_clients: Throttle,
    pub(super) idle_closes: Throttle,
}

impl Budget {
    pub(super) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            pressure: watch::Sender::new(false),
            refusals: Throttle::default(),
            long_lines: Throttle::default(),
            slow_clients: Throttle::default(),
            idle_closes: Throttle::default(),
        })
    }

    /// A slot for a new connection of `uid`, or why there is none.
    pub(super) fn admit(self: &Arc<Self>, uid: u32, admin: bool) -> Result<Slot, Refusal> {
        let mut counts = self.lock();
        let Limits {
            shared,
            per_uid,
            admin_reserve,
        } = self.limits;
        if admin {
            let max = shared + admin_reserve;
            if counts.total >= max {
                return Err(Refusal::Full { max });
            }
        } else {
            let held = counts.by_uid.get(&uid).copied().unwrap_or(0);
            if held >= per_uid {
                return Err(Refusal::PerUid { uid, max: per_uid });
            }
            if counts.total >= shared {
                return Err(Refusal::Full { max: shared });
            }
            *counts.by_uid.entry(uid).or_default() += 1;
        }
        counts.total += 1;
        self.update_pressure(counts.total);
        Ok(Slot {
            budget: Arc::clone(self),
            uid: (!admin).then_some(uid),
        })
    }

    /// Follows whether the socket is under pressure; see [`Limits::pressure_from`] and
    /// [`Limits::pressure_until`].
    pub(super) fn pressure(&self) -> watch::Receiver<bool> {
        self.pressure.subscribe()
    }

    fn release(&self, uid: Option<u32>) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(uid) = uid
            && let Some(held) = counts.by_uid.get_mut(&uid)
        {
            *held -= 1;
            if *held == 0 {
                counts.by_uid.remove(&uid);
            }
        }
        self.update_pressure(counts.total);
    }

    fn update_pressure(&self, total: usize) {
        let (from, until) = (self.limits.pressure_from(), self.limits.pressure_until());
        self.pressure.send_if_modified(|under| {
            let now = if *under { total > until } else { total >= from };
            let changed = *under != now;
            *under = now;
            changed
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        let counts = self.lock();
        (counts.total, counts.by_uid.values().sum())
    }
}

/// One connection's place in the budget, given back when it is dropped.
pub(super) struct Slot {
    budget: Arc<Budget>,
    /// The uid it counts against, for connections without admin access.
    uid: Option<u32>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.budget.release(self.uid);
    }
}

/// Answers a refused connection with one busy line and closes it.
pub(super) fn refuse(stream: UnixStream, refusal: &Refusal, budget: &Budget) {
    let line = jsonrpc::response_err(&Value::Null, &refusal.error()) + "\n";
    // A fresh socket's send buffer is empty, so this short line goes out without waiting; if
    // it does not, the client was gone anyway. Written on the plain socket because Tokio's
    // `try_write` says "would block" until the reactor has seen the new socket writable.
    if let Ok(plain) = stream.into_std() {
        let _ = (&plain).write(line.as_bytes());
    }
    if let Some(suppressed) = budget.refusals.ready() {
        match refusal {
            Refusal::PerUid { uid, max } => tracing::warn!(
                uid,
                max,
                suppressed,
                "status socket under pressure: refused a connection, the uid is at its \
                 connection cap"
            ),
            Refusal::Full { max } => tracing::warn!(
                max,
                suppressed,
                "status socket under pressure: refused a connection, every slot is taken"
            ),
        }
    }
}

/// Lets one warning of a kind through per [`WARN_EVERY`], counting the ones it holds back.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(held back since the last one)` when a warning may be logged now.
    pub(super) fn ready(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.last
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            s.suppressed += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(shared: usize, per_uid: usize, admin_reserve: usize) -> Arc<Budget> {
        Budget::new(Limits {
            shared,
            per_uid,
            admin_reserve,
        })
    }

    #[test]
    fn a_uid_without_admin_access_is_capped() {
        let b = budget(10, 2, 1);
        let held: Vec<_> = (0..2).map(|_| b.admit(1000, false).unwrap()).collect();
        assert_eq!(
            b.admit(1000, false).err(),
            Some(Refusal::PerUid { uid: 1000, max: 2 })
        );
        // Another uid, and an administrator, are not affected.
        let _other = b.admit(1001, false).unwrap();
        let _admin = b.admit(0, true).unwrap();
        drop(held);
        assert_eq!(b.held(), (2, 1), "the capped uid's slots came back");
        let _again = b.admit(1000, false).unwrap();
    }

    #[test]
    fn administrators_have_slots_nobody_else_can_take() {
        let b = budget(4, 4, 2);
        let readers: Vec<_> = (0..4).map(|i| b.admit(1000 + i, false).unwrap()).collect();
        assert_eq!(b.admit(2000, false).err(), Some(Refusal::Full { max: 4 }));
        let admins: Vec<_> = (0..2).map(|_| b.admit(0, true).unwrap()).collect();
        assert_eq!(b.admit(0, true).err(), Some(Refusal::Full { max: 6 }));
        drop(admins);
        drop(readers);
        assert_eq!(b.held(), (0, 0));
    }

    #[test]
    fn pressure_runs_from_three_quarters_down_to_half_the_shared_slots() {
        let b = budget(8, 8, 2);
        let pressure = b.pressure();
        let mut held: Vec<_> = (0..5).map(|i| b.admit(i, false).unwrap()).collect();
        assert!(!*pressure.borrow(), "5 of 8 is not pressure");
        held.push(b.admit(9, false).unwrap());
        assert!(*pressure.borrow(), "6 of 8 is");
        held.truncate(5);
        assert!(*pressure.borrow(), "5 of 8 still is, once it started");
        held.truncate(4);
        assert!(!*pressure.borrow(), "it ends at half");
    }

    #[test]
    fn refusals_name_the_limit_that_bit() {
        let e = Refusal::PerUid { uid: 1000, max: 32 }.error();
        assert_eq!(e.code, BUSY);
        assert_eq!(
            e.message,
            "too many connections from uid 1000: at most 32 at once per user; close some and \
             try again"
        );
        let e = Refusal::Full { max: 256 }.error();
        assert!(
            e.message
                .starts_with("too many connections: the agent serves at most 256"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_throttle_lets_one_warning_through_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        t.state.lock().unwrap().last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(t.ready(), Some(2));
    }
}
