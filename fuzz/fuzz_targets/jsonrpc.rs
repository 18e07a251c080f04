//! Fuzz target `jsonrpc`: one status-socket line through the JSON-RPC envelope parser and the
//! typed request parser, as the transport and the core use them. Every line becomes a typed
//! request or the JSON-RPC error it deserves, and every answer is one well-formed line that
//! echoes the request's id.

#![no_main]

use flowwarden::api::{
    jsonrpc::{self, INVALID_PARAMS, INVALID_REQUEST, Incoming, METHOD_NOT_FOUND, PARSE_ERROR},
    methods::{AccessRule, METHODS, Request},
    peer::Access,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|line: &[u8]| {
    match jsonrpc::parse(line) {
        Ok(Incoming::Call(call)) => {
            assert!(matches!(
                call.id,
                Value::Number(_) | Value::String(_) | Value::Null
            ));
            assert!(matches!(
                call.params,
                Value::Object(_) | Value::Array(_) | Value::Null
            ));
            assert_eq!(jsonrpc::parse_line(line).as_ref(), Ok(&call));
            match Request::parse(&call) {
                Ok(request) => {
                    let info = METHODS
                        .iter()
                        .find(|m| m.name == call.method)
                        .unwrap_or_else(|| panic!("parsed unknown method {:?}", call.method));
                    // A method listed as admin-only must always need admin access.
                    if info.access == AccessRule::Admin {
                        assert_eq!(request.access(), Access::Admin, "{}", call.method);
                    }
                    answer_is_a_line(&jsonrpc::response_ok(&call.id, Value::Null), &call.id);
                }
                Err(e) => {
                    let listed = METHODS.iter().any(|m| m.name == call.method);
                    let want = if listed {
                        INVALID_PARAMS
                    } else {
                        METHOD_NOT_FOUND
                    };
                    assert_eq!(e.code, want, "{}", e.message);
                    answer_is_a_line(&jsonrpc::response_err(&call.id, &e), &call.id);
                }
            }
        }
        Ok(Incoming::Notification { .. }) => {
            let (id, e) = jsonrpc::parse_line(line).expect_err("a notification is not a call");
            assert_eq!((id, e.code), (Value::Null, INVALID_REQUEST));
        }
        Err((id, e)) => {
            if e.code == PARSE_ERROR {
                assert_eq!(id, Value::Null);
                assert!(serde_json::from_slice::<Value>(line).is_err());
                assert!(e.message.contains(" at line "), "{}", e.message);
            } else {
                assert_eq!(e.code, INVALID_REQUEST, "{}", e.message);
            }
            answer_is_a_line(&jsonrpc::response_err(&id, &e), &id);
        }
    }
});

/// The answer is one JSON-RPC 2.0 line carrying `id`.
fn answer_is_a_line(line: &str, id: &Value) {
    assert!(!line.contains('\n'), "an answer spans lines: {line}");
    let v: Value = serde_json::from_str(line).expect("an answer is JSON");
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(&v["id"], id);
    assert!(v.get("result").is_some() != v.get("error").is_some());
}
