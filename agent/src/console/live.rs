//! Live pages over server-sent events: the sessions list and a session's detail re-read
//! whenever the agent's audit stream says something happened (and once a second, for the
//! counters), sent only when they changed; the audit tail as events come.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    extract::{Path, Query, State as AxState},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use super::{
    Shared,
    access::SignedInAdmin,
    agent::Heard,
    audit::AuditParams,
    sessions::{ListQuery, audit_rows, fetch_page, live_detail, rows},
};
use crate::sessions::model::SessionId;

/// Counters move without audit events: pages are re-read at least this often.
const TICK: Duration = Duration::from_secs(1);

/// Events for the browser, as a stream axum can send.
pub(super) struct Events(pub(super) mpsc::Receiver<Event>);

impl futures_core::Stream for Events {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

pub(super) fn sse(rx: mpsc::Receiver<Event>) -> Response {
    Sse::new(Events(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Waits for the next reason to look again: a tick, or an audit event `relevant` accepts.
async fn next_change(
    heard: &mut tokio::sync::broadcast::Receiver<Heard>,
    relevant: impl Fn(&Heard) -> bool,
) {
    let tick = tokio::time::sleep(TICK);
    tokio::pin!(tick);
    loop {
        tokio::select! {
            () = &mut tick => return,
            got = heard.recv() => match got {
                Ok(h) if relevant(&h) => break,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => break,
                // The hub is gone: ticks only.
                Err(RecvError::Closed) => { (&mut tick).await; return; }
            },
        }
    }
    // A burst of events (a termination brings several) becomes one re-read.
    tokio::time::sleep(Duration::from_millis(50)).await;
    while heard.try_recv().is_ok() {}
}

pub async fn sessions(
    AxState(state): AxState<Shared>,
    SignedInAdmin(admin): SignedInAdmin,
    Query(q): Query<ListQuery>,
) -> Response {
    let (tx, rx) = mpsc::channel(4);
    let mut heard = state.heard();
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            if let Ok((list, _)) = fetch_page(&state, &q).await {
                let html = rows(&list, &admin).into_string();
                if html != last {
                    let ev = Event::default().event("rows").json_data(&html);
                    if tx.send(ev.expect("a string encodes")).await.is_err() {
                        return;
                    }
                    last = html;
                }
            }
            if tx.is_closed() {
                return;
            }
            next_change(&mut heard, |h| match h {
                Heard::Event(e) => e.session.is_some(),
                Heard::Gap => true,
            })
            .await;
        }
    });
    sse(rx)
}

pub async fn session(
    AxState(state): AxState<Shared>,
    SignedInAdmin(_admin): SignedInAdmin,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = serde_json::from_value::<SessionId>(serde_json::Value::String(id)) else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    let (tx, rx) = mpsc::channel(4);
    let mut heard = state.heard();
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            if let Ok(s) = state.agent.call(move |c| c.sessions_get(id)).await {
                let html = live_detail(&s).into_string();
                if html != last {
                    let ev = Event::default().event("detail").json_data(&html);
                    if tx.send(ev.expect("a string encodes")).await.is_err() {
                        return;
                    }
                    last = html;
                }
            }
            if tx.is_closed() {
                return;
            }
            next_change(&mut heard, |h| match h {
                Heard::Event(e) => e.session == Some(id),
                Heard::Gap => true,
            })
            .await;
        }
    });
    sse(rx)
}

pub async fn audit(
    AxState(state): AxState<Shared>,
    SignedInAdmin(_admin): SignedInAdmin,
    Query(p): Query<AuditParams>,
) -> Response {
    let (tx, rx) = mpsc::channel(64);
    let mut heard = state.heard();
    tokio::spawn(async move {
        loop {
            let ev = match heard.recv().await {
                Ok(Heard::Event(e)) if p.matches(&e) => Event::default()
                    .event("audit")
                    .json_data(audit_rows(std::slice::from_ref(&*e)).into_string()),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => Event::default()
                    .event("lagged")
                    .json_data(format!("{n} events were not shown live: reload the page")),
                Err(RecvError::Closed) => return,
            };
            if tx.send(ev.expect("a string encodes")).await.is_err() {
                return;
            }
        }
    });
    sse(rx)
}
