//! Which certificate authorities an outbound TLS client trusts: the system store, or a PEM
//! bundle the operator names (a private CA), built into a rustls client config that any room
//! making HTTPS requests to an outside service can share (key fetches today).
//!
//! A `ca_file` *replaces* the system store for the client built with it: the provider behind a
//! private CA is then vouched for by that CA alone, and no public CA can impersonate it. To
//! trust both, put both in the bundle.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject};

/// Where distributions keep their CA bundle, tried in order after `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why a trust store cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the CA bundle {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("the CA bundle {} holds no PEM certificate", path.display())]
    Empty { path: PathBuf },
    #[error("certificate {index} of the CA bundle {} is not a usable CA: {reason}", path.display())]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A TLS client config that trusts `ca_file` alone when given, else the system store.
///
/// # Errors
/// `ca_file` cannot be read, holds no certificate, or holds one that is not a usable CA.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TrustError> {
    let roots = match ca_file {
        Some(path) => Arc::new(bundle(path)?),
        None => system_roots(),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate of a PEM bundle, each one checked to be usable as a trust anchor.
///
/// # Errors
/// As [`client_config`].
pub fn bundle(path: &Path) -> Result<RootCertStore, TrustError> {
    let unreadable = |reason: String| TrustError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(TrustError::Empty {
            path: path.to_owned(),
        });
    }
    let mut store = RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        store.add(cert).map_err(|e| TrustError::BadCertificate {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// The system store, read once: `SSL_CERT_FILE`, else the distribution's bundle, else (a
/// minimal container without one) the Mozilla roots compiled in.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let named = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let candidates = named
            .iter()
            .cloned()
            .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from));
        for path in candidates {
            if !path.is_file() {
                continue;
            }
            // A bundle with a few odd entries still vouches with the rest, as OpenSSL does.
            let mut store = RootCertStore::empty();
            if let Ok(iter) = CertificateDer::pem_file_iter(&path) {
                let (added, skipped) = store.add_parsable_certificates(iter.flatten());
                if added > 0 {
                    tracing::debug!(bundle = %path.display(), added, skipped, "system CA store");
                    return Arc::new(store);
                }
            }
            tracing::warn!(bundle = %path.display(), "no usable certificate in the CA bundle");
        }
        tracing::info!("no system CA bundle found: trusting the built-in Mozilla roots");
        Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_are_checked() {
        let dir = std::env::temp_dir().join(format!("fw-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(matches!(bundle(&empty), Err(TrustError::Empty { .. })));
        assert!(matches!(
            bundle(&dir.join("missing.pem")),
            Err(TrustError::Unreadable { .. })
        ));
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(bundle(&good).unwrap().len(), 1);
        assert!(client_config(Some(&good)).is_ok());
        assert!(!system_roots().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
