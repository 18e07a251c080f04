//! A transmitter's signing keys: from a JWKS file, an explicit `jwks_uri`, or the
//! `jwks_uri` of its `/.well-known/ssf-configuration`, kept by the same cached, refreshed
//! key store the agent uses for token issuers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{SignalError, TransmitterConfig};
use crate::auth::{Alg, Fetched, IssuerConfig, IssuerKeys, Tuning, check_url, fetch_get};

/// The part of an SSF transmitter configuration metadata document (SSF 1.0 §7.1) the agent
/// uses; the rest is ignored on purpose.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SsfConfiguration {
    pub issuer: Option<String>,
    pub jwks_uri: Option<String>,
    pub configuration_endpoint: Option<String>,
    pub status_endpoint: Option<String>,
    pub verification_endpoint: Option<String>,
    #[serde(default)]
    pub delivery_methods_supported: Vec<String>,
}

/// `/.well-known/ssf-configuration` inserted between the host and the path of the issuer
/// (SSF 1.0 §7.2), e.g. `https://tx.example/t1` → `https://tx.example/.well-known/ssf-configuration/t1`.
pub fn configuration_url(issuer: &str) -> String {
    let trimmed = issuer.trim_end_matches('/');
    let (scheme, rest) = trimmed.split_once("://").unwrap_or(("https", trimmed));
    match rest.split_once('/') {
        Some((host, path)) => format!("{scheme}://{host}/.well-known/ssf-configuration/{path}"),
        None => format!("{scheme}://{rest}/.well-known/ssf-configuration"),
    }
}

/// Fetches and checks the transmitter's configuration metadata: it must speak for the
/// configured issuer (mix-up defence, as for OIDC discovery).
///
/// # Errors
/// The fetch fails, the document is not JSON, or it names another issuer.
pub fn fetch_configuration(
    agent: &ureq::Agent,
    issuer: &str,
    budget: Duration,
) -> Result<SsfConfiguration, String> {
    let url = configuration_url(issuer);
    check_url(&url)?;
    let fetched = fetch_get(agent, &url, Instant::now() + budget, budget)?;
    let doc: SsfConfiguration = serde_json::from_slice(&fetched.body)
        .map_err(|e| format!("{url}: not an SSF configuration document: {e}"))?;
    match &doc.issuer {
        Some(claimed) if claimed.trim_end_matches('/') == issuer.trim_end_matches('/') => Ok(doc),
        Some(claimed) => Err(format!(
            "{url}: the document is for issuer {claimed:?}, not {issuer:?}"
        )),
        None => Err(format!("{url}: the document names no issuer")),
    }
}

/// The key store of transmitter `cfg` (`at` names it in errors). A JWKS file is read now, so
/// a broken one stops the agent at start; URLs are fetched on first use.
///
/// # Errors
/// A key file that cannot be read or holds no usable key; a `ca_file` that cannot be used.
pub(crate) fn transmitter_keys(
    at: &str,
    cfg: &TransmitterConfig,
    algs: Vec<Alg>,
) -> Result<IssuerKeys, SignalError> {
    let tuning = Tuning::default();
    if let Some(path) = &cfg.jwks_file {
        // A file is read exactly as an issuer's `jwks_file` is.
        let as_issuer = IssuerConfig {
            issuer: cfg.issuer.clone(),
            audiences: vec![cfg.audience.clone()],
            algorithms: cfg.algorithms.clone(),
            jwks_file: Some(path.clone()),
            discovery: None,
            hs256_secret_file: None,
            ca_file: None,
            token_types: Vec::new(),
            refresh_secs: cfg.refresh_secs,
            claims: Default::default(),
        };
        return IssuerKeys::new(at, &as_issuer, algs, tuning).map_err(|e| SignalError::BadKeys {
            field: format!("{at}.jwks_file"),
            path: path.clone(),
            reason: e.to_string(),
        });
    }
    let issuer = cfg.issuer.clone();
    let explicit = cfg.jwks_uri.clone();
    let locate: Arc<crate::auth::JwksLocator> = Arc::new(move |agent, budget| {
        let deadline = Instant::now() + budget;
        let uri = match &explicit {
            Some(uri) => uri.clone(),
            None => fetch_configuration(agent, &issuer, budget)?
                .jwks_uri
                .ok_or_else(|| format!("the ssf-configuration of {issuer} has no jwks_uri"))?,
        };
        check_url(&uri).map_err(|why| format!("jwks_uri {why}"))?;
        let fetched: Fetched = fetch_get(agent, &uri, deadline, budget)?;
        Ok(fetched)
    });
    IssuerKeys::located(
        &cfg.issuer,
        cfg.ca_file.as_deref(),
        algs,
        Duration::from_secs(cfg.refresh_secs),
        tuning,
        locate,
    )
    .map_err(|e| SignalError::BadKeys {
        field: format!("{at}.ca_file"),
        path: cfg.ca_file.clone().unwrap_or_default(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_well_known_path_goes_between_host_and_path() {
        assert_eq!(
            configuration_url("https://tx.example"),
            "https://tx.example/.well-known/ssf-configuration"
        );
        assert_eq!(
            configuration_url("https://tx.example/tenant/1/"),
            "https://tx.example/.well-known/ssf-configuration/tenant/1"
        );
    }
}
