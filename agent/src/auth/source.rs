//! Where an issuer's keys come from (JWKS file, OIDC discovery, HS256 secret) and how the cached
//! set is kept fresh: on an unknown `kid` (rate-limited) and periodically, keeping the last good
//! set whenever a refresh fails.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{
    alg::Alg,
    config::{AuthConfigError, IssuerConfig},
    fetch,
    jwks::KeySet,
    trust,
};

/// HS256 secrets shorter than the hash output are brute-forceable (RFC 7518 3.2).
const MIN_SECRET_BYTES: usize = 32;
/// A JWKS `Cache-Control: max-age` shorter than this (or `no-store`) still waits this long
/// before the next periodic fetch: the provider's hint must not turn into a fetch loop.
pub(crate) const MIN_MAX_AGE: Duration = Duration::from_secs(60);

/// Timing knobs; fixed in production, shortened by tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Budget for one key fetch (the discovery document and the JWKS together), connect to
    /// last byte.
    pub(crate) http_timeout: Duration,
    /// Least time between two refreshes caused by tokens (unknown `kid`, keys never loaded):
    /// a stream of forged kids must not turn into a stream of fetches.
    pub(crate) on_demand_every: Duration,
    /// A failed periodic refresh is retried after this (or `refresh_secs`, if shorter).
    pub(crate) retry_after_failure: Duration,
    /// Replaces every issuer's `refresh_secs` when set.
    pub(crate) refresh_every: Option<Duration>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            http_timeout: Duration::from_secs(5),
            on_demand_every: Duration::from_secs(10),
            retry_after_failure: Duration::from_secs(60),
            refresh_every: None,
        }
    }
}

enum KeySource {
    JwksFile(PathBuf),
    Discovery(ureq::Agent),
    Secret,
    /// Keys found some other way (a Shared Signals transmitter's `jwks_uri`, or its
    /// `ssf-configuration`): the locator fetches the JWKS document within the budget.
    Located(ureq::Agent, Arc<JwksLocator>),
}

/// Fetches a JWKS document with `agent` within the budget (see [`IssuerKeys::located`]).
pub(crate) type JwksLocator =
    dyn Fn(&ureq::Agent, Duration) -> Result<fetch::Fetched, String> + Send + Sync;

/// One issuer's keys: a read-mostly snapshot for verification, and refresh bookkeeping that
/// only refreshes touch.
pub(crate) struct IssuerKeys {
    issuer: String,
    source: KeySource,
    algs: Vec<Alg>,
    refresh_every: Duration,
    tuning: Tuning,
    current: RwLock<Arc<KeySet>>,
    state: Mutex<RefreshState>,
}

#[derive(Default)]
struct RefreshState {
    last_on_demand: Option<Instant>,
    /// `None` until a first successful load: a discovery issuer is fetched lazily, on first use.
    next_periodic: Option<Instant>,
    last_error: Option<String>,
    last_success: Option<SystemTime>,
    /// When the last load (periodic or on demand, good or bad) ended.
    last_attempt_end: Option<Instant>,
    /// The same, on the wall clock, for status.
    last_attempt_wall: Option<SystemTime>,
}

/// What an on-demand refresh brought.
pub(crate) enum OnDemand {
    /// A newer set than the one the caller looked at.
    Fresh(Arc<KeySet>),
    /// Rate-limited (or not refreshable); carries the last failure, if the last try failed.
    NotNow {
        last_error: Option<String>,
    },
    Failed(String),
}

