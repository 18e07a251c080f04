//! OIDC discovery over HTTP: the discovery document, then the JWKS it points to, within one
//! time budget, with a body size cap and https-only URLs (plain http only on loopback, for
//! tests).

use std::{
    io::Read,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;

/// A JWKS or discovery document larger than this is garbage, not keys.
pub(crate) const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// `<issuer without trailing slash>/.well-known/openid-configuration` (OIDC Discovery 4).
pub(crate) fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Keys fetched over plain http could be swapped by anyone on the path, so only https is
/// accepted, except on loopback where there is no path to attack.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{url:?} is not an https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = !authority.contains('@')
        && (host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()));
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{url:?} is not an https:// URL (plain http:// only for a loopback address)"
        ))
    }
}

/// An HTTP client for key fetches, trusting what `tls` trusts (see [`super::trust`]).
pub(crate) fn agent(timeout: Duration, tls: Arc<rustls::ClientConfig>) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls)
        // One budget for connect, TLS, headers and body: a slow server fails like a dead one.
        .timeout(timeout)
        // Keys come from the URLs configured or discovered, never from wherever a redirect points.
        .redirects(0)
        .user_agent(concat!("flowwarden/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The part of the discovery document that matters here; the rest is ignored on purpose, as
/// providers publish dozens of other fields.
#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: Option<String>,
    jwks_uri: String,
}

/// A JWKS document as fetched, with how long the provider says it may be cached.
pub(crate) struct Fetched {
    pub(crate) body: Vec<u8>,
    /// `Cache-Control: max-age` of the JWKS response (`no-store` / `no-cache` count as 0).
    pub(crate) max_age: Option<Duration>,
}

/// Fetches the issuer's current JWKS document by OIDC discovery. Both requests share one
/// `budget`: a token that waits for this fetch waits at most that long, however the provider
/// spreads its slowness over the two answers.
pub(crate) fn discover_jwks(
    agent: &ureq::Agent,
    issuer: &str,
    budget: Duration,
) -> Result<Fetched, String> {
    let deadline = Instant::now() + budget;
    let url = discovery_url(issuer);
    let body = get(agent, &url, deadline, budget)?.body;
    let doc: DiscoveryDocument = serde_json::from_slice(&body)
        .map_err(|e| format!("{url}: not an OpenID discovery document: {e}"))?;
    // Mix-up defence (OIDC Discovery 4.3): the document must speak for the configured issuer.
    if let Some(claimed) = &doc.issuer
        && claimed.trim_end_matches('/') != issuer.trim_end_matches('/')
    {
        return Err(format!(
            "{url}: the document is for issuer {claimed:?}, not {issuer:?}"
        ));
    }
    check_url(&doc.jwks_uri).map_err(|why| format!("{url}: jwks_uri {why}"))?;
    get(agent, &doc.jwks_uri, deadline, budget)
}

/// `max-age` of a `Cache-Control` header; `no-store` and `no-cache` mean "do not keep".
pub(crate) fn max_age(cache_control: &str) -> Option<Duration> {
    let mut age = None;
    for directive in cache_control.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age
}

/// One GET of a JSON document or JWKS within the time left until `deadline` (shared by the
/// requests of one fetch), https only unless loopback, redirects refused, body capped.
pub(crate) fn get(
    agent: &ureq::Agent,
    url: &str,
    deadline: Instant,
    budget: Duration,
) -> Result<Fetched, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!(
            "{url}: not requested: the {budget:?} budget of the key fetch is spent"
        ));
    }
    // ureq's timeout covers connect, headers and the whole body, read through its reader.
    let response = agent.get(url).timeout(left).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => format!("{url}: HTTP status {code}"),
        ureq::Error::Transport(t) => {
            let kind = t.kind().to_string();
            // The I/O source says most ("timed out reading response"); the message often
            // only repeats the kind.
            let detail = std::error::Error::source(&t)
                .map(|s| s.to_string())
                .or_else(|| t.message().filter(|m| *m != kind).map(str::to_owned));
            let hint = if detail
                .as_deref()
                .is_some_and(|d| d.contains("UnknownIssuer"))
            {
                " (the provider's certificate is not from a CA this issuer trusts: set its \
                 ca_file to the CA bundle that issued it)"
            } else {
                ""
            };
            match detail {
                Some(detail) => format!("{url}: {kind}: {detail}{hint}"),
                None => format!("{url}: {kind}{hint}"),
            }
        }
    })?;
    // With redirects off, ureq hands a 3xx back as a response; its body is not the document.
    if !(200..300).contains(&response.status()) {
        return Err(format!(
            "{url}: HTTP status {} (redirects are not followed)",
            response.status()
        ));
    }
    let max_age = response.header("cache-control").and_then(max_age);
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("{url}: reading the body: {e}"))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(format!("{url}: body is larger than {MAX_BODY_BYTES} bytes"));
    }
    Ok(Fetched { body, max_age })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(max_age("Max-Age=\"30\""), Some(Duration::from_secs(30)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("max-age=60, no-cache"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }

    #[test]
    fn discovery_url_and_scheme_checks() {
        assert_eq!(
            discovery_url("https://idp.example/realm/"),
            "https://idp.example/realm/.well-known/openid-configuration"
        );
        for ok in [
            "https://idp.example/x",
            "http://127.0.0.1:8080/x",
            "http://localhost/x",
            "http://[::1]:9/x",
            "http://127.9.9.9",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example/x",
            "http://127.0.0.1.evil.example/",
            "http://127.0.0.1@evil.example/",
            "ftp://idp.example",
            "file:///etc/passwd",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
