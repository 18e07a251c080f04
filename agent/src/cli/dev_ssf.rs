//! `flowwarden dev ssf`: DEVELOPMENT TOOLS. A stand-in Shared Signals transmitter: signs SETs
//! for any event and subject with a development key, pushes them to an agent, or serves them
//! for polling (RFC 8936) with its `ssf-configuration` and JWKS. Never for production.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};

use super::output::outln;
use crate::{
    sessions::model::now_ms,
    signals::{
        SET_MEDIA_TYPE,
        dev::{self, DEV_TRANSMITTER, DevSet, SigningKey},
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
    /// Be a transmitter at http://LISTEN: /.well-known/ssf-configuration, /jwks.json, a
    /// stream management API at /streams, queued SETs served for polling (RFC 8936) at
    /// /poll or pushed to a push stream (RFC 8935); runs until killed.
    Serve(super::dev_ssf_serve::ServeArgs),
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
                    let path = super::dev_ssf_serve::queue_path(&dir);
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
        SsfCommand::Serve(args) => super::dev_ssf_serve::serve(args),
    }
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
