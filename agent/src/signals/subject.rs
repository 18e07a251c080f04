//! Subjects of security events (RFC 9493 subject identifiers, SSF §3 complex subjects), and
//! how one is matched against a live session's claims and device posture.

use serde_json::{Map, Value};

use super::config::SubjectMapping;
use crate::{
    identity::Identity,
    sessions::{Lookup, Name, model::Session},
};

/// Longest identifier value taken from a SET; longer ones are refused, not truncated.
const MAX_ID_CHARS: usize = 1024;

/// A parsed subject identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Email(String),
    IssSub {
        iss: String,
        sub: String,
    },
    Opaque(String),
    JwtId {
        iss: String,
        jti: String,
    },
    Complex(Box<Complex>),
    /// A format the agent does not match on (`phone_number`, `account`, `did`, `uri`,
    /// `aliases`, …): the event is acknowledged and ignored.
    Unsupported(String),
}

/// The members of a complex subject the agent can hold a session to. Every present member
/// must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Complex {
    pub user: Option<Subject>,
    pub device: Option<Subject>,
    pub session: Option<Subject>,
    pub tenant: Option<Subject>,
}

/// What a simple subject names, when it is not inside a complex one: the user for most
/// events, the device for `device-compliance-change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Device,
    Session,
    Tenant,
}

/// Why a subject cannot be used; the SET is refused `invalid_request` with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSubject(pub String);

fn string(m: &Map<String, Value>, member: &str, format: &str) -> Result<String, BadSubject> {
    match m.get(member) {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_ID_CHARS => {
            Ok(s.clone())
        }
        Some(Value::String(_)) => Err(BadSubject(format!(
            "the {format} subject's {member:?} is empty or longer than {MAX_ID_CHARS} characters"
        ))),
        _ => Err(BadSubject(format!(
            "the {format} subject has no string {member:?}"
        ))),
    }
}

impl Subject {
    /// Parses a subject identifier object.
    ///
    /// # Errors
    /// A known format without its members, or a complex subject with a member the agent
    /// cannot hold a session to (`application`, `org_unit`, `group`, …): ignoring such a
    /// member would widen the match beyond what the transmitter named, so the event is
    /// refused instead (a critical member the agent cannot process).
    pub fn parse(value: &Value) -> Result<Subject, BadSubject> {
        Self::parse_at(value, true)
    }

    fn parse_at(value: &Value, top: bool) -> Result<Subject, BadSubject> {
        let Value::Object(m) = value else {
            return Err(BadSubject("a subject must be a JSON object".into()));
        };
        let format = match m.get("format") {
            Some(Value::String(f)) => f.as_str(),
            _ if top && m.keys().any(|k| COMPLEX_MEMBERS.contains(&k.as_str())) => "complex",
            _ => return Err(BadSubject("the subject has no string \"format\"".into())),
        };
        Ok(match format {
            "email" => Subject::Email(string(m, "email", format)?),
            "iss_sub" => Subject::IssSub {
                iss: string(m, "iss", format)?,
                sub: string(m, "sub", format)?,
            },
            "opaque" => Subject::Opaque(string(m, "id", format)?),
            "jwt_id" => Subject::JwtId {
                iss: string(m, "iss", format)?,
                jti: string(m, "jti", format)?,
            },
            "complex" if top => {
                let mut c = Complex::default();
                for (name, member) in m {
                    let slot = match name.as_str() {
                        "format" => continue,
                        "user" => &mut c.user,
                        "device" => &mut c.device,
                        "session" => &mut c.session,
                        "tenant" => &mut c.tenant,
                        other => {
                            let shown: String = other.chars().take(64).collect();
                            return Err(BadSubject(format!(
                                "the complex subject's member {shown:?} cannot be matched by \
                                 this agent, and ignoring it would widen the event's reach"
                            )));
                        }
                    };
                    *slot = Some(Self::parse_at(member, false)?);
                }
                if c == Complex::default() {
                    return Err(BadSubject("the complex subject has no member".into()));
                }
                Subject::Complex(Box::new(c))
            }
            "complex" => return Err(BadSubject("a complex subject inside a complex one".into())),
            other => Subject::Unsupported(other.chars().take(64).collect()),
        })
    }

