//! Reconnect tokens: a client proves it holds its session's seed (not the IdP token) with a
//! short-lived, single-use HMAC token `fwr1.<session>.<counter>.<unix secs>.<mac>`.
//!
//! The MAC is HMAC-SHA256 keyed with the seed's 32 bytes over the text before the last dot,
//! base64url without padding. The agent keeps the highest counter it accepted; a token must
//! carry a larger one, and its time must be within [`MAX_SKEW_SECS`] of the agent's clock.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::sessions::model::SessionId;

/// Longer tokens are refused unparsed.
pub const MAX_TOKEN_BYTES: usize = 512;
/// How far a token's timestamp may be from now, either way.
pub const MAX_SKEW_SECS: u64 = 60;
const PREFIX: &str = "fwr1";
const SEED_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a reconnect token was refused (or could not be minted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconnectError {
    #[error("malformed reconnect token: {detail}")]
    Malformed { detail: &'static str },
    #[error("the reconnect token's MAC does not verify for session {session}")]
    BadMac { session: SessionId },
    #[error("reconnect counter {counter} is not above {last} for session {session}: a replay")]
    Replayed {
        session: SessionId,
        counter: u64,
        last: u64,
    },
    #[error(
        "reconnect token time {token_secs} is more than {MAX_SKEW_SECS}s from now ({now_secs})"
    )]
    Stale { token_secs: u64, now_secs: u64 },
    #[error("the session's reconnect seed is not {SEED_BYTES} bytes of hex")]
    BadSeed,
}

impl ReconnectError {
    /// Stable snake_case code for audit records and clients.
    pub fn code(&self) -> &'static str {
        match self {
            ReconnectError::Malformed { .. } => "malformed",
            ReconnectError::BadMac { .. } => "bad_mac",
            ReconnectError::Replayed { .. } => "replayed",
            ReconnectError::Stale { .. } => "stale",
            ReconnectError::BadSeed => "bad_seed",
        }
    }
}

/// A fresh seed for a session: 32 bytes from the OS CSPRNG, lowercase hex.
pub fn new_seed() -> String {
    let mut seed = [0u8; SEED_BYTES];
    // Without a working OS random source no secret can be made at all; there is no fallback.
    getrandom::fill(&mut seed).expect("the OS random source works");
    hex::encode(seed)
}

/// Mints the token a client presents to reconnect `session` (`counter` above the last one used).
///
/// # Errors
/// [`ReconnectError::BadSeed`] if `seed_hex` is not 32 bytes of hex.
pub fn mint(
    seed_hex: &str,
    session: SessionId,
    counter: u64,
    now_secs: u64,
) -> Result<String, ReconnectError> {
    let mut mac = keyed(seed_hex)?;
    let body = format!("{PREFIX}.{session}.{counter}.{now_secs}");
    mac.update(body.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{body}.{tag}"))
}

/// The session a token claims, without checking it: lets the agent find that session's seed.
///
/// # Errors
/// [`ReconnectError::Malformed`] if the token does not parse.
pub fn session_of(token: &str) -> Result<SessionId, ReconnectError> {
    parse(token).map(|p| p.session)
}

/// Checks a token against its session's seed and the last counter accepted; returns the
/// token's counter, which the caller stores as the new last counter.
///
/// # Errors
/// `malformed`, `bad_mac`, `stale` or `replayed` (in that order of checking), or `bad_seed`.
pub fn check(
    token: &str,
    seed_hex: &str,
    last_counter: u64,
    now_secs: u64,
) -> Result<u64, ReconnectError> {
    let parsed = parse(token)?;
    let mut mac = keyed(seed_hex)?;
    mac.update(parsed.body.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&parsed.tag)
        .map_err(|_| ReconnectError::BadMac {
            session: parsed.session,
        })?;
    if parsed.secs.abs_diff(now_secs) > MAX_SKEW_SECS {
        return Err(ReconnectError::Stale {
            token_secs: parsed.secs,
            now_secs,
        });
    }
    if parsed.counter <= last_counter {
        return Err(ReconnectError::Replayed {
            session: parsed.session,
            counter: parsed.counter,
            last: last_counter,
        });
    }
    Ok(parsed.counter)
}

struct Parsed<'a> {
    body: &'a str,
    session: SessionId,
    counter: u64,
    secs: u64,
    tag: Vec<u8>,
}

