//! Explain: why an identity may or may not reach one resource, rule by rule, in words an
//! operator can act on (`flowwarden policy explain`).

use std::net::IpAddr;

use serde::Serialize;

use super::{Policy, rules::Rule};
use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub resource: String,
    pub allowed: bool,
    /// The rule that allows it (the first in file order).
    pub rule: Option<String>,
    /// When allowed, the allowing rule; when not, one line per rule that mentions the
    /// resource saying why it does not apply.
    pub reasons: Vec<String>,
}

impl Policy {
    /// Explains the decision `evaluate` makes for one resource. Without `source`, rules are
    /// explained for any source address, and source limits are only mentioned.
    pub fn explain(
        &self,
        identity: &Identity,
        source: Option<IpAddr>,
        resource: &str,
    ) -> Explanation {
        let mut out = Explanation {
            resource: resource.to_owned(),
            allowed: false,
            rule: None,
            reasons: Vec::new(),
        };
        if self.resources.by_name(resource).is_none() {
            let names: Vec<&str> = self
                .resources
                .resources
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            let names = if names.is_empty() {
                "none are defined".to_owned()
            } else {
                names.join(", ")
            };
            out.reasons
                .push(format!("unknown resource {resource} (resources: {names})"));
            return out;
        }
        let mut mentioned = false;
        for rule in self.rules.iter().filter(|r| r.grants(resource)) {
            mentioned = true;
            let failures = failures(rule, identity, source);
            if failures.is_empty() {
                let from = match source {
                    Some(source) => format!(" from {source}"),
                    None if rule.sources.is_empty() => String::new(),
                    None => format!(" from {} only", list(&rule.sources)),
                };
                out.allowed = true;
                out.rule = Some(rule.name.clone());
                out.reasons = vec![format!(
                    "rule {}: grants {resource} to {}{from}",
                    rule.name,
                    identity.user()
                )];
                return out;
            }
            out.reasons
                .push(format!("rule {}: {}", rule.name, failures.join("; ")));
        }
        if !mentioned {
            out.reasons
                .push(format!("no rule grants resource {resource}"));
        }
        out
    }
}

/// Every condition of `rule` that `identity` (from `source`, if given) fails.
pub(super) fn failures(rule: &Rule, identity: &Identity, source: Option<IpAddr>) -> Vec<String> {
    let user = identity.user();
    let mut out = Vec::new();
    if !rule.names(identity) {
        out.push(match (rule.users.is_empty(), rule.groups.is_empty()) {
            (false, true) => format!("{user} is not one of users {}", list(&rule.users)),
            (true, false) => format!("{user} is not in groups {}", list(&rule.groups)),
            _ => format!(
                "{user} is neither one of users {} nor in groups {}",
                list(&rule.users),
                list(&rule.groups)
            ),
        });
    }
    for claim in rule.claims.iter().filter(|c| !c.matches(identity)) {
        let wanted = match claim.values.as_slice() {
            [one] => one.clone(),
            many => format!("one of {}", list(many)),
        };
        let has = match identity.claims.get_path(&claim.claim) {
            None => format!("the token has no {} claim", claim.claim),
            Some(serde_json::Value::Object(_) | serde_json::Value::Null) => {
                format!("the token's {} claim is not a value or a list", claim.claim)
            }
            Some(serde_json::Value::Array(_)) => {
                format!(
                    "the token says {}",
                    list(&identity.claim_values(&claim.claim))
                )
            }
            Some(_) => format!(
                "the token says {}",
                identity.claim_values(&claim.claim).join(", ")
            ),
        };
        out.push(format!("claim {} must be {wanted}, {has}", claim.claim));
    }
    out.extend(
        rule.device
            .failures(&identity.device)
            .map(|f| f.to_string()),
    );
    if let Some(source) = source
        && !rule.allows_source(source)
    {
        out.push(format!("source {source} is not in {}", list(&rule.sources)));
    }
    out
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests;