    /// The format name, for audit records.
    pub fn format(&self) -> &str {
        match self {
            Subject::Email(_) => "email",
            Subject::IssSub { .. } => "iss_sub",
            Subject::Opaque(_) => "opaque",
            Subject::JwtId { .. } => "jwt_id",
            Subject::Complex(_) => "complex",
            Subject::Unsupported(f) => f,
        }
    }

    /// A short description for audit records and `sessions show`.
    pub fn describe(&self) -> String {
        match self {
            Subject::Email(e) => format!("email {e}"),
            Subject::IssSub { iss, sub } => format!("iss_sub {iss} {sub}"),
            Subject::Opaque(id) => format!("opaque {id}"),
            Subject::JwtId { iss, jti } => format!("jwt_id {iss} {jti}"),
            Subject::Complex(c) => {
                let parts: Vec<String> = [
                    ("user", &c.user),
                    ("device", &c.device),
                    ("session", &c.session),
                    ("tenant", &c.tenant),
                ]
                .into_iter()
                .filter_map(|(n, s)| s.as_ref().map(|s| format!("{n}: {}", s.describe())))
                .collect();
                format!("complex {{{}}}", parts.join("; "))
            }
            Subject::Unsupported(f) => format!("unsupported format {f}"),
        }
    }

    /// Whether the agent can match this subject at all.
    pub fn is_supported(&self) -> bool {
        match self {
            Subject::Unsupported(_) => false,
            Subject::Complex(c) => [&c.user, &c.device, &c.session, &c.tenant]
                .into_iter()
                .flatten()
                .all(Subject::is_supported),
            _ => true,
        }
    }

    /// The user this subject names (for cut-offs and locks), if it names one: a simple user
    /// subject, or a complex subject's `user` member.
    pub fn user(&self, role: Role) -> Option<&Subject> {
        match self {
            Subject::Complex(c) => c.user.as_ref(),
            Subject::Unsupported(_) => None,
            simple if role == Role::User => Some(simple),
            _ => None,
        }
    }

    /// The device id this subject names, if it names one.
    pub fn device_id(&self, role: Role) -> Option<&str> {
        let device = match self {
            Subject::Complex(c) => c.device.as_ref()?,
            simple if role == Role::Device => simple,
            _ => return None,
        };
        match device {
            Subject::Opaque(id) => Some(id),
            Subject::IssSub { sub, .. } => Some(sub),
            _ => None,
        }
    }

