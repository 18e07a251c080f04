//! The verifier: a bearer token in, an [`Identity`] or a [`Rejection`] with a stable code out.

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    alg::Alg,
    claims::{self, ClaimRules},
    config::{AuthConfig, AuthConfigError, ClaimMapping},
    json,
    jwks::KeyOutcome,
    source::{IssuerKeyStatus, IssuerKeys, OnDemand, Tuning},
};
use crate::identity::Identity;

/// Larger tokens are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// An attacker-chosen `alg` is echoed in rejections only this far.
const MAX_ALG_ECHO: usize = 32;

/// Why a token was refused. Messages carry no part of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("malformed token: {detail}")]
    Malformed { detail: String },
    #[error("algorithm {alg:?} is not allowed for this issuer")]
    AlgorithmNotAllowed { alg: String },
    #[error("the token's issuer is not configured")]
    UnknownIssuer,
    #[error("no key of the issuer matches the token's kid and algorithm")]
    UnknownKey,
    #[error("the issuer's keys are unavailable: {detail}")]
    KeysUnavailable { detail: String },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is not meant for this agent (aud)")]
    WrongAudience,
    #[error("the token lacks the {claim:?} claim")]
    MissingClaim { claim: String },
    #[error("the token's type (typ {typ:?}) is not one this issuer accepts")]
    WrongTokenType { typ: String },
}

impl Rejection {
    /// Stable snake_case code, for audit records, metrics and clients.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::TooLarge => "too_large",
            Rejection::Malformed { .. } => "malformed",
            Rejection::AlgorithmNotAllowed { .. } => "algorithm_not_allowed",
            Rejection::UnknownIssuer => "unknown_issuer",
            Rejection::UnknownKey => "unknown_key",
            Rejection::KeysUnavailable { .. } => "keys_unavailable",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongAudience => "wrong_audience",
            Rejection::MissingClaim { .. } => "missing_claim",
            Rejection::WrongTokenType { .. } => "wrong_token_type",
        }
    }

    /// What an unauthenticated client is told: the code's meaning, never the provider's
    /// internal URLs or TLS errors (those go to the log, the audit record and `status`).
    pub fn client_message(&self) -> String {
        match self {
            Rejection::KeysUnavailable { .. } => {
                "the identity provider's keys cannot be loaded right now; try again later, or \
                 ask the operator (the agent's status shows why)"
                    .into()
            }
            other => other.to_string(),
        }
    }
}

/// Verifies bearer tokens against the configured issuers. `Send + Sync`; share it in an `Arc`.
/// A background thread refreshes keys periodically; it ends when the verifier is dropped.
pub struct Verifier {
    shared: Arc<Shared>,
    refresher: Option<thread::Thread>,
}

struct Shared {
    leeway_secs: u64,
    issuers: Vec<Issuer>,
    stop: AtomicBool,
}

struct Issuer {
    name: String,
    audiences: Vec<String>,
    algs: Vec<Alg>,
    mapping: ClaimMapping,
    /// Accepted `typ` values, lowercase, without `application/`; `""` is "no typ".
    token_types: Vec<String>,
    keys: IssuerKeys,
}

/// A media type as RFC 7515 4.1.9 compares it: case-insensitive, `application/` implied.
fn media_type(typ: &str) -> String {
    let lower = typ.trim().to_ascii_lowercase();
    match lower.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => lower,
    }
}

/// The JOSE header. Other members (`typ`, `x5t`, ...) are ignored, not refused: providers set
/// them freely. `jku`, `x5u` and `jwk` are ignored on purpose: keys never come from the token.
#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

impl Verifier {
    /// Validates `cfg`, and loads JWKS files and HS256 secrets now; discovery keys are fetched
    /// on first use.
    ///
    /// # Errors
    /// An invalid config, or a key file that cannot be read or holds no usable key.
    pub fn new(cfg: &AuthConfig) -> Result<Self, AuthConfigError> {
        Self::with_tuning(cfg, Tuning::default())
    }