/// An issuer's key state, for `flowwarden status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerKeyStatus {
    pub issuer: String,
    /// `jwks_file <path>`, `discovery` or `hs256_secret_file`.
    pub source: String,
    /// Whether a key set was ever loaded (discovery issuers load on first use).
    pub loaded: bool,
    /// Usable keys in the current set.
    pub keys: usize,
    /// The `kid` of each usable key (`-` for a key without one), in the set's order.
    pub kids: Vec<String>,
    /// Last successful load, seconds since the Unix epoch.
    pub last_refresh_unix: Option<u64>,
    /// Last load attempt, good or bad, seconds since the Unix epoch.
    pub last_fetch_unix: Option<u64>,
    /// When the next periodic refresh is due, seconds since the Unix epoch (`None`: keys are
    /// loaded on first use, or never refreshed).
    pub next_refresh_unix: Option<u64>,
    /// Why the last refresh failed, if it did (the current set is the last good one, if any).
    pub last_error: Option<String>,
}

impl IssuerKeyStatus {
    /// One line for `flowwarden status`: what the issuer's keys are and when they change.
    pub fn summary(&self, now_secs: u64) -> String {
        let ago = |t: Option<u64>| {
            t.map_or("never".into(), |t| {
                format!("{}s ago", now_secs.saturating_sub(t))
            })
        };
        let mut line = format!(
            "{} ({}): {} keys [{}], fetched {}, loaded {}",
            self.issuer,
            self.source,
            self.keys,
            self.kids.join(", "),
            ago(self.last_fetch_unix),
            ago(self.last_refresh_unix),
        );
        if let Some(next) = self.next_refresh_unix {
            line.push_str(&format!(", next in {}s", next.saturating_sub(now_secs)));
        }
        if !self.loaded {
            line.push_str(", NO KEYS LOADED");
        }
        if let Some(e) = &self.last_error {
            line.push_str(&format!(", last error: {e}"));
        }
        line
    }
}

