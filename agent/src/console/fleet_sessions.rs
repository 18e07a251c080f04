//! The Fleet sessions page: every live session on every host, as the fleet's live view (NATS
//! KV) has it — host, who, from where, to what, since when, state, expiry — filtered by user
//! and host, updated live. There only when the console's config has `[fleet]`; it reads the
//! view with the Hosts page's credentials. This host's own sessions link to their detail page.
//! Ending a session on another host is a signed fleet command: the console sends one only
//! when its config gives it a fleet admin key (`[console.fleet] admin_key_file`), for an admin
//! who confirmed it with a reason and a CSRF token; the host that ends the session audits it
//! with the administrator's identity. Without the key the page only shows.

use axum::{
    Form,
    extract::{Path, Query, State as AxState},
    response::{IntoResponse, Response},
};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::{
    Shared,
    access::SignedInAdmin,
    hosts::{COMMAND_WAIT, TICK, live_region, no_fleet},
    html::{page, span, utc},
    sessions::TerminateForm,
};
use crate::{
    fleet::view::{FleetSession, PartialHost, partial_hosts},
    sessions::model::now_ms,
};

/// Rows shown at most; a filter narrows the rest.
const MAX_ROWS: usize = 1000;

/// The page's filters, from its query string.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct FleetQuery {
    /// Email or subject, any case.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

impl FleetQuery {
    fn user(&self) -> Option<&str> {
        self.user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
    }

    fn host(&self) -> Option<&str> {
        self.host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())
    }

    fn admits(&self, s: &FleetSession) -> bool {
        self.user().is_none_or(|u| s.user.eq_ignore_ascii_case(u))
            && self.host().is_none_or(|h| s.host == h)
    }

    fn query_string(&self) -> String {
        [("user", self.user()), ("host", self.host())]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={}", super::oidc::enc(v))))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// The part of the page the live stream replaces: the table, or the error block.
/// What one administrator may do on the page.
#[derive(Debug, Clone, Copy)]
struct Rights<'a> {
    this_host: &'a str,
    /// An admin, on a console that holds a fleet admin key.
    terminate: bool,
}

fn terminate_path(s: &FleetSession) -> String {
    format!(
        "/fleet/sessions/{}/{}/terminate",
        super::oidc::enc(&s.host),
        super::oidc::enc(&s.id)
    )
}

/// The view as the page reads it: the sessions, and the hosts whose view is partial.
type ViewRead = Result<(Vec<FleetSession>, Vec<PartialHost>), String>;

fn region(read: &ViewRead, q: &FleetQuery, rights: Rights<'_>) -> Markup {
    let now = now_ms();
    let (mut shown, partial): (Vec<&FleetSession>, &[PartialHost]) = match read {
        Ok((all, partial)) => (all.iter().filter(|s| q.admits(s)).collect(), partial),
        Err(_) => (Vec::new(), &[]),
    };
    shown.sort_by(|a, b| {
        a.host
            .cmp(&b.host)
            .then(b.created_at_ms.cmp(&a.created_at_ms))
    });
    let more = shown.len().saturating_sub(MAX_ROWS);
    shown.truncate(MAX_ROWS);
    html! {
        @match read {
            Err(why) => div.fleet-error #fleet-error {
                p.error { "The fleet's view cannot be read: " (why) }
                p { "The Sessions page uses this agent's status socket and keeps working. This \
                     page retries every " (TICK.as_secs()) " seconds." }
            },
            Ok(_) if shown.is_empty() && partial.is_empty() => p #no-fleet-sessions {
                "No live session in the fleet's view matches (agents publish theirs every second)."
            },
            Ok(_) => {
                @for p in partial {
                    p.partial { (p.host) " has " (p.live) " live sessions; the fleet's view holds its \
                        newest " (p.shown) ". Filter by user, or use that host's own console, for the rest." }
                }
                p #fleet-count {
                    (shown.len() + more) @if shown.len() + more == 1 { " live session" } @else { " live sessions" }
                    @if more > 0 {
                    ", the first " (MAX_ROWS) " shown: narrow with a filter" }
                }
                table.sessions.fleet-sessions {
                    thead { tr {
                        th { "host" } th { "who" } th { "from" } th { "resources" }
                        th { "since" } th { "state" } th { "expires" } th {}
                    } }
                    tbody {
                        @for s in &shown {
                            tr id=(format!("fs-{}", s.id)) data-host=(s.host) {
                                td.host { (s.host) }
                                td.who { (s.user) }
                                td.from { (s.source) }
                                td.resources { (s.resources.join(", ")) }
                                td.since {
                                    (utc(s.created_at_ms)) " (" (span(now.saturating_sub(s.created_at_ms))) " ago)"
                                }
                                td { span class=(format!("state {}", s.state)) { (s.state) } }
                                td.expires { (utc(s.expires_at_ms)) }
                                td {
                                    @if s.host == rights.this_host {
                                        a href=(format!("/sessions/{}", s.id)) { "this host's session…" }
                                    } @else if rights.terminate {
                                        a.terminate href=(terminate_path(s)) { "Terminate…" }
                                    }
                                }
                            }
                        }
                    }
                }
            },
        }
    }
}

