//! The Hosts page: every agent of the fleet as the fleet's live view (NATS KV) has it:
//! version, policy version, lag, connected, sessions, last seen. There only when the
//! console's config has `[fleet]`; it reads the view, like `flowwarden fleet hosts`, and
//! sends nothing to any host.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{Event as NatsEvent, connection::State as Link, jetstream};
use axum::{
    extract::State as AxState,
    http::StatusCode,
    response::{Html, IntoResponse, Response, sse::Event},
};
use maud::{Markup, html};
use tokio::sync::mpsc;

use super::{
    Shared,
    access::SignedInAdmin,
    html::{bare, page, span, utc},
};
use crate::{
    api::request::Terminate,
    fleet::{
        FleetConfig, FleetError,
        admin::{Admin, Issued, connected, hosts_in, sessions_in},
        command::{Action, Target},
        keys::AdminKey,
        link::{self, Names},
        view::{FleetSession, HostView},
    },
    sessions::model::{SessionId, now_ms},
};

/// How long a fleet command from the console waits for the host's outcome.
pub const COMMAND_WAIT: Duration = Duration::from_secs(5);
/// A read of the view that takes longer than this is reported on the page.
const READ_WITHIN: Duration = Duration::from_secs(3);
/// The live region is re-read this often (agents publish their view once a second).
pub(super) const TICK: Duration = Duration::from_secs(2);

/// The console's link to the fleet's view: one NATS connection, kept (and re-made) in the
/// background, so that an unreachable server never holds up a page.
pub struct FleetView {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    servers: String,
    /// This host's name in the fleet: its sessions are the ones the console can open.
    host: String,
    /// The admin key the console signs fleet commands with (`[console.fleet]
    /// admin_key_file`); without it the console commands nothing beyond its own host.
    admin_key: Option<Arc<AdminKey>>,
    /// The server's last complaint (a permissions violation, say): shown with a failed read.
    server_said: Arc<Mutex<Option<String>>>,
}

impl FleetView {
    /// Starts connecting to `config`'s servers; returns at once.
    ///
    /// # Errors
    /// A credential file cannot be read.
    pub async fn connect(
        config: &FleetConfig,
        admin_key: Option<AdminKey>,
    ) -> Result<Self, FleetError> {
        let server_said = Arc::new(Mutex::new(None));
        let said = Arc::clone(&server_said);
        let client =
            link::connect(
                config,
                "flowwarden-console".into(),
                false,
                move |event| match event {
                    NatsEvent::ServerError(e) => {
                        tracing::warn!(error = %e, "console: the fleet's server refused");
                        *said.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                    NatsEvent::Connected | NatsEvent::Disconnected => {
                        tracing::info!(%event, "console: fleet link {event}");
                    }
                    other => tracing::debug!(event = %other, "console: fleet link event"),
                },
            )
            .await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(READ_WITHIN);
        Ok(Self {
            client,
            js,
            names: Names::new(&config.subject_prefix),
            servers: config.servers.join(", "),
            host: config.host_name(),
            admin_key: admin_key.map(Arc::new),
            server_said,
        })
    }

    /// This host's name in the fleet.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the console may end sessions on other hosts (it holds an admin key).
    pub fn can_command(&self) -> bool {
        self.admin_key.is_some()
    }

    /// Ends session `id` on `host` with a signed fleet command, on behalf of the signed-in
    /// administrator `by`; waits up to [`COMMAND_WAIT`] for the host's outcome.
    ///
    /// # Errors
    /// No admin key, or the command was not stored by the server.
    pub async fn terminate(
        &self,
        host: &str,
        id: SessionId,
        reason: String,
        by: &str,
    ) -> Result<Issued, String> {
        let Some(key) = &self.admin_key else {
            return Err(
                "this console holds no fleet admin key ([console.fleet] admin_key_file)".into(),
            );
        };
        let params = Terminate {
            ids: vec![id],
            reason: Some(reason),
            on_behalf_of: Some(by.to_owned()),
            ..Terminate::default()
        };
        let action = Action::Call {
            method: "sessions.terminate".into(),
            params: serde_json::to_value(&params).map_err(|e| e.to_string())?,
        };
        let admin = Admin {
            client: self.client.clone(),
            js: self.js.clone(),
            names: self.names.clone(),
        };
        let said = || {
            self.server_said
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        };
        admin
            .issue(
                key,
                Target::Host(host.to_owned()),
                action,
                None,
                COMMAND_WAIT,
            )
            .await
            .map_err(|e| match said() {
                Some(s) => format!("{e} (the server said: {s})"),
                None => e.to_string(),
            })
    }

    /// Every host in the view, or what the page says instead.
    pub async fn hosts(&self) -> Result<Vec<HostView>, String> {
        self.read(hosts_in(&self.js, &self.names)).await
    }

    /// Every live session on every host in the view, or what the page says instead.
    pub async fn sessions(&self) -> Result<Vec<FleetSession>, String> {
        self.read(sessions_in(&self.js, &self.names)).await
    }

    /// One read of the view within its time, its failure said as a page says it.
    async fn read<T>(
        &self,
        read: impl std::future::Future<Output = Result<T, FleetError>>,
    ) -> Result<T, String> {
        if self.client.connection_state() != Link::Connected {
            return Err(format!(
                "cannot reach the fleet's NATS servers ({}); the console keeps trying",
                self.servers
            ));
        }
        let read = tokio::time::timeout(READ_WITHIN * 2, read).await;
        let said = self
            .server_said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let why = match read {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "reading the fleet's view from {} took over {:?}",
                self.servers,
                READ_WITHIN * 2
            ),
        };
        Err(match said {
            Some(s) => format!("{why} (the server said: {s})"),
            None => why,
        })
    }
}

