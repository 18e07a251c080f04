//! `flowwarden dev ssf`: DEVELOPMENT TOOLS. A stand-in Shared Signals transmitter: signs SETs
//! for any event and subject with a development key, pushes them to an agent, or serves them
//! for polling (RFC 8936) with its `ssf-configuration` and JWKS. Never for production.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use super::output::outln;
use crate::{
    sessions::model::now_ms,
    signals::{
        SET_MEDIA_TYPE,
        dev::{self, DEV_TRANSMITTER, DevSet, SigningKey},
        poll::{PollRequest, PollResponse},
    },
};

#[derive(Debug, clap::Subcommand)]
pub enum SsfCommand {
    /// Make an RS256 transmitter key and its JWKS (`ssf-signing-key.pem`, `ssf-jwks.json`).
    Keygen {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a SET and print it (or add it to a `serve` queue with --queue).
    Set {
        #[command(flatten)]
        event: EventArgs,
        /// Write the SET into this queue directory instead of printing it.
        #[arg(long)]
        queue: Option<PathBuf>,
    },
    /// Sign a SET and push it to an agent (RFC 8935).
    Push {
        #[command(flatten)]
        event: EventArgs,
        /// The agent's admission endpoint, host:port.
        #[arg(long)]
        agent: String,
        /// The agent's certificate fingerprint (it logs it at start).
        #[arg(long)]
        fingerprint: String,
        /// A file holding the Authorization header value the agent expects.
        #[arg(long)]
        authorization_file: PathBuf,
    },
    /// Serve queued SETs for polling (RFC 8936) at http://LISTEN/poll, with
    /// /.well-known/ssf-configuration and /jwks.json; runs until killed.
    Serve {
        #[arg(long)]
        listen: String,
        /// The key directory (its JWKS is served).
        #[arg(long)]
        dir: PathBuf,
        /// Where `dev ssf set --queue` puts SETs; acknowledged ones are deleted.
        #[arg(long)]
        queue: PathBuf,
        #[arg(long, default_value = DEV_TRANSMITTER)]
        issuer: String,
    },
}

/// One event about one subject.
#[derive(Debug, clap::Args)]
pub struct EventArgs {
    /// The key directory (`dev ssf keygen`, or `dev keygen` for ES256).
    #[arg(long)]
    pub dir: PathBuf,
    /// session-revoked, credential-change, device-compliance-change, token-claims-change,
    /// assurance-level-change, account-disabled, account-purged, credential-compromise,
    /// verification, stream-updated, or a full event type URI.
    #[arg(long)]
    pub event: String,
    #[arg(long, default_value = DEV_TRANSMITTER)]
    pub issuer: String,
    #[arg(long, default_value = "flowwarden")]
    pub audience: String,
    /// Subject: an email.
    #[arg(long)]
    pub email: Option<String>,
    /// Subject: iss_sub, as ISS SUB.
    #[arg(long, num_args = 2, value_names = ["ISS", "SUB"])]
    pub iss_sub: Option<Vec<String>>,
    /// Subject: an opaque user id.
    #[arg(long)]
    pub opaque: Option<String>,
    /// Subject: jwt_id, as ISS JTI (a token's jti).
    #[arg(long, num_args = 2, value_names = ["ISS", "JTI"])]
    pub jwt_id: Option<Vec<String>>,
    /// Subject: a device id (complex subject's device member).
    #[arg(long)]
    pub device: Option<String>,
    /// Subject: a session id (complex subject's session member).
    #[arg(long)]
    pub session: Option<String>,
    /// Subject: a tenant id (complex subject's tenant member).
    #[arg(long)]
    pub tenant: Option<String>,
    /// device-compliance-change: compliant or not-compliant; stream-updated: enabled, paused
    /// or disabled.
    #[arg(long)]
    pub status: Option<String>,
    /// credential-change: create, revoke, update or delete.
    #[arg(long)]
    pub change_type: Option<String>,
    /// token-claims-change: NAME=JSON (repeat); a value that is not JSON is a string.
    #[arg(long = "claim")]
    pub claims: Vec<String>,
    /// assurance-level-change: the new level.
    #[arg(long)]
    pub level: Option<String>,
    /// verification: the state to echo.
    #[arg(long)]
    pub state: Option<String>,
    /// The SET's jti (random by default).
    #[arg(long)]
    pub jti: Option<String>,
}

impl EventArgs {
    fn user_subject(&self) -> Option<Value> {
        if let Some(e) = &self.email {
            return Some(json!({"format": "email", "email": e}));
        }
        if let Some(v) = &self.iss_sub {
            return Some(json!({"format": "iss_sub", "iss": v[0], "sub": v[1]}));
        }
        if let Some(id) = &self.opaque {
            return Some(json!({"format": "opaque", "id": id}));
        }
        self.jwt_id
            .as_ref()
            .map(|v| json!({"format": "jwt_id", "iss": v[0], "jti": v[1]}))
    }

