//! Who is signed in to the console: its own sign-in sessions (a random cookie, kept in
//! memory, expiring), the role their groups give them, their CSRF token, and the checks every
//! page and every change goes through.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRequestParts, OriginalUri},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use subtle::ConstantTimeEq as _;

use super::{
    Shared,
    oidc::{Pending, SignedIn, random_token},
};

/// The sign-in cookie; `__Host-` when served over TLS (Secure, no Domain, Path=/).
pub const COOKIE: &str = "fw_console";
pub const COOKIE_TLS: &str = "__Host-fw_console";
/// Binds a sign-in under way to the browser that started it (SameSite=Lax: the provider's
/// redirect back is a cross-site navigation, on which Strict cookies are not sent).
pub const LOGIN_COOKIE: &str = "fw_console_login";
/// A sign-in not finished within this long is forgotten.
const PENDING_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees everything, changes nothing.
    Read,
    /// May terminate and lock.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read-only",
            Self::Admin => "admin",
        }
    }
}

/// A signed-in administrator.
#[derive(Debug, Clone)]
pub struct Admin {
    pub user: String,
    pub role: Role,
    /// Sent back in every change (a hidden form field); compared in constant time.
    pub csrf: String,
    pub expires: Instant,
}

impl Admin {
    pub fn can_change(&self) -> bool {
        self.role == Role::Admin
    }
}

pub struct Access {
    signed_in: Mutex<HashMap<String, Arc<Admin>>>,
    pending: Mutex<HashMap<String, Pending>>,
    lifetime: Duration,
    admin_groups: Vec<String>,
    read_groups: Vec<String>,
    /// Cookies are `Secure` (and `__Host-`) when the console is served over TLS.
    pub tls: bool,
}

/// Why someone may not sign in.
#[derive(Debug, thiserror::Error)]
#[error(
    "{user} is in none of the console's groups (admin: {admin:?}, read: {read:?}); their \
     groups: {groups:?}"
)]
pub struct NotAnAdministrator {
    pub user: String,
    pub groups: Vec<String>,
    pub admin: Vec<String>,
    pub read: Vec<String>,
}

impl Access {
    pub fn new(
        lifetime: Duration,
        admin_groups: Vec<String>,
        read_groups: Vec<String>,
        tls: bool,
    ) -> Self {
        Self {
            signed_in: Mutex::default(),
            pending: Mutex::default(),
            lifetime,
            admin_groups,
            read_groups,
            tls,
        }
    }

    pub fn cookie_name(&self) -> &'static str {
        if self.tls { COOKIE_TLS } else { COOKIE }
    }

    /// The role a set of groups gives: admin wins over read.
    pub fn role_of(&self, groups: &[String]) -> Option<Role> {
        let any = |wanted: &[String]| groups.iter().any(|g| wanted.contains(g));
        if any(&self.admin_groups) {
            Some(Role::Admin)
        } else if any(&self.read_groups) {
            Some(Role::Read)
        } else {
            None
        }
    }

    /// Opens a console session for someone the provider vouched for.
    ///
    /// # Errors
    /// They are in none of the configured groups.
    pub fn sign_in(&self, who: SignedIn) -> Result<(String, Arc<Admin>), NotAnAdministrator> {
        let Some(role) = self.role_of(&who.groups) else {
            return Err(NotAnAdministrator {
                user: who.user,
                groups: who.groups,
                admin: self.admin_groups.clone(),
                read: self.read_groups.clone(),
            });
        };
        let admin = Arc::new(Admin {
            user: who.user,
            role,
            csrf: random_token(),
            expires: Instant::now() + self.lifetime,
        });
        let cookie = random_token();
        let mut table = self.signed_in.lock().expect("console sessions lock");
        table.retain(|_, a| a.expires > Instant::now());
        table.insert(cookie.clone(), Arc::clone(&admin));
        Ok((cookie, admin))
    }

    /// Opens a console session with a given role, without a provider: for benches and
    /// in-process tests (never reachable over HTTP).
    pub fn sign_in_as(&self, user: &str, role: Role) -> String {
        let cookie = random_token();
        let admin = Arc::new(Admin {
            user: user.to_owned(),
            role,
            csrf: random_token(),
            expires: Instant::now() + self.lifetime,
        });
        self.signed_in
            .lock()
            .expect("console sessions lock")
            .insert(cookie.clone(), admin);
        cookie
    }

    pub fn sign_out(&self, cookie: &str) {
        self.signed_in
            .lock()
            .expect("console sessions lock")
            .remove(cookie);
    }

    /// The administrator behind a cookie, unless the session expired.
    pub fn lookup(&self, cookie: &str) -> Option<Arc<Admin>> {
        let mut table = self.signed_in.lock().expect("console sessions lock");
        match table.get(cookie) {
            Some(a) if a.expires > Instant::now() => Some(Arc::clone(a)),
            Some(_) => {
                table.remove(cookie);
                None
            }
            None => None,
        }
    }

    pub fn remember(&self, pending: Pending) {
        let mut table = self.pending.lock().expect("pending sign-ins lock");
        table.retain(|_, p| p.created.elapsed() < PENDING_FOR);
        table.insert(pending.state.clone(), pending);
    }

    /// The sign-in `state` names, once: a replayed callback finds nothing.
    pub fn take_pending(&self, state: &str) -> Option<Pending> {
        self.pending
            .lock()
            .expect("pending sign-ins lock")
            .remove(state)
            .filter(|p| p.created.elapsed() < PENDING_FOR)
    }

    /// `Set-Cookie` for a new console session.
    pub fn session_cookie(&self, value: &str) -> HeaderValue {
        let secure = if self.tls { "; Secure" } else { "" };
        let cookie = format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            self.cookie_name(),
            self.lifetime.as_secs()
        );
        HeaderValue::from_str(&cookie).expect("a cookie of safe characters")
    }

    /// `Set-Cookie` that clears the console session.
    pub fn clear_cookie(&self) -> HeaderValue {
        let secure = if self.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}",
            self.cookie_name()
        ))
        .expect("a cookie of safe characters")
    }

    /// `Set-Cookie` for a sign-in under way.
    pub fn login_cookie(&self, state: &str) -> HeaderValue {
        let secure = if self.tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{LOGIN_COOKIE}={state}; Path=/callback; HttpOnly; SameSite=Lax; Max-Age=600{secure}"
        ))
        .expect("a cookie of safe characters")
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a submitted CSRF token is this administrator's.
pub fn csrf_ok(admin: &Admin, submitted: Option<&str>) -> bool {
    submitted.is_some_and(|s| bool::from(s.as_bytes().ct_eq(admin.csrf.as_bytes())))
}