/// The part of the page the live stream replaces: the table, or the error block.
pub(super) fn region(read: &Result<Vec<HostView>, String>) -> Markup {
    let now = now_ms();
    html! {
        @match read {
            Err(why) => div.fleet-error #fleet-error {
                p.error { "The fleet's view cannot be read: " (why) }
                p { "The other pages use this agent's status socket and keep working. This page \
                     retries every " (TICK.as_secs()) " seconds." }
            },
            Ok(hosts) if hosts.is_empty() => p #no-hosts {
                "No host has published its view yet (agents with [fleet] do so every second)."
            },
            Ok(hosts) => table.hosts {
                thead { tr {
                    th { "host" } th { "connected" } th { "version" } th { "policy version" }
                    th { "current" } th { "lag" } th { "sessions" } th { "last seen" }
                } }
                tbody {
                    @for h in hosts {
                        @let up = connected(h);
                        tr id=(format!("h-{}", h.host)) data-connected=(up) {
                            td.host { (h.host) }
                            td.connected class=(if up { "ok" } else { "bad" }) {
                                @if up { "yes" } @else { "no" }
                            }
                            td.version { (h.version) }
                            td.policy-version { (h.policy_version) }
                            td.current { @if h.current { "yes" } @else { "no" } }
                            td.lag { (h.lag) }
                            td.sessions { (h.sessions) }
                            td.last-seen {
                                (utc(h.last_seen_ms)) " (" (span(now.saturating_sub(h.last_seen_ms))) " ago)"
                            }
                        }
                    }
                }
            },
        }
    }
}

pub(super) fn no_fleet() -> Response {
    let body = bare(
        "No fleet",
        html! {
            h1 { "404" }
            p.error { "This console's config has no [fleet] section: there are no hosts to show." }
            p { a href="/" { "Sessions" } }
        },
    );
    (StatusCode::NOT_FOUND, Html(body.into_string())).into_response()
}

/// `/hosts`, for any signed-in administrator.
pub async fn page_of_hosts(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
) -> Response {
    let Some(fleet) = &state.fleet else {
        return no_fleet();
    };
    let read = fleet.hosts().await;
    let body = html! {
        h1 { "Hosts" }
        p { "Every agent of the fleet, from the view each publishes every second; a host is \
             connected while its view is under 5 seconds old. Updated live." }
        div #live data-live="/live/hosts" { (region(&read)) }
    };
    page(&state, "Hosts", &admin, "Hosts", body).into_response()
}

/// `/live/hosts`: the region again whenever it changes.
pub async fn live_hosts(
    AxState(state): AxState<Shared>,
    SignedInAdmin(_admin): SignedInAdmin,
) -> Response {
    if state.fleet.is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    live_region(state, |state| async move {
        match &state.fleet {
            Some(fleet) => region(&fleet.hosts().await).into_string(),
            None => String::new(),
        }
    })
}

/// A live region of a fleet page: rendered again every [`TICK`] by `render`, and sent (as
/// the `detail` event console.js swaps in) whenever it changed, until the browser leaves.
pub(super) fn live_region<F, Fut>(state: Shared, render: F) -> Response
where
    F: Fn(Shared) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let html = render(Arc::clone(&state)).await;
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

    fn host(name: &str, seen_ms_ago: u64) -> HostView {
        HostView {
            host: name.into(),
            version: "0.1.0".into(),
            policy_version: 7,
            current: true,
            lag: 0,
            control_position: 12,
            sessions: 3,
            last_seen_ms: now_ms() - seen_ms_ago,
        }
    }

    #[test]
    fn each_host_is_a_row_and_a_stale_one_is_not_connected() {
        let html = region(&Ok(vec![host("web-1", 0), host("web-2", 60_000)])).into_string();
        assert!(
            html.contains(r#"id="h-web-1" data-connected="true""#),
            "{html}"
        );
        assert!(
            html.contains(r#"id="h-web-2" data-connected="false""#),
            "{html}"
        );
        assert!(
            html.contains(r#"<td class="policy-version">7</td>"#),
            "{html}"
        );
        assert!(html.contains("(1m ago)"), "{html}");
    }

    #[test]
    fn a_failed_read_is_an_error_block_not_a_table() {
        let html = region(&Err(
            "cannot reach the fleet's NATS servers (nats://x:4222)".into(),
        ))
        .into_string();
        assert!(html.contains(r#"id="fleet-error""#), "{html}");
        assert!(html.contains("nats://x:4222"), "{html}");
        assert!(!html.contains("<table"), "{html}");
    }
}
