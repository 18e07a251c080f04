//! `flowwarden fleet`: the administrator's view of and commands to every host, over NATS
//! JetStream: keygen, init, hosts, sessions, terminate, policy push, locks, signals, audit.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{output, table};
use crate::{
    api::request::Terminate,
    fleet::{
        FleetConfig,
        admin::{self, Admin, Issued},
        command::{Action, Target},
        keys::AdminKey,
    },
    sessions::model::{SessionId, now_ms},
};

/// How to reach the fleet's servers as an administrator.
#[derive(Debug, clap::Args)]
pub struct LinkArgs {
    /// NATS server URL (repeat for several).
    #[arg(
        long = "server",
        env = "FLOWWARDEN_FLEET_SERVERS",
        value_delimiter = ',',
        global = true
    )]
    servers: Vec<String>,
    #[arg(
        long,
        env = "FLOWWARDEN_FLEET_PREFIX",
        default_value = "flowwarden",
        global = true
    )]
    prefix: String,
    /// CA certificate of the servers (TLS required when set).
    #[arg(long, env = "FLOWWARDEN_FLEET_CA", global = true)]
    ca: Option<PathBuf>,
    /// NATS `.creds` file.
    #[arg(long, env = "FLOWWARDEN_FLEET_CREDS", global = true)]
    creds: Option<PathBuf>,
    /// NATS user (with --password-file).
    #[arg(long, env = "FLOWWARDEN_FLEET_USER", global = true)]
    user: Option<String>,
    #[arg(long, env = "FLOWWARDEN_FLEET_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// The admin private key that signs commands (from `fleet keygen`).
    #[arg(long = "admin-key", env = "FLOWWARDEN_FLEET_ADMIN_KEY", global = true)]
    admin_key: Option<PathBuf>,
    /// Seconds to wait for every host's outcome of a command.
    #[arg(long, default_value_t = 5, global = true)]
    wait: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Make an admin key pair: the private key into FILE (mode 0600), the public key (for
    /// `admin_keys` in each agent's `[fleet]`) on standard output.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Create the fleet's streams and buckets (idempotent); --replicas 3 on a cluster.
    Init {
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long)]
        json: bool,
    },
    /// Each agent: version, policy version, connected, lag, sessions, last seen.
    Hosts {
        #[arg(long)]
        json: bool,
    },
    /// Live sessions on every host; terminate them anywhere.
    Sessions {
        #[command(subcommand)]
        command: FleetSessions,
    },
    /// Push a policy directory to every host.
    Policy {
        #[command(subcommand)]
        command: FleetPolicy,
    },
    /// Locks on every host: add, list, remove.
    Lock {
        #[command(subcommand)]
        command: FleetLock,
    },
    /// Identity signals on every host: publish a SET to the fleet's signals stream.
    Signal {
        #[command(subcommand)]
        command: FleetSignal,
    },
    /// Every host's audit events, from the fleet's events stream.
    Audit {
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// How many of the latest events to print first.
        #[arg(long, default_value_t = 50)]
        last: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetSignal {
    /// Publish a SET (a compact JWS signed by a transmitter the agents trust) for every agent
    /// to apply as if its transmitter had pushed it. Not signed with an admin key: the
    /// agents check the transmitter's signature.
    Publish {
        /// The file holding the SET, or `-` for standard input.
        set: PathBuf,
        /// The last token of the subject it is published on (`<prefix>.signals.<from>`): who
        /// relays it.
        #[arg(long, default_value = "admin")]
        from: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetSessions {
    /// Every live session on every host.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Sever a session (on the host that runs it) or every session of a user, everywhere.
    Terminate {
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        id: Option<SessionId>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetLock {
    /// Lock a target out on every host (hosts that are down apply it before they admit).
    Add {
        #[command(flatten)]
        target: super::lock::TargetArgs,
        /// How long the lock holds on each host from when it applies it (e.g. 15m, 2h).
        #[arg(long, value_parser = super::lock::parse_ttl)]
        ttl: Option<u64>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, requires = "reason")]
        show_reason: bool,
        #[arg(long)]
        json: bool,
    },
    /// The fleet's locks (by the id of the command that added them).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a fleet lock from every host.
    Remove {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetPolicy {
    /// Validate DIR (as `policy check` does), sign it and publish it as the next version.
    Push {
        dir: PathBuf,
        /// The bundle version; by default one above the last pushed.
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    #[command(flatten)]
    link: LinkArgs,
    #[command(subcommand)]
    command: FleetCommand,
}

impl FleetArgs {
    pub fn json(&self) -> bool {
        match &self.command {
            FleetCommand::Keygen { json, .. }
            | FleetCommand::Init { json, .. }
            | FleetCommand::Hosts { json }
            | FleetCommand::Audit { json, .. }
            | FleetCommand::Signal {
                command: FleetSignal::Publish { json, .. },
            }
            | FleetCommand::Sessions {
                command: FleetSessions::List { json, .. } | FleetSessions::Terminate { json, .. },
            }
            | FleetCommand::Policy {
                command: FleetPolicy::Push { json, .. },
            }
            | FleetCommand::Lock {
                command:
                    FleetLock::Add { json, .. }
                    | FleetLock::List { json }
                    | FleetLock::Remove { json, .. },
            } => *json,
        }
    }
}

/// The snapshot key of the latest policy bundle.
const POLICY_SNAPSHOT_KEY: &str = "policy";

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    if let FleetCommand::Keygen { out, json } = &args.command {
        return keygen(out, *json);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

fn keygen(out: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (key, text) = AdminKey::generate()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    let public = key.public.encoded();
    if json {
        return output::json(
            &json!({"key_id": key.public.id, "public_key": public, "private_key_file": out}),
        );
    }
    output::text(&format!(
        "private key written to {} (keep it secret)\nkey id      {}\npublic key  {public}\n\nadd to each agent's [fleet]:\n  admin_keys = [\"{public}\"]\n",
        out.display(),
        key.public.id
    ))
}

impl LinkArgs {
    fn config(&self) -> anyhow::Result<FleetConfig> {
        if self.servers.is_empty() {
            bail!("no fleet server: give --server nats://host:4222 (or FLOWWARDEN_FLEET_SERVERS)");
        }
        let mut c = FleetConfig::for_admin(self.servers.clone(), self.prefix.clone());
        c.ca_file.clone_from(&self.ca);
        c.creds_file.clone_from(&self.creds);
        c.user.clone_from(&self.user);
        c.password_file.clone_from(&self.password_file);
        Ok(c)
    }

    fn key(&self) -> anyhow::Result<AdminKey> {
        let Some(path) = &self.admin_key else {
            bail!(
                "commands are signed: give --admin-key FILE (from `flowwarden fleet keygen`) or FLOWWARDEN_FLEET_ADMIN_KEY"
            );
        };
        Ok(AdminKey::load(path)?)
    }
}

async fn run_async(args: FleetArgs) -> anyhow::Result<()> {
    let link = &args.link;
    let replicas = match &args.command {
        FleetCommand::Init { replicas, .. } => *replicas,
        _ => 1,
    };
    let config = link.config()?;
    // Creating what is missing with one replica never changes what exists. A relay of SETs
    // only publishes: its NATS user may do nothing else.
    let fleet = if matches!(args.command, FleetCommand::Signal { .. }) {
        Admin::connect_only(&config).await?
    } else {
        Admin::connect(&config, replicas).await?
    };
    let wait = Duration::from_secs(link.wait);
    match args.command {
        FleetCommand::Keygen { .. } => unreachable!("handled without a connection"),
        FleetCommand::Init { json, .. } => {
            if json {
                return output::json(&json!({"ok": true, "replicas": replicas}));
            }
            output::text(&format!(
                "fleet streams and buckets ready ({replicas} replica(s))\n"
            ))
        }
        FleetCommand::Hosts { json } => {
            let hosts = fleet.hosts().await?;
            if json {
                let rows: Vec<_> = hosts
                    .iter()
                    .map(|h| {
                        let mut v = serde_json::to_value(h).unwrap_or_default();
                        v["connected"] = admin::connected(h).into();
                        v
                    })
                    .collect();
                return output::json(&rows);
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = hosts
                .iter()
                .map(|h| {
                    vec![
                        h.host.clone(),
                        h.version.clone(),
                        h.policy_version.to_string(),
                        if admin::connected(h) { "yes" } else { "no" }.into(),
                        if h.current {
                            "current".into()
                        } else {
                            format!("lag {}", h.lag)
                        },
                        h.sessions.to_string(),
                        table::ago(h.last_seen_ms, now),
                    ]
                })
                .collect();
            table::print(
                &[
                    "HOST",
                    "VERSION",
                    "POLICY",
                    "CONNECTED",
                    "CONTROL",
                    "SESSIONS",
                    "LAST SEEN",
                ],
                &rows,
            )
        }
        FleetCommand::Sessions {
            command: FleetSessions::List { user, json },
        } => {
            let all = fleet.sessions(None).await?;
            let partial = crate::fleet::view::partial_hosts(&fleet.hosts().await?, &all);
            let sessions: Vec<_> = all
                .into_iter()
                .filter(|s| {
                    user.as_deref()
                        .is_none_or(|u| s.user.eq_ignore_ascii_case(u))
                })
                .collect();
            // A host past the view's size publishes its newest sessions only: said on stderr,
            // so that the table (or JSON) stays what scripts read.
            for p in &partial {
                eprintln!(
                    "note: {} has {} live sessions; the fleet's view holds its newest {}",
                    p.host, p.live, p.shown
                );
            }
            if json {
                return output::json(&sessions);
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = sessions
                .iter()
                .map(|s| {
                    vec![
                        s.host.clone(),
                        s.id.clone(),
                        s.user.clone(),
                        s.source.clone(),
                        s.resources.join(","),
                        s.state.clone(),
                        table::ago(s.created_at_ms, now),
                    ]
                })
                .collect();
            table::print(
                &[
                    "HOST",
                    "SESSION",
                    "USER",
                    "SOURCE",
                    "RESOURCES",
                    "STATE",
                    "SINCE",
                ],
                &rows,
            )
        }
        FleetCommand::Sessions {
            command:
                FleetSessions::Terminate {
                    id,
                    user,
                    reason,
                    json,
                },
        } => {
            let key = link.key()?;
            let (target, params, lasting) = match (id, user) {
                (Some(id), None) => {
                    // To the host that runs it; to every host when the view does not know it.
                    let target = fleet
                        .owner_of(&id.to_string())
                        .await?
                        .map_or(Target::All, Target::Host);
                    let params = Terminate {
                        ids: vec![id],
                        reason,
                        ..Terminate::default()
                    };
                    (target, params, false)
                }
                (None, Some(user)) => {
                    let params = Terminate {
                        user: Some(user),
                        reason,
                        ..Terminate::default()
                    };
                    (Target::All, params, true)
                }
                _ => bail!("give a session id or --user, not both"),
            };
            let action = Action::Call {
                method: "sessions.terminate".into(),
                params: serde_json::to_value(&params)?,
            };
            // A user's termination stays in the snapshot: a host whose position is purged
            // still severs her sessions when it comes back.
            let snapshot = lasting.then(|| format!("terminate-user.{}", now_ms()));
            let issued = fleet.issue(&key, target, action, snapshot, wait).await?;
            report(&issued, json)
        }
        FleetCommand::Policy {
            command: FleetPolicy::Push { dir, version, json },
        } => {
            let key = link.key()?;
            let version = match version {
                Some(v) => v,
                None => last_pushed(&fleet).await?.map_or(1, |v| v + 1),
            };
            let bundle = crate::fleet::policy::bundle(&dir, version)?;
            let issued = fleet
                .issue(
                    &key,
                    Target::All,
                    Action::Policy(bundle),
                    Some(POLICY_SNAPSHOT_KEY.into()),
                    wait,
                )
                .await?;
            if json {
                let mut v = serde_json::to_value(&issued)?;
                v["version"] = version.into();
                return output::json(&v);
            }
            output::text(&format!("policy version {version}\n"))?;
            report(&issued, false)
        }
        FleetCommand::Lock { command } => lock(&fleet, link, command, wait).await,
        FleetCommand::Signal {
            command: FleetSignal::Publish { set, from, json },
        } => {
            if !crate::fleet::config::valid_token(&from) {
                bail!("--from {from:?} must be letters, digits, - and _ only (a subject token)");
            }
            let bytes = if set.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .context("reading the SET from standard input")?;
                b
            } else {
                std::fs::read(&set).with_context(|| format!("reading {}", set.display()))?
            };
            let text = std::str::from_utf8(&bytes)
                .map(str::trim)
                .ok()
                .filter(|t| t.split('.').count() == 3)
                .with_context(|| {
                    format!(
                        "{} is not a SET: expected a compact JWS (three base64url parts separated by dots)",
                        set.display()
                    )
                })?;
            let seq = fleet.publish_set(&from, text.as_bytes().to_vec()).await?;
            let subject = fleet.names.signals(&from);
            if json {
                return output::json(&json!({"subject": subject, "stream_seq": seq}));
            }
            output::text(&format!(
                "SET published on {subject} (signals stream seq {seq}); each agent's audit shows what it did\n"
            ))
        }
        FleetCommand::Audit { follow, last, json } => {
            let mut failed = None;
            fleet
                .audit(last, follow, |event| {
                    let printed = if json {
                        output::json_line(&event)
                    } else {
                        output::text(&format!("{}\n", audit_line(&event)))
                    };
                    match printed {
                        Ok(()) => true,
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    }
                })
                .await?;
            failed.map_or(Ok(()), Err)
        }
    }
}

/// Snapshot keys of fleet locks: `lock.<command id>`.
const LOCK_PREFIX: &str = "lock.";

async fn lock(
    fleet: &Admin,
    link: &LinkArgs,
    command: FleetLock,
    wait: Duration,
) -> anyhow::Result<()> {
    match command {
        FleetLock::Add {
            target,
            ttl,
            reason,
            show_reason,
            json,
        } => {
            let key = link.key()?;
            let new = crate::locks::NewLock {
                target: target.target()?,
                ttl_secs: ttl,
                reason,
                show_reason,
                on_behalf_of: None,
            };
            let action = Action::Call {
                method: "lock.add".into(),
                params: serde_json::to_value(&new)?,
            };
            let issued = fleet
                .issue(
                    &key,
                    Target::All,
                    action,
                    Some(format!("{LOCK_PREFIX}{{id}}")),
                    wait,
                )
                .await?;
            report(&issued, json)
        }
        FleetLock::List { json } => {
            let locks: Vec<serde_json::Value> = fleet
                .snapshot(LOCK_PREFIX)
                .await?
                .into_iter()
                .map(|(_, e)| {
                    let params = match &e.action {
                        Action::Call { params, .. } => params.clone(),
                        Action::Policy(_) => serde_json::Value::Null,
                    };
                    json!({
                        "id": e.id,
                        "target": params["target"],
                        "ttl_secs": params["ttl_secs"],
                        "reason": params["reason"],
                        "issued_at_ms": e.issued_at_ms,
                        "key": e.key,
                    })
                })
                .collect();
            if json {
                return output::json(&locks);
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = locks
                .iter()
                .map(|l| {
                    vec![
                        l["id"].as_str().unwrap_or("").to_owned(),
                        l["target"].to_string(),
                        l["reason"].as_str().unwrap_or("").to_owned(),
                        table::ago(l["issued_at_ms"].as_u64().unwrap_or(0), now),
                    ]
                })
                .collect();
            table::print(&["LOCK", "TARGET", "REASON", "ISSUED"], &rows)
        }
        FleetLock::Remove { id, json } => {
            let key = link.key()?;
            let snapshot_key = format!("{LOCK_PREFIX}{id}");
            if !fleet
                .snapshot(&snapshot_key)
                .await?
                .iter()
                .any(|(k, _)| *k == snapshot_key)
            {
                bail!("no fleet lock {id}: `flowwarden fleet lock list` shows them");
            }
            let action = Action::Call {
                method: "lock.remove".into(),
                params: json!({ "id": id }),
            };
            let issued = fleet.issue(&key, Target::All, action, None, wait).await?;
            // Out of the snapshot once removal is on the stream: a host resynchronising
            // later never sees the lock at all.
            fleet.forget(&snapshot_key).await?;
            report(&issued, json)
        }
    }
}

/// The version of the last bundle pushed, from the snapshot.
async fn last_pushed(fleet: &Admin) -> anyhow::Result<Option<u64>> {
    let kv = fleet
        .js
        .get_key_value(fleet.names.snapshot_bucket())
        .await
        .context("opening the snapshot bucket")?;
    let Some(bytes) = kv
        .get(POLICY_SNAPSHOT_KEY)
        .await
        .context("reading the snapshot")?
    else {
        return Ok(None);
    };
    // Our own signed bundle: its envelope says the version.
    let signed: crate::fleet::command::Signed = serde_json::from_slice(&bytes)?;
    use base64::Engine as _;
    let envelope = base64::engine::general_purpose::STANDARD.decode(signed.envelope)?;
    let envelope: crate::fleet::command::Envelope = serde_json::from_slice(&envelope)?;
    Ok(match envelope.action {
        Action::Policy(b) => Some(b.version),
        Action::Call { .. } => None,
    })
}

fn report(issued: &Issued, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(issued);
    }
    let mut out = format!(
        "command {} (stream seq {})\n",
        issued.command, issued.stream_seq
    );
    for o in &issued.outcomes {
        out.push_str(&format!(
            "  {:<20} {} {}\n",
            o.host,
            if o.applied { "applied" } else { "REFUSED" },
            o.outcome
        ));
    }
    for h in &issued.waiting_for {
        out.push_str(&format!(
            "  {h:<20} no answer yet (it applies the command when it catches up)\n"
        ));
    }
    output::text(&out)
}

fn audit_line(e: &serde_json::Value) -> String {
    let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let mut line = format!(
        "{:<16} {:>6} {:<26}",
        s("host"),
        e.get("seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        s("kind")
    );
    for k in [
        "user", "session", "source", "resource", "command", "reason", "outcome", "detail",
    ] {
        let v = s(k);
        if !v.is_empty() {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    line
}
