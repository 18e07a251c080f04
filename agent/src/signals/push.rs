//! Push delivery (RFC 8935): `POST /v1/ssf/events` on the admission HTTPS listener. The
//! `Authorization` header picks the stream (compared in constant time), the body must be an
//! `application/secevent+jwt` of bounded size, and the answer is `202` once the SET's effect
//! is durable, or `400` with `{"err", "description"}`.

use std::sync::Arc;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use serde::{Deserialize, Serialize};

use super::{
    ErrCode, SET_MEDIA_TYPE,
    receiver::{NotAccepted, Receiver},
    set::{MAX_SET_BYTES, Refused},
};

/// A refused body larger than this is not read to its end: the connection is closed instead.
const MAX_DRAIN_BYTES: u64 = 2 * 1024 * 1024;

/// Reads a body to its end without keeping it; `false` when it breaks off or runs past
/// [`MAX_DRAIN_BYTES`].
async fn drain(mut body: Incoming) -> bool {
    use http_body_util::BodyExt as _;
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                seen += f.data_ref().map_or(0, |d| d.len() as u64);
                if seen > MAX_DRAIN_BYTES {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// The error body of RFC 8935 2.3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushError {
    pub err: String,
    pub description: String,
}

fn answer(status: StatusCode, body: Option<&PushError>, close: bool) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    if close {
        b = b.header(header::CONNECTION, "close");
    }
    let bytes = match body {
        Some(e) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            serde_json::to_vec(e).unwrap_or_default()
        }
        None => Vec::new(),
    };
    b.body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn refusal(r: &Refused, close: bool) -> Response<Full<Bytes>> {
    answer(
        StatusCode::BAD_REQUEST,
        Some(&PushError {
            err: r.err.as_str().to_owned(),
            description: r.description.clone(),
        }),
        close,
    )
}

fn refused(err: ErrCode, description: impl Into<String>) -> Refused {
    Refused {
        err,
        description: description.into(),
    }
}

/// Whether a `Content-Type` value is `application/secevent+jwt` (parameters allowed).
fn is_set_media_type(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(SET_MEDIA_TYPE))
}

/// Answers one pushed SET. `receiver` is `None` when no push transmitter is configured.
/// `allow` takes a token of the source's admission budget: a push that is not authenticated
/// as a configured transmitter is audited only while its source has budget left, and
/// answered `429` without a record beyond it, so that nobody who lacks the push credential
/// can write the audit log at will. A transmitter's own pushes are never limited.
pub async fn handle(
    receiver: Option<&Arc<Receiver>>,
    req: Request<Incoming>,
    allow: impl FnOnce() -> bool,
) -> Response<Full<Bytes>> {
    let Some(receiver) = receiver else {
        return answer(
            StatusCode::NOT_FOUND,
            Some(&PushError {
                err: "not_found".into(),
                description: "no Shared Signals transmitter is configured on this agent".into(),
            }),
            false,
        );
    };
    if req.method() != Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            Some(&PushError {
                err: ErrCode::InvalidRequest.as_str().into(),
                description: format!("{} takes POST", super::PUSH_PATH),
            }),
            false,
        );
    }
    let mut auth = req.headers().get_all(header::AUTHORIZATION).iter();
    let (first, second) = (auth.next(), auth.next());
    let index = match (first, second) {
        (Some(value), None) => receiver.push_transmitter(Some(value.as_bytes())),
        _ => None,
    };
    let Some(index) = index else {
        if !allow() {
            tracing::debug!("unauthenticated SET push refused: its source is over its budget");
            return answer(
                StatusCode::TOO_MANY_REQUESTS,
                Some(&PushError {
                    err: "rate_limited".into(),
                    description: "too many pushes without the stream's credential from this \
                                  address: wait a moment and send the configured \
                                  Authorization header"
                        .into(),
                }),
                false,
            );
        }
        let r = refused(
            ErrCode::AuthenticationFailed,
            "send exactly one Authorization header, the value the stream was configured with",
        );
        receiver.refused(usize::MAX, &r).await;
        return refusal(&r, false);
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !is_set_media_type(content_type) {
        let r = refused(
            ErrCode::InvalidRequest,
            format!("the Content-Type must be {SET_MEDIA_TYPE}"),
        );
        receiver.refused(index, &r).await;
        return refusal(&r, false);
    }
    let too_large = || {
        refused(
            ErrCode::InvalidRequest,
            format!("the body is larger than {MAX_SET_BYTES} bytes: not a SET"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > MAX_SET_BYTES as u64) {
        let r = too_large();
        receiver.refused(index, &r).await;
        // Read and dropped (within a bound) so that the transmitter, which sends its whole
        // body before it reads, gets this answer instead of a reset connection.
        let drained = n <= MAX_DRAIN_BYTES && drain(req.into_body()).await;
        return refusal(&r, !drained);
    }
    let body = match Limited::new(req.into_body(), MAX_SET_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let r = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                refused(ErrCode::InvalidRequest, "the body could not be read")
            };
            receiver.refused(index, &r).await;
            return refusal(&r, true);
        }
    };
    let Ok(token) = String::from_utf8(body.to_vec()) else {
        let r = refused(ErrCode::InvalidRequest, "the body is not a compact JWS");
        receiver.refused(index, &r).await;
        return refusal(&r, false);
    };
    match receiver.receive(index, token).await {
        Ok(_) => answer(StatusCode::ACCEPTED, None, false),
        Err(NotAccepted::Refused(r)) => refusal(&r, false),
        Err(NotAccepted::Failed(e)) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(&PushError {
                err: "internal".into(),
                description: format!("the agent could not act on the SET; deliver it again: {e}"),
            }),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert!(is_set_media_type("application/secevent+jwt"));
        assert!(is_set_media_type("Application/SecEvent+JWT; charset=utf-8"));
        assert!(!is_set_media_type("application/jwt"));
        assert!(!is_set_media_type("application/json"));
        assert!(!is_set_media_type(""));
    }
}
