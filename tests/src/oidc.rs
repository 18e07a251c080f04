//! A real OpenID provider for acceptance tests: panva's `oidc-provider` (installed by `cargo
//! xtask setup` under tests/oidc), run by node over HTTPS with a certificate from a private CA
//! made here, restartable with a new signing key under a new or the same kid.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// The client the provider knows, and its secret.
pub const CLIENT_ID: &str = "laptop-7";
const CLIENT_SECRET: &str = "acceptance-test-secret-not-for-production";

/// The directory holding provider.mjs and its node_modules.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, written as PEM files.
pub struct PrivateCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl PrivateCa {
    /// # Panics
    /// When a key or certificate cannot be made or written.
    pub fn generate(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "flowwarden acceptance CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "idp.acceptance.test");
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("server certificate");
        let out = Self {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("idp-cert.pem"),
            key_file: dir.join("idp-key.pem"),
        };
        std::fs::write(&out.ca_file, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&out.cert_file, server_cert.pem()).expect("write idp-cert.pem");
        std::fs::write(&out.key_file, server_key.serialize_pem()).expect("write idp-key.pem");
        out
    }
}

/// The running provider; killed on drop.
pub struct OidcProvider {
    pub issuer: String,
    port: u16,
    child: Option<Child>,
    /// The web console's redirect URI, when the provider also signs console users in.
    console_redirect: Option<String>,
}

impl OidcProvider {
    /// Starts the provider on a free port with a fresh key under `kid`.
    ///
    /// # Panics
    /// node or the installed `oidc-provider` is missing (run `cargo xtask setup`), or the
    /// provider does not come up within 30 s.
    pub fn start(ca: &PrivateCa, kid: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut provider = Self {
            issuer: format!("https://127.0.0.1:{port}"),
            port,
            child: None,
            console_redirect: None,
        };
        provider.restart(ca, kid);
        provider
    }

    /// Like [`OidcProvider::start`], also serving the web console's sign-in: the public
    /// client `flowwarden-console` redirecting to `redirect_uri`, and a login form where
    /// `admin@corp.example` (admins' group) or `reader@corp.example` (readers') sign in.
    ///
    /// # Panics
    /// As [`OidcProvider::start`].
    pub fn start_for_console(ca: &PrivateCa, kid: &str, redirect_uri: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut provider = Self {
            issuer: format!("https://127.0.0.1:{port}"),
            port,
            child: None,
            console_redirect: Some(redirect_uri.to_owned()),
        };
        provider.restart(ca, kid);
        provider
    }

    /// Stops the provider and starts it again on the same port with a new key under `kid`:
    /// a rotation with a new kid, or under the same one.
    ///
    /// # Panics
    /// As [`OidcProvider::start`].
    pub fn restart(&mut self, ca: &PrivateCa, kid: &str) {
        self.stop();
        let dir = oidc_dir();
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed in {}: run `cargo xtask setup`",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("provider.mjs"))
            .arg(self.port.to_string())
            .arg(&ca.cert_file)
            .arg(&ca.key_file)
            .arg(kid)
            .envs(
                self.console_redirect
                    .iter()
                    .map(|r| ("CONSOLE_REDIRECT_URI", r.as_str())),
            )
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting node (is node installed?)");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with("ready ") => return,
                Ok(_) => {}
                Err(e) => panic!("the OpenID provider did not start: {e}"),
            }
        }
    }

    /// A JWT access token from the provider's token endpoint (client credentials, for the
    /// agent's resource), fetched with curl trusting the private CA only.
    ///
    /// # Panics
    /// When the provider does not issue one.
    pub fn access_token(&self, ca: &PrivateCa) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca.ca_file)
            .args(["-u", &format!("{CLIENT_ID}:{CLIENT_SECRET}")])
            .args(["-d", "grant_type=client_credentials", "-d", "scope=ssh"])
            .args(["-d", "resource=urn:flowwarden:agent"])
            .arg(format!("{}/token", self.issuer))
            .output()
            .expect("running curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "token request failed: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("token response JSON");
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {body}"))
            .to_owned()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}
