//! The method list against the typed parser, the access rules, and `docs/status-socket.md`.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::{
    api::{
        answers::ModeName,
        jsonrpc::parse_line,
        request::{DatapathMode as ModeParams, Empty, Proto, Terminate, Whois as WhoisParams},
    },
    sessions::model::SessionId,
};

const DOC: &str = include_str!("../../../../docs/status-socket.md");

fn call(method: &str, params: Value) -> Call {
    Call {
        id: json!(1),
        method: method.into(),
        params,
    }
}

#[test]
fn methods_parse_into_typed_requests() {
    assert_eq!(
        Request::parse(&call("status", Value::Null)).unwrap(),
        Request::Status(Empty {})
    );
    let r = Request::parse(&call(
        "sessions.terminate",
        json!({"ids": ["00000000000000ff"], "reason": "left the company"}),
    ))
    .unwrap();
    assert_eq!(
        r,
        Request::SessionsTerminate(Terminate {
            ids: vec![SessionId(0xff)],
            user: None,
            reason: Some("left the company".into()),
            ..Terminate::default()
        })
    );
    assert_eq!(r.method(), "sessions.terminate");
    let r = Request::parse(&call(
        "whois",
        json!({"a": "10.0.0.7:51514", "b": "10.0.0.2:22"}),
    ))
    .unwrap();
    assert!(matches!(
        r,
        Request::Whois(WhoisParams {
            protocol: Proto::Tcp,
            ..
        })
    ));
}

#[test]
fn unknown_methods_and_bad_params_say_what_is_wrong() {
    let e = Request::parse(&call("sessions.nuke", json!({}))).unwrap_err();
    assert_eq!(e.code, METHOD_NOT_FOUND);
    assert!(e.message.contains("sessions.terminate"), "{}", e.message);
    let e = Request::parse(&call("sessions.get", json!({"id": "zz"}))).unwrap_err();
    assert_eq!(e.code, INVALID_PARAMS);
    assert!(e.message.contains("not a session id"), "{}", e.message);
    let e = Request::parse(&call("sessions.list", json!({"colour": "red"}))).unwrap_err();
    assert_eq!(e.code, INVALID_PARAMS);
    assert!(e.message.contains("colour"), "{}", e.message);
    let e = Request::parse(&call("sessions.get", json!([1, 2]))).unwrap_err();
    assert_eq!(e.code, INVALID_PARAMS);
    let e = Request::parse(&call("datapath.mode", json!({"mode": "off"}))).unwrap_err();
    assert!(
        e.message
            .starts_with("invalid params for datapath.mode: unknown variant `off`"),
        "{}",
        e.message
    );
}

/// Every method's access, exactly: admin for what changes state, read for the rest, and
/// `datapath.mode` admin only when it is given a mode.
#[test]
fn access_is_exact_per_method_and_per_call() {
    let want = [
        ("status", json!({}), Access::Read),
        ("sessions.list", json!({}), Access::Read),
        ("sessions.get", json!({"id": "1"}), Access::Read),
        ("sessions.terminate", json!({"user": "a"}), Access::Admin),
        ("flows.list", json!({}), Access::Read),
        (
            "whois",
            json!({"a": "10.0.0.1:1", "b": "10.0.0.2:2"}),
            Access::Read,
        ),
        ("audit.query", json!({}), Access::Read),
        ("audit.subscribe", json!({}), Access::Read),
        ("policy.reload", json!({}), Access::Admin),
        ("policy.check", json!({}), Access::Read),
        ("policy.explain", json!({"user": "a"}), Access::Read),
        ("datapath.mode", json!({}), Access::Read),
        ("datapath.mode", json!({"mode": "monitor"}), Access::Admin),
        ("datapath.mode", json!({"mode": "enforce"}), Access::Admin),
        (
            "lock.add",
            json!({"target": {"user": "a@corp.example"}}),
            Access::Admin,
        ),
        ("lock.list", json!({}), Access::Read),
        ("lock.show", json!({"id": "lk-1"}), Access::Read),
        ("lock.remove", json!({"id": "lk-1"}), Access::Admin),
        ("signals.status", json!({}), Access::Read),
        (
            "console.refused",
            json!({"by": "r", "action": "a", "reason": "x"}),
            Access::Admin,
        ),
    ];
    for (method, params, access) in want.clone() {
        let r = Request::parse(&call(method, params.clone())).unwrap();
        assert_eq!(r.access(), access, "{method} {params}");
    }
    let covered: BTreeSet<&str> = want.iter().map(|(m, _, _)| *m).collect();
    let all: BTreeSet<&str> = METHODS.iter().map(|m| m.name).collect();
    assert_eq!(covered, all, "every method's access is pinned here");
    assert_eq!(
        DatapathMode::access(&ModeParams {
            mode: Some(ModeName::Monitor)
        }),
        Access::Admin
    );
    assert!(streams("audit.subscribe") && !streams("status") && !streams("nope"));
}

