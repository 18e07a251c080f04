"""The web console in a real browser (Playwright driving the system's Chromium, headless).

Run by tests/tests/console_e2e.rs, which owns the agent, the OpenID provider, the console and
alice's ssh. The two talk in lines: this script prints `READY`, `TERMINATED`, `DONE` (and
`FAIL <why>`) on stdout, and reads `ALICE <session id>` and `BOB <session id>` from stdin.

Environment: CONSOLE_URL, CHROMIUM (the browser's path), SHOTS (a directory for the
screenshots). Waits are generous and never the thing asserted: what is asserted is what the
page shows.
"""

import os
import re
import sys

from playwright.sync_api import expect, sync_playwright

URL = os.environ["CONSOLE_URL"].rstrip("/")
CHROMIUM = os.environ["CHROMIUM"]
SHOTS = os.environ["SHOTS"]
WAIT_MS = 30_000


def say(line):
    print(line, flush=True)


def hear(prefix):
    line = sys.stdin.readline().strip()
    if not line.startswith(prefix + " "):
        raise AssertionError(f"expected {prefix} from the test, got {line!r}")
    return line.split(" ", 1)[1]


def sign_in(context, account):
    """Signs in through the provider's login form; returns the console's sessions page."""
    page = context.new_page()
    page.goto(URL + "/")
    # Not signed in: the console sent the browser to the provider.
    page.locator("input[name=login]").fill(account)
    page.locator("#idp-sign-in").click()
    expect(page.locator("#signed-in-as")).to_have_text(account, timeout=WAIT_MS)
    return page


