//! The locks page: every lock (active and expired), adding one on any target the locks
//! support (with a TTL and a reason), removing one; and which locks touch a session, for its
//! detail page.

use axum::{
    Form,
    extract::{Path, Query, State as AxState},
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use serde::Deserialize;

use super::{
    ConsoleError, Shared,
    access::SignedInAdmin,
    html::{failure, page as frame, span, utc},
    routes::check_change,
};
use crate::{
    api::views::SessionView,
    locks::{
        LockId, LockState, LockTarget, NewLock,
        model::parse_prefix,
        wire::{LockFilter, LockView},
    },
    sessions::model::{SessionId, now_ms},
};

/// The target kinds the add form offers, as the locks issue names them.
const KINDS: [&str; 6] = ["user", "group", "device", "source", "session", "token"];

/// A target from the form's kind and value.
///
/// # Errors
/// An unknown kind or a session id that does not parse; the agent checks the rest.
pub fn target(kind: &str, value: &str) -> Result<LockTarget, ConsoleError> {
    let v = value.trim().to_owned();
    Ok(match kind {
        "user" => LockTarget::User(v),
        "group" => LockTarget::Group(v),
        "device" => LockTarget::Device(v),
        "source" => LockTarget::Source(v),
        "token" => LockTarget::Token(v),
        "session" => LockTarget::Session(
            serde_json::from_value::<SessionId>(serde_json::Value::String(v.clone())).map_err(
                |_| ConsoleError::Internal(format!("{v:?} is not a session id (16 hex digits)")),
            )?,
        ),
        other => {
            return Err(ConsoleError::Internal(format!(
                "lock target kind {other:?}: use one of {}",
                KINDS.join(", ")
            )));
        }
    })
}

/// Whether a lock's target covers this session (what the agent matches at admission).
pub fn touches(lock: &LockView, s: &SessionView) -> bool {
    let user_is = |u: &str| {
        s.user.eq_ignore_ascii_case(u)
            || s.email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(u))
            || s.subject == u
    };
    match &lock.target {
        LockTarget::User(u) => user_is(u),
        LockTarget::Subject { iss, sub } => *iss == s.issuer && *sub == s.subject,
        LockTarget::Group(g) => s.groups.contains(g),
        LockTarget::Device(d) => s.device.id.as_deref() == Some(d.as_str()),
        LockTarget::Source(p) => parse_prefix(p).is_ok_and(|net| net.contains(&s.source)),
        LockTarget::Session(id) => id.to_string() == s.id,
        LockTarget::Token(t) => s.token_sha256.as_deref() == Some(t.as_str()),
    }
}

fn state(l: &LockView) -> &'static str {
    match l.state {
        LockState::Active => "active",
        LockState::Expired => "expired",
    }
}