/// `### \`name\` (label)` headings of the methods section.
fn documented_methods() -> Vec<(String, String)> {
    DOC.lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .map(|rest| {
            let (name, label) = rest.split_once("` (").expect("heading is `name` (access)");
            (
                name.to_owned(),
                label
                    .strip_suffix(')')
                    .expect("closing parenthesis")
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_docs_list_every_method_with_its_access_and_nothing_else() {
    let documented = documented_methods();
    let listed: Vec<(String, String)> = METHODS
        .iter()
        .map(|m| {
            let mut label = m.access.doc_label().to_owned();
            if m.streams {
                label.push_str(", streaming");
            }
            (m.name.to_owned(), label)
        })
        .collect();
    assert_eq!(
        documented, listed,
        "docs/status-socket.md headings (left) must match the method list (right), in order"
    );
}

/// The lines of every ```json block.
fn example_lines() -> Vec<Value> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in DOC.lines() {
        match line.trim() {
            "```json" => inside = true,
            "```" => inside = false,
            l if inside && !l.is_empty() => out.push(
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("example is not JSON ({e}): {l}")),
            ),
            _ => {}
        }
    }
    out
}

/// Keys of `v`, recursively, as paths (array elements share the path `[]`).
fn key_paths(v: &Value, at: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let path = format!("{at}.{k}");
                key_paths(v, &path, out);
                out.insert(path);
            }
        }
        Value::Array(a) => {
            for v in a {
                key_paths(v, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
}

fn elided(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.contains_key("…") || o.values().any(elided),
        Value::Array(a) => a.iter().any(elided),
        _ => false,
    }
}

/// A documented answer read as the method's typed result and written back has the same keys
/// at every level: nothing documented is missing from the type, nothing in it undocumented.
fn same_shape<M: Method>(documented: &Value) {
    let typed: M::Result = serde_json::from_value(documented.clone())
        .unwrap_or_else(|e| panic!("the documented answer of {} does not read: {e}", M::NAME));
    let back = serde_json::to_value(&typed).unwrap();
    let (mut want, mut got) = (BTreeSet::new(), BTreeSet::new());
    key_paths(documented, "", &mut want);
    key_paths(&back, "", &mut got);
    assert_eq!(
        want,
        got,
        "{}: documented keys vs the typed answer's",
        M::NAME
    );
}

fn check_answer(method: &str, result: &Value) {
    match method {
        "status" => same_shape::<Status>(result),
        "sessions.list" => same_shape::<SessionsList>(result),
        "sessions.get" => same_shape::<SessionsGet>(result),
        "sessions.terminate" => same_shape::<SessionsTerminate>(result),
        "flows.list" => same_shape::<FlowsList>(result),
        "whois" => same_shape::<Whois>(result),
        "audit.query" => same_shape::<AuditQuery>(result),
        "audit.subscribe" => same_shape::<AuditSubscribe>(result),
        "policy.reload" => same_shape::<PolicyReload>(result),
        "policy.check" => same_shape::<PolicyCheck>(result),
        "policy.explain" => same_shape::<PolicyExplain>(result),
        "datapath.mode" => same_shape::<DatapathMode>(result),
        "lock.add" => same_shape::<super::LockAdd>(result),
        "lock.list" => same_shape::<super::LockList>(result),
        "lock.show" => same_shape::<super::LockShow>(result),
        "lock.remove" => same_shape::<super::LockRemove>(result),
        "signals.status" => same_shape::<SignalsStatus>(result),
        "console.refused" => same_shape::<ConsoleRefused>(result),
        other => panic!("no answer check for {other}"),
    }
}

/// Every documented request parses into its typed request; every documented answer that is
/// written out in full has exactly the keys of the typed result; the documented error is the
/// error the parser gives, word for word.
#[test]
fn the_documented_examples_match_the_types() {
    let lines = example_lines();
    let mut requests = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(method) = line.get("method").and_then(Value::as_str) else {
            continue;
        };
        if line.get("id").is_none() {
            // A notification the agent sends: only audit events are documented.
            assert_eq!(method, crate::api::answers::AUDIT_EVENT, "{line}");
            serde_json::from_value::<AuditEvent>(line["params"].clone())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            continue;
        }
        requests += 1;
        let call = parse_line(line.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e:?}"));
        let answer = lines
            .get(i + 1)
            .filter(|a| a.get("id") == line.get("id"))
            .unwrap_or_else(|| panic!("{line}: no answer follows with the same id"));
        match (Request::parse(&call), answer.get("error")) {
            (Err(e), Some(documented)) => {
                assert_eq!(serde_json::to_value(&e).unwrap(), *documented, "{line}");
            }
            (Ok(_), None) => {
                let result = &answer["result"];
                if !elided(result) {
                    check_answer(method, result);
                }
            }
            (got, _) => panic!("{line}: documented {answer}, parsed {got:?}"),
        }
    }
    assert!(
        requests >= METHODS.len(),
        "every method has an example ({requests})"
    );
}
