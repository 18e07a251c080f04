//! `flowwarden policy`: check, reload and explain policy through the agent.

use std::path::PathBuf;

use super::{
    output::{self, outln},
    socket::{SocketArg, fail},
};
use crate::{
    api::{
        answers::{ExplainView, ReloadView},
        request::{Explain, PolicyCheck},
    },
    sessions::model::SessionId,
};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Re-read the policy directory now (the agent also follows edits by itself).
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Validate the agent's policy directory, or a candidate one, without applying it.
    Check {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Which rule allows a user a resource, or why none does; with --candidate, which live
    /// sessions a new policy would sever.
    Explain {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        session: Option<SessionId>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        candidate: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

impl PolicyCommand {
    pub fn json(&self) -> bool {
        match self {
            Self::Reload { json } | Self::Check { json, .. } | Self::Explain { json, .. } => *json,
        }
    }
}

/// The agent reads paths from its own working directory: send them absolute.
fn absolute(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).unwrap_or(p)
}

pub fn run(socket: &SocketArg, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Reload { json } => {
            let v = socket.connect()?.policy_reload().map_err(fail)?;
            if json {
                return output::json(&v);
            }
            outln!("{}", render_reload(&v))
        }
        PolicyCommand::Check { dir, json } => {
            let v = socket
                .connect()?
                .policy_check(&PolicyCheck {
                    dir: dir.map(absolute),
                })
                .map_err(fail)?;
            if json {
                return output::json(&v);
            }
            outln!(
                "{}: ok ({} files, {} resources, {} rules)",
                v.dir.display(),
                v.files,
                v.resources,
                v.rules
            )
        }
        PolicyCommand::Explain {
            user,
            session,
            resource,
            candidate,
            json,
        } => {
            let v = socket
                .connect()?
                .policy_explain(&Explain {
                    user,
                    session,
                    resource,
                    candidate: candidate.map(absolute),
                })
                .map_err(fail)?;
            if json {
                return output::json(&v);
            }
            output::text(&render_explain(&v))
        }
    }
}

fn render_reload(v: &ReloadView) -> String {
    match &v.outcome {
        Some(o) if v.changed => format!(
            "policy reloaded: {} live sessions re-evaluated, {} grants removed, {} flows \
             severed, {} sessions terminated",
            o.evaluated, o.grants_removed, o.flows_severed, o.sessions_terminated
        ),
        _ => "policy unchanged".into(),
    }
}

fn render_explain(v: &ExplainView) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing into a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    match v {
        ExplainView::Candidate { affected, .. } => {
            if affected.is_empty() {
                line("the candidate policy severs no live session".into());
            }
            for a in affected {
                line(format!(
                    "session {} ({} from {}) would lose {}{}",
                    a.session,
                    a.user,
                    a.source,
                    // As docs/policy.md shows it: the list as JSON writes it.
                    serde_json::to_string(&a.removed).unwrap_or_default(),
                    if a.terminated {
                        " and be terminated"
                    } else {
                        ""
                    }
                ));
            }
        }
        ExplainView::Identity {
            user,
            session,
            refused_at_ms,
            explanations,
            refused_by,
            ..
        } => {
            match (session, refused_at_ms) {
                (Some(session), _) => line(format!("{user} (session {session}):")),
                (None, Some(at)) => line(format!(
                    "{user} (no session; the identity of the admission refused {}):",
                    super::table::ago(*at, crate::sessions::model::now_ms())
                )),
                (None, None) => line(format!("{user}:")),
            }
            for r in refused_by {
                line(format!("  refused before policy: {r}"));
            }
            for e in explanations {
                line(format!(
                    "  {}: {}",
                    e.resource,
                    match (&e.rule, e.allowed) {
                        (Some(rule), true) => format!("allowed by rule {rule}"),
                        (None, true) => "allowed".into(),
                        (_, false) => "denied".into(),
                    }
                ));
                for r in &e.reasons {
                    line(format!("    {r}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn explanations_read_as_sentences() {
        let v: ExplainView = serde_json::from_value(json!({"user": "alice@corp.example",
            "session": "5e55100000000001", "source": "10.0.0.7", "explanations": [
            {"resource": "admin-console", "allowed": false, "rule": null,
             "reasons": ["rule admins: alice@corp.example is not in groups [admins]"]},
            {"resource": "ssh", "allowed": true, "rule": "ops-ssh", "reasons": []}]}))
        .unwrap();
        assert_eq!(
            render_explain(&v),
            "alice@corp.example (session 5e55100000000001):\n  admin-console: denied\n    \
             rule admins: alice@corp.example is not in groups [admins]\n  ssh: allowed by rule \
             ops-ssh\n"
        );
        let v: ExplainView = serde_json::from_value(json!({"candidate": "/c", "affected": [
            {"session": "5e55100000000001", "user": "alice", "source": "10.0.0.7",
             "removed": ["ssh", "db"], "terminated": true}]}))
        .unwrap();
        assert_eq!(
            render_explain(&v),
            "session 5e55100000000001 (alice from 10.0.0.7) would lose [\"ssh\",\"db\"] and be \
             terminated\n"
        );
    }

    #[test]
    fn a_reload_says_what_it_did() {
        let v: ReloadView = serde_json::from_value(json!({"changed": true, "outcome":
            {"evaluated": 4, "grants_removed": 1, "flows_severed": 1, "sessions_terminated": 1}}))
        .unwrap();
        assert!(render_reload(&v).starts_with("policy reloaded: 4 live sessions re-evaluated"));
        let v = ReloadView {
            changed: false,
            outcome: None,
        };
        assert_eq!(render_reload(&v), "policy unchanged");
    }
}
