//! `flowwarden dev`: DEVELOPMENT TOOLS for demos and tests. A signing key and tokens made here
//! stand in for an identity provider; never configure a production agent to trust them.

use std::path::PathBuf;

use anyhow::Context as _;

use super::output::outln;
use crate::{
    auth::dev::{self, DevClaims},
    sessions::model::now_ms,
};

#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Make a development ES256 signing key and its public JWKS (for `[[auth.issuer]]
    /// jwks_file`).
    Keygen {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Mint a development token signed with the key from `dev keygen`.
    Token(TokenArgs),
    /// A stand-in Shared Signals transmitter: signs, pushes and serves SETs.
    Ssf {
        #[command(subcommand)]
        command: Box<super::dev_ssf::SsfCommand>,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The key directory made by `dev keygen`.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "https://idp.flowwarden.dev")]
    pub issuer: String,
    #[arg(long, default_value = "flowwarden")]
    pub audience: String,
    #[arg(long)]
    pub sub: String,
    #[arg(long)]
    pub email: Option<String>,
    /// Repeat for several groups.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    #[arg(long)]
    pub device_id: Option<String>,
    #[arg(long)]
    pub managed: Option<bool>,
    #[arg(long)]
    pub compliant: Option<bool>,
    #[arg(long)]
    pub os: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub lifetime: u64,
}

pub fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Ssf { command } => super::dev_ssf::run(*command),
        DevCommand::Keygen { dir } => {
            let keys = dev::keygen(&dir)?;
            outln!("development key (not for production):")?;
            outln!("  private key {}", keys.private_key.display())?;
            outln!("  public JWKS {}  (kid {})", keys.jwks.display(), keys.kid)
        }
        DevCommand::Token(a) => {
            let jwks_path = a.dir.join(dev::JWKS_FILE);
            let kid = dev::kid_of(&jwks_path)
                .with_context(|| format!("reading the key id from {}", jwks_path.display()))?;
            let claims = DevClaims {
                issuer: a.issuer,
                audience: a.audience,
                subject: a.sub,
                email: a.email,
                groups: a.groups,
                device_id: a.device_id,
                managed: a.managed,
                compliant: a.compliant,
                os: a.os,
                lifetime_secs: a.lifetime,
                not_before_secs: None,
            };
            let token = dev::token(&a.dir.join(dev::KEY_FILE), &kid, &claims, now_ms() / 1000)?;
            outln!("{token}")
        }
    }
}
