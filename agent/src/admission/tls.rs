//! The admission endpoint's certificate: from the config, or a self-signed pair generated at
//! first start and kept in the state directory. Clients pin its SHA-256 fingerprint.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("certificate {cert} and key {key} do not make a usable TLS config: {detail}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// The server's TLS config and the fingerprint clients pin.
pub struct AdmissionTls {
    pub config: Arc<ServerConfig>,
    /// Lowercase hex SHA-256 of the leaf certificate (DER).
    pub fingerprint: String,
    pub cert_path: PathBuf,
    /// True when this start generated the certificate.
    pub generated: bool,
}

/// Self-signed pair locations inside the state directory.
pub fn generated_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("admission-cert.pem"),
        state_dir.join("admission-key.pem"),
    )
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Loads the configured pair, or the generated one (creating it on first start).
///
/// # Errors
/// Files cannot be read or written, or do not hold a certificate and a matching key.
pub fn load_or_generate(
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    state_dir: &Path,
) -> Result<AdmissionTls, TlsError> {
    let (cert_path, key_path, generated) = match (cert_file, key_file) {
        (Some(c), Some(k)) => (c.to_owned(), k.to_owned(), false),
        _ => {
            let (c, k) = generated_paths(state_dir);
            let generated = !(c.exists() && k.exists());
            if generated {
                generate(&c, &k)?;
            }
            (c, k, generated)
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Read {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::Read {
            path: cert_path,
            detail: "no PEM certificate in it".into(),
        });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TlsError::Config {
            cert: cert_path.clone(),
            key: key_path.clone(),
            detail: e.to_string(),
        })?;
    Ok(AdmissionTls {
        config: Arc::new(config),
        fingerprint,
        cert_path,
        generated,
    })
}

fn generate(cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.insert(0, host.to_owned());
        }
    }
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    // The key first, private from the moment it exists.
    write_file(
        key_path,
        certified.key_pair.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reuses() {
        let dir = std::env::temp_dir().join(format!("fw-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = load_or_generate(None, None, &dir).unwrap();
        assert!(first.generated);
        assert_eq!(first.fingerprint.len(), 64);
        let (_, key) = generated_paths(&dir);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o777,
            0o600,
            "the private key must not be readable by others"
        );
        let second = load_or_generate(None, None, &dir).unwrap();
        assert!(!second.generated);
        assert_eq!(first.fingerprint, second.fingerprint);
        let err = load_or_generate(Some(&dir.join("nope.pem")), Some(&key), &dir)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nope.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