    /// A simple subject when one member is given (a lone device for a device event), else a
    /// complex one.
    pub fn subject(&self) -> Option<Value> {
        let user = self.user_subject();
        let opaque = |id: &String| json!({"format": "opaque", "id": id});
        let device = self.device.as_ref().map(opaque);
        let session = self.session.as_ref().map(opaque);
        let tenant = self.tenant.as_ref().map(opaque);
        let members = [&user, &device, &session, &tenant]
            .iter()
            .filter(|m| m.is_some())
            .count();
        match members {
            0 => None,
            1 if user.is_some() => user,
            1 if device.is_some() && self.event.ends_with("device-compliance-change") => device,
            _ => {
                let mut c = Map::new();
                c.insert("format".into(), "complex".into());
                for (name, m) in [
                    ("user", user),
                    ("device", device),
                    ("session", session),
                    ("tenant", tenant),
                ] {
                    if let Some(m) = m {
                        c.insert(name.into(), m);
                    }
                }
                Some(Value::Object(c))
            }
        }
    }

    /// The SET these arguments describe.
    ///
    /// # Errors
    /// A claim that is not NAME=VALUE.
    pub fn set(&self) -> anyhow::Result<DevSet> {
        let mut set = DevSet::new(&self.event, self.subject());
        set.issuer = self.issuer.clone();
        set.audience = self.audience.clone();
        set.jti = self.jti.clone();
        let e = &mut set.event;
        if let Some(s) = &self.status {
            // SSF's stream-updated names it `status`; CAEP's device change `current_status`.
            let member = if self.event.ends_with("stream-updated") {
                "status"
            } else {
                "current_status"
            };
            e.insert(member.into(), s.clone().into());
        }
        if let Some(c) = &self.change_type {
            e.insert("change_type".into(), c.clone().into());
            e.insert("credential_type".into(), "password".into());
        }
        if let Some(l) = &self.level {
            e.insert("current_level".into(), l.clone().into());
            e.insert("namespace".into(), "RFC8176".into());
        }
        if let Some(s) = &self.state {
            e.insert("state".into(), s.clone().into());
        }
        if !self.claims.is_empty() {
            let mut claims = Map::new();
            for c in &self.claims {
                let Some((k, v)) = c.split_once('=') else {
                    bail!("--claim {c:?}: write NAME=VALUE");
                };
                let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
                claims.insert(k.into(), value);
            }
            e.insert("claims".into(), Value::Object(claims));
        }
        Ok(set)
    }

    fn signed(&self) -> anyhow::Result<String> {
        let key = SigningKey::from_dir(&self.dir)
            .with_context(|| format!("loading the transmitter key from {}", self.dir.display()))?;
        Ok(key.sign(&self.set()?, now_ms() / 1000)?)
    }
}

pub fn run(command: SsfCommand) -> anyhow::Result<()> {
    match command {
        SsfCommand::Keygen { dir } => {
            let (key, jwks, kid) = dev::keygen(&dir)?;
            outln!("development transmitter key (not for production):")?;
            outln!("  private key {}", key.display())?;
            outln!("  public JWKS {}  (kid {kid})", jwks.display())
        }
        SsfCommand::Set { event, queue } => {
            let set = event.signed()?;
            match queue {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    let path = dir.join(format!("{}.set", dev::random_jti()));
                    std::fs::write(&path, &set)
                        .with_context(|| format!("writing {}", path.display()))?;
                    outln!("{}", path.display())
                }
                None => outln!("{set}"),
            }
        }
        SsfCommand::Push {
            event,
            agent,
            fingerprint,
            authorization_file,
        } => {
            let set = event.signed()?;
            let authorization = std::fs::read_to_string(&authorization_file)
                .with_context(|| format!("reading {}", authorization_file.display()))?;
            let (status, body) = dev::push(
                &agent,
                &fingerprint,
                authorization.trim(),
                SET_MEDIA_TYPE,
                set.as_bytes(),
            )?;
            if status == 202 {
                outln!("202 accepted")
            } else {
                bail!("the agent answered {status}: {body}")
            }
        }
        SsfCommand::Serve {
            listen,
            dir,
            queue,
            issuer,
        } => serve(&listen, &dir, &queue, &issuer),
    }
}