/// The sessions in the view, and the hosts whose view is partial.
async fn read_view(fleet: &super::hosts::FleetView) -> ViewRead {
    let sessions = fleet.sessions().await?;
    let hosts = fleet.hosts().await?;
    let partial = partial_hosts(&hosts, &sessions);
    Ok((sessions, partial))
}

/// `/fleet`, for any signed-in administrator.
pub async fn page_of_fleet_sessions(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<FleetQuery>,
) -> Response {
    let Some(fleet) = &state.fleet else {
        return no_fleet();
    };
    let read = read_view(fleet).await;
    let rights = Rights {
        this_host: fleet.host(),
        terminate: admin.can_change() && fleet.can_command(),
    };
    let v = |o: Option<&str>| o.unwrap_or_default().to_owned();
    let body = html! {
        h1 { "Fleet sessions" }
        p { "Every live session on every host of the fleet, from the view each agent publishes \
             every second. Updated live." }
        @if !fleet.can_command() {
            p { "Ending a session on another host is a signed fleet command: "
                code { "flowwarden fleet sessions terminate ID" } " (this console holds no \
                fleet admin key)." }
        }
        form.filters method="get" action="/fleet" {
            input name="user" placeholder="user (email or subject)" value=(v(q.user()));
            input name="host" placeholder="host" value=(v(q.host()));
            button type="submit" { "Filter" }
        }
        div #live data-live=(format!("/live/fleet?{}", q.query_string())) {
            (region(&read, &q, rights))
        }
    };
    page(&state, "Fleet sessions", &admin, "Fleet sessions", body).into_response()
}

