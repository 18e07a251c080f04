//! The harness's users and its two policies: `wide` and `narrow` differ so that every reload
//! withdraws grants (and ends the sessions left with none) or stops doing so.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use serde::Serialize;

/// A simulated user and how long their tokens live.
#[derive(Debug)]
pub struct User {
    pub email: &'static str,
    pub groups: &'static [&'static str],
    /// Short-lived tokens make sessions expire (sweep writes) while the harness runs.
    pub lifetime_secs: u64,
}

pub const USERS: &[User] = &[
    User {
        email: "alice@corp.example",
        groups: &["ops"],
        lifetime_secs: 3600,
    },
    User {
        email: "bob@corp.example",
        groups: &["dev"],
        lifetime_secs: 3600,
    },
    User {
        email: "carol@corp.example",
        groups: &["temp"],
        lifetime_secs: 3600,
    },
    User {
        email: "dave@corp.example",
        groups: &["ops"],
        // Short, so that its sessions expire during a run; above the agent's minimum remaining
        // lifetime (5 s, `auth::claims::MIN_REMAINING_SECS`) with room for a slow admission.
        lifetime_secs: 10,
    },
    User {
        email: "erin@corp.example",
        groups: &["dev", "temp"],
        lifetime_secs: 3600,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// ops: ssh, web, db; dev: web (from the dev sources); temp: db.
    Wide,
    /// ops: ssh, web; dev: web (from the dev sources); no temp rule.
    Narrow,
}

impl Variant {
    pub fn flipped(self) -> Self {
        match self {
            Self::Wide => Self::Narrow,
            Self::Narrow => Self::Wide,
        }
    }
}

const MARKER: &str = "# crash-harness policy ";

/// The policy file's text. `generation` makes every write a change.
pub fn text(variant: Variant, generation: u64, dev_sources: &[IpAddr]) -> String {
    let (name, ops) = match variant {
        Variant::Wide => ("wide", r#"["ssh", "web", "db"]"#),
        Variant::Narrow => ("narrow", r#"["ssh", "web"]"#),
    };
    let sources: Vec<String> = dev_sources.iter().map(|s| format!("\"{s}\"")).collect();
    let mut t = format!(
        "{MARKER}{name} {generation}\n\
         [[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
         [[resource]]\nname = \"web\"\nprotocol = \"tcp\"\nports = [8080]\n\n\
         [[resource]]\nname = \"db\"\nprotocol = \"tcp\"\nports = [5432]\n\n\
         [[rule]]\nname = \"ops\"\ngroups = [\"ops\"]\nresources = {ops}\n\n\
         [[rule]]\nname = \"dev\"\ngroups = [\"dev\"]\nresources = [\"web\"]\nsources = [{}]\n\n\
         [rule.session]\nidle_timeout = \"10s\"\ndormant_timeout = \"10s\"\n",
        sources.join(", ")
    );
    if variant == Variant::Wide {
        t.push_str("\n[[rule]]\nname = \"temp\"\ngroups = [\"temp\"]\nresources = [\"db\"]\n");
    }
    t
}

/// Which variant the policy file holds now.
///
/// # Panics
/// The file is not one the harness wrote.
pub fn on_disk(path: &Path) -> Variant {
    let t = std::fs::read_to_string(path).expect("reading the policy file");
    match t
        .strip_prefix(MARKER)
        .and_then(|r| r.split_whitespace().next())
    {
        Some("wide") => Variant::Wide,
        Some("narrow") => Variant::Narrow,
        _ => panic!("{} is not a harness policy:\n{t}", path.display()),
    }
}

/// The resources `variant` grants to these groups from `source`.
pub fn allowed(
    variant: Variant,
    groups: &[String],
    source: IpAddr,
    dev_sources: &[IpAddr],
) -> BTreeSet<&'static str> {
    let mut out = BTreeSet::new();
    for g in groups {
        match (g.as_str(), variant) {
            ("ops", Variant::Wide) => out.extend(["ssh", "web", "db"]),
            ("ops", Variant::Narrow) => out.extend(["ssh", "web"]),
            ("dev", _) if dev_sources.contains(&source) => {
                out.insert("web");
            }
            ("temp", Variant::Wide) => {
                out.insert("db");
            }
            _ => {}
        }
    }
    out
}