    pub(crate) fn with_tuning(cfg: &AuthConfig, tuning: Tuning) -> Result<Self, AuthConfigError> {
        cfg.validate()?;
        let mut issuers = Vec::with_capacity(cfg.issuers.len());
        for (i, ic) in cfg.issuers.iter().enumerate() {
            let at = format!("auth.issuer[{i}]");
            let algs = ic.parse_algorithms(&at)?;
            issuers.push(Issuer {
                name: ic.issuer.clone(),
                audiences: ic.audiences.clone(),
                keys: IssuerKeys::new(&at, ic, algs.clone(), tuning)?,
                algs,
                mapping: ic.claims.clone(),
                token_types: ic.token_types.iter().map(|t| media_type(t)).collect(),
            });
        }
        let shared = Arc::new(Shared {
            leeway_secs: cfg.leeway_secs,
            issuers,
            stop: AtomicBool::new(false),
        });
        let refresher = if shared.issuers.iter().any(|i| i.keys.refreshable()) {
            let tick = tuning.refresh_every.map_or(Duration::from_secs(1), |r| {
                (r / 4).min(Duration::from_secs(1))
            });
            let worker = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name("auth-key-refresh".into())
                .spawn(move || worker.refresh_loop(tick))
                .map_err(AuthConfigError::RefreshThread)?;
            Some(handle.thread().clone())
        } else {
            None
        };
        Ok(Self { shared, refresher })
    }

    /// Verifies a bearer token at Unix time `now_secs`. May block briefly on a key fetch (an
    /// unknown `kid`, or discovery keys not loaded yet): call it from a blocking context.
    ///
    /// # Errors
    /// The [`Rejection`] that refused the token; nothing is accepted on any failure.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Identity, Rejection> {
        match self.attempt(token, now_secs, Fetch::Allowed) {
            Ok(identity) => Ok(identity),
            Err(Stop::Rejected(rejection)) => Err(rejection),
            // Only returned when fetching is not allowed.
            Err(Stop::WouldFetch) => Err(Rejection::UnknownKey),
        }
    }

    /// [`Verifier::verify`] without ever blocking: `None` when the answer needs a key fetch
    /// (then call `verify` from a blocking context). Admissions verify here first, on the
    /// async worker: handing every token to a blocking thread cost two context switches per
    /// admission for the rare one that needs the network.
    pub fn verify_cached(&self, token: &str, now_secs: u64) -> Option<Result<Identity, Rejection>> {
        match self.attempt(token, now_secs, Fetch::NotNow) {
            Ok(identity) => Some(Ok(identity)),
            Err(Stop::Rejected(rejection)) => Some(Err(rejection)),
            Err(Stop::WouldFetch) => None,
        }
    }

    fn attempt(&self, token: &str, now_secs: u64, fetch: Fetch) -> Result<Identity, Stop> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::TooLarge.into());
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("expected three base64url parts separated by dots").into());
        };
        let header_json = b64(h64).ok_or_else(|| malformed("the header is not base64url"))?;
        // From text, not bytes: serde_json skips the members it does not need without checking
        // their UTF-8, and RFC 7515 (5.2) wants the whole header to be UTF-8 JSON.
        let header_text =
            std::str::from_utf8(&header_json).map_err(|_| malformed("the header is not UTF-8"))?;
        let header: Header = serde_json::from_str(header_text)
            .map_err(|_| malformed("the header is not a JSON object with a string alg"))?;
        if header.crit.is_some() {
            return Err(malformed("critical header extensions (crit) are not supported").into());
        }
        if header.alg.trim().eq_ignore_ascii_case("none") {
            return Err(not_allowed(&header.alg).into());
        }

        // Unverified: read only to choose the issuer's config; trusted after the signature.
        let payload_json = b64(p64).ok_or_else(|| malformed("the payload is not base64url"))?;
        let claims: Map<String, Value> =
            json::object(&payload_json).map_err(|why| Rejection::Malformed {
                detail: format!("the payload is not a JSON object with unique members: {why}"),
            })?;
        let iss = match claims.get("iss") {
            Some(Value::String(iss)) => iss,
            None => {
                return Err(Rejection::MissingClaim {
                    claim: "iss".into(),
                }
                .into());
            }
            Some(_) => return Err(malformed("iss must be a string").into()),
        };
        let issuer = self
            .shared
            .issuers
            .iter()
            .find(|i| i.name == *iss)
            .ok_or(Rejection::UnknownIssuer)?;
        let alg = Alg::from_name(&header.alg)
            .filter(|a| issuer.algs.contains(a))
            .ok_or_else(|| not_allowed(&header.alg))?;

        let signature = b64(s64).ok_or_else(|| malformed("the signature is not base64url"))?;
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        issuer.check_signature(header.kid.as_deref(), alg, signed, &signature, fetch)?;
        let typ = header.typ.as_deref().map_or_else(String::new, media_type);
        if !issuer.token_types.contains(&typ) {
            return Err(Rejection::WrongTokenType {
                typ: header
                    .typ
                    .unwrap_or_default()
                    .chars()
                    .take(MAX_ALG_ECHO)
                    .collect(),
            }
            .into());
        }

        let iss = iss.clone();
        let rules = ClaimRules {
            audiences: &issuer.audiences,
            mapping: &issuer.mapping,
            leeway_secs: self.shared.leeway_secs,
        };
        Ok(claims::identity(iss, claims, signed, now_secs, &rules)?)
    }

    /// Each issuer's key state, for status displays.
    pub fn key_status(&self) -> Vec<IssuerKeyStatus> {
        self.shared.key_status()
    }

    /// Makes this verifier the one [`key_status`] reports on: the agent's, for `status`.
    pub fn report_status(&self) {
        *AGENT_VERIFIER
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&self.shared);
    }
}

