//! Rules: who may reach which resources, from where, on what device, and with which session
//! limits; parsed from `[[rule]]` tables and validated against the resources of every file.

use std::{collections::BTreeMap, fmt, net::IpAddr, ops::Range};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{
    PolicyError, ResourceTable,
    duration::{DAY, MINUTE, bounded_duration, format_duration},
    file::{Source, valid_name},
};
use crate::identity::{ClaimPath, Device, Identity};

/// A validated rule. Matching is all of: who (users or groups, or everyone), claims, device,
/// sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// `file:line` of its name, for messages.
    pub location: String,
    /// Names of the resources it grants, as written (validated, no duplicates).
    pub resources: Vec<String>,
    /// Emails (matched case-insensitively) or subjects (matched exactly).
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Whether `everyone = true` was written: then users and groups are empty.
    pub everyone: bool,
    pub claims: Vec<ClaimRequirement>,
    pub device: DeviceRequirements,
    pub session: SessionOverrides,
    /// Allowed session source prefixes; empty means any source.
    pub sources: Vec<IpNet>,
    /// The kernel ids of `resources`, in the same order.
    pub(super) resource_ids: Vec<u32>,
}

/// A claim the token must carry with one of `values` (a list claim matches if any of its
/// items is one of them). Values are compared as the identity shows them: strings as they
/// are, booleans as `true`/`false`, numbers in decimal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequirement {
    /// The claim path as written in the policy (docs/policy.md, "Claim paths").
    pub claim: ClaimPath,
    pub values: Vec<String>,
}

/// Device posture a rule requires. An absent device claim never satisfies a requirement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRequirements {
    pub managed: Option<bool>,
    pub compliant: Option<bool>,
    /// Allowed operating systems, compared case-insensitively; empty means any.
    pub os: Vec<String>,
}

/// Session limits a rule sets; `None` leaves the decision to other rules or the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionOverrides {
    pub max_duration_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub dormant_timeout_secs: Option<u64>,
    pub reconnect: Option<bool>,
}

/// A device requirement an identity fails; small and `Copy`, so evaluation does not allocate
/// until a message is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFailure<'a> {
    /// `(posture name, value required, what the token says)`, e.g. `("managed", true, None)`.
    Flag(&'static str, bool, Option<bool>),
    /// `(systems allowed, what the token says)`.
    Os(&'a [String], Option<&'a str>),
}

impl fmt::Display for DeviceFailure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Flag(name, want, has) => {
                if want {
                    write!(f, "device.{name} required")?;
                } else {
                    write!(f, "device.{name} = false required")?;
                }
                match has {
                    Some(v) => write!(f, ", the token says {v}"),
                    None => write!(f, ", the token has no device_{name} claim"),
                }
            }
            Self::Os(allowed, has) => {
                write!(f, "device.os must be one of [{}]", allowed.join(", "))?;
                match has {
                    Some(os) => write!(f, ", the token says {os}"),
                    None => write!(f, ", the token has no device_os claim"),
                }
            }
        }
    }
}

impl DeviceRequirements {
    /// The first requirement `device` fails.
    pub fn check<'a>(&'a self, device: &'a Device) -> Result<(), DeviceFailure<'a>> {
        self.failures(device).next().map_or(Ok(()), Err)
    }

    /// Every requirement `device` fails, lazily (evaluation only wants the first).
    pub fn failures<'a>(&'a self, device: &'a Device) -> impl Iterator<Item = DeviceFailure<'a>> {
        let flags = [
            ("managed", self.managed, device.managed),
            ("compliant", self.compliant, device.compliant),
        ]
        .into_iter()
        .filter_map(|(name, want, has)| {
            want.filter(|&w| has != Some(w))
                .map(|w| DeviceFailure::Flag(name, w, has))
        });
        let os = device.os.as_deref();
        let os_fails = !self.os.is_empty()
            && !os.is_some_and(|os| self.os.iter().any(|o| o.eq_ignore_ascii_case(os)));
        flags.chain(os_fails.then_some(DeviceFailure::Os(&self.os, os)))
    }
}

