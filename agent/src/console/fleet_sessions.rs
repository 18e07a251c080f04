//! The Fleet sessions page: every live session on every host, as the fleet's live view (NATS
//! KV) has it — host, who, from where, to what, since when, state, expiry — filtered by user
//! and host and updated live. There only when the console's config has `[fleet]`; it reads
//! the view with the Hosts page's credentials and sends nothing to any host. Ending a session
//! on another host is a signed fleet command (`flowwarden fleet sessions terminate`), and the
//! console holds no admin key: this host's own sessions link to their detail page, where an
//! admin has the terminate button.

use axum::{
    extract::{Query, State as AxState},
    response::{IntoResponse, Response, sse::Event},
};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    Shared,
    access::SignedInAdmin,
    hosts::{TICK, no_fleet},
    html::{page, span, utc},
};
use crate::{fleet::view::FleetSession, sessions::model::now_ms};

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
fn region(read: &Result<Vec<FleetSession>, String>, q: &FleetQuery, this_host: &str) -> Markup {
    let now = now_ms();
    let mut shown: Vec<&FleetSession> = match read {
        Ok(all) => all.iter().filter(|s| q.admits(s)).collect(),
        Err(_) => Vec::new(),
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
            Ok(_) if shown.is_empty() => p #no-fleet-sessions {
                "No live session in the fleet's view matches (agents publish theirs every second)."
            },
            Ok(_) => {
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
                                    @if s.host == this_host {
                                        a href=(format!("/sessions/{}", s.id)) { "this host's session…" }
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

/// `/fleet`, for any signed-in administrator.
pub async fn page_of_fleet_sessions(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<FleetQuery>,
) -> Response {
    let Some(fleet) = &state.fleet else {
        return no_fleet();
    };
    let read = fleet.sessions().await;
    let v = |o: Option<&str>| o.unwrap_or_default().to_owned();
    let body = html! {
        h1 { "Fleet sessions" }
        p { "Every live session on every host of the fleet, from the view each agent publishes \
             every second. Updated live. Ending a session on another host is a signed fleet \
             command: " code { "flowwarden fleet sessions terminate ID" } " (the console holds \
             no admin key)." }
        form.filters method="get" action="/fleet" {
            input name="user" placeholder="user (email or subject)" value=(v(q.user()));
            input name="host" placeholder="host" value=(v(q.host()));
            button type="submit" { "Filter" }
        }
        div #live data-live=(format!("/live/fleet?{}", q.query_string())) {
            (region(&read, &q, fleet.host()))
        }
    };
    page(&state, "Fleet sessions", &admin, "Fleet sessions", body).into_response()
}

/// `/live/fleet`: the region again whenever it changes.
pub async fn live_fleet_sessions(
    AxState(state): AxState<Shared>,
    SignedInAdmin(_admin): SignedInAdmin,
    Query(q): Query<FleetQuery>,
) -> Response {
    if state.fleet.is_none() {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let Some(fleet) = &state.fleet else { return };
        let mut last = String::new();
        loop {
            let html = region(&fleet.sessions().await, &q, fleet.host()).into_string();
            if html != last {
                let ev = Event::default().event("detail").json_data(&html);
                if tx.send(ev.expect("a string encodes")).await.is_err() {
                    return;
                }
                last = html;
            }
            tokio::time::sleep(TICK).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    super::live::sse(rx)
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

    fn all() -> Result<Vec<FleetSession>, String> {
        Ok(vec![
            session("web-2", "s1", "alice@corp.example"),
            session("web-1", "s2", "bob@corp.example"),
            session("web-1", "s3", "Alice@corp.example"),
        ])
    }

    #[test]
    fn every_hosts_sessions_are_rows_and_only_this_hosts_link_to_their_detail() {
        let html = region(&all(), &FleetQuery::default(), "web-1").into_string();
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
        let html = region(&all(), &q, "web-1").into_string();
        assert!(html.contains("fs-s1") && html.contains("fs-s3"), "{html}");
        assert!(!html.contains("fs-s2"), "{html}");
        let q = FleetQuery {
            user: Some("alice@corp.example".into()),
            host: Some("web-2".into()),
        };
        let html = region(&all(), &q, "web-1").into_string();
        assert!(html.contains("fs-s1") && !html.contains("fs-s3"), "{html}");
        assert_eq!(q.query_string(), "user=alice%40corp.example&host=web-2");
        let none = FleetQuery {
            user: Some("carol@corp.example".into()),
            host: None,
        };
        let html = region(&all(), &none, "web-1").into_string();
        assert!(html.contains("no-fleet-sessions"), "{html}");
    }

    #[test]
    fn a_failed_read_is_an_error_block() {
        let html = region(&Err("cannot reach".into()), &FleetQuery::default(), "h").into_string();
        assert!(html.contains(r#"id="fleet-error""#), "{html}");
        assert!(!html.contains("<table"), "{html}");
    }
}