fn parse(token: &str) -> Result<Parsed<'_>, ReconnectError> {
    let bad = |detail| ReconnectError::Malformed { detail };
    if token.len() > MAX_TOKEN_BYTES {
        return Err(bad("longer than 512 bytes"));
    }
    let (body, tag) = token.rsplit_once('.').ok_or(bad("no MAC"))?;
    let mut fields = body.split('.');
    let (Some(prefix), Some(session), Some(counter), Some(secs), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(bad("expected fwr1.<session>.<counter>.<secs>.<mac>"));
    };
    if prefix != PREFIX {
        return Err(bad("not a fwr1 token"));
    }
    // Canonical forms only, so one token has exactly one spelling.
    let canonical_hex = session.len() == 16
        && session
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !canonical_hex {
        return Err(bad("session must be 16 lowercase hex digits"));
    }
    let session = session
        .parse::<SessionId>()
        .map_err(|_| bad("session must be 16 lowercase hex digits"))?;
    let counter = decimal(counter).ok_or(bad("counter must be a decimal number"))?;
    let secs = decimal(secs).ok_or(bad("time must be a decimal number"))?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| bad("MAC is not base64url"))?;
    Ok(Parsed {
        body,
        session,
        counter,
        secs,
        tag,
    })
}

fn decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

fn keyed(seed_hex: &str) -> Result<HmacSha256, ReconnectError> {
    let mut seed = [0u8; SEED_BYTES];
    hex::decode_to_slice(seed_hex, &mut seed).map_err(|_| ReconnectError::BadSeed)?;
    HmacSha256::new_from_slice(&seed).map_err(|_| ReconnectError::BadSeed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;
    const SESSION: SessionId = SessionId(0x0123_4567_89ab_cdef);

    fn code(r: Result<u64, ReconnectError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn round_trip() {
        let seed = new_seed();
        assert_eq!(seed.len(), 64);
        assert!(
            seed.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(seed, new_seed());
        let token = mint(&seed, SESSION, 7, NOW).expect("mint");
        assert!(
            token.starts_with("fwr1.0123456789abcdef.7.1700000000."),
            "{token}"
        );
        assert_eq!(session_of(&token), Ok(SESSION));
        assert_eq!(check(&token, &seed, 6, NOW + 60), Ok(7));
        assert_eq!(check(&token, &seed, 0, NOW - 60), Ok(7));
    }

    #[test]
    fn refusals_have_exact_codes() {
        let seed = new_seed();
        let other = new_seed();
        let token = mint(&seed, SESSION, 5, NOW).expect("mint");
        assert_eq!(code(check(&token, &other, 0, NOW)), "bad_mac");
        assert_eq!(code(check(&token, &seed, 5, NOW)), "replayed");
        assert_eq!(code(check(&token, &seed, 9, NOW)), "replayed");
        assert_eq!(code(check(&token, &seed, 0, NOW + 61)), "stale");
        assert_eq!(code(check(&token, &seed, 0, NOW - 61)), "stale");
        assert_eq!(code(check(&token, "zz", 0, NOW)), "bad_seed");
        assert_eq!(
            mint("abc", SESSION, 1, NOW).map_err(|e| e.code()),
            Err("bad_seed")
        );

        // Changing any field breaks the MAC.
        let forged = token.replacen(".5.", ".6.", 1);
        assert_eq!(code(check(&forged, &seed, 0, NOW)), "bad_mac");
        let moved = token.replacen("0123456789abcdef", "0123456789abcdee", 1);
        assert_eq!(code(check(&moved, &seed, 0, NOW)), "bad_mac");
        assert_eq!(code(check(&format!("{token}A"), &seed, 0, NOW)), "bad_mac");
    }

    #[test]
    fn malformed_and_junk_never_panic() {
        let seed = new_seed();
        let good = mint(&seed, SESSION, 1, NOW).expect("mint");
        let long = format!("{good}{}", "A".repeat(600));
        let noncanonical = [
            good.replacen(".1.", ".01.", 1),
            good.replacen(".1.", ".+1.", 1),
            good.replacen("0123456789abcdef", "0123456789ABCDEF", 1),
            good.replacen("0123456789abcdef", "0x23456789abcdef", 1),
            good.replacen("fwr1", "fwr2", 1),
        ];
        let junk = [
            "",
            ".",
            "....",
            "fwr1",
            "fwr1.....",
            "fwr1.x.1.1.AAAA",
            "fwr1.0123456789abcdef.1.1",
            "fwr1.0123456789abcdef.1.1.!!",
            "fwr1.0123456789abcdef.99999999999999999999999.1.AAAA",
            "fwr1.0123456789abcdef.-1.1.AAAA",
            "fwr1.0123456789abcdef.1.1.1.AAAA",
            "\u{0}\u{ff}é.é.é.é.é",
        ];
        for t in noncanonical
            .iter()
            .map(String::as_str)
            .chain(junk)
            .chain([long.as_str()])
        {
            assert_eq!(code(check(t, &seed, 0, NOW)), "malformed", "{t:?}");
            assert!(session_of(t).is_err(), "{t:?}");
        }
        // Arbitrary byte soup: any outcome but a panic or an acceptance.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 0..400 {
            let s: String = (0..len % 90)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    b"fwr1.0123456789abcdef-_AZaz09"[(state % 29) as usize] as char
                })
                .collect();
            assert_ne!(code(check(&s, &seed, 0, NOW)), "ok", "{s:?}");
        }
    }
}
