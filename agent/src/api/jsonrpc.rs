//! The JSON-RPC 2.0 envelope of the status socket: one request or response object per line.
//!
//! Every flowwarden method is a call: a request must carry an `id` (number, string or null)
//! and gets exactly one response. A line without `id` is a JSON-RPC notification; the spec
//! forbids answering those, so the transport neither answers nor executes them (a
//! `sessions.terminate` whose failure nobody can see is worse than one that never ran).
//! Batches (arrays) are refused with `-32600`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The line was not JSON at all.
pub const PARSE_ERROR: i64 = -32700;
/// JSON, but not a request this server accepts (not an object, batch, bad members).
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// An application error the core reports (the operation was refused as asked).
pub const APP_ERROR: i64 = -32000;
/// The request conflicts with current state (e.g. terminating an already ended session).
pub const CONFLICT: i64 = APP_ERROR;
/// The caller's access level does not allow the method, or the socket refused the peer.
pub const PERMISSION_DENIED: i64 = -32001;
/// The thing named in the request (session, flow, resource) does not exist.
pub const NOT_FOUND: i64 = -32004;
/// The agent is at its connection limit; trying again later can succeed.
pub const BUSY: i64 = -32005;

/// The `error` member of a response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, message)
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("unknown method {method:?}"))
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(NOT_FOUND, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(PERMISSION_DENIED, message)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

/// A parsed request line that expects a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Echoed back in the response: a number, a string or null.
    pub id: Value,
    pub method: String,
    /// An object or an array; `Value::Null` when the request had no `params`.
    pub params: Value,
}

/// What one line turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Call(Call),
    /// A request without `id`: never answered (JSON-RPC 2.0, section 4.1), never executed.
    Notification {
        method: String,
    },
}

/// The members a request object may have; anything else is refused so that a typo such as
/// `"param"` fails loudly instead of being silently ignored.
const REQUEST_MEMBERS: [&str; 4] = ["jsonrpc", "id", "method", "params"];

/// Parses one line into a call, or into the error response it deserves (with the request's id
/// when it could be recovered, else null). A notification is an error here: use [`parse`] to
/// tell the two apart.
///
/// # Errors
///
/// `-32700` for invalid JSON (the message says where), `-32600` for anything that is JSON but
/// not a call: not an object, a batch, `jsonrpc` other than `"2.0"`, `method` missing or not a
/// string, `params` not structured, unknown members, or a missing `id`.
pub fn parse_line(line: &[u8]) -> Result<Call, (Value, RpcError)> {
    match parse(line)? {
        Incoming::Call(call) => Ok(call),
        Incoming::Notification { method } => Err((
            Value::Null,
            RpcError::invalid_request(format!(
                "request for {method:?} has no \"id\": every flowwarden method is a call, and \
                 notifications are not supported"
            )),
        )),
    }
}

/// Parses one line into a call or a notification.
///
/// # Errors
///
/// As [`parse_line`], except that a missing `id` is a notification, not an error.
pub fn parse(line: &[u8]) -> Result<Incoming, (Value, RpcError)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| (Value::Null, invalid_json(&e)))?;
    let mut object = match value {
        Value::Object(object) => object,
        Value::Array(_) => {
            return Err((
                Value::Null,
                RpcError::invalid_request("batches are not supported"),
            ));
        }
        other => {
            return Err((
                Value::Null,
                RpcError::invalid_request(format!(
                    "a request must be a JSON object, not {}",
                    kind_of(&other)
                )),
            ));
        }
    };

    // The id comes first so that every later error can be matched to its request.
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::Number(_) | Value::String(_) | Value::Null)) => Some(id),
        Some(other) => {
            return Err((
                Value::Null,
                RpcError::invalid_request(format!(
                    "\"id\" must be a number, a string or null, not {}",
                    kind_of(&other)
                )),
            ));
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let fail = |message: String| (reply_id.clone(), RpcError::invalid_request(message));

    if let Some(unknown) = unknown_member(&object) {
        return Err(fail(format!(
            "unknown member {unknown:?}: a request has only jsonrpc, id, method and params"
        )));
    }
    match object.remove("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        Some(other) => return Err(fail(format!("\"jsonrpc\" must be \"2.0\", not {other}"))),
        None => return Err(fail("missing \"jsonrpc\": it must be \"2.0\"".to_owned())),
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(other) => {
            return Err(fail(format!(
                "\"method\" must be a string, not {}",
                kind_of(&other)
            )));
        }
        None => return Err(fail("missing \"method\"".to_owned())),
    };
    let params = match object.remove("params") {
        // An explicit null is what many clients send for "no params"; treat it as absent.
        None | Some(Value::Null) => Value::Null,
        Some(params @ (Value::Object(_) | Value::Array(_))) => params,
        Some(other) => {
            return Err(fail(format!(
                "\"params\" must be an object or an array, not {}",
                kind_of(&other)
            )));
        }
    };

    Ok(match id {
        Some(id) => Incoming::Call(Call { id, method, params }),
        None => Incoming::Notification { method },
    })
}

