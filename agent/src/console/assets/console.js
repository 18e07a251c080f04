// The console's only script: live updates over server-sent events. Pages carry no inline
// script (the Content-Security-Policy forbids it); each live region names its stream in
// data-live, and the server sends ready HTML (escaped by the server's templates).
"use strict";

function follow(el, event, apply) {
  const source = new EventSource(el.dataset.live);
  source.addEventListener(event, (e) => apply(JSON.parse(e.data)));
  source.addEventListener("lagged", (e) => {
    const note = document.getElementById("live-note");
    if (note) note.textContent = JSON.parse(e.data);
  });
  source.addEventListener("open", () => document.body.classList.remove("offline"));
  source.addEventListener("error", () => document.body.classList.add("offline"));
}

document.addEventListener("DOMContentLoaded", () => {
  const rows = document.getElementById("rows");
  if (rows) follow(rows, "rows", (html) => { rows.innerHTML = html; });
  const live = document.getElementById("live");
  if (live) follow(live, "detail", (html) => { live.innerHTML = html; });
  const audit = document.getElementById("audit-rows");
  if (audit) {
    follow(audit, "audit", (html) => {
      audit.insertAdjacentHTML("afterbegin", html);
      while (audit.rows.length > 1000) audit.deleteRow(-1);
    });
  }
});
