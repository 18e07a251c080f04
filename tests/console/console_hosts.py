"""The console's Hosts page in a real browser (Playwright driving the system's Chromium).

Run by tests/tests/console_hosts.rs, which owns the NATS server, the two fleet hosts, the
OpenID provider and the console. This script prints `HOSTS` once the page lists both hosts,
`FLEET_SESSIONS` once the Fleet sessions page shows the session on the other host,
`FLEET_TERMINATED` once an admin ended it from there (and a reader's forged POST was
refused), and
`DONE` at the end (or `FAIL <why>`); it reads `NATS_DOWN` from stdin once the test has
stopped the NATS server.

Environment, besides console_e2e.py's: HOSTS (the hosts' names, comma separated), VERSION
(the agents' version), POLICY_VERSION (the policy version every host has in force), and
FLEET_SESSION, FLEET_SESSION_HOST, FLEET_SESSION_USER (a live session on another host).
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

from console_e2e import CHROMIUM, SHOTS, URL, WAIT_MS, forged_post, hear, say, sign_in

HOSTS = os.environ["HOSTS"].split(",")
VERSION = os.environ["VERSION"]
POLICY_VERSION = os.environ["POLICY_VERSION"]
FLEET_SESSION = os.environ["FLEET_SESSION"]
FLEET_SESSION_HOST = os.environ["FLEET_SESSION_HOST"]
FLEET_SESSION_USER = os.environ["FLEET_SESSION_USER"]


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        ctx = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1440, "height": 700}
        )
        # Read-only is enough to see the hosts.
        reader = sign_in(ctx, "reader@corp.example")
        expect(reader.locator("#role")).to_have_text("read-only")
        reader.locator("header nav a", has_text="Hosts").click()
        expect(reader).to_have_url(URL + "/hosts")
        for host in HOSTS:
            row = reader.locator(f"#h-{host}")
            expect(row).to_be_visible(timeout=WAIT_MS)
            expect(row.locator("td.version")).to_have_text(VERSION)
            expect(row.locator("td.policy-version")).to_have_text(
                POLICY_VERSION, timeout=WAIT_MS
            )
            expect(row.locator("td.connected")).to_have_text("yes", timeout=WAIT_MS)
        expect(reader.locator("table.hosts tbody tr")).to_have_count(len(HOSTS))
        expect(reader.locator("#fleet-error")).to_have_count(0)
        reader.screenshot(path=os.path.join(SHOTS, "console-hosts.png"), full_page=True)
        say("HOSTS")

        # Every host's live sessions, by host and by user.
        reader.locator("header nav a", has_text="Fleet sessions").click()
        expect(reader).to_have_url(URL + "/fleet")
        row = reader.locator(f"#fs-{FLEET_SESSION}")
        expect(row).to_be_visible(timeout=WAIT_MS)
        expect(row.locator("td.host")).to_have_text(FLEET_SESSION_HOST)
        expect(row.locator("td.who")).to_have_text(FLEET_SESSION_USER)
        expect(row.locator("td.resources")).to_have_text("ssh")
        # Another host's session has no detail link here: it is not this console's host.
        expect(row.locator("a")).to_have_count(0)
        reader.screenshot(
            path=os.path.join(SHOTS, "console-fleet-sessions.png"), full_page=True
        )
        others = [h for h in HOSTS if h != FLEET_SESSION_HOST]
        reader.fill("input[name=host]", others[0])
        reader.click("form.filters button")
        expect(reader.locator("#no-fleet-sessions")).to_be_visible(timeout=WAIT_MS)
        reader.fill("input[name=host]", "")
        reader.fill("input[name=user]", FLEET_SESSION_USER.upper())
        reader.click("form.filters button")
        expect(reader.locator(f"#fs-{FLEET_SESSION}")).to_be_visible(timeout=WAIT_MS)
        say("FLEET_SESSIONS")

        # A reader's forged POST is refused (403, audited by the console's agent).
        path = f"/fleet/sessions/{FLEET_SESSION_HOST}/{FLEET_SESSION}/terminate"
        token = reader.locator("form.signout input[name=csrf]").get_attribute("value")
        forged = forged_post(reader, path, {"csrf": token, "reason": "forged"})
        if forged.status != 403:
            raise AssertionError(f"a reader's POST answered {forged.status}, not 403")

        # An admin ends alice's session on the other host from here.
        admin_ctx = browser.new_context(
            ignore_https_errors=True, viewport={"width": 1440, "height": 700}
        )
        admin = sign_in(admin_ctx, "admin@corp.example")
        admin.goto(URL + "/fleet")
        row = admin.locator(f"#fs-{FLEET_SESSION}")
        expect(row).to_be_visible(timeout=WAIT_MS)
        row.locator("a.terminate").click()
        admin.fill("#reason", "laptop stolen")
        admin.click("#confirm-terminate")
        expect(admin.locator("#outcome")).to_have_attribute(
            "data-applied", "true", timeout=WAIT_MS
        )
        expect(admin.locator("#outcome")).to_contain_text(FLEET_SESSION_HOST)
        admin.goto(URL + "/fleet")
        expect(admin.locator(f"#fs-{FLEET_SESSION}")).to_have_count(0, timeout=WAIT_MS)
        say("FLEET_TERMINATED")

        # NATS gone: the open page turns into the error block by itself...
        hear("NATS_DOWN")
        expect(reader.locator("#fleet-error")).to_be_visible(timeout=WAIT_MS)
        expect(reader.locator("#fleet-error")).to_contain_text("cannot reach")
        expect(reader.locator("table.hosts")).to_have_count(0)
        # ...a fresh load says the same, and the rest of the console still works.
        reader.goto(URL + "/hosts")
        expect(reader.locator("#fleet-error")).to_contain_text("cannot reach")
        reader.goto(URL + "/audit")
        expect(reader.locator("h1")).to_have_text("Audit")
        expect(reader.locator("#signed-in-as")).to_have_text("reader@corp.example")
        browser.close()
    say("DONE")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the Rust test prints this line as its failure
        say("FAIL " + " ".join(str(e).split()))
        sys.exit(1)