fn unix(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl IssuerKeys {
    /// Loads file-backed keys now, so a broken file stops the agent at start, not at first login.
    pub(crate) fn new(
        at: &str,
        cfg: &IssuerConfig,
        algs: Vec<Alg>,
        tuning: Tuning,
    ) -> Result<Self, AuthConfigError> {
        let refresh_every = tuning
            .refresh_every
            .unwrap_or(Duration::from_secs(cfg.refresh_secs));
        let (source, initial) = if let Some(path) = &cfg.jwks_file {
            let field = format!("{at}.jwks_file");
            let bytes = read_capped(path).map_err(|source| AuthConfigError::Unreadable {
                field: field.clone(),
                path: path.clone(),
                source,
            })?;
            let set =
                KeySet::from_jwks(&bytes, &algs).map_err(|reason| AuthConfigError::BadKeys {
                    field,
                    path: path.clone(),
                    reason,
                })?;
            (KeySource::JwksFile(path.clone()), set)
        } else if let Some(path) = &cfg.hs256_secret_file {
            (
                KeySource::Secret,
                KeySet::from_secret(&read_secret(at, path)?),
            )
        } else {
            let tls = trust::client_config(cfg.ca_file.as_deref()).map_err(|e| {
                AuthConfigError::BadKeys {
                    field: format!("{at}.ca_file"),
                    path: cfg.ca_file.clone().unwrap_or_default(),
                    reason: e.to_string(),
                }
            })?;
            (
                KeySource::Discovery(fetch::agent(tuning.http_timeout, tls)),
                KeySet::empty(),
            )
        };
        let loaded = initial.loaded;
        let keys = Self {
            issuer: cfg.issuer.clone(),
            source,
            algs,
            refresh_every,
            tuning,
            current: RwLock::new(Arc::new(initial)),
            state: Mutex::new(RefreshState::default()),
        };
        if loaded {
            let mut st = lock(&keys.state);
            st.last_success = Some(SystemTime::now());
            st.last_attempt_wall = st.last_success;
            if !matches!(keys.source, KeySource::Secret) {
                st.next_periodic = Some(Instant::now() + refresh_every);
            }
        }
        Ok(keys)
    }

    /// Keys that `locate` fetches (and refetches, on rotation), over HTTPS trusting `ca_file`
    /// alone when given: for sources other than an issuer's own discovery document.
    ///
    /// # Errors
    /// `ca_file` cannot be used.
    pub(crate) fn located(
        issuer: &str,
        ca_file: Option<&Path>,
        algs: Vec<Alg>,
        refresh_every: Duration,
        tuning: Tuning,
        locate: Arc<JwksLocator>,
    ) -> Result<Self, trust::TrustError> {
        let tls = trust::client_config(ca_file)?;
        Ok(Self {
            issuer: issuer.to_owned(),
            source: KeySource::Located(fetch::agent(tuning.http_timeout, tls), locate),
            algs,
            refresh_every,
            tuning,
            current: RwLock::new(Arc::new(KeySet::empty())),
            state: Mutex::new(RefreshState::default()),
        })
    }

    /// The current set; cheap (one read lock, one reference count).
    pub(crate) fn snapshot(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether a background thread has anything to do for this issuer.
    pub(crate) fn refreshable(&self) -> bool {
        !matches!(self.source, KeySource::Secret)
    }

    /// Whether [`IssuerKeys::refresh_on_demand`] would fetch now (not rate-limited): a token
    /// whose signature failed with a known kid is only worth a blocking retry then.
    pub(crate) fn may_refresh_now(&self, seen: &Arc<KeySet>) -> bool {
        if !self.refreshable() {
            return false;
        }
        if !Arc::ptr_eq(&self.snapshot(), seen) {
            return true;
        }
        let st = lock(&self.state);
        st.last_on_demand
            .is_none_or(|t| t.elapsed() >= self.tuning.on_demand_every)
    }

    /// A token named a key that `seen` lacks, or its signature failed with the key of its
    /// kid (a provider that replaced its key under the same kid): reload, unless someone just
    /// did.
    pub(crate) fn refresh_on_demand(&self, seen: &Arc<KeySet>) -> OnDemand {
        if !self.refreshable() {
            return OnDemand::NotNow { last_error: None };
        }
        let asked = Instant::now();
        let mut st = lock(&self.state);
        // Another thread may have reloaded while this one waited for the lock.
        let current = self.snapshot();
        if !Arc::ptr_eq(&current, seen) {
            return OnDemand::Fresh(current);
        }
        // A load that failed while this token waited for the lock answered it already: a
        // fetch of its own would make it wait for two fetch budgets instead of one.
        if st.last_attempt_end.is_some_and(|end| end >= asked) {
            return OnDemand::NotNow {
                last_error: st.last_error.clone(),
            };
        }
        let now = Instant::now();
        if st
            .last_on_demand
            .is_some_and(|t| now.duration_since(t) < self.tuning.on_demand_every)
        {
            return OnDemand::NotNow {
                last_error: st.last_error.clone(),
            };
        }
        st.last_on_demand = Some(now);
        match self.reload(&mut st, now) {
            Ok(set) => OnDemand::Fresh(set),
            Err(e) => OnDemand::Failed(e),
        }
    }

    /// The periodic refresh; never waits behind a refresh already under way.
    pub(crate) fn refresh_if_due(&self, now: Instant) {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::WouldBlock) => return,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
        };
        if st.next_periodic.is_some_and(|due| now >= due) {
            // A failure is recorded in the state and logged; the last good set stays.
            let _ = self.reload(&mut st, now);
        }
    }

    pub(crate) fn status(&self) -> IssuerKeyStatus {
        let set = self.snapshot();
        let st = lock(&self.state);
        IssuerKeyStatus {
            issuer: self.issuer.clone(),
            source: match &self.source {
                KeySource::JwksFile(p) => format!("jwks_file {}", p.display()),
                KeySource::Discovery(_) => "discovery".into(),
                KeySource::Secret => "hs256_secret_file".into(),
                KeySource::Located(..) => "located".into(),
            },
            loaded: set.loaded,
            keys: set.len(),
            kids: set.kids(),
            last_refresh_unix: st.last_success.and_then(unix),
            last_fetch_unix: st.last_attempt_wall.and_then(unix),
            next_refresh_unix: st.next_periodic.and_then(|due| {
                let wall = SystemTime::now() + due.saturating_duration_since(Instant::now());
                unix(wall)
            }),
            last_error: st.last_error.clone(),
        }
    }

    fn reload(&self, st: &mut RefreshState, now: Instant) -> Result<Arc<KeySet>, String> {
        let loaded = self.load();
        st.last_attempt_end = Some(Instant::now());
        st.last_attempt_wall = Some(SystemTime::now());
        match loaded {
            Ok((set, max_age)) => {
                let set = Arc::new(set);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&set);
                if st.last_error.take().is_some() {
                    tracing::info!(issuer = %self.issuer, keys = set.len(), "issuer keys recovered");
                } else {
                    tracing::debug!(issuer = %self.issuer, keys = set.len(), "issuer keys loaded");
                }
                st.last_success = Some(SystemTime::now());
                // The provider's max-age may bring the next fetch forward (a rotation it
                // announces), never past the operator's refresh_secs, never into a loop.
                let every = max_age.map_or(self.refresh_every, |age| {
                    self.refresh_every.min(age.max(MIN_MAX_AGE))
                });
                st.next_periodic = Some(now + every);
                Ok(set)
            }
            Err(e) => {
                if self.snapshot().loaded {
                    tracing::warn!(issuer = %self.issuer, error = %e,
                        "refreshing issuer keys failed; keeping the last good keys");
                } else {
                    tracing::warn!(issuer = %self.issuer, error = %e,
                        "loading issuer keys failed; no keys were ever loaded, so this \
                         issuer's tokens are refused until a load succeeds");
                }
                st.last_error = Some(e.clone());
                if st.next_periodic.is_some() {
                    let retry = self.refresh_every.min(self.tuning.retry_after_failure);
                    st.next_periodic = Some(now + retry);
                }
                Err(e)
            }
        }
    }

    /// A fresh key set, and how long the provider says it may be cached.
    fn load(&self) -> Result<(KeySet, Option<Duration>), String> {
        match &self.source {
            KeySource::JwksFile(path) => {
                let bytes = read_capped(path).map_err(|e| format!("{}: {e}", path.display()))?;
                KeySet::from_jwks(&bytes, &self.algs)
                    .map(|set| (set, None))
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            KeySource::Discovery(agent) => {
                let fetched = fetch::discover_jwks(agent, &self.issuer, self.tuning.http_timeout)?;
                KeySet::from_jwks(&fetched.body, &self.algs)
                    .map(|set| (set, fetched.max_age))
                    .map_err(|e| format!("jwks_uri of {}: {e}", self.issuer))
            }
            KeySource::Secret => Err("an HS256 secret is read once, at start".into()),
            KeySource::Located(agent, locate) => {
                let fetched = locate(agent, self.tuning.http_timeout)?;
                KeySet::from_jwks(&fetched.body, &self.algs)
                    .map(|set| (set, fetched.max_age))
                    .map_err(|e| format!("keys of {}: {e}", self.issuer))
            }
        }
    }
}

fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(fetch::MAX_BODY_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > fetch::MAX_BODY_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} bytes", fetch::MAX_BODY_BYTES),
        ));
    }
    Ok(bytes)
}

fn read_secret(at: &str, path: &Path) -> Result<Vec<u8>, AuthConfigError> {
    let field = format!("{at}.hs256_secret_file");
    let mut secret = read_capped(path).map_err(|source| AuthConfigError::Unreadable {
        field: field.clone(),
        path: path.to_owned(),
        source,
    })?;
    // Files written by editors and `echo` end in a newline that is not part of the secret.
    while secret.last().is_some_and(u8::is_ascii_whitespace) {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthConfigError::BadKeys {
            field,
            path: path.to_owned(),
            reason: format!(
                "the secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES}",
                secret.len()
            ),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the HS256 secret file is readable by group or others");
        }
    }
    Ok(secret)
}
