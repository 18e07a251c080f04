//! The console's routes, the headers every answer carries (CSP without inline script, no
//! framing, no sniffing), its embedded assets, signing in and out, and the refusal of changes
//! that fail their checks (403, audited).

use axum::{
    Form, Router,
    extract::{Query, Request, State as AxState},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::html;
use serde::Deserialize;

use super::{
    Shared, access,
    access::{Admin, SignedInAdmin},
    audit, fleet_sessions, hosts, html as page, live, locks, policy, sessions,
};
use crate::api::request::ConsoleRefusal;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// Every route of the console.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(sessions::list_page))
        .route("/sessions/{id}", get(sessions::detail_page))
        .route(
            "/sessions/{id}/terminate",
            get(sessions::confirm_page).post(sessions::terminate),
        )
        .route("/audit", get(audit::page))
        .route("/audit/export", get(audit::export))
        .route("/policy", get(policy::page))
        .route("/locks", get(locks::page).post(locks::add))
        .route("/locks/{id}/remove", post(locks::remove))
        .route("/live/sessions", get(live::sessions))
        .route("/live/sessions/{id}", get(live::session))
        .route("/live/audit", get(live::audit))
        .route("/hosts", get(hosts::page_of_hosts))
        .route("/live/hosts", get(hosts::live_hosts))
        .route("/fleet", get(fleet_sessions::page_of_fleet_sessions))
        .route(
            "/fleet/sessions/{host}/{id}/terminate",
            get(fleet_sessions::confirm_page).post(fleet_sessions::terminate),
        )
        .route("/live/fleet", get(fleet_sessions::live_fleet_sessions))
        .route("/login", get(login))
        .route("/callback", get(callback))
        .route("/logout", post(logout))
        .route("/assets/console.js", get(js))
        .route("/assets/console.css", get(css))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CONSOLE_JS,
    )
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CONSOLE_CSS,
    )
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// Only a path on this console, never another site.
fn local_path(next: Option<String>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/".into(),
    }
}

async fn login(AxState(state): AxState<Shared>, Query(q): Query<LoginQuery>) -> Response {
    let Some(oidc) = &state.oidc else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this console has no identity provider configured ([console.oidc])",
        )
            .into_response();
    };
    let (url, pending) = oidc.begin(local_path(q.next));
    let cookie = state.access.login_cookie(&pending.state);
    state.access.remember(pending);
    ([(header::SET_COOKIE, cookie)], Redirect::to(&url)).into_response()
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

fn sign_in_failed(status: StatusCode, why: &str) -> Response {
    let body = page::bare(
        "Sign-in failed",
        html! {
            h1 { "Sign-in failed" }
            p.error { (why) }
            p { a href="/login" { "Try again" } }
        },
    );
    (status, Html(body.into_string())).into_response()
}

async fn callback(
    AxState(state): AxState<Shared>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    if let Some(e) = q.error {
        let d = q.error_description.unwrap_or_default();
        return sign_in_failed(
            StatusCode::FORBIDDEN,
            &format!("the identity provider said {e}: {d}"),
        );
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return sign_in_failed(StatusCode::BAD_REQUEST, "no code or state in the callback");
    };
    // The browser that comes back must be the one that left.
    if access::cookie(&headers, access::LOGIN_COOKIE) != Some(st.as_str()) {
        return sign_in_failed(
            StatusCode::FORBIDDEN,
            "this sign-in was not started in this browser (or took over 10 minutes)",
        );
    }
    let Some(pending) = state.access.take_pending(&st) else {
        return sign_in_failed(
            StatusCode::FORBIDDEN,
            "unknown or expired sign-in: start again",
        );
    };
    let st2 = std::sync::Arc::clone(&state);
    let finished = tokio::task::spawn_blocking(move || {
        let oidc = st2.oidc.as_ref().expect("a pending sign-in has a provider");
        oidc.finish(&code, &pending).map(|who| (who, pending.next))
    })
    .await;
    let (who, next) = match finished {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return sign_in_failed(StatusCode::FORBIDDEN, &e.to_string()),
        Err(e) => return sign_in_failed(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let (cookie, admin) = match state.access.sign_in(who) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(user = %e.user, "console: sign-in refused: no console group");
            return sign_in_failed(StatusCode::FORBIDDEN, &e.to_string());
        }
    };
    tracing::info!(user = %admin.user, role = admin.role.as_str(), "console: signed in");
    // A page of our own moves on: the redirect from the provider was a cross-site navigation,
    // and the SameSite=Strict cookie is sent from the next same-site one.
    let body = page::bare(
        "Signed in",
        html! {
            meta http-equiv="refresh" content=(format!("0;url={next}"));
            p { "Signed in as " (admin.user) ". " a href=(next) { "Continue" } }
        },
    );
    let mut res = Html(body.into_string()).into_response();
    let h = res.headers_mut();
    h.append(header::SET_COOKIE, state.access.session_cookie(&cookie));
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static("fw_console_login=; Path=/callback; Max-Age=0"),
    );
    res
}

#[derive(Deserialize)]
pub struct CsrfForm {
    pub csrf: Option<String>,
}

async fn logout(
    AxState(state): AxState<Shared>,
    headers: HeaderMap,
    SignedInAdmin(admin): SignedInAdmin,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !access::csrf_ok(&admin, f.csrf.as_deref()) {
        return refuse(
            &state,
            &admin,
            "POST /logout",
            "missing or wrong CSRF token",
        )
        .await;
    }
    if let Some(c) = access::cookie(&headers, state.access.cookie_name()) {
        state.access.sign_out(c);
    }
    (
        [(header::SET_COOKIE, state.access.clear_cookie())],
        Html(
            page::bare(
                "Signed out",
                html! { p { "Signed out. " a href="/login" { "Sign in" } } },
            )
            .into_string(),
        ),
    )
        .into_response()
}

/// Checks a change: the CSRF token first (a forged form), then the role. `Err` is the 403
/// to send, already audited.
pub async fn check_change(
    state: &Shared,
    admin: &Admin,
    csrf: Option<&str>,
    action: &str,
) -> Result<(), Response> {
    if !access::csrf_ok(admin, csrf) {
        return Err(refuse(state, admin, action, "missing or wrong CSRF token").await);
    }
    if !admin.can_change() {
        return Err(refuse(state, admin, action, "read-only administrator").await);
    }
    Ok(())
}

/// 403, and a `console_refused` event in the agent's audit log.
pub async fn refuse(state: &Shared, admin: &Admin, action: &str, reason: &str) -> Response {
    tracing::warn!(user = %admin.user, %action, %reason, "console: change refused");
    let r = ConsoleRefusal {
        by: admin.user.clone(),
        action: action.to_owned(),
        reason: reason.to_owned(),
    };
    if let Err(e) = state.agent.call(move |c| c.console_refused(&r)).await {
        tracing::error!(error = %e, "console: the refusal could not be audited");
    }
    let body = page::bare(
        "Refused",
        html! {
            h1 { "403: refused" }
            p.error { (reason) ": " (action) }
            p { "This refusal is in the audit log." }
        },
    );
    (StatusCode::FORBIDDEN, Html(body.into_string())).into_response()
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn after_sign_in_only_local_paths() {
        assert_eq!(local_path(Some("/audit?user=a".into())), "/audit?user=a");
        for bad in ["https://evil.example", "//evil.example", "/\\evil", "audit"] {
            assert_eq!(local_path(Some(bad.into())), "/", "{bad}");
        }
        assert_eq!(local_path(None), "/");
    }
}
