//! One policy file as written: its TOML tables, and TOML errors turned into
//! `file:line: field: problem` that name the key an operator has to fix.

use std::{ops::Range, path::Path};

use serde::Deserialize;

use super::{PolicyError, resource::ResourceDef, rules::RuleDef};

/// The tables a policy file may hold; anything else is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    #[serde(default)]
    pub resource: Vec<ResourceDef>,
    #[serde(default)]
    pub rule: Vec<RuleDef>,
}

/// A file's path and text, to turn spans into `file:line` locations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// `file:line` of a span's start.
    pub fn at(&self, span: Range<usize>) -> String {
        format!("{}:{}", self.path.display(), line_of(self.text, span.start))
    }

    pub fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> PolicyError {
        PolicyError::Invalid {
            location: self.at(span),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Parses the file; a TOML or schema error keeps its line and says which key it is about.
    pub fn parse(&self) -> Result<PolicyFile, PolicyError> {
        // Syntax first: its errors are about the text (toml points past the mistake, often at
        // the next key), so they are not pinned on a key; schema errors are.
        let (e, syntax) = match self.text.parse::<toml::Table>() {
            Err(e) => (e, true),
            Ok(_) => match toml::from_str::<PolicyFile>(self.text) {
                Ok(file) => return Ok(file),
                Err(e) => (e, false),
            },
        };
        // toml's messages span lines ("invalid array\nexpected `]`"); ours are one line.
        let message = match e.message().trim() {
            "" => unexplained(self.text, e.span()),
            m => m.replace('\n', ": "),
        };
        let Some(span) = e.span() else {
            return Err(PolicyError::Invalid {
                location: self.path.display().to_string(),
                field: "toml".into(),
                problem: message,
            });
        };
        let (field, problem) = if syntax && !message.starts_with("duplicate key") {
            ("toml".to_owned(), message)
        } else {
            describe(self.text, span.start, &message)
        };
        Err(self.invalid(span, field, problem))
    }
}

/// What is wrong where toml says nothing: it gives no message for a control character in a
/// comment (found by the `policy` fuzz target), and an operator needs one.
fn unexplained(text: &str, span: Option<Range<usize>>) -> String {
    let at = span.and_then(|s| text.get(s.start..)?.chars().next());
    match at {
        Some(c) if c.is_control() => format!(
            "control character {c:?} (U+{:04X}) is not allowed in TOML, even in a comment",
            u32::from(c)
        ),
        Some(c) => format!("unexpected {c:?}"),
        None => "invalid TOML".into(),
    }
}

/// Whether `name` is a valid resource or rule name: 1 to 64 of a-z, 0-9, '-' and '_'.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The field path (`rule.device.os`) and problem for a toml error at `offset`. toml reports
/// spans, not key paths, so the path is read back from the text: the table header above the
/// error and the key of its line. Ordinary policy files (headers on their own lines, inline
/// tables on one line) come out exact; anything stranger still gets the right line.
fn describe(text: &str, offset: usize, message: &str) -> (String, String) {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let header = header_of(line);
    // On a header line the error is about the header's own table (`[rule.devise]`, or a
    // missing key of `[[rule]]`); elsewhere, about a key of the table above.
    let table = header.or_else(|| text[..line_start].lines().rev().find_map(header_of));
    let key = if header.is_some() { None } else { key_of(line) };
    let join = |parts: &[Option<&str>]| {
        // An empty quoted key (`"" = 0`) is shown as written, not as nothing (found by
        // the `policy` fuzz target: the field came out empty).
        let path: Vec<&str> = parts
            .iter()
            .flatten()
            .map(|p| if p.is_empty() { "\"\"" } else { p })
            .collect();
        if path.is_empty() {
            "toml".to_owned()
        } else {
            path.join(".")
        }
    };

    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, allowed)) = rest.split_once('`')
    {
        // `foo = 1` names the unknown key itself; `device = { bar = 1 }` names its table.
        let field = match (header, key) {
            (Some(h), _) => h.to_owned(),
            (None, Some(k)) if k == name || k.ends_with(&format!(".{name}")) => {
                join(&[table, Some(k)])
            }
            (None, Some(k)) => join(&[table, Some(k), Some(name)]),
            (None, None) => join(&[table, Some(name)]),
        };
        let problem = format!("unknown key{allowed}");
        return (field, problem);
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((name, _)) = rest.split_once('`')
    {
        return (
            join(&[table, Some(name)]),
            "missing: this key is required".into(),
        );
    }
    (join(&[table, key]), message.to_owned())
}

/// `rule.device` for `[rule.device]` or `[[rule]]` (comments and spaces allowed).
fn header_of(line: &str) -> Option<&str> {
    let inner = line.trim_start().strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let end = inner.find(']')?;
    let name = inner[..end].trim();
    (!name.is_empty()).then_some(name)
}

/// The (possibly dotted) key of a `key = value` line.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    bare.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Source {
            path: Path::new("p.toml"),
            text,
        }
        .parse()
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn toml_errors_name_the_key() {
        assert_eq!(
            error("[[rule]]\nname = 'a'\nresources = ['x']\nfoo = 1\n"),
            "p.toml:4: rule.foo: unknown key, expected one of `name`, `resources`, `users`, \
             `groups`, `everyone`, `claims`, `device`, `session`, `sources`"
        );
        assert_eq!(
            error(
                "[[rule]]\nname = 'a'\nresources = ['x']\n[rule.device]\nmanaged = true\nbar = 1\n"
            ),
            "p.toml:6: rule.device.bar: unknown key, expected one of `managed`, `compliant`, `os`"
        );
        assert_eq!(
            error(
                "[[rule]]\nname = 'a'\nresources = ['x']\ndevice = { managed = true, baz = 1 }\n"
            ),
            "p.toml:4: rule.device.baz: unknown key, expected one of `managed`, `compliant`, `os`"
        );
        assert_eq!(
            error("[[rule]]\nname = 'a'\nresources = ['x']\n[rule.devise]\n"),
            "p.toml:4: rule.devise: unknown key, expected one of `name`, `resources`, `users`, \
             `groups`, `everyone`, `claims`, `device`, `session`, `sources`"
        );
        assert_eq!(
            error("[[rules]]\nname = 'a'\n"),
            "p.toml:1: rules: unknown key, expected `resource` or `rule`"
        );
        assert_eq!(
            error("\"\"=0#"),
            "p.toml:1: \"\": unknown key, expected `resource` or `rule`"
        );
        assert_eq!(
            error("# rules\n\n[[rule]]\nname = 'a'\n"),
            "p.toml:3: rule.resources: missing: this key is required"
        );
        assert_eq!(
            error("[[rule]]\nname = 'a'\nresources = ['x']\neveryone = 'yes'\n"),
            "p.toml:4: rule.everyone: invalid type: string \"yes\", expected a boolean"
        );
        assert_eq!(
            error("[[rule]]\nname = 'a'\nname = 'b'\n"),
            "p.toml:3: rule.name: duplicate key `name` in table `rule`"
        );
        assert_eq!(
            error("[[rule]]\nname = 'a'\nresources = ['x'\n"),
            "p.toml:4: toml: invalid array: expected `]`"
        );
        // toml has no message for this one; the fuzz target found the empty problem.
        assert_eq!(
            error("# rules \u{1}\n[[rule]]\n"),
            "p.toml:1: toml: control character '\\u{1}' (U+0001) is not allowed in TOML, even \
             in a comment"
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("ops-ssh_2"));
        for bad in ["", "Ops", "a b", "é", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
