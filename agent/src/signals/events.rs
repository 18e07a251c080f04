//! The event types the receiver knows (CAEP 1.0, RISC 1.0, SSF 1.0 stream events) and what
//! each one's payload says, read into a typed event the receiver acts on.

use serde_json::{Map, Value};

const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";
const SSF: &str = "https://schemas.openid.net/secevent/ssf/event-type/";

/// Every event type the receiver acts on, for stream configuration (`events_requested`).
pub const REQUESTED: [&str; 10] = [
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
    "https://schemas.openid.net/secevent/caep/event-type/credential-change",
    "https://schemas.openid.net/secevent/caep/event-type/device-compliance-change",
    "https://schemas.openid.net/secevent/caep/event-type/token-claims-change",
    "https://schemas.openid.net/secevent/caep/event-type/assurance-level-change",
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
    "https://schemas.openid.net/secevent/risc/event-type/account-purged",
    "https://schemas.openid.net/secevent/risc/event-type/credential-compromise",
    "https://schemas.openid.net/secevent/ssf/event-type/verification",
    "https://schemas.openid.net/secevent/ssf/event-type/stream-updated",
];

/// A known event, with the payload members that decide what it does.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    SessionRevoked,
    /// `change_type` of a `credential-change` (`create`, `revoke`, `update`, `delete`).
    CredentialChange {
        change_type: String,
    },
    DeviceCompliance {
        compliant: bool,
    },
    TokenClaims {
        claims: Map<String, Value>,
    },
    AssuranceLevel {
        current_level: String,
    },
    AccountDisabled,
    AccountPurged,
    CredentialCompromise,
    /// SSF §8.1.4: `state` echoes what the receiver asked for.
    Verification {
        state: Option<String>,
    },
    /// SSF §8.1.5: the transmitter changed the stream's status.
    StreamUpdated {
        status: String,
    },
    Unknown,
}

/// The short name of an event type URI (`session-revoked`), or the URI for unknown ones.
pub fn short_name(uri: &str) -> String {
    for prefix in [CAEP, RISC, SSF] {
        if let Some(name) = uri.strip_prefix(prefix) {
            return name.to_owned();
        }
    }
    uri.chars().take(128).collect()
}

/// Why a known event's payload cannot be acted on (refused `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEvent(pub String);

fn text(event: &Map<String, Value>, member: &str, name: &str) -> Result<String, BadEvent> {
    match event.get(member) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.chars().take(256).collect()),
        _ => Err(BadEvent(format!("{name} needs a string {member:?}"))),
    }
}

impl Event {
    /// Reads the event of type `uri` from its payload.
    ///
    /// # Errors
    /// A known event without the members that say what it means.
    pub fn read(uri: &str, event: &Map<String, Value>) -> Result<Event, BadEvent> {
        let name = short_name(uri);
        let known = uri.starts_with(CAEP) || uri.starts_with(RISC) || uri.starts_with(SSF);
        if !known {
            return Ok(Event::Unknown);
        }
        Ok(
            match (uri.starts_with(CAEP), uri.starts_with(RISC), name.as_str()) {
                (true, _, "session-revoked") => Event::SessionRevoked,
                (true, _, "credential-change") => Event::CredentialChange {
                    change_type: text(event, "change_type", &name)?,
                },
                (true, _, "device-compliance-change") => {
                    let status = text(event, "current_status", &name)?;
                    match status.as_str() {
                        "compliant" => Event::DeviceCompliance { compliant: true },
                        "not-compliant" => Event::DeviceCompliance { compliant: false },
                        other => {
                            return Err(BadEvent(format!(
                                "{name}: current_status {other:?} is neither compliant nor not-compliant"
                            )));
                        }
                    }
                }
                (true, _, "token-claims-change") => match event.get("claims") {
                    Some(Value::Object(c)) if !c.is_empty() => {
                        Event::TokenClaims { claims: c.clone() }
                    }
                    _ => return Err(BadEvent(format!("{name} needs a non-empty claims object"))),
                },
                (true, _, "assurance-level-change") => Event::AssuranceLevel {
                    current_level: text(event, "current_level", &name)?,
                },
                (_, true, "account-disabled") => Event::AccountDisabled,
                (_, true, "account-purged") => Event::AccountPurged,
                (_, true, "credential-compromise") => Event::CredentialCompromise,
                (false, false, "verification") => Event::Verification {
                    state: event
                        .get("state")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                },
                (false, false, "stream-updated") => Event::StreamUpdated {
                    status: text(event, "status", &name)?,
                },
                _ => Event::Unknown,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(uri: &str, v: Value) -> Result<Event, BadEvent> {
        Event::read(uri, v.as_object().expect("object"))
    }

    #[test]
    fn events_are_read_by_type() {
        assert_eq!(read(REQUESTED[0], json!({})), Ok(Event::SessionRevoked));
        assert_eq!(
            read(
                REQUESTED[2],
                json!({"current_status": "not-compliant", "previous_status": "compliant"})
            ),
            Ok(Event::DeviceCompliance { compliant: false })
        );
        assert!(read(REQUESTED[2], json!({"current_status": "meh"})).is_err());
        assert!(read(REQUESTED[1], json!({})).is_err());
        assert!(read(REQUESTED[3], json!({"claims": {}})).is_err());
        assert_eq!(read(REQUESTED[5], json!({})), Ok(Event::AccountDisabled));
        assert_eq!(
            read(REQUESTED[8], json!({"state": "abc"})),
            Ok(Event::Verification {
                state: Some("abc".into())
            })
        );
        assert_eq!(
            read("https://example.com/my-event", json!({})),
            Ok(Event::Unknown)
        );
        assert_eq!(
            read(
                "https://schemas.openid.net/secevent/caep/event-type/risk-level-change",
                json!({})
            ),
            Ok(Event::Unknown)
        );
        assert_eq!(short_name(REQUESTED[7]), "credential-compromise");
    }
}
