//! Flow-table pressure in the log: one warning when new flows start being denied because the
//! table is full, one note once none has been denied for a while. Never one line per packet:
//! the kernel counts the packets (`flow_table_full`), and a full table under attack denies
//! thousands a second.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::Enforcer;
use crate::datapath::DropReason;

/// How many looks at the counter without a new denial end an episode: a trickle of denied
/// packets (a client retrying every few seconds) stays one episode, and the log gets at most
/// one warning per this many intervals.
pub const QUIET_LOOKS: u32 = 30;

/// What changed since the last look at the kernel's `flow_table_full` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureChange {
    /// New flows started being denied (or, in monitor mode, would be) for want of room.
    Full {
        /// Denied since the last look.
        denied: u64,
    },
    /// No flow was denied for a whole quiet period.
    Relieved {
        /// Denied during the whole episode.
        denied: u64,
    },
}

/// Edge detection over the kernel's running count of flows denied because the table was full.
#[derive(Debug, Clone)]
pub struct FlowPressure {
    quiet: Duration,
    full: bool,
    last: u64,
    episode_start: u64,
    last_denial: Option<Instant>,
}

impl FlowPressure {
    /// Starts from the counter's current value: denials from before (say, before the agent
    /// restarted over its pinned maps) are not news. An episode ends after `quiet` without a
    /// new denial.
    pub fn new(denied_so_far: u64, quiet: Duration) -> Self {
        Self {
            quiet,
            full: false,
            last: denied_so_far,
            episode_start: denied_so_far,
            last_denial: None,
        }
    }

    /// Takes the counter's value at `now`; says when an episode starts or ends, once each.
    pub fn observe(&mut self, denied_total: u64, now: Instant) -> Option<PressureChange> {
        // The counters only grow while their map lives; a smaller value is a new map.
        if denied_total < self.last {
            *self = Self::new(denied_total, self.quiet);
            return None;
        }
        let previous = std::mem::replace(&mut self.last, denied_total);
        if denied_total > previous {
            self.last_denial = Some(now);
            if self.full {
                return None;
            }
            self.full = true;
            self.episode_start = previous;
            return Some(PressureChange::Full {
                denied: denied_total - previous,
            });
        }
        let quiet_for = self
            .last_denial
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if self.full && quiet_for >= self.quiet {
            self.full = false;
            return Some(PressureChange::Relieved {
                denied: denied_total - self.episode_start,
            });
        }
        None
    }
}

/// Flows denied for want of room so far, enforced or only counted in monitor mode.
fn denied_total(enforcer: &Enforcer) -> Option<u64> {
    let c = enforcer.counters().ok()?;
    Some(c.dropped(DropReason::FlowTableFull) + c.would_drop(DropReason::FlowTableFull))
}

/// Looks at the counter every `every` and logs each change of [`FlowPressure`]; an episode
/// ends after [`QUIET_LOOKS`] looks without a denial.
pub async fn watch(enforcer: Arc<Enforcer>, every: Duration) {
    let mut pressure = FlowPressure::new(denied_total(&enforcer).unwrap_or(0), every * QUIET_LOOKS);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(total) = denied_total(&enforcer) else {
            continue;
        };
        match pressure.observe(total, Instant::now()) {
            Some(PressureChange::Full { denied }) => {
                let (flows, capacity) = enforcer.flow_fill();
                tracing::warn!(
                    flows,
                    capacity,
                    denied,
                    "flow table full: new flows to resources are denied until flows end or idle \
                     ones are swept (datapath.flow_table_size sets its size)"
                );
            }
            Some(PressureChange::Relieved { denied }) => {
                tracing::info!(denied, "flow table has room again");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_secs(30);

    #[test]
    fn one_warning_per_episode_not_per_packet() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut p = FlowPressure::new(0, QUIET);
        assert_eq!(p.observe(0, at(0)), None, "quiet");
        assert_eq!(
            p.observe(3, at(1)),
            Some(PressureChange::Full { denied: 3 })
        );
        // Denials go on, thousands of them, then a trickle: nothing more to say.
        for (total, secs) in [
            (10, 2),
            (500, 3),
            (100_000, 4),
            (100_001, 20),
            (100_002, 49),
        ] {
            assert_eq!(p.observe(total, at(secs)), None, "at {total}");
        }
        assert_eq!(p.observe(100_002, at(78)), None, "29 s without a denial");
        assert_eq!(
            p.observe(100_002, at(79)),
            Some(PressureChange::Relieved { denied: 100_002 })
        );
        assert_eq!(p.observe(100_002, at(200)), None, "still quiet");
        // A second episode is reported again, counted from its own start.
        assert_eq!(
            p.observe(100_009, at(201)),
            Some(PressureChange::Full { denied: 7 })
        );
        assert_eq!(p.observe(100_011, at(202)), None);
        assert_eq!(
            p.observe(100_011, at(232)),
            Some(PressureChange::Relieved { denied: 9 })
        );
    }

    #[test]
    fn denials_before_the_start_or_from_an_old_map_are_not_news() {
        let t0 = Instant::now();
        let mut p = FlowPressure::new(42, QUIET);
        assert_eq!(p.observe(42, t0), None);
        assert_eq!(p.observe(43, t0), Some(PressureChange::Full { denied: 1 }));
        // The maps were recreated: the counter starts over, silently.
        assert_eq!(p.observe(0, t0), None);
        assert_eq!(p.observe(0, t0 + QUIET), None, "no relief for the old map");
        assert_eq!(
            p.observe(2, t0 + QUIET),
            Some(PressureChange::Full { denied: 2 })
        );
    }
}