impl ClaimRequirement {
    /// Reads the one claim from the compact claims text: evaluation runs this for every live
    /// session on every policy change.
    pub fn matches(&self, identity: &Identity) -> bool {
        match identity.claims.get_path(&self.claim) {
            Some(serde_json::Value::Array(items)) => items.iter().any(|v| self.matches_value(v)),
            Some(v) => self.matches_value(&v),
            None => false,
        }
    }

    fn matches_value(&self, v: &serde_json::Value) -> bool {
        use serde_json::Value;
        match v {
            Value::String(s) => self.values.iter().any(|w| w == s),
            Value::Bool(b) => {
                let b = if *b { "true" } else { "false" };
                self.values.iter().any(|w| w == b)
            }
            Value::Number(n) => {
                let mut buf = StackStr::default();
                if fmt::write(&mut buf, format_args!("{n}")).is_ok() {
                    self.values.iter().any(|w| w.as_bytes() == buf.as_bytes())
                } else {
                    let n = n.to_string();
                    self.values.contains(&n)
                }
            }
            _ => false,
        }
    }
}

/// Formats a number without allocating; fails (and the caller allocates) past 32 bytes.
#[derive(Default)]
struct StackStr {
    buf: [u8; 32],
    len: usize,
}

impl StackStr {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl Rule {
    /// Whether the rule names people (users or groups), as opposed to every identity whose
    /// claims match.
    pub fn names_people(&self) -> bool {
        !self.users.is_empty() || !self.groups.is_empty()
    }

    /// Who, by users and groups only (claims are separate).
    pub fn names(&self, identity: &Identity) -> bool {
        !self.names_people()
            || self.users.iter().any(|u| identity.is(u))
            || self.groups.iter().any(|g| identity.in_group(g))
    }

    pub fn claims_match(&self, identity: &Identity) -> bool {
        self.claims.iter().all(|c| c.matches(identity))
    }