    /// Where the sessions this subject may name are to be looked for: the identity index
    /// for an email, an `iss_sub` or a device (a complex subject's user member first, then
    /// its device member); every session for what the index does not cover (a claim of the
    /// transmitter's mapping). [`Subject::matches`] decides among them.
    pub fn lookup(&self, role: Role) -> Lookup<'_> {
        match (role, self) {
            (_, Subject::Complex(c)) => [(&c.user, Role::User), (&c.device, Role::Device)]
                .into_iter()
                .filter_map(|(member, role)| member.as_ref().map(|m| m.lookup(role)))
                .find(|l| *l != Lookup::Everywhere)
                .unwrap_or(Lookup::Everywhere),
            (Role::User, Subject::Email(e)) => Lookup::Named(vec![Name::User(e)]),
            (Role::User, Subject::IssSub { sub, .. }) => Lookup::Named(vec![Name::Subject(sub)]),
            (Role::Device, Subject::Opaque(v) | Subject::IssSub { sub: v, .. }) => {
                Lookup::Named(vec![Name::Device(v)])
            }
            _ => Lookup::Everywhere,
        }
    }

    /// Whether `session` is one this subject names; a simple subject names a `role`.
    pub fn matches(&self, session: &Session, role: Role, map: &SubjectMapping) -> bool {
        match self {
            Subject::Complex(c) => [
                (&c.user, Role::User),
                (&c.device, Role::Device),
                (&c.session, Role::Session),
                (&c.tenant, Role::Tenant),
            ]
            .into_iter()
            .all(|(member, role)| {
                member
                    .as_ref()
                    .is_none_or(|m| m.matches_simple(&session.identity, role, map))
            }),
            simple => simple.matches_simple(&session.identity, role, map),
        }
    }

    fn matches_simple(&self, id: &Identity, role: Role, map: &SubjectMapping) -> bool {
        let claim_has = |path, want: &str| id.claim_values(path).iter().any(|v| v == want);
        match (role, self) {
            (Role::User, Subject::Email(e)) => id
                .email
                .as_deref()
                .is_some_and(|mine| mine.eq_ignore_ascii_case(e)),
            (Role::User, Subject::IssSub { iss, sub }) => id.issuer == *iss && id.subject == *sub,
            (Role::User, Subject::Opaque(v)) => claim_has(&map.opaque, v),
            (Role::User | Role::Session, Subject::JwtId { iss, jti }) => {
                id.issuer == *iss && claim_has(&map.jwt_id, jti)
            }
            (Role::Device, Subject::Opaque(v) | Subject::IssSub { sub: v, .. }) => {
                id.device.id.as_deref() == Some(v.as_str())
            }
            (Role::Session, Subject::Opaque(v)) => claim_has(&map.session, v),
            (Role::Tenant, Subject::Opaque(v) | Subject::IssSub { sub: v, .. }) => {
                claim_has(&map.tenant, v)
            }
            _ => false,
        }
    }
}

