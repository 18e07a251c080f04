//! Claim paths: how a config or a policy names a claim, top-level or nested, so that posture in
//! `device: {managed: true}` and namespaced names like `https://corp.example/claims/groups`
//! can both be read.
//!
//! Syntax (docs/configuration.md, "Claim paths"):
//! - a value starting with `/` is a JSON Pointer (RFC 6901): `/device/managed`; `~1` stands
//!   for `/` and `~0` for `~` inside a name, so `/device.managed` is the top-level claim named
//!   `device.managed`;
//! - any other value is one top-level claim name, taken literally
//!   (`https://corp.example/claims/groups`, `cognito:groups`), except that a bare name with a
//!   dot and no slash (`device.managed`) is refused as ambiguous: it is the commonest way of
//!   meaning a nested claim, and read literally it would silently never match;
//! - where the pointer meets an array and its next segment is not an index, the rest of the
//!   path is applied to every item (`/roles/name` over `roles: [{name: "ops"}, …]` gives every
//!   name).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A parsed claim path; its text is kept for messages and for display.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClaimPath {
    text: String,
    segments: Vec<String>,
}

impl ClaimPath {
    /// Parses a claim path (see the module docs).
    ///
    /// # Errors
    /// Why the text is not a path, for an operator.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must name a claim, not be empty".into());
        }
        let Some(pointer) = text.strip_prefix('/') else {
            if text.contains('.') && !text.contains('/') {
                return Err(format!(
                    "{text:?} is ambiguous: write \"/{}\" for the nested claim, or \"/{text}\" \
                     for a top-level claim with a dot in its name",
                    text.replace('.', "/")
                ));
            }
            return Ok(Self {
                text: text.to_owned(),
                segments: vec![text.to_owned()],
            });
        };
        let mut segments = Vec::new();
        for raw in pointer.split('/') {
            let mut name = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                match (c, c == '~') {
                    (_, false) => name.push(c),
                    (_, true) => match chars.next() {
                        Some('0') => name.push('~'),
                        Some('1') => name.push('/'),
                        _ => {
                            return Err(format!(
                                "{text:?}: `~` must be followed by 0 (for ~) or 1 (for /)"
                            ));
                        }
                    },
                }
            }
            segments.push(name);
        }
        if segments[0].is_empty() {
            return Err(format!("{text:?} names no claim after the leading /"));
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    /// A path to one top-level claim, whatever its name holds.
    pub fn top(name: &str) -> Self {
        Self {
            text: name.to_owned(),
            segments: vec![name.to_owned()],
        }
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The top-level claim the path starts at.
    pub fn claim(&self) -> &str {
        &self.segments[0]
    }

    /// The segments after the top-level claim.
    pub(crate) fn rest(&self) -> &[String] {
        &self.segments[1..]
    }

    /// Follows the rest of the path from the top-level claim's value.
    pub(crate) fn descend(&self, top: Value) -> Option<Value> {
        descend(top, self.rest())
    }

    /// Follows the whole path in a claims object.
    pub fn lookup(&self, claims: &serde_json::Map<String, Value>) -> Option<Value> {
        descend(claims.get(self.claim())?.clone(), self.rest())
    }
}

fn descend(value: Value, rest: &[String]) -> Option<Value> {
    let Some((first, more)) = rest.split_first() else {
        return Some(value);
    };
    match value {
        Value::Object(mut map) => descend(map.remove(first)?, more),
        Value::Array(items) => match first.parse::<usize>() {
            Ok(i) if !first.starts_with('+') => descend(items.into_iter().nth(i)?, more),
            // An array of objects: the rest of the path, in every item that has it.
            _ => {
                let mut found = Vec::new();
                for item in items {
                    match descend(item, rest) {
                        Some(Value::Array(inner)) => found.extend(inner),
                        Some(v) => found.push(v),
                        None => {}
                    }
                }
                (!found.is_empty()).then_some(Value::Array(found))
            }
        },
        _ => None,
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl Serialize for ClaimPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ClaimPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(path: &str, claims: Value) -> Option<Value> {
        let Value::Object(map) = claims else {
            panic!("claims must be an object")
        };
        ClaimPath::parse(path).expect("parses").lookup(&map)
    }

    #[test]
    fn pointers_names_and_escapes() {
        let claims = json!({
            "device": {"managed": true, "os": "linux"},
            "device.managed": false,
            "https://corp.example/claims/groups": ["ops"],
            "a/b": {"c~d": 1},
            "roles": [{"name": "ops"}, {"name": "dev"}, {"other": 1}],
            "nested": [{"tags": ["x", "y"]}, {"tags": ["z"]}],
        });
        assert_eq!(at("/device/managed", claims.clone()), Some(json!(true)));
        assert_eq!(at("/device.managed", claims.clone()), Some(json!(false)));
        assert_eq!(
            at("https://corp.example/claims/groups", claims.clone()),
            Some(json!(["ops"]))
        );
        assert_eq!(
            at("/https:~1~1corp.example~1claims~1groups/0", claims.clone()),
            Some(json!("ops"))
        );
        assert_eq!(at("/a~1b/c~0d", claims.clone()), Some(json!(1)));
        assert_eq!(
            at("/roles/name", claims.clone()),
            Some(json!(["ops", "dev"]))
        );
        assert_eq!(at("/roles/1/name", claims.clone()), Some(json!("dev")));
        assert_eq!(
            at("/nested/tags", claims.clone()),
            Some(json!(["x", "y", "z"]))
        );
        assert_eq!(at("/device/missing", claims.clone()), None);
        assert_eq!(at("/device/managed/deeper", claims.clone()), None);
        assert_eq!(at("/roles/9", claims), None);
    }

    #[test]
    fn unparseable_paths_are_refused_with_a_hint() {
        for (bad, want) in [
            ("", "must name a claim"),
            ("/", "names no claim"),
            ("/device/~2x", "`~` must be followed by 0"),
            ("/a~", "`~` must be followed by 0"),
            (
                "device.managed",
                "write \"/device/managed\" for the nested claim",
            ),
        ] {
            let err = ClaimPath::parse(bad).expect_err(bad);
            assert!(err.contains(want), "{bad:?}: {err}");
        }
        assert_eq!(
            ClaimPath::parse("cognito:groups").unwrap().claim(),
            "cognito:groups"
        );
        assert_eq!(ClaimPath::top("device.managed").claim(), "device.managed");
    }
}