/// The signed-in administrator of a request; pages without one send the browser to sign in,
/// other requests get 401.
pub struct SignedInAdmin(pub Arc<Admin>);

impl FromRequestParts<Shared> for SignedInAdmin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let found =
            cookie(&parts.headers, state.access.cookie_name()).and_then(|c| state.access.lookup(c));
        if let Some(admin) = found {
            return Ok(Self(admin));
        }
        if parts.method == axum::http::Method::GET {
            let path = parts
                .extensions
                .get::<OriginalUri>()
                .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
            let next = path.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            // Live streams are not pages: the browser's EventSource retries after sign-in.
            if next.starts_with("/live/") {
                return Err(StatusCode::UNAUTHORIZED.into_response());
            }
            return Err(
                Redirect::to(&format!("/login?next={}", super::oidc::enc(&next))).into_response(),
            );
        }
        Err((
            StatusCode::UNAUTHORIZED,
            "not signed in to the console (or the sign-in expired): sign in again",
        )
            .into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(
            Duration::from_secs(60),
            vec!["fw-admins".into()],
            vec!["fw-readers".into()],
            false,
        )
    }

    #[test]
    fn groups_give_roles_and_nobody_else_signs_in() {
        let a = access();
        let who = |groups: &[&str]| SignedIn {
            user: "x@corp.example".into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        };
        let (cookie, admin) = a.sign_in(who(&["fw-readers", "fw-admins"])).unwrap();
        assert_eq!(admin.role, Role::Admin);
        assert_eq!(a.lookup(&cookie).unwrap().user, "x@corp.example");
        let (_, reader) = a.sign_in(who(&["fw-readers"])).unwrap();
        assert!(!reader.can_change());
        let e = a.sign_in(who(&["ops"])).unwrap_err();
        assert!(
            e.to_string().contains("none of the console's groups"),
            "{e}"
        );
        a.sign_out(&cookie);
        assert!(a.lookup(&cookie).is_none());
    }

    #[test]
    fn csrf_needs_the_exact_token_and_cookies_are_strict() {
        let a = access();
        let (_, admin) = a
            .sign_in(SignedIn {
                user: "x".into(),
                groups: vec!["fw-admins".into()],
            })
            .unwrap();
        assert!(csrf_ok(&admin, Some(&admin.csrf)));
        assert!(!csrf_ok(&admin, None));
        assert!(!csrf_ok(&admin, Some("forged")));
        let c = a.session_cookie("v");
        let c = c.to_str().unwrap();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"),
            "{c}"
        );
        let tls = Access::new(Duration::from_secs(60), vec![], vec![], true);
        assert!(
            tls.session_cookie("v")
                .to_str()
                .unwrap()
                .contains("; Secure")
        );
        assert_eq!(tls.cookie_name(), COOKIE_TLS);
    }

    #[test]
    fn expired_sign_ins_are_gone() {
        let a = Access::new(Duration::ZERO, vec!["g".into()], vec![], false);
        let (cookie, _) = a
            .sign_in(SignedIn {
                user: "x".into(),
                groups: vec!["g".into()],
            })
            .unwrap();
        assert!(a.lookup(&cookie).is_none());
    }

    #[test]
    fn cookies_are_read_from_any_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; fw_console=abc"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