/// `/live/fleet`: the region again whenever it changes.
pub async fn live_fleet_sessions(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<FleetQuery>,
) -> Response {
    if state.fleet.is_none() {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    live_region(state, move |state| {
        let (q, admin) = (q.clone(), admin.clone());
        async move {
            let Some(fleet) = &state.fleet else {
                return String::new();
            };
            let rights = Rights {
                this_host: fleet.host(),
                terminate: admin.can_change() && fleet.can_command(),
            };
            region(&read_view(fleet).await, &q, rights).into_string()
        }
    })
}

/// The session `id` on `host` in the fleet's view, or the page that says why not.
async fn in_view(state: &Shared, host: &str, id: &str) -> Result<FleetSession, Response> {
    let Some(fleet) = &state.fleet else {
        return Err(no_fleet());
    };
    let gone = |why: String| {
        let body = super::html::bare(
            "Not in the fleet's view",
            html! {
                h1 { "Not in the fleet's view" }
                p.error { (why) }
                p { a href="/fleet" { "Fleet sessions" } }
            },
        );
        (
            axum::http::StatusCode::NOT_FOUND,
            axum::response::Html(body.into_string()),
        )
            .into_response()
    };
    match fleet.sessions().await {
        Ok(all) => all
            .into_iter()
            .find(|s| s.host == host && s.id == id)
            .ok_or_else(|| {
                gone(format!(
                    "no live session {id} on host {host} (ended, or not published yet)"
                ))
            }),
        Err(why) => Err(gone(why)),
    }
}

/// `GET /fleet/sessions/{host}/{id}/terminate`: what would end, and the form that ends it.
pub async fn confirm_page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path((host, id)): Path<(String, String)>,
) -> Response {
    let s = match in_view(&state, &host, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let can_command = state.fleet.as_ref().is_some_and(|f| f.can_command());
    let body = html! {
        h1 { "Terminate session " code { (s.id) } " on " (s.host) "?" }
        p { strong { (s.user) } " from " (s.source) " to " (s.resources.join(", "))
            ". The console sends a fleet command signed with its admin key to " (s.host)
            ", which drops every flow of the session from its next packet and closes its sockets." }
        @if !admin.can_change() {
            p.error { "You are a read-only administrator: you cannot terminate sessions." }
        } @else if !can_command {
            p.error { "This console holds no fleet admin key: use "
                code { "flowwarden fleet sessions terminate " (s.id) } "." }
        } @else {
            form.confirm method="post" action=(terminate_path(&s)) {
                input type="hidden" name="csrf" value=(admin.csrf);
                label { "Reason " input #reason name="reason" required placeholder="why (recorded in the audit log)"; }
                button #confirm-terminate type="submit" { "Terminate now" }
                " " a href="/fleet" { "Cancel" }
            }
        }
    };
    page(&state, "Terminate", &admin, "Fleet sessions", body).into_response()
}

/// `POST /fleet/sessions/{host}/{id}/terminate`: the signed command, and the host's answer.
pub async fn terminate(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path((host, id)): Path<(String, String)>,
    Form(f): Form<TerminateForm>,
) -> Response {
    let action = format!("POST /fleet/sessions/{host}/{id}/terminate");
    if let Err(refused) =
        super::routes::check_change(&state, &admin, f.csrf.as_deref(), &action).await
    {
        return refused;
    }
    let Some(fleet) = &state.fleet else {
        return no_fleet();
    };
    if !fleet.can_command() {
        let reason = "this console holds no fleet admin key";
        return super::routes::refuse(&state, &admin, &action, reason).await;
    }
    let s = match in_view(&state, &host, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let session_id = match super::sessions::parse_id(&s.id) {
        Ok(id) => id,
        Err(e) => return super::html::failure(&e),
    };
    let reason = f
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "terminated from the console".into());
    let issued = fleet
        .terminate(&s.host, session_id, reason, &admin.user)
        .await;
    let body = match &issued {
        Ok(issued) => {
            tracing::info!(user = %admin.user, host = %s.host, session = %s.id, command = %issued.command, "console: fleet terminate sent");
            html! {
                h1 { "Sent to " (s.host) }
                p { "Command " code #command { (issued.command) } " (control stream sequence "
                    (issued.stream_seq) "), signed with this console's fleet admin key." }
                @for o in &issued.outcomes {
                    p #outcome data-applied=(o.applied) {
                        (o.host) ": " @if o.applied { "applied: " } @else { "refused: " } (o.outcome)
                    }
                }
                @if !issued.waiting_for.is_empty() {
                    p #waiting { "No answer within " (COMMAND_WAIT.as_secs()) " s from "
                        (issued.waiting_for.join(", ")) ": it applies the command when it reads it." }
                }
                p { a href="/fleet" { "Fleet sessions" } }
            }
        }
        Err(why) => html! {
            h1 { "Not sent" }
            p.error #not-sent { "The command was not stored by the fleet's server: " (why) }
            p { a href="/fleet" { "Fleet sessions" } }
        },
    };
    page(&state, "Terminate", &admin, "Fleet sessions", body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(host: &str, id: &str, user: &str) -> FleetSession {
        FleetSession {
            host: host.into(),
            id: id.into(),
            user: user.into(),
            source: "10.0.0.7".into(),
            state: "active".into(),
            resources: vec!["ssh".into(), "web".into()],
            created_at_ms: now_ms() - 90_000,
            expires_at_ms: now_ms() + 3_600_000,
        }
    }

    fn reader(this_host: &str) -> Rights<'_> {
        Rights {
            this_host,
            terminate: false,
        }
    }

    #[test]
    fn only_an_admin_of_a_console_with_a_key_gets_terminate_links_and_only_for_other_hosts() {
        let q = FleetQuery::default();
        let html = region(&all(), &q, reader("web-1")).into_string();
        assert!(!html.contains("Terminate"), "{html}");
        let admin = Rights {
            this_host: "web-1",
            terminate: true,
        };
        let html = region(&all(), &q, admin).into_string();
        assert!(
            html.contains(r#"href="/fleet/sessions/web-2/s1/terminate""#),
            "{html}"
        );
        // This host's own sessions are ended from their detail page.
        assert!(!html.contains("/fleet/sessions/web-1/"), "{html}");
    }

    fn all() -> ViewRead {
        Ok((
            vec![
                session("web-2", "s1", "alice@corp.example"),
                session("web-1", "s2", "bob@corp.example"),
                session("web-1", "s3", "Alice@corp.example"),
            ],
            Vec::new(),
        ))
    }

    #[test]
    fn a_host_whose_view_is_partial_is_said_even_when_no_row_matches() {
        let read = Ok((
            Vec::new(),
            vec![PartialHost {
                host: "web-3".into(),
                live: 12_345,
                shown: 4_000,
            }],
        ));
        let html = region(&read, &FleetQuery::default(), reader("web-1")).into_string();
        assert!(html.contains("web-3 has 12345 live sessions"), "{html}");
        assert!(html.contains("newest 4000"), "{html}");
        assert!(!html.contains("no-fleet-sessions"), "{html}");
    }

    #[test]
    fn every_hosts_sessions_are_rows_and_only_this_hosts_link_to_their_detail() {
        let html = region(&all(), &FleetQuery::default(), reader("web-1")).into_string();
        for id in ["s1", "s2", "s3"] {
            assert!(html.contains(&format!("id=\"fs-{id}\"")), "{id}: {html}");
        }
        assert!(html.contains(r#"href="/sessions/s2""#), "{html}");
        assert!(!html.contains(r#"href="/sessions/s1""#), "{html}");
        assert!(html.contains("ssh, web"), "{html}");
        assert!(html.contains("3 live sessions"), "{html}");
        // Host by host.
        assert!(html.find("fs-s2").unwrap() < html.find("fs-s1").unwrap());
    }

    #[test]
    fn filters_by_user_in_any_case_and_by_host() {
        let q = FleetQuery {
            user: Some(" ALICE@corp.example ".into()),
            host: None,
        };
        let html = region(&all(), &q, reader("web-1")).into_string();
        assert!(html.contains("fs-s1") && html.contains("fs-s3"), "{html}");
        assert!(!html.contains("fs-s2"), "{html}");
        let q = FleetQuery {
            user: Some("alice@corp.example".into()),
            host: Some("web-2".into()),
        };
        let html = region(&all(), &q, reader("web-1")).into_string();
        assert!(html.contains("fs-s1") && !html.contains("fs-s3"), "{html}");
        assert_eq!(q.query_string(), "user=alice%40corp.example&host=web-2");
        let none = FleetQuery {
            user: Some("carol@corp.example".into()),
            host: None,
        };
        let html = region(&all(), &none, reader("web-1")).into_string();
        assert!(html.contains("no-fleet-sessions"), "{html}");
    }

    #[test]
    fn a_failed_read_is_an_error_block() {
        let html = region(
            &Err("cannot reach".into()),
            &FleetQuery::default(),
            reader("h"),
        )
        .into_string();
        assert!(html.contains(r#"id="fleet-error""#), "{html}");
        assert!(!html.contains("<table"), "{html}");
    }
}