/// A success response, as one line without the trailing newline.
pub fn response_ok(id: &Value, result: Value) -> String {
    #[derive(Serialize)]
    struct OkLine<'a> {
        jsonrpc: &'static str,
        id: &'a Value,
        result: Value,
    }
    to_line(&OkLine {
        jsonrpc: "2.0",
        id,
        result,
    })
}

/// An error response, as one line without the trailing newline.
pub fn response_err(id: &Value, err: &RpcError) -> String {
    #[derive(Serialize)]
    struct ErrLine<'a> {
        jsonrpc: &'static str,
        id: &'a Value,
        error: &'a RpcError,
    }
    to_line(&ErrLine {
        jsonrpc: "2.0",
        id,
        error: err,
    })
}

/// A server-to-client notification (one item of a stream), as one line without the newline.
pub fn notification(method: &str, params: Value) -> String {
    #[derive(Serialize)]
    struct Notification<'a> {
        jsonrpc: &'static str,
        method: &'a str,
        params: Value,
    }
    to_line(&Notification {
        jsonrpc: "2.0",
        method,
        params,
    })
}

fn to_line(value: &impl Serialize) -> String {
    // Serialising JSON values and strings cannot fail (every map key is a string), but a
    // response must be written whatever happens, so fall back to a fixed internal error.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "could not serialise a JSON-RPC response");
        format!(
            r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":{INTERNAL_ERROR},"message":"response could not be serialised"}}}}"#
        )
    })
}

fn invalid_json(e: &serde_json::Error) -> RpcError {
    // serde_json's Display ends in " at line L column C"; say where first, as people read it.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let reason = full.strip_suffix(&suffix).unwrap_or(&full);
    RpcError::new(
        PARSE_ERROR,
        format!(
            "invalid JSON at line {} column {}: {reason}",
            e.line(),
            e.column()
        ),
    )
}