/// Locks as a table; with `csrf`, each active one gets a remove button.
pub fn table(locks: &[LockView], csrf: Option<&str>) -> Markup {
    let now = now_ms();
    html! {
        table.locks {
            thead { tr { th { "lock" } th { "target" } th { "state" } th { "reason" } th { "by" } th { "since" } th { "expires" } th {} } }
            tbody { @for l in locks {
                tr id=(format!("lock-{}", l.id)) data-state=(state(l)) {
                    td { code { (l.id) } }
                    td.target { (l.target.to_string()) }
                    td { span class=(format!("state {}", state(l))) { (state(l)) } }
                    td { (l.reason.clone().unwrap_or_default()) }
                    td { (l.by) }
                    td title=(utc(l.created_at_ms)) { (span(now.saturating_sub(l.created_at_ms))) " ago" }
                    td { @match l.expires_at_ms { Some(at) if at > now => { "in " (span(at - now)) }, Some(at) => { (utc(at)) }, None => { "when removed" } } }
                    td { @if let (Some(token), LockState::Active) = (csrf, l.state) {
                        form.inline method="post" action=(format!("/locks/{}/remove", l.id)) {
                            input type="hidden" name="csrf" value=(token);
                            button.remove type="submit" { "Remove" }
                        }
                    } }
                }
            } }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct LocksQuery {
    pub added: Option<String>,
    pub cut: Option<usize>,
    pub removed: Option<String>,
}

pub async fn page(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<LocksQuery>,
) -> Response {
    let locks = match state
        .agent
        .call(|c| c.lock_list(&LockFilter::default()))
        .await
    {
        Ok(l) => l,
        Err(e) => return failure(&e),
    };
    let body = html! {
        h1 { "Locks" }
        @if let Some(id) = &q.added {
            p.notice #notice { "Added " code { (id) } "; it ended " (q.cut.unwrap_or(0)) " live sessions." }
        }
        @if let Some(id) = &q.removed { p.notice #notice { "Removed " code { (id) } "." } }
        p { "A lock refuses admission and reconnect of everything it matches, and ended every live session it matched when it was added." }
        @if admin.can_change() {
            form.filters #add-lock method="post" action="/locks" {
                input type="hidden" name="csrf" value=(admin.csrf);
                select name="kind" { @for k in KINDS { option value=(k) { (k) } } }
                input name="value" required placeholder="alice@corp.example, laptop-17, 10.0.0.0/24, …";
                input name="ttl" placeholder="TTL (2h, 7d; empty: until removed)";
                input name="reason" placeholder="reason";
                label { input type="checkbox" name="show_reason" value="yes"; " show the reason to refused clients" }
                button type="submit" { "Add lock" }
            }
        }
        (table(&locks, admin.can_change().then_some(admin.csrf.as_str())))
    };
    frame(&state, "Locks", &admin, "Locks", body).into_response()
}

#[derive(Deserialize)]
pub struct AddForm {
    pub csrf: Option<String>,
    pub kind: Option<String>,
    pub value: Option<String>,
    pub ttl: Option<String>,
    pub reason: Option<String>,
    pub show_reason: Option<String>,
}

/// A TTL as the form has it: empty is "until removed".
fn ttl_secs(text: Option<&str>) -> Result<Option<u64>, ConsoleError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => crate::policy::parse_duration(t).map(Some).ok_or_else(|| {
            ConsoleError::Internal(format!("TTL {t:?}: write it as 90s, 15m, 2h, 7d or 1d12h"))
        }),
    }
}

fn reason(text: Option<String>) -> Option<String> {
    text.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty())
}

pub async fn add(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Form(f): Form<AddForm>,
) -> Response {
    if let Err(refused) = check_change(&state, &admin, f.csrf.as_deref(), "POST /locks").await {
        return refused;
    }
    let new = match (
        target(
            f.kind.as_deref().unwrap_or_default(),
            f.value.as_deref().unwrap_or_default(),
        ),
        ttl_secs(f.ttl.as_deref()),
    ) {
        (Ok(target), Ok(ttl_secs)) => NewLock {
            target,
            ttl_secs,
            reason: reason(f.reason),
            show_reason: f.show_reason.is_some(),
            on_behalf_of: Some(admin.user.clone()),
        },
        (Err(e), _) | (_, Err(e)) => return failure(&e),
    };
    match state.agent.call(move |c| c.lock_add(&new)).await {
        Ok(added) => {
            tracing::info!(user = %admin.user, lock = %added.lock.id, "console: lock added");
            Redirect::to(&format!(
                "/locks?added={}&cut={}",
                added.lock.id, added.sessions_cut
            ))
            .into_response()
        }
        Err(e) => failure(&e),
    }
}

#[derive(Deserialize)]
pub struct RemoveForm {
    pub csrf: Option<String>,
}

pub async fn remove(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Path(id): Path<String>,
    Form(f): Form<RemoveForm>,
) -> Response {
    let action = format!("POST /locks/{id}/remove");
    if let Err(refused) = check_change(&state, &admin, f.csrf.as_deref(), &action).await {
        return refused;
    }
    let Ok(lock) = id.parse::<LockId>() else {
        return failure(&ConsoleError::Internal(format!("{id:?} is not a lock id")));
    };
    let who = Some(admin.user.clone());
    match state
        .agent
        .call(move |c| c.lock_remove_for(lock, who))
        .await
    {
        Ok(done) => Redirect::to(&format!("/locks?removed={}", done.removed.id)).into_response(),
        Err(e) => failure(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_targets_and_ttls_read_as_the_cli_writes_them() {
        assert_eq!(
            target("device", " laptop-7 ").unwrap(),
            LockTarget::Device("laptop-7".into())
        );
        assert!(target("planet", "x").is_err());
        assert!(target("session", "nope").is_err());
        assert_eq!(ttl_secs(Some("2h")).unwrap(), Some(7200));
        assert_eq!(ttl_secs(Some("  ")).unwrap(), None);
        assert!(ttl_secs(Some("soon")).is_err());
    }
}
