//! Admissions against a real agent process, for the benches that measure admission rates:
//! ES256 development tokens minted in process, and clients (one TLS keep-alive connection
//! each) that take the next token until none are left, closed loop or paced.

use std::{
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use flowwarden::{admission::client::Client, auth::dev, sessions::model::now_ms};

/// `count` ES256 development tokens signed with the key in `keys` (as `dev keygen` wrote it),
/// for distinct subjects `<prefix>-0000000`… in groups `staff` and `bench`.
///
/// # Errors
/// The key or JWKS cannot be read, or signing fails.
pub fn mint(keys: &Path, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let kid = dev::kid_of(&keys.join(dev::JWKS_FILE))?;
    let (key, now) = (keys.join(dev::KEY_FILE), now_ms() / 1000);
    (0..count)
        .map(|i| {
            let mut c = dev::DevClaims::new(&format!("{prefix}-{i:07}"));
            c.email = Some(format!("{prefix}-{i:07}@corp.example"));
            c.groups = vec!["staff".into(), "bench".into()];
            c.managed = Some(true);
            Ok(dev::token(&key, &kid, &c, now)?)
        })
        .collect()
}

/// What one drive of admissions came to.
#[derive(Default)]
pub struct Outcome {
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Closed loop: send to answer. Paced: scheduled send time to answer. Sorted.
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Outcome {
    /// Admissions answered 201 per second of the drive.
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// One admission, checked: a 201 comes only after the commit, with the one granted resource.
///
/// # Errors
/// The agent refused, or granted something else than one resource.
pub fn admit(client: &Client, token: &str) -> Result<(), String> {
    match client.login(token) {
        Ok(r) if r.grants.len() == 1 => Ok(()),
        Ok(r) => Err(format!("unexpected grants {:?}", r.grants)),
        Err(e) => Err(e.to_string()),
    }
}

/// Each client (one keep-alive connection each) takes the next token until none are left.
/// With `pace`, token i is due at start + i × pace and its latency counts from then, so a slow
/// answer cannot hide the requests it delayed (no coordinated omission).
pub fn drive(clients: &[Client], tokens: &[String], pace: Option<Duration>) -> Outcome {
    let next = AtomicUsize::new(0);
    let start = Instant::now() + Duration::from_millis(20);
    let parts: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|client| {
                let next = &next;
                s.spawn(move || {
                    let mut out = Outcome::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(token) = tokens.get(i) else { break };
                        let due = match pace {
                            Some(p) => start + p * u32::try_from(i).unwrap_or(u32::MAX),
                            None => Instant::now(),
                        };
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        match admit(client, token) {
                            Ok(()) => out.latencies.push(due.elapsed()),
                            Err(e) => {
                                out.errors += 1;
                                out.first_error.get_or_insert(e);
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Outcome {
        elapsed: start.elapsed(),
        ..Outcome::default()
    };
    for p in parts {
        all.errors += p.errors;
        all.first_error = all.first_error.or(p.first_error);
        all.latencies.extend(p.latencies);
    }
    all.ok = all.latencies.len();
    all.latencies.sort_unstable();
    all
}
