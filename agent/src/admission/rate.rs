//! Per-source token buckets: a flood from some addresses cannot starve the others.

use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::Instant};

/// Buckets beyond this many are pruned (full ones first) so a scan of spoofed sources cannot
/// grow memory without bound.
const MAX_TRACKED: usize = 100_000;

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `source`; false when it has none left.
    pub fn allow(&self, source: IpAddr) -> bool {
        self.allow_at(source, Instant::now())
    }

    fn allow_at(&self, source: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&source) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = buckets.entry(source).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_source_has_its_own_bucket() {
        let r = RateLimiter::new(2, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert!((0..3).all(|_| r.allow_at(a, t0)));
        assert!(!r.allow_at(a, t0), "burst exhausted");
        assert!(r.allow_at(b, t0), "another source is not affected");
        assert!(
            r.allow_at(a, t0 + Duration::from_millis(500)),
            "refilled at 2/s"
        );
        assert!(!r.allow_at(a, t0 + Duration::from_millis(500)));
    }
}
