//! The audit page: the newest events with filters, a live tail, and the export of a filtered
//! range as JSON lines.

use axum::{
    extract::{Query, State as AxState},
    http::header,
    response::{IntoResponse, Response},
};
use maud::html;
use serde::Deserialize;

use super::{
    ConsoleError, Shared,
    access::SignedInAdmin,
    html::{failure, page as frame},
    sessions::audit_rows,
};
use crate::{
    audit::{AuditQuery, MAX_QUERY_LIMIT, event::AuditEvent},
    sessions::model::SessionId,
};

/// Events shown when the page opens.
const SHOWN: usize = 200;
/// The most events one export holds.
pub const EXPORT_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditParams {
    pub user: Option<String>,
    pub kind: Option<String>,
    pub session: Option<String>,
    /// Export: from this Unix millisecond…
    pub since_ms: Option<u64>,
    /// …up to this one.
    pub until_ms: Option<u64>,
}

fn some(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl AuditParams {
    /// The agent's query for these filters.
    ///
    /// # Errors
    /// A session that is not a session id.
    pub fn query(&self) -> Result<AuditQuery, ConsoleError> {
        let session = match some(&self.session) {
            Some(s) => Some(
                serde_json::from_value::<SessionId>(serde_json::Value::String(s.clone())).map_err(
                    |_| {
                        ConsoleError::Internal(format!("{s:?} is not a session id (16 hex digits)"))
                    },
                )?,
            ),
            None => None,
        };
        Ok(AuditQuery {
            session,
            user: some(&self.user),
            kind: some(&self.kind),
            since_ms: self.since_ms,
            ..AuditQuery::default()
        })
    }

    /// Whether a live event passes the page's filters.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.query().is_ok_and(|q| q.matches(e))
    }

    fn query_string(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("user", &self.user),
            ("kind", &self.kind),
            ("session", &self.session),
        ] {
            if let Some(v) = some(v) {
                parts.push(format!("{k}={}", super::oidc::enc(&v)));
            }
        }
        parts.join("&")
    }
}

pub async fn page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(p): Query<AuditParams>,
) -> Response {
    let q = match p.query() {
        Ok(q) => AuditQuery {
            limit: Some(SHOWN),
            ..q
        },
        Err(e) => return failure(&e),
    };
    let events = match state.agent.call(move |c| c.audit_query(&q)).await {
        Ok(e) => e,
        Err(e) => return failure(&e),
    };
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let qs = p.query_string();
    let body = html! {
        h1 { "Audit" }
        form.filters method="get" action="/audit" {
            input name="user" placeholder="user" value=(v(&p.user));
            input name="kind" placeholder="kind (session_terminated, …)" value=(v(&p.kind));
            input name="session" placeholder="session id" value=(v(&p.session));
            button type="submit" { "Filter" }
        }
        form.filters method="get" action="/audit/export" {
            input type="hidden" name="user" value=(v(&p.user));
            input type="hidden" name="kind" value=(v(&p.kind));
            input type="hidden" name="session" value=(v(&p.session));
            input name="since_ms" placeholder="from (Unix ms)" inputmode="numeric";
            input name="until_ms" placeholder="until (Unix ms)" inputmode="numeric";
            button type="submit" { "Export JSON lines" }
        }
        p { "Newest first; new events appear at the top as they happen." }
        table.audit {
            thead { tr { th { "when" } th { "what" } th { "user" } th { "session" } th { "from" } th { "detail" } } }
            tbody #audit-rows data-live=(format!("/live/audit?{qs}")) { (audit_rows(&events)) }
        }
    };
    frame(&state, "Audit", &admin, "Audit", body).into_response()
}

/// Every matching event of the range, oldest first, one JSON object per line.
pub async fn export(
    AxState(state): AxState<Shared>,
    SignedInAdmin(_admin): SignedInAdmin,
    Query(p): Query<AuditParams>,
) -> Response {
    let q = match p.query() {
        Ok(q) => q,
        Err(e) => return failure(&e),
    };
    let until = p.until_ms;
    let lines = state
        .agent
        .call(move |c| {
            let mut out = Vec::new();
            let mut after = 0;
            let mut count = 0;
            loop {
                let page = c.audit_query(&AuditQuery {
                    after_seq: Some(after),
                    limit: Some(MAX_QUERY_LIMIT),
                    ..q.clone()
                })?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let full = page.len() == MAX_QUERY_LIMIT;
                for e in page {
                    if until.is_some_and(|u| e.at_ms > u) || count >= EXPORT_MAX {
                        return Ok(out);
                    }
                    serde_json::to_writer(&mut out, &e).expect("an event encodes");
                    out.push(b'\n');
                    count += 1;
                }
                if !full {
                    break;
                }
            }
            Ok(out)
        })
        .await;
    match lines {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/x-ndjson"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"flowwarden-audit.jsonl\"",
                ),
            ],
            body,
        )
            .into_response(),
        Err(e) => failure(&e),
    }
}