def forged_post(page, path, form):
    """A POST the page's own forms would never send, with the page's cookies."""
    return page.request.post(URL + path, form=form, max_redirects=0)


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        # The provider's certificate comes from the test's private CA.
        admin_ctx = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1440, "height": 900}
        )
        admin = sign_in(admin_ctx, "admin@corp.example")
        expect(admin.locator("#role")).to_have_text("admin")
        # No [fleet] in this console's config: no Hosts page in the navigation.
        expect(admin.locator("header nav a", has_text="Hosts")).to_have_count(0)

        # The console's own cookie: HttpOnly, SameSite=Strict.
        cookies = [c for c in admin_ctx.cookies() if c["name"].endswith("fw_console")]
        assert cookies, admin_ctx.cookies()
        assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict", cookies
        csp = admin.request.get(URL + "/").headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp

        # The sessions page is open before alice logs in: her row must arrive live.
        say("READY")
        alice = hear("ALICE")
        bob = hear("BOB")
        row = admin.locator(f"#s-{alice}")
        expect(row).to_be_visible(timeout=WAIT_MS)
        expect(row).to_contain_text("alice@corp.example")
        expect(admin.locator(f"#s-{bob}")).to_be_visible(timeout=WAIT_MS)
        # Her ssh is a live flow: the row counts it.
        expect(row.locator("td").nth(7)).to_have_text("1", timeout=WAIT_MS)
        admin.screenshot(path=os.path.join(SHOTS, "console-sessions.png"), full_page=True)

        # The detail page: identity, claims, flows with live counters.
        row.locator("td").first.locator("a").click()
        expect(admin.locator("#user")).to_have_text("alice@corp.example")
        expect(admin.locator("table.claims")).to_contain_text("groups")
        expect(admin.locator("#live table.flows")).to_contain_text("ssh", timeout=WAIT_MS)
        admin.screenshot(path=os.path.join(SHOTS, "console-session.png"), full_page=True)

        # Terminate, with a reason, confirmed on its own page.
        admin.locator("a.terminate").first.click()
        admin.locator("#reason").fill("console e2e: laptop reported stolen")
        # ...and lock her out until an administrator says otherwise.
        admin.locator("#lock-user").check()
        admin.locator("#confirm-terminate").click()
        expect(admin.locator("#notice")).to_contain_text("Terminated 1 session")
        expect(admin.locator("#notice")).to_contain_text("Locked: lk-")
        say("TERMINATED")
        expect(admin.locator("#state")).to_contain_text("terminated", timeout=WAIT_MS)
        expect(admin.locator("#ended")).to_contain_text(
            "terminated by admin@corp.example (console"
        )
        expect(admin.locator("#locks-touching")).to_contain_text("user alice@corp.example")

        # The list shows it terminated, with the drops, without a reload.
        admin.goto(URL + "/")
        row = admin.locator(f"#s-{alice}")
        expect(row).to_have_attribute("data-state", "terminated", timeout=WAIT_MS)
        expect(row.locator(".drops")).to_have_text(
            re.compile(r"dropped after termination: \d+ packets"), timeout=WAIT_MS
        )
        expect(row.locator("a.terminate")).to_have_count(0)

        # The audit tail says who did it.
        admin.goto(URL + "/audit?kind=session_terminated")
        expect(admin.locator("#audit-rows")).to_contain_text(
            "by: admin@corp.example (console", timeout=WAIT_MS
        )
        expect(admin.locator("#audit-rows")).to_contain_text("laptop reported stolen")

        # A POST without the CSRF token is refused, even from an admin.
        r = forged_post(admin, f"/sessions/{bob}/terminate", {"reason": "no token"})
        assert r.status == 403, (r.status, r.text())
        r = forged_post(
            admin, f"/sessions/{bob}/terminate", {"reason": "wrong token", "csrf": "forged"}
        )
        assert r.status == 403, (r.status, r.text())

        # A read-only administrator sees everything and no terminate button anywhere.
        reader_ctx = browser.new_context(ignore_https_errors=True)
        reader = sign_in(reader_ctx, "reader@corp.example")
        expect(reader.locator("#role")).to_have_text("read-only")
        expect(reader.locator(f"#s-{bob}")).to_be_visible(timeout=WAIT_MS)
        expect(reader.locator("a.terminate")).to_have_count(0)
        reader.goto(URL + f"/sessions/{bob}")
        expect(reader.locator("#user")).to_have_text("bob@corp.example")
        expect(reader.locator("a.terminate")).to_have_count(0)
        reader.goto(URL + f"/sessions/{bob}/terminate")
        expect(reader.locator("form.confirm")).to_have_count(0)
        # Forged with the reader's own valid CSRF token: the role refuses it.
        token = reader.locator("form.signout input[name=csrf]").get_attribute("value")
        r = forged_post(
            reader, f"/sessions/{bob}/terminate", {"reason": "forged", "csrf": token}
        )
        assert r.status == 403 and "read-only administrator" in r.text(), (r.status, r.text())

        # Each refusal is in the audit log, with who tried.
        admin.goto(URL + "/audit?kind=console_refused")
        tail = admin.locator("#audit-rows")
        expect(tail).to_contain_text("reader@corp.example", timeout=WAIT_MS)
        expect(tail).to_contain_text("read-only administrator")
        expect(tail).to_contain_text("missing or wrong CSRF token")
        say("REFUSED")
        hear("GO")

        # Locks: alice's (from the terminate), then one added here on bob, then removed.
        admin.goto(URL + "/locks")
        expect(admin.locator("table.locks")).to_contain_text("user alice@corp.example")
        form = admin.locator("#add-lock")
        form.locator("select[name=kind]").select_option("user")
        form.locator("input[name=value]").fill("bob@corp.example")
        form.locator("input[name=ttl]").fill("2h")
        form.locator("input[name=reason]").fill("console e2e: lock bob")
        form.locator("button[type=submit]").click()
        expect(admin.locator("#notice")).to_contain_text("it ended 1 live sessions")
        bob_lock = admin.locator("table.locks tr", has_text="user bob@corp.example")
        expect(bob_lock).to_have_attribute("data-state", "active")
        expect(bob_lock).to_contain_text("admin@corp.example (console")
        # The read-only administrator sees the locks, and no way to change them.
        reader.goto(URL + "/locks")
        expect(reader.locator("table.locks")).to_contain_text("user bob@corp.example")
        expect(reader.locator("#add-lock")).to_have_count(0)
        expect(reader.locator("button.remove")).to_have_count(0)
        r = forged_post(
            reader, "/locks", {"csrf": token, "kind": "user", "value": "admin@corp.example"}
        )
        assert r.status == 403 and "read-only administrator" in r.text(), (r.status, r.text())
        bob_lock.locator("button.remove").click()
        expect(admin.locator("#notice")).to_contain_text("Removed")

        browser.close()
    say("DONE")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the Rust test prints this line as its failure
        say("FAIL " + " ".join(str(e).split()))
        sys.exit(1)
