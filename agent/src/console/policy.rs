//! The policy page: what is loaded, and "explain" for a user or for a candidate policy
//! directory (which live sessions it would sever), as `flowwarden policy explain` does.

use axum::{
    extract::{Query, State as AxState},
    response::{IntoResponse, Response},
};
use maud::html;
use serde::Deserialize;

use super::{
    Shared,
    access::SignedInAdmin,
    html::{failure, page as frame},
};
use crate::api::{answers::ExplainView, request::Explain};

#[derive(Debug, Default, Deserialize)]
pub struct PolicyParams {
    pub user: Option<String>,
    pub resource: Option<String>,
    pub candidate: Option<String>,
}

fn some(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub async fn page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(p): Query<PolicyParams>,
) -> Response {
    let status = match state.agent.call(|c| c.status()).await {
        Ok(s) => s,
        Err(e) => return failure(&e),
    };
    let ask = if let Some(candidate) = some(&p.candidate) {
        Some(Explain {
            candidate: Some(candidate.into()),
            ..Explain::default()
        })
    } else {
        some(&p.user).map(|user| Explain {
            user: Some(user),
            resource: some(&p.resource),
            ..Explain::default()
        })
    };
    let explained = match ask {
        Some(e) => Some(state.agent.call(move |c| c.policy_explain(&e)).await),
        None => None,
    };
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let pol = &status.policy;
    let body = html! {
        h1 { "Policy" }
        dl.facts {
            dt { "directory" } dd { (pol.dir) }
            dt { "loaded" } dd { (pol.files) " files, " (pol.resources) " resources, " (pol.rules) " rules" }
            dt { "fingerprint" } dd { code { (pol.fingerprint) } }
            dt { "mode" } dd { (status.mode.as_str()) }
        }
        h2 { "Explain" }
        form.filters method="get" action="/policy" {
            input name="user" placeholder="user (email or subject)" value=(v(&p.user));
            input name="resource" placeholder="resource (all when empty)" value=(v(&p.resource));
            button type="submit" { "Explain for this user" }
        }
        form.filters method="get" action="/policy" {
            input name="candidate" placeholder="candidate policy directory (absolute)" value=(v(&p.candidate));
            button type="submit" { "What would it sever?" }
        }
        @match explained {
            None => {}
            Some(Err(e)) => p.error { (e.to_string()) }
            Some(Ok(ExplainView::Identity { user, session, source, explanations, refused_by, .. })) => {
                @if let Some(session) = session {
                    p { "Identity of " strong { (user) } " as session " a href=(format!("/sessions/{session}")) { (session) } " from " (source) " holds it:" }
                } @else {
                    p { "Identity of " strong { (user) } " as their last refused admission from " (source) " presented it (no session):" }
                }
                @for r in &refused_by { p.error { "Refused before policy: " (r) } }
                table.explain {
                    thead { tr { th { "resource" } th { "allowed" } th { "rule" } th { "why" } } }
                    tbody { @for x in &explanations { tr {
                        td { (x.resource) } td { @if x.allowed { "yes" } @else { "no" } }
                        td { (x.rule.clone().unwrap_or_default()) } td { (x.reasons.join("; ")) }
                    } } }
                }
            }
            Some(Ok(ExplainView::Candidate { candidate, affected })) => {
                p { (candidate.display()) " would cut " (affected.len()) " live sessions." }
                table.explain {
                    thead { tr { th { "session" } th { "user" } th { "from" } th { "loses" } th { "terminated" } } }
                    tbody { @for a in &affected { tr {
                        td { a href=(format!("/sessions/{}", a.session)) { (a.session) } }
                        td { (a.user) } td { (a.source) } td { (a.removed.join(", ")) }
                        td { @if a.terminated { "yes" } @else { "no" } }
                    } } }
                }
            }
        }
    };
    frame(&state, "Policy", &admin, "Policy", body).into_response()
}