const COMPLEX_MEMBERS: [&str; 4] = ["user", "device", "session", "tenant"];

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;
    use crate::{
        identity::test_identity,
        sessions::model::{SessionId, SessionSettings, SessionState},
    };

    fn session() -> Session {
        let mut identity = test_identity("alice@corp.test", &["staff"]);
        identity.subject = "u-1".into();
        identity.issuer = "https://idp.test".into();
        identity.device.id = Some("laptop-7".into());
        identity.claims.insert("sid".into(), json!("s-9"));
        identity.claims.insert("jti".into(), json!("t-3"));
        identity.claims.insert("tid".into(), json!("corp"));
        identity.claims.insert("sub".into(), json!("u-1"));
        Session {
            id: SessionId(1),
            state: SessionState::Active,
            identity,
            source: Ipv4Addr::LOCALHOST.into(),
            previous_sources: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            expires_at_ms: u64::MAX,
            dormant_since_ms: None,
            grants: Vec::new(),
            settings: SessionSettings {
                max_duration_secs: 1,
                idle_timeout_secs: 1,
                dormant_timeout_secs: 1,
                reconnect: false,
            },
            reconnect: None,
            ended: None,
        }
    }

    fn matches(v: Value, role: Role) -> bool {
        Subject::parse(&v)
            .expect("parses")
            .matches(&session(), role, &SubjectMapping::default())
    }

    #[test]
    fn each_format_matches_its_claim() {
        let u = Role::User;
        assert!(matches(
            json!({"format": "email", "email": "ALICE@corp.test"}),
            u
        ));
        assert!(!matches(
            json!({"format": "email", "email": "bob@corp.test"}),
            u
        ));
        assert!(matches(
            json!({"format": "iss_sub", "iss": "https://idp.test", "sub": "u-1"}),
            u
        ));
        assert!(!matches(
            json!({"format": "iss_sub", "iss": "https://other", "sub": "u-1"}),
            u
        ));
        assert!(matches(json!({"format": "opaque", "id": "u-1"}), u));
        assert!(matches(
            json!({"format": "jwt_id", "iss": "https://idp.test", "jti": "t-3"}),
            u
        ));
        assert!(!matches(
            json!({"format": "jwt_id", "iss": "https://idp.test", "jti": "t-4"}),
            u
        ));
        assert!(matches(
            json!({"format": "opaque", "id": "laptop-7"}),
            Role::Device
        ));
        assert!(!matches(json!({"format": "opaque", "id": "laptop-7"}), u));
        assert!(matches(
            json!({"format": "complex",
                   "user": {"format": "email", "email": "alice@corp.test"},
                   "device": {"format": "opaque", "id": "laptop-7"},
                   "session": {"format": "opaque", "id": "s-9"},
                   "tenant": {"format": "opaque", "id": "corp"}}),
            u
        ));
        assert!(
            !matches(
                json!({"format": "complex",
                       "user": {"format": "email", "email": "alice@corp.test"},
                       "device": {"format": "opaque", "id": "desktop-1"}}),
                u
            ),
            "every member must match"
        );
    }

    /// The index lookup must be a superset of what `matches` accepts: every session a
    /// subject matches is filed under the names its lookup gives.
    #[test]
    fn each_subject_is_looked_for_under_a_name_of_the_session_it_matches() {
        let named = |v: Value, role: Role| -> Lookup<'static> {
            let subject: &'static Subject =
                Box::leak(Box::new(Subject::parse(&v).expect("parses")));
            subject.lookup(role)
        };
        assert_eq!(
            named(
                json!({"format": "email", "email": "ALICE@corp.test"}),
                Role::User
            ),
            Lookup::Named(vec![Name::User("ALICE@corp.test")])
        );
        assert_eq!(
            named(
                json!({"format": "iss_sub", "iss": "https://idp.test", "sub": "u-1"}),
                Role::User
            ),
            Lookup::Named(vec![Name::Subject("u-1")])
        );
        assert_eq!(
            named(json!({"format": "opaque", "id": "laptop-7"}), Role::Device),
            Lookup::Named(vec![Name::Device("laptop-7")])
        );
        assert_eq!(
            named(json!({"format": "opaque", "id": "u-1"}), Role::User),
            Lookup::Everywhere,
            "an opaque user id is a claim of the mapping's choosing"
        );
        assert_eq!(
            named(
                json!({"format": "complex",
                       "session": {"format": "opaque", "id": "s-9"},
                       "device": {"format": "opaque", "id": "laptop-7"}}),
                Role::User
            ),
            Lookup::Named(vec![Name::Device("laptop-7")])
        );
        assert_eq!(
            named(
                json!({"format": "complex", "session": {"format": "opaque", "id": "s-9"}}),
                Role::User
            ),
            Lookup::Everywhere
        );
    }

    #[test]
    fn bad_and_unsupported_subjects() {
        for bad in [
            json!("alice"),
            json!({"email": "x"}),
            json!({"format": "email"}),
            json!({"format": "iss_sub", "iss": "x"}),
            json!({"format": "opaque", "id": ""}),
            json!({"format": "complex"}),
            json!({"format": "complex", "application": {"format": "opaque", "id": "a"}}),
            json!({"format": "complex", "user": {"format": "complex",
                   "user": {"format": "opaque", "id": "a"}}}),
        ] {
            assert!(Subject::parse(&bad).is_err(), "{bad}");
        }
        let phone = Subject::parse(&json!({"format": "phone_number", "phone_number": "+1"}))
            .expect("parses");
        assert!(!phone.is_supported());
        assert!(!phone.matches(&session(), Role::User, &SubjectMapping::default()));
        let device = Subject::parse(&json!({"format": "complex",
            "device": {"format": "opaque", "id": "laptop-7"}}))
        .expect("parses");
        assert_eq!(device.device_id(Role::User), Some("laptop-7"));
        assert!(device.user(Role::User).is_none());
    }
}
