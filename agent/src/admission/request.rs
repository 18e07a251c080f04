//! What an admission request asks for, read from its method, path and `Authorization` header
//! alone: the part of the endpoint that needs neither the socket nor the session table (and
//! that the `admission` fuzz target drives).

use std::net::IpAddr;

use hyper::{HeaderMap, Method, StatusCode, header};

use super::wire::{RECONNECT_PATH, RECONNECT_SCHEME, SESSIONS_PATH};

/// A request that passed routing, the rate limit and the credential check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask<'a> {
    /// `POST /v1/sessions` with `Authorization: Bearer <token>`: verify, then admit.
    Admit { token: &'a str },
    /// `POST /v1/sessions/reconnect` with `Authorization: Reconnect <token>`.
    Reconnect { token: &'a str },
}

/// An answer decided before any token is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// The stable `error` code of the JSON body.
    pub code: &'static str,
    pub message: String,
}

/// Routes a request: unknown path (404), wrong method (405), rate limit (429, asked of
/// `allow` only for a request that reached an endpoint), more than one `Authorization` header
/// (400: which one a proxy and the agent each read is anyone's guess), missing credential
/// (401). The checks run in that order, so a flood of requests without a token still spends
/// the source's budget.
///
/// # Errors
/// The [`Refusal`] to send back.
pub fn read<'a>(
    method: &Method,
    path: &str,
    headers: &'a HeaderMap,
    source: IpAddr,
    allow: impl FnOnce() -> bool,
) -> Result<Ask<'a>, Refusal> {
    if path != SESSIONS_PATH && path != RECONNECT_PATH {
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no such endpoint: use POST {SESSIONS_PATH} or POST {RECONNECT_PATH}"),
        });
    }
    if method != Method::POST {
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: format!("{path} takes POST"),
        });
    }
    if !allow() {
        return Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!("too many attempts from {source}: wait a moment and try again"),
        });
    }
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "duplicate_authorization",
            message: "send exactly one Authorization header".into(),
        });
    }
    if path == RECONNECT_PATH {
        return match credential(headers, RECONNECT_SCHEME) {
            Some(token) => Ok(Ask::Reconnect { token }),
            None => Err(missing(format!(
                "send the reconnect token as `Authorization: {RECONNECT_SCHEME} <token>`"
            ))),
        };
    }
    match credential(headers, "Bearer") {
        Some(token) => Ok(Ask::Admit { token }),
        None => Err(missing(
            "send the identity provider's token as `Authorization: Bearer <jwt>`".into(),
        )),
    }
}

fn missing(message: String) -> Refusal {
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        code: "missing_token",
        message,
    }
}

/// The credential after `scheme` in the Authorization header, if that is what it holds.
fn credential<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (s, rest) = value.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(authorization: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = authorization {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(a));
        }
        h
    }

    const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn status(r: Result<Ask<'_>, Refusal>) -> StatusCode {
        r.map_or_else(|e| e.status, |_| StatusCode::OK)
    }

    #[test]
    fn routes_in_order_path_method_rate_credential() {
        let none = headers(None);
        let ok = || true;
        let limited = || false;
        assert_eq!(
            status(read(&Method::POST, "/v1/other", &none, SOURCE, limited)),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(read(&Method::GET, SESSIONS_PATH, &none, SOURCE, limited)),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let e = read(&Method::POST, SESSIONS_PATH, &none, SOURCE, limited).unwrap_err();
        assert_eq!(
            (e.status, e.code, e.message.as_str()),
            (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many attempts from 127.0.0.1: wait a moment and try again"
            )
        );
        let e = read(&Method::POST, SESSIONS_PATH, &none, SOURCE, ok).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, "missing_token")
        );
        assert!(e.message.contains("Bearer"), "{}", e.message);
        let e = read(&Method::POST, RECONNECT_PATH, &none, SOURCE, ok).unwrap_err();
        assert!(e.message.contains(RECONNECT_SCHEME), "{}", e.message);
    }

    #[test]
    fn two_authorization_headers_refuse_the_request() {
        let mut h = headers(Some("Bearer a.b.c"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer d.e.f"),
        );
        for path in [SESSIONS_PATH, RECONNECT_PATH] {
            let e = read(&Method::POST, path, &h, SOURCE, || true).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, "duplicate_authorization"),
                "{path}"
            );
        }
    }

    #[test]
    fn the_scheme_picks_the_endpoint_and_is_case_insensitive() {
        let bearer = headers(Some("bearer  a.b.c "));
        assert_eq!(
            read(&Method::POST, SESSIONS_PATH, &bearer, SOURCE, || true),
            Ok(Ask::Admit { token: "a.b.c" })
        );
        // A bearer token on the reconnect endpoint is not a reconnect token.
        assert_eq!(
            status(read(&Method::POST, RECONNECT_PATH, &bearer, SOURCE, || {
                true
            })),
            StatusCode::UNAUTHORIZED
        );
        let rc = headers(Some("Reconnect fwr1.x"));
        assert_eq!(
            read(&Method::POST, RECONNECT_PATH, &rc, SOURCE, || true),
            Ok(Ask::Reconnect { token: "fwr1.x" })
        );
        assert_eq!(
            status(read(&Method::POST, SESSIONS_PATH, &rc, SOURCE, || true)),
            StatusCode::UNAUTHORIZED
        );
    }
}
