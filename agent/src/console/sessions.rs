//! The sessions pages: the live list (filtered, paged), one session in full, and terminate
//! with a reason, confirmed on a page of its own.

use axum::{
    Form,
    extract::{Path, Query, State as AxState},
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::{
    ConsoleError, Shared,
    access::{Admin, SignedInAdmin},
    html::{bytes, failure, page, span, utc},
    routes::check_change,
};
use crate::{
    api::{
        request::{SessionFilter, Terminate},
        views::SessionView,
    },
    audit::{AuditQuery, event::AuditEvent},
    locks::{
        LockTarget, NewLock,
        wire::{LockFilter, LockView},
    },
    sessions::model::{SessionId, SessionState, now_ms},
};

/// Sessions on one page of the list.
pub const PAGE_SIZE: usize = 100;

/// The list's filters and page, as the query string carries them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default, skip_serializing_if = "blank")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "blank")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<usize>,
}

#[allow(clippy::ref_option)] // serde's skip_serializing_if hands a reference
fn blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

fn some(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl ListQuery {
    /// The status-socket filter for this page.
    ///
    /// # Errors
    /// A source that is not an IP address, or an unknown state.
    pub fn filter(&self) -> Result<SessionFilter, String> {
        let source = match some(&self.source) {
            Some(s) => Some(
                s.parse()
                    .map_err(|_| format!("source {s:?} is not an IP address"))?,
            ),
            None => None,
        };
        let state = match some(&self.state).as_deref() {
            None => None,
            Some("live") => None,
            Some(s) => Some(
                serde_json::from_value::<SessionState>(serde_json::Value::String(s.to_owned()))
                    .map_err(|_| {
                        format!("state {s:?}: use live, active, dormant, expired or terminated")
                    })?,
            ),
        };
        Ok(SessionFilter {
            state,
            user: some(&self.user),
            resource: some(&self.resource),
            source,
            live: some(&self.state).as_deref() == Some("live"),
            offset: Some(self.page.unwrap_or(0) * PAGE_SIZE),
            limit: Some(PAGE_SIZE + 1),
        })
    }

    pub fn query_string(&self) -> String {
        serde_urlencoded(self)
    }
}

fn serde_urlencoded(q: &ListQuery) -> String {
    let v = serde_json::to_value(q).unwrap_or_default();
    let Some(map) = v.as_object() else {
        return String::new();
    };
    map.iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{k}={}", super::oidc::enc(&v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// One page of sessions (and whether there is a next one).
///
/// # Errors
/// A filter that does not parse, or the agent.
pub async fn fetch_page(
    state: &Shared,
    q: &ListQuery,
) -> Result<(Vec<SessionView>, bool), ConsoleError> {
    let filter = q.filter().map_err(ConsoleError::Internal)?;
    let mut list = state.agent.call(move |c| c.sessions_list(&filter)).await?;
    let more = list.len() > PAGE_SIZE;
    list.truncate(PAGE_SIZE);
    Ok((list, more))
}

fn state_cell(s: &SessionView) -> Markup {
    html! {
        span class=(format!("state {}", s.state.as_str())) { (s.state.as_str()) }
        @if matches!(s.state, SessionState::Terminated) {
            br;
            span.drops {
                "dropped after termination: " (s.dropped_after_termination.packets) " packets, "
                (bytes(s.dropped_after_termination.bytes))
            }
        }
    }
}

fn device(s: &SessionView) -> String {
    let d = &s.device;
    let mut parts = vec![d.id.clone().unwrap_or_else(|| "—".into())];
    if let Some(m) = d.managed {
        parts.push(if m {
            "managed".into()
        } else {
            "unmanaged".into()
        });
    }
    if d.compliant == Some(false) {
        parts.push("not compliant".into());
    }
    parts.join(", ")
}

/// The rows of the list (the part live updates replace).
pub fn rows(list: &[SessionView], admin: &Admin) -> Markup {
    let now = now_ms();
    html! {
        @for s in list {
            tr id=(format!("s-{}", s.id)) data-state=(s.state.as_str()) {
                td { a href=(format!("/sessions/{}", s.id)) { (s.user) } }
                td { (s.groups.join(", ")) }
                td { (device(s)) }
                td { (s.source) }
                td { (s.grants.iter().map(|g| g.resource.as_str()).collect::<Vec<_>>().join(", ")) }
                td title=(utc(s.created_at_ms)) { (span(now.saturating_sub(s.created_at_ms))) " ago" }
                td { (state_cell(s)) }
                td.num { (s.traffic.flows) }
                td.num { (bytes(s.traffic.rx_bytes)) " / " (bytes(s.traffic.tx_bytes)) }
                td title=(utc(s.expires_at_ms)) {
                    @if s.state.is_live() { "in " (span(s.expires_at_ms.saturating_sub(now))) } @else { "—" }
                }
                td {
                    @if admin.can_change() && s.state.is_live() {
                        a.terminate href=(format!("/sessions/{}/terminate", s.id)) { "Terminate…" }
                    }
                }
            }
        }
    }
}

pub async fn list_page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<ListQuery>,
) -> Response {
    let (list, more) = match fetch_page(&state, &q).await {
        Ok(p) => p,
        Err(e) => return failure(&e),
    };
    let pageno = q.page.unwrap_or(0);
    let qs = q.query_string();
    let at = |p: usize| {
        let mut q2 = q.clone();
        q2.page = Some(p);
        format!("/?{}", q2.query_string())
    };
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let body = html! {
        h1 { "Sessions" }
        form.filters method="get" action="/" {
            input name="user" placeholder="user" value=(v(&q.user));
            input name="resource" placeholder="resource" value=(v(&q.resource));
            input name="source" placeholder="source IP" value=(v(&q.source));
            select name="state" {
                @for st in ["", "live", "active", "dormant", "expired", "terminated"] {
                    option value=(st) selected[q.state.as_deref() == Some(st)] {
                        @if st.is_empty() { "any state" } @else { (st) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        p.pager {
            "Page " (pageno + 1) ", " (PAGE_SIZE) " sessions a page, newest first; updated live. "
            @if pageno > 0 { a href=(at(pageno - 1)) { "← newer" } " " }
            @if more { a href=(at(pageno + 1)) { "older →" } }
        }
        table.sessions {
            thead { tr {
                th { "who" } th { "groups" } th { "device" } th { "from" } th { "resources" }
                th { "since" } th { "state" } th { "flows" } th { "bytes in / out" } th { "expires" } th {}
            } }
            tbody #rows data-live=(format!("/live/sessions?{qs}")) { (rows(&list, &admin)) }
        }
    };
    page(&state, "Sessions", &admin, "Sessions", body).into_response()
}

/// The part of the detail page live updates replace: state, counters, drops, flows.
pub fn live_detail(s: &SessionView) -> Markup {
    let t = &s.traffic;
    html! {
        dl.facts {
            dt { "state" } dd #state { (state_cell(s)) }
            @if let Some(end) = &s.ended {
                dt { "ended" } dd #ended { (utc(end.at_ms)) ": " (end_cause(end)) }
            }
            dt { "flows" } dd { (t.flows) }
            dt { "in" } dd { (t.rx_packets) " packets, " (bytes(t.rx_bytes)) }
            dt { "out" } dd { (t.tx_packets) " packets, " (bytes(t.tx_bytes)) }
            dt { "dropped after termination" }
            dd #drops { (s.dropped_after_termination.packets) " packets, " (bytes(s.dropped_after_termination.bytes)) }
        }
        h2 { "Flows" }
        @let flows = s.flows.clone().unwrap_or_default();
        @if flows.is_empty() { p { "No flow in the kernel." } } @else {
            table.flows {
                thead { tr { th { "resource" } th { "protocol" } th { "from" } th { "to" } th { "in" } th { "out" } th { "age" } th { "idle" } th { "revoked" } } }
                tbody { @for f in &flows { tr {
                    td { (f.resource.clone().unwrap_or_default()) } td { (f.protocol) } td { (f.source) } td { (f.destination) }
                    td.num { (f.rx_packets) " / " (bytes(f.rx_bytes)) } td.num { (f.tx_packets) " / " (bytes(f.tx_bytes)) }
                    td { (span(f.age_ms)) } td { (span(f.idle_ms)) } td { @if f.revoked { "yes: dropped" } @else { "no" } }
                } } }
            }
        }
    }
}

fn end_cause(end: &crate::sessions::model::SessionEnd) -> String {
    use crate::sessions::model::EndCause as C;
    match &end.cause {
        C::Expired => "expired".into(),
        C::DormantTimeout => "dormant too long".into(),
        C::Terminated { by, reason } => format!("terminated by {by}: {reason}"),
        C::PolicyChange { reason } => format!("policy change: {reason}"),
        C::IdentityEvent { reason } => format!("identity event: {reason}"),
    }
}

pub fn audit_rows(events: &[AuditEvent]) -> Markup {
    html! {
        @for e in events {
            tr data-seq=(e.seq) {
                td { (utc(e.at_ms)) }
                td.kind { (e.kind.name()) }
                td { (e.user.clone().unwrap_or_default()) }
                td { @if let Some(id) = e.session { a href=(format!("/sessions/{id}")) { (id) } } }
                td { (e.source.map(|s| s.to_string()).unwrap_or_default()) }
                td.detail { (describe(e)) }
            }
        }
    }
}

/// The event's own fields and its detail, in a line.
pub fn describe(e: &AuditEvent) -> String {
    let kind = serde_json::to_value(&e.kind).unwrap_or_default();
    let mut parts: Vec<String> = kind
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "kind")
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect();
    if let Some(r) = &e.resource {
        parts.push(format!("resource: {r}"));
    }
    if !e.detail.is_empty() {
        parts.push(e.detail.clone());
    }
    parts.join("; ")
}

pub(super) fn parse_id(id: &str) -> Result<SessionId, ConsoleError> {
    serde_json::from_value(serde_json::Value::String(id.to_owned()))
        .map_err(|_| ConsoleError::Internal(format!("{id:?} is not a session id (16 hex digits)")))
}

#[derive(Deserialize, Default)]
pub struct DetailQuery {
    pub terminated: Option<usize>,
    /// Locks added with the termination, comma-separated.
    pub locked: Option<String>,
}

pub async fn detail_page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return failure(&e),
    };
    let got = state
        .agent
        .call(move |c| {
            let s = c.sessions_get(id)?;
            let trail = c.audit_query(&AuditQuery {
                session: Some(id),
                limit: Some(200),
                ..AuditQuery::default()
            })?;
            let touching: Vec<LockView> = c
                .lock_list(&LockFilter::default())?
                .into_iter()
                .filter(|l| super::locks::touches(l, &s))
                .collect();
            Ok((s, trail, touching))
        })
        .await;
    let (s, trail, touching) = match got {
        Ok(x) => x,
        Err(e) => return failure(&e),
    };
    let claims = s.claims.clone().unwrap_or_default();
    let body = html! {
        @if let Some(n) = q.terminated {
            p.notice #notice {
                "Terminated " (n) " session" @if n != 1 { "s" } " on your behalf."
                @if let Some(locked) = &q.locked { " Locked: " (locked) "." }
            }
        }
        h1 { "Session " code { (s.id) } }
        p.lead {
            strong #user { (s.user) } " from " (s.source) ", since " (utc(s.created_at_ms))
            @if s.state.is_live() { ", expires " (utc(s.expires_at_ms)) }
        }
        @if admin.can_change() && s.state.is_live() {
            p { a.terminate.button href=(format!("/sessions/{}/terminate", s.id)) { "Terminate…" } }
        }
        section #live data-live=(format!("/live/sessions/{}", s.id)) { (live_detail(&s)) }
        h2 { "Identity" }
        dl.facts {
            dt { "subject" } dd { (s.subject) }
            dt { "issuer" } dd { (s.issuer) }
            dt { "email" } dd { (s.email.clone().unwrap_or_default()) }
            dt { "groups" } dd { (s.groups.join(", ")) }
            dt { "device" } dd { (device(&s)) }
            dt { "device os" } dd { (s.device.os.clone().unwrap_or_default()) }
            dt { "previous sources" } dd { (s.previous_sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")) }
            dt { "grants" } dd { (s.grants.iter().map(|g| format!("{} (rule {})", g.resource, g.rule)).collect::<Vec<_>>().join(", ")) }
            dt { "token sha256" } dd { code { (s.token_sha256.clone().unwrap_or_default()) } }
        }
        h3 { "Every claim of the token" }
        table.claims {
            tbody { @for (k, v) in &claims { tr { th { (k) } td { code { (v.to_string()) } } } } }
        }
        h2 { "Locks that touch it" }
        @if touching.is_empty() { p #locks-touching { "No lock matches this session." } } @else {
            div #locks-touching { (super::locks::table(&touching, None)) }
        }
        h2 { "Audit trail" }
        table.audit {
            thead { tr { th { "when" } th { "what" } th { "user" } th { "session" } th { "from" } th { "detail" } } }
            tbody { (audit_rows(&trail)) }
        }
    };
    page(
        &state,
        &format!("Session {}", s.id),
        &admin,
        "Sessions",
        body,
    )
    .into_response()
}

pub async fn confirm_page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return failure(&e),
    };
    let s = match state.agent.call(move |c| c.sessions_get(id)).await {
        Ok(s) => s,
        Err(e) => return failure(&e),
    };
    let body = html! {
        h1 { "Terminate session " code { (s.id) } "?" }
        p { strong { (s.user) } " from " (s.source) " to " (s.grants.iter().map(|g| g.resource.as_str()).collect::<Vec<_>>().join(", ")) ": "
            (s.traffic.flows) " live flows. Every flow is dropped from its next packet and its sockets are closed." }
        @if !admin.can_change() {
            p.error { "You are a read-only administrator: you cannot terminate sessions." }
        } @else if !s.state.is_live() {
            p { "This session is already " (s.state.as_str()) "." }
        } @else {
            form.confirm method="post" action=(format!("/sessions/{}/terminate", s.id)) {
                input type="hidden" name="csrf" value=(admin.csrf);
                label { "Reason " input #reason name="reason" required placeholder="why (recorded in the audit log)"; }
                label { input #lock-user type="checkbox" name="lock_user" value="yes"; " and lock this user (" (s.user) ")" }
                @if let Some(device) = &s.device.id {
                    label { input #lock-device type="checkbox" name="lock_device" value="yes"; " and lock this device (" (device) ")" }
                }
                button #confirm-terminate type="submit" { "Terminate now" }
                " " a href=(format!("/sessions/{}", s.id)) { "Cancel" }
            }
        }
    };
    page(&state, "Terminate", &admin, "Sessions", body).into_response()
}

#[derive(Deserialize)]
pub struct TerminateForm {
    pub csrf: Option<String>,
    pub reason: Option<String>,
    /// Also lock the session's user / device (until removed), with the same reason.
    pub lock_user: Option<String>,
    pub lock_device: Option<String>,
}

pub async fn terminate(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path(id): Path<String>,
    Form(f): Form<TerminateForm>,
) -> Response {
    let action = format!("POST /sessions/{id}/terminate");
    if let Err(refused) = check_change(&state, &admin, f.csrf.as_deref(), &action).await {
        return refused;
    }
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(e) => return failure(&e),
    };
    let reason = f
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "terminated from the console".into());
    let t = Terminate {
        ids: vec![id],
        reason: Some(reason.clone()),
        on_behalf_of: Some(admin.user.clone()),
        ..Terminate::default()
    };
    let (lock_user, lock_device) = (f.lock_user.is_some(), f.lock_device.is_some());
    let who = admin.user.clone();
    let done = state
        .agent
        .call(move |c| {
            let s = c.sessions_get(id)?;
            let ended = c.sessions_terminate(&t)?;
            let mut targets = Vec::new();
            if lock_user {
                targets.push(LockTarget::User(s.user.clone()));
            }
            if let (true, Some(device)) = (lock_device, s.device.id.clone()) {
                targets.push(LockTarget::Device(device));
            }
            let mut locked = Vec::new();
            for target in targets {
                let added = c.lock_add(&NewLock {
                    target,
                    ttl_secs: None,
                    reason: Some(reason.clone()),
                    show_reason: false,
                    on_behalf_of: Some(who.clone()),
                })?;
                locked.push(added.lock.id.to_string());
            }
            Ok((ended.count, locked))
        })
        .await;
    match done {
        Ok((count, locked)) => {
            tracing::info!(user = %admin.user, session = %id, count, ?locked, "console: terminated");
            let locked = if locked.is_empty() {
                String::new()
            } else {
                format!("&locked={}", locked.join(","))
            };
            Redirect::to(&format!("/sessions/{id}?terminated={count}{locked}")).into_response()
        }
        Err(e) => failure(&e),
    }
}