    pub fn allows_source(&self, source: IpAddr) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&source))
    }

    pub fn grants(&self, resource: &str) -> bool {
        self.resources.iter().any(|r| r == resource)
    }

    /// `(name, kernel id)` of each resource it grants.
    pub fn targets(&self) -> impl Iterator<Item = (&str, u32)> {
        self.resources
            .iter()
            .map(String::as_str)
            .zip(self.resource_ids.iter().copied())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleDef {
    name: Spanned<String>,
    resources: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    everyone: Option<Spanned<bool>>,
    #[serde(default)]
    claims: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    device: DeviceDef,
    #[serde(default)]
    session: SessionDef,
    /// `None` when absent (any source); an empty list is refused.
    #[serde(default)]
    sources: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDef {
    managed: Option<bool>,
    compliant: Option<bool>,
    os: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionDef {
    max_duration: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    dormant_timeout: Option<Spanned<String>>,
    reconnect: Option<bool>,
}

/// Validates the rules of every file (in file order) against the resources of every file.
///
/// # Errors
/// The first invalid rule, with its file, line and field.
pub(super) fn compile_rules<'a>(
    files: impl IntoIterator<Item = (Source<'a>, Vec<RuleDef>)>,
    resources: &ResourceTable,
) -> Result<Vec<Rule>, PolicyError> {
    let mut rules: Vec<Rule> = Vec::new();
    for (src, defs) in files {
        for def in defs {
            let rule = compile_rule(src, def, resources)?;
            if let Some(first) = rules.iter().find(|r| r.name == rule.name) {
                return Err(PolicyError::Invalid {
                    location: rule.location,
                    field: "rule.name".into(),
                    problem: format!(
                        "{:?} is defined twice (first at {}): rule names must be unique",
                        rule.name, first.location
                    ),
                });
            }
            rules.push(rule);
        }
    }
    Ok(rules)
}

fn compile_rule(src: Source<'_>, def: RuleDef, table: &ResourceTable) -> Result<Rule, PolicyError> {
    let invalid = |span: Range<usize>, field: &str, problem: String| {
        src.invalid(span, format!("rule.{field}"), problem)
    };
    let name_span = def.name.span();
    let name = def.name.into_inner();
    if !valid_name(&name) {
        return Err(invalid(
            name_span,
            "name",
            format!("{name:?}: use 1 to 64 of a-z, 0-9, '-' and '_'"),
        ));
    }

    let (list_span, list) = (def.resources.span(), def.resources.into_inner());
    if list.is_empty() {
        return Err(invalid(
            list_span,
            "resources",
            "empty: list the resources this rule grants, e.g. [\"ssh\"]".into(),
        ));
    }
    let mut resources = Vec::new();
    let mut resource_ids = Vec::new();
    for entry in list {
        let span = entry.span();
        let wanted = entry.into_inner();
        let Some(resource) = table.by_name(&wanted) else {
            let known: Vec<&str> = table.resources.iter().map(|r| r.name.as_str()).collect();
            let known = if known.is_empty() {
                "none are defined".to_owned()
            } else {
                known.join(", ")
            };
            return Err(invalid(
                span,
                "resources",
                format!("unknown resource {wanted:?} (resources: {known})"),
            ));
        };
        if resources.contains(&wanted) {
            return Err(invalid(
                span,
                "resources",
                format!("{wanted:?} is listed twice"),
            ));
        }
        resource_ids.push(resource.id);
        resources.push(wanted);
    }

    let users = non_empty_strings(src, def.users, "users", "user")?;
    let groups = non_empty_strings(src, def.groups, "groups", "group")?;
    let claims = compile_claims(src, def.claims)?;
    let everyone = match def.everyone {
        Some(e) if *e.get_ref() => {
            if !users.is_empty() || !groups.is_empty() {
                return Err(invalid(
                    e.span(),
                    "everyone",
                    "everyone = true already matches every identity: remove users and groups, \
                     or set everyone = false"
                        .into(),
                ));
            }
            true
        }
        _ => false,
    };
    if !everyone && users.is_empty() && groups.is_empty() && claims.is_empty() {
        return Err(invalid(
            name_span,
            "users",
            format!(
                "rule {name:?} matches nobody: list users, groups or claims, or set \
                 everyone = true to grant every identity"
            ),
        ));
    }

    let device = DeviceRequirements {
        managed: def.device.managed,
        compliant: def.device.compliant,
        os: match def.device.os {
            None => Vec::new(),
            Some(os) => {
                let span = os.span();
                let os = non_empty_strings(src, os.into_inner(), "device.os", "system")?;
                if os.is_empty() {
                    return Err(invalid(
                        span,
                        "device.os",
                        "empty: list the allowed systems, e.g. [\"linux\", \"macos\"], or leave \
                         os out to allow any"
                            .into(),
                    ));
                }
                os
            }
        },
    };

    let spelled = |v: &Option<Spanned<String>>| v.as_ref().map(|v| (v.span(), v.get_ref().clone()));
    let (idle_text, dormant_text) = (
        spelled(&def.session.idle_timeout),
        spelled(&def.session.dormant_timeout),
    );
    let duration = |value: Option<Spanned<String>>, field: &str, min: u64, max: u64| {
        value
            .map(|v| {
                let span = v.span();
                bounded_duration(v.get_ref(), min, max)
                    .map_err(|problem| invalid(span, &format!("session.{field}"), problem))
            })
            .transpose()
    };
    let session = SessionOverrides {
        max_duration_secs: duration(def.session.max_duration, "max_duration", MINUTE, 30 * DAY)?,
        idle_timeout_secs: duration(def.session.idle_timeout, "idle_timeout", 10, 7 * DAY)?,
        dormant_timeout_secs: duration(
            def.session.dormant_timeout,
            "dormant_timeout",
            10,
            30 * DAY,
        )?,
        reconnect: def.session.reconnect,
    };
    // A limit the session's own maximum always beats is a misunderstanding, not a policy.
    if let Some(max) = session.max_duration_secs {
        for (field, secs, text) in [
            ("idle_timeout", session.idle_timeout_secs, &idle_text),
            (
                "dormant_timeout",
                session.dormant_timeout_secs,
                &dormant_text,
            ),
        ] {
            if let (Some(secs), Some((span, text))) = (secs, text)
                && secs > max
            {
                return Err(invalid(
                    span.clone(),
                    &format!("session.{field}"),
                    format!(
                        "{text:?} is longer than max_duration {:?}: the session ends before \
                         it could apply; shorten it or leave it out",
                        format_duration(max)
                    ),
                ));
            }
        }
    }

    if let Some(list) = &def.sources
        && list.get_ref().is_empty()
    {
        return Err(invalid(
            list.span(),
            "sources",
            "empty: list the prefixes sessions may come from, e.g. [\"10.0.0.0/8\"], or \
             leave sources out to allow any source"
                .into(),
        ));
    }
    let mut sources = Vec::new();
    for s in def.sources.map(Spanned::into_inner).unwrap_or_default() {
        let net = parse_prefix(s.get_ref()).ok_or_else(|| {
            invalid(
                s.span(),
                "sources",
                format!(
                    "{:?} is not an address prefix: write e.g. \"10.0.0.0/8\", \
                     \"2001:db8::/32\" or a single address",
                    s.get_ref()
                ),
            )
        })?;
        sources.push(net);
    }

    Ok(Rule {
        name,
        location: src.at(name_span),
        resources,
        users,
        groups,
        everyone,
        claims,
        device,
        session,
        sources,
        resource_ids,
    })
}

fn non_empty_strings(
    src: Source<'_>,
    list: Vec<Spanned<String>>,
    field: &str,
    what: &str,
) -> Result<Vec<String>, PolicyError> {
    list.into_iter()
        .map(|s| {
            if s.get_ref().trim().is_empty() {
                Err(src.invalid(
                    s.span(),
                    format!("rule.{field}"),
                    format!("an empty {what} name matches nothing: remove it"),
                ))
            } else {
                Ok(s.into_inner())
            }
        })
        .collect()
}

fn compile_claims(
    src: Source<'_>,
    claims: BTreeMap<String, Spanned<toml::Value>>,
) -> Result<Vec<ClaimRequirement>, PolicyError> {
    let mut out = Vec::new();
    for (claim, value) in claims {
        let span = value.span();
        let field = format!("rule.claims.{claim}");
        if claim.is_empty() {
            return Err(src.invalid(span, "rule.claims", "a claim needs a name"));
        }
        let path = ClaimPath::parse(&claim)
            .map_err(|why| src.invalid(span.clone(), field.clone(), why))?;
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            toml::Value::Integer(i) => Some(i.to_string()),
            _ => None,
        };
        let values = match value.get_ref() {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
            v => scalar(v).map(|s| vec![s]),
        };
        let values = values.ok_or_else(|| {
            src.invalid(
                span.clone(),
                field.clone(),
                "a claim matches a string, a boolean or an integer, or a list of them",
            )
        })?;
        if values.is_empty() {
            return Err(src.invalid(
                span,
                field,
                "empty: list the values that match, e.g. [\"hwk\", \"otp\"], or leave the claim out",
            ));
        }
        out.push(ClaimRequirement {
            claim: path,
            values,
        });
    }
    Ok(out)
}

/// A prefix, or a single address as a host prefix; host bits are cleared.
pub(super) fn parse_prefix(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

#[cfg(test)]
mod tests;