/// The verifier `status` reports on; weak, so that it never keeps one alive.
static AGENT_VERIFIER: Mutex<Weak<Shared>> = Mutex::new(Weak::new());

/// The key state of each issuer of the agent's verifier (empty before one reports): keys and
/// kids, last fetch, last error, next refresh.
pub fn key_status() -> Vec<IssuerKeyStatus> {
    let shared = AGENT_VERIFIER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .upgrade();
    shared.map_or_else(Vec::new, |s| s.key_status())
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = &self.refresher {
            t.unpark();
        }
    }
}

impl Shared {
    fn key_status(&self) -> Vec<IssuerKeyStatus> {
        self.issuers.iter().map(|i| i.keys.status()).collect()
    }

    fn refresh_loop(&self, tick: Duration) {
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            for issuer in &self.issuers {
                issuer.keys.refresh_if_due(now);
            }
            thread::park_timeout(tick);
        }
    }
}

impl Issuer {
    fn check_signature(
        &self,
        kid: Option<&str>,
        alg: Alg,
        signed: &[u8],
        signature: &[u8],
        fetch: Fetch,
    ) -> Result<(), Stop> {
        let keys = self.keys.snapshot();
        let outcome = match keys.verify(kid, alg, signed, signature) {
            // The provider may have replaced the key under the same kid (some do on restart):
            // reload once, rate-limited like an unknown kid, and retry with the new set.
            KeyOutcome::BadSignature if !self.keys.may_refresh_now(&keys) => {
                KeyOutcome::BadSignature
            }
            KeyOutcome::BadSignature if fetch == Fetch::NotNow => return Err(Stop::WouldFetch),
            KeyOutcome::BadSignature => match self.keys.refresh_on_demand(&keys) {
                OnDemand::Fresh(newer) => newer.verify(kid, alg, signed, signature),
                // Keys unavailable now: the signature failed with the keys there are.
                OnDemand::NotNow { .. } | OnDemand::Failed(_) => KeyOutcome::BadSignature,
            },
            KeyOutcome::NoKey if fetch == Fetch::NotNow => return Err(Stop::WouldFetch),
            KeyOutcome::NoKey => match self.keys.refresh_on_demand(&keys) {
                OnDemand::Fresh(newer) => newer.verify(kid, alg, signed, signature),
                OnDemand::NotNow { .. } if keys.loaded => KeyOutcome::NoKey,
                OnDemand::NotNow { last_error } => {
                    return Err(Stop::Rejected(Rejection::KeysUnavailable {
                        detail: last_error.unwrap_or_else(|| "keys are not loaded yet".into()),
                    }));
                }
                OnDemand::Failed(detail) => {
                    return Err(Stop::Rejected(Rejection::KeysUnavailable { detail }));
                }
            },
            known => known,
        };
        match outcome {
            KeyOutcome::Verified => Ok(()),
            KeyOutcome::BadSignature => Err(Stop::Rejected(Rejection::BadSignature)),
            KeyOutcome::NoKey => Err(Stop::Rejected(Rejection::UnknownKey)),
        }
    }
}

/// Whether a verification may fetch keys (and so block).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetch {
    Allowed,
    NotNow,
}

/// Why a verification attempt stopped short of an identity.
enum Stop {
    Rejected(Rejection),
    /// The keys it needs are not cached, and fetching was not allowed.
    WouldFetch,
}

impl From<Rejection> for Stop {
    fn from(rejection: Rejection) -> Self {
        Stop::Rejected(rejection)
    }
}

fn b64(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part).ok()
}

fn malformed(detail: &str) -> Rejection {
    Rejection::Malformed {
        detail: detail.into(),
    }
}

fn not_allowed(alg: &str) -> Rejection {
    Rejection::AlgorithmNotAllowed {
        alg: alg.chars().take(MAX_ALG_ECHO).collect(),
    }
}
