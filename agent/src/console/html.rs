//! The console's page frame (navigation, who is signed in, sign out) and the small formats
//! every page shares: times, durations, byte counts.

use axum::{
    http::StatusCode,
    response::{Html, IntoResponse, Response},
};
use maud::{DOCTYPE, Markup, html};

use super::{ConsoleError, State, access::Admin};

/// A page with the navigation, for a signed-in administrator. Hosts is in the navigation
/// only when the console's config has `[fleet]`.
pub fn page(
    state: &State,
    title: &str,
    admin: &Admin,
    current: &str,
    body: Markup,
) -> Html<String> {
    let mut nav = vec![
        ("/", "Sessions"),
        ("/audit", "Audit"),
        ("/policy", "Policy"),
        ("/locks", "Locks"),
    ];
    if state.fleet.is_some() {
        nav.push(("/hosts", "Hosts"));
        nav.push(("/fleet", "Fleet sessions"));
    }
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · flowwarden" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    span.brand { "flowwarden" }
                    nav {
                        @for (href, label) in nav {
                            a href=(href) class=[(current == label).then_some("current")] { (label) }
                        }
                    }
                    span.who {
                        span #signed-in-as { (admin.user) }
                        " · "
                        span #role class=(admin.role.as_str()) { (admin.role.as_str()) }
                    }
                    form.signout method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(admin.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    };
    Html(markup.into_string())
}

/// A page without navigation (sign-in outcomes, refusals).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · flowwarden" }
                link rel="stylesheet" href="/assets/console.css";
            }
            body { main { (body) } }
        }
    }
}

/// What a failed call to the agent looks like to the administrator.
pub fn failure(e: &ConsoleError) -> Response {
    use crate::api::{client::ClientError, jsonrpc::NOT_FOUND};
    let status = match e {
        ConsoleError::Agent(ClientError::Rpc { code, .. }) if *code == NOT_FOUND => {
            StatusCode::NOT_FOUND
        }
        ConsoleError::Agent(ClientError::Rpc { .. }) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    let body = bare(
        "Error",
        html! {
            h1 { (status.as_u16()) }
            p.error { (e.to_string()) }
            p { a href="/" { "Sessions" } }
        },
    );
    (status, Html(body.into_string())).into_response()
}

/// `2 KiB`, `3.4 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A span of milliseconds for people: `45s`, `12m`, `3h 05m`, `2d 4h`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A Unix-milliseconds time as UTC, `2026-12-04 09:45:07Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_for_people() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
        assert_eq!(span(45_000), "45s");
        assert_eq!(span(3_900_000), "1h 05m");
        assert_eq!(span(2 * 86_400_000 + 4 * 3_600_000), "2d 4h");
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_795_312_000_000), "2026-11-22 01:46:40Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
    }
}