fn serve(listen: &str, dir: &Path, queue: &Path, issuer: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    std::fs::create_dir_all(queue)?;
    let jwks_path = if dir.join(dev::SSF_JWKS_FILE).exists() {
        dir.join(dev::SSF_JWKS_FILE)
    } else {
        dir.join(crate::auth::dev::JWKS_FILE)
    };
    outln!(
        "serving SETs from {} for polling at http://{addr}/poll",
        queue.display()
    )?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if let Err(e) = answer(stream, &jwks_path, queue, issuer, &addr.to_string()) {
            tracing::warn!(error = %e, "dev ssf: a request failed");
        }
    }
    Ok(())
}

/// One HTTP/1.1 request, answered and closed.
fn answer(
    stream: TcpStream,
    jwks: &Path,
    queue: &Path,
    issuer: &str,
    addr: &str,
) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, reply) = match path {
        "/.well-known/ssf-configuration" => (
            200,
            json!({
                "spec_version": "1_0",
                "issuer": issuer,
                "jwks_uri": format!("http://{addr}/jwks.json"),
                "delivery_methods_supported": ["urn:ietf:rfc:8936"],
            })
            .to_string(),
        ),
        "/jwks.json" => (200, std::fs::read_to_string(jwks)?),
        "/poll" => (200, poll(queue, &body)?),
        _ => (404, json!({"err": "not_found"}).to_string()),
    };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    Ok(())
}

/// RFC 8936: drop the acknowledged SETs from the queue, answer up to `maxEvents` others.
fn poll(queue: &Path, body: &[u8]) -> anyhow::Result<String> {
    let req: PollRequest = serde_json::from_slice(body).context("not a poll request")?;
    let mut pending = Vec::new();
    for entry in std::fs::read_dir(queue)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "set") {
            let set = std::fs::read_to_string(&path)?;
            let jti = jti_of(&set).unwrap_or_default();
            if req.ack.contains(&jti) || req.set_errs.contains_key(&jti) {
                std::fs::remove_file(&path)?;
            } else {
                pending.push((jti, set));
            }
        }
    }
    pending.sort();
    let more = pending.len() > req.max_events as usize;
    let sets = pending
        .into_iter()
        .take(req.max_events as usize)
        .map(|(jti, set)| (jti, Value::String(set)))
        .collect();
    Ok(serde_json::to_string(&PollResponse {
        sets,
        more_available: more,
    })?)
}

fn jti_of(set: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = set.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["jti"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::signals::events::Event;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        event: EventArgs,
    }

    fn event(args: &[&str]) -> (DevSet, Event) {
        let cli = Cli::parse_from([&["dev-ssf", "--dir", "/nonexistent"], args].concat());
        let set = cli.event.set().expect("a SET");
        let parsed = Event::read(&set.event_uri(), &set.event).expect("the agent reads it");
        (set, parsed)
    }

    /// `--status` goes where each event type carries it, so that the agent reads it back.
    #[test]
    fn status_is_the_member_each_event_reads() {
        let (set, parsed) = event(&["--event", "stream-updated", "--status", "disabled"]);
        assert_eq!(set.event.get("status"), Some(&json!("disabled")));
        assert_eq!(
            parsed,
            Event::StreamUpdated {
                status: "disabled".into()
            }
        );
        let (set, parsed) = event(&[
            "--event",
            "device-compliance-change",
            "--device",
            "laptop-7",
            "--status",
            "not-compliant",
        ]);
        assert_eq!(
            set.event.get("current_status"),
            Some(&json!("not-compliant"))
        );
        assert_eq!(parsed, Event::DeviceCompliance { compliant: false });
    }
}
