//! Time and locks: a lock whose TTL ran out is marked expired and audited (it stopped
//! refusing the moment its TTL ran out; the sweep only records it), and records that can no
//! longer refuse anything are pruned: denials past their token's `exp`, cut-offs older than
//! the longest token lifetime, expired locks past the retention window.

use std::{sync::Arc, time::Duration};

use super::{LocksConfig, LocksError};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    sessions::{Sessions, model::now_ms},
    store::{LockWrite, Write},
};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockSweep {
    pub expired: usize,
    pub locks_pruned: usize,
    pub denials_pruned: usize,
    pub cutoffs_pruned: usize,
}

impl Sessions {
    /// Marks expired locks (audited `lock_expired`) and prunes what can no longer matter.
    /// Durable first, then the index follows.
    ///
    /// # Errors
    /// The store fails; nothing is pruned then.
    pub async fn sweep_locks(&self, config: &LocksConfig) -> Result<LockSweep, LocksError> {
        let now = now_ms();
        let retention = config.expired_retention_secs.saturating_mul(1000);
        let lifetime = config.max_token_lifetime_secs.saturating_mul(1000);
        let mut out = LockSweep::default();
        let mut writes = Vec::new();
        let (expired, pruned_locks, pruned_denials, pruned_cutoffs) = {
            let index = self.locks().read();
            let mut expired = Vec::new();
            let mut pruned = Vec::new();
            for l in index.locks.values() {
                if l.holds(now) {
                    continue;
                }
                match l.expired_at_ms {
                    None => {
                        let mut marked = l.clone();
                        marked.expired_at_ms = Some(now);
                        expired.push(marked);
                    }
                    Some(at) if now.saturating_sub(at) > retention => pruned.push(l.id),
                    Some(_) => {}
                }
            }
            let denials: Vec<String> = index
                .denials
                .values()
                .filter(|d| d.until_ms <= now)
                .map(|d| d.key.clone())
                .collect();
            let cutoffs: Vec<(String, String)> = index
                .cutoffs
                .values()
                .flat_map(|m| m.values())
                .filter(|c| now.saturating_sub(c.cutoff_secs.saturating_mul(1000)) > lifetime)
                .map(|c| (c.iss.clone(), c.sub.clone()))
                .collect();
            (expired, pruned, denials, cutoffs)
        };
        for l in &expired {
            let mut e = AuditEvent::new(AuditKind::LockExpired {
                lock: l.id.to_string(),
            });
            e.detail = format!(
                "{} expired (added by {} at {} ms); it no longer refuses anything",
                l.target, l.by, l.created_at_ms
            );
            writes.push(Write::Locks(LockWrite::PutLock(l.clone())));
            writes.push(Write::Audit(e));
        }
        writes.extend(
            pruned_locks
                .iter()
                .map(|id| Write::Locks(LockWrite::DeleteLock(*id))),
        );
        writes.extend(
            pruned_denials
                .iter()
                .map(|k| Write::Locks(LockWrite::DeleteDenial(k.clone()))),
        );
        writes.extend(pruned_cutoffs.iter().map(|(iss, sub)| {
            Write::Locks(LockWrite::DeleteCutoff {
                iss: iss.clone(),
                sub: sub.clone(),
            })
        }));
        if writes.is_empty() {
            return Ok(out);
        }
        self.commit(writes).await?;
        let mut index = self.locks().write();
        for l in expired {
            out.expired += 1;
            if let Some(held) = index.locks.get_mut(&l.id) {
                held.expired_at_ms = l.expired_at_ms;
            }
        }
        for id in pruned_locks {
            out.locks_pruned += usize::from(index.remove_lock(id).is_some());
        }
        for k in pruned_denials {
            out.denials_pruned += usize::from(index.denials.remove(&k).is_some());
        }
        for (iss, sub) in pruned_cutoffs {
            if let Some(m) = index.cutoffs.get_mut(&iss) {
                out.cutoffs_pruned += usize::from(m.remove(&sub).is_some());
                if m.is_empty() {
                    index.cutoffs.remove(&iss);
                }
            }
        }
        Ok(out)
    }
}

/// Sweeps the locks every `every` until the task is dropped.
pub async fn sweep_loop(sessions: Arc<Sessions>, config: LocksConfig, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sessions.sweep_locks(&config).await {
            Ok(s) if s != LockSweep::default() => tracing::info!(?s, "locks swept"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the lock sweep failed; it runs again"),
        }
    }
}