fn unknown_member(object: &Map<String, Value>) -> Option<&str> {
    object
        .keys()
        .map(String::as_str)
        .find(|k| !REQUEST_MEMBERS.contains(k))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// An integer id too large for u64 is held as a float; the answer must still carry the very
    /// same id, or a client matching answers to requests loses this one (found by fuzzing).
    #[test]
    fn a_huge_numeric_id_is_echoed_exactly() {
        let line =
            br#"{"jsonrpc":"2.0","id":6666666000000000000008875348047994464935,"method":"status"}"#;
        let call = parse_line(line).expect("a valid call");
        let answer: Value = serde_json::from_str(&response_ok(&call.id, Value::Null)).unwrap();
        assert_eq!(answer["id"], call.id);
    }

    fn err_of(line: &str) -> (Value, RpcError) {
        match parse_line(line.as_bytes()) {
            Ok(call) => panic!("expected {line} to be refused, it parsed as {call:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_a_call_with_each_kind_of_id_and_params() {
        let call = parse_line(br#"{"jsonrpc":"2.0","id":7,"method":"status"}"#).unwrap();
        assert_eq!(
            call,
            Call {
                id: json!(7),
                method: "status".into(),
                params: Value::Null
            }
        );

        let call =
            parse_line(br#"{"jsonrpc":"2.0","id":"a","method":"m","params":{"x":1}}"#).unwrap();
        assert_eq!((call.id, call.params), (json!("a"), json!({"x": 1})));

        let call = parse_line(br#"{"jsonrpc":"2.0","id":null,"method":"m","params":[1]}"#).unwrap();
        assert_eq!((call.id, call.params), (Value::Null, json!([1])));

        let call = parse_line(br#"{"jsonrpc":"2.0","id":1,"method":"m","params":null}"#).unwrap();
        assert_eq!(call.params, Value::Null);
    }

    #[test]
    fn invalid_json_says_where() {
        let (id, e) = err_of(r#"{"jsonrpc":"2.0",,}"#);
        assert_eq!((id, e.code), (Value::Null, PARSE_ERROR));
        assert_eq!(
            e.message,
            "invalid JSON at line 1 column 18: key must be a string"
        );
        let (_, e) = err_of("{\"jsonrpc\":\n  tru}");
        assert_eq!(e.message, "invalid JSON at line 2 column 6: expected ident");
    }

    #[test]
    fn refuses_what_is_not_a_single_request_object() {
        let (_, e) = err_of(r#"[{"jsonrpc":"2.0","id":1,"method":"m"}]"#);
        assert_eq!(
            (e.code, e.message.as_str()),
            (INVALID_REQUEST, "batches are not supported")
        );
        let (_, e) = err_of("[]");
        assert_eq!(e.message, "batches are not supported");
        let (_, e) = err_of(r#""status""#);
        assert_eq!(e.code, INVALID_REQUEST);
        assert!(e.message.contains("not a string"), "{}", e.message);
    }

    #[test]
    fn envelope_errors_keep_the_id_when_it_is_valid() {
        let (id, e) = err_of(r#"{"jsonrpc":"1.0","id":3,"method":"m"}"#);
        assert_eq!((id, e.code), (json!(3), INVALID_REQUEST));
        assert!(e.message.contains("\"2.0\""), "{}", e.message);

        let (id, e) = err_of(r#"{"id":"x","method":"m"}"#);
        assert_eq!((id, e.code), (json!("x"), INVALID_REQUEST));

        let (id, e) = err_of(r#"{"jsonrpc":"2.0","id":4,"method":"m","param":{}}"#);
        assert_eq!(id, json!(4));
        assert!(
            e.message.contains("unknown member \"param\""),
            "{}",
            e.message
        );

        let (id, e) = err_of(r#"{"jsonrpc":"2.0","id":5,"method":9}"#);
        assert_eq!(id, json!(5));
        assert!(
            e.message.contains("\"method\" must be a string"),
            "{}",
            e.message
        );

        let (_, e) = err_of(r#"{"jsonrpc":"2.0","id":6}"#);
        assert_eq!(e.message, "missing \"method\"");

        let (id, e) = err_of(r#"{"jsonrpc":"2.0","id":6,"method":"m","params":"x"}"#);
        assert_eq!((id, e.code), (json!(6), INVALID_REQUEST));

        let (id, e) = err_of(r#"{"jsonrpc":"2.0","id":{"a":1},"method":"m"}"#);
        assert_eq!((id, e.code), (Value::Null, INVALID_REQUEST));
    }

    #[test]
    fn a_request_without_id_is_a_notification() {
        let line = br#"{"jsonrpc":"2.0","method":"sessions.terminate","params":{}}"#;
        assert_eq!(
            parse(line).unwrap(),
            Incoming::Notification {
                method: "sessions.terminate".into()
            }
        );
        let (id, e) = parse_line(line).unwrap_err();
        assert_eq!((id, e.code), (Value::Null, INVALID_REQUEST));
    }

    #[test]
    fn responses_are_single_lines_in_the_spec_shape() {
        let ok = response_ok(&json!(1), json!({"a": "b\nc"}));
        assert_eq!(ok, r#"{"jsonrpc":"2.0","id":1,"result":{"a":"b\nc"}}"#);

        let err = response_err(&Value::Null, &RpcError::method_not_found("nope"));
        assert_eq!(
            err,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"unknown method \"nope\""}}"#
        );

        let with_data = RpcError::not_found("no session 9").with_data(json!({"session": 9}));
        let back: Value = serde_json::from_str(&response_err(&json!("s"), &with_data)).unwrap();
        assert_eq!(back["error"]["data"], json!({"session": 9}));

        let n = notification("audit.event", json!({"seq": 1}));
        assert_eq!(
            n,
            r#"{"jsonrpc":"2.0","method":"audit.event","params":{"seq":1}}"#
        );
    }
}
