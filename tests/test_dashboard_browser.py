"""The dashboard in a real browser: headless Chromium, driven by Playwright, on the example app.

The example app runs on loopback with its outbox sender on and a fake RudderStack data plane.
The test searches the dead letters, requeues one and sees it delivered, and takes a
screenshot of each page (``CIO_RUDDER_SCREENSHOTS=docs`` keeps them for the README).

Needs Debian's ``chromium`` (/usr/bin/chromium) and ``pip install -e ".[browser]"``; skips
saying which is missing, or fails in CI (``CIO_RUDDER_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from werkzeug.serving import make_server

from example_app import create_app
from example_app.admin import PREFIX, USER
from example_app.demo import serve
from flask_cio_rudder import CioRudder, get_outbox
from flask_cio_rudder.dashboard import dashboard
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers

from .conftest import EMAIL_EVENTS, sample
from .helpers import wait_until
from .stores import unavailable

pytestmark = [pytest.mark.slow, pytest.mark.service]

KEY = "browser-test-signing-key"
PASSWORD = "demo-password"
CHROMIUM = os.environ.get("CIO_RUDDER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REFUSED = sample("bounced") | {"event_id": "01HBROWSERTESTREFUSED00001"}
REFUSED["data"] = REFUSED["data"] | {
    "identifiers": {"id": "77", "email": "erin@example.com"},
    "recipient": "erin@example.com",
}


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium under Playwright; skipped (failed in CI) when either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable('playwright is not installed: pip install -e ".[browser]"', "the browser test")
    if not shutil.which(CHROMIUM):
        unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium", "the browser test")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def site(tmp_path: Path, data_plane: FakeDataPlane) -> Iterator[tuple[Flask, str]]:
    """The example app on a loopback port, its sender on, with delivered events and two dead letters."""
    app = create_app(
        {
            "CIO_RUDDER_SIGNING_KEY": KEY,
            "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
            "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
            "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
            "SUPPRESSION_DATABASE": str(tmp_path / "suppressions.sqlite3"),
            "DASHBOARD_PASSWORD": PASSWORD,
            "SECRET_KEY": "browser-test-secret",
        }
    )
    try:
        with serve(app) as base_url, requests.Session() as http:

            def send(body: dict[str, Any]) -> None:
                raw = encode(body)
                answer = http.post(
                    base_url + "/webhooks/customerio", data=raw, headers=signature_headers(raw, KEY)
                )
                assert answer.status_code == 200, answer.text

            for metric in EMAIL_EVENTS:
                send(sample(metric))
            wait_until(
                lambda: len(data_plane.events) == len(EMAIL_EVENTS), what="the six samples are delivered"
            )
            data_plane.fail_next(400)  # RudderStack refuses the next event: a dead letter
            send(REFUSED)
            send(
                {
                    "event_id": "01HBROWSERTESTREJECTED0001",
                    "object_type": "email",
                    "metric": "sent",
                    "data": {},
                }
            )
            wait_until(lambda: get_outbox(app).count_dead_letters() == 2, what="two dead letters are kept")
            yield app, base_url + PREFIX
    finally:
        app.extensions["cio_rudder"].forwarder.close()


def test_an_operator_finds_a_dead_letter_requeues_it_and_sees_it_delivered(
    browser: Any, site: tuple[Flask, str], data_plane: FakeDataPlane, tmp_path: Path
) -> None:
    app, dashboard_url = site
    shots = Path(os.environ.get("CIO_RUDDER_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD}, viewport={"width": 1100, "height": 640}
    )
    page = context.new_page()

    page.goto(dashboard_url + "/")
    assert page.locator("#delivered").inner_text() == "6"
    assert page.locator("#dead").inner_text() == "2"
    assert page.locator("svg rect.accepted").count() == 60
    page.screenshot(path=str(shots / "dashboard-overview.png"))

    page.click("text=Dead letters")
    page.fill("input[name=email]", "Erin@example.com")
    page.click("button:has-text('Search')")
    rows = page.locator("table tr")
    assert rows.count() == 2  # the header and Erin's bounce
    assert "RudderStack answered 400" in rows.nth(1).inner_text()
    page.screenshot(path=str(shots / "dashboard-dead-letters.png"))

    page.click("a:has-text('body')")
    assert "erin@example.com" in page.locator("pre").inner_text()
    page.click("button:has-text('Requeue')")
    assert "Requeued" in page.locator(".flash").inner_text()
    wait_until(
        lambda: any(event["properties"]["eventId"] == REFUSED["event_id"] for event in data_plane.events),
        what="the requeued event reaches the data plane",
    )

    def outcome_after_reload() -> str:
        page.reload()
        return str(page.locator("#outcome").inner_text())

    wait_until(lambda: outcome_after_reload() == "delivered", what="the event page says delivered")
    page.screenshot(path=str(shots / "dashboard-event.png"), full_page=True)

    page.click("header >> text=Events")
    page.fill("input[name=q]", "bob@example.com")
    page.click("button:has-text('Find')")
    assert page.locator("span.pill.delivered").count() == 1
    page.screenshot(path=str(shots / "dashboard-events.png"))

    page.goto(dashboard_url + "/dead-letters")
    assert page.locator("table tr").count() == 2  # only the rejected body is left
    page.click("a:has-text('Purge 1')")
    assert "Purge 1 dead letter?" in page.locator("h1").inner_text()
    page.screenshot(path=str(shots / "dashboard-confirm.png"))
    page.click("#confirm")
    assert "Deleted 1 dead letter." in page.locator(".flash").inner_text()
    context.close()
    assert get_outbox(app).count_dead_letters() == 0


@contextmanager
def dashboard_site(tmp_path: Path, **config: Any) -> Iterator[tuple[Flask, str]]:
    """An app with the outbox (sender off) and the dashboard, served on a loopback port in a thread;
    ``ssl_context`` serves it over HTTPS. Yields the app and the dashboard's URL."""
    ssl_context = config.pop("ssl_context", None)
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="browser-test-secret",
        CIO_RUDDER_SIGNING_KEY=KEY,
        CIO_RUDDER_WRITE_KEY="browser-test-write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        **config,
    )
    CioRudder(app)
    server = make_server("127.0.0.1", 0, app, ssl_context=ssl_context)
    thread = threading.Thread(target=server.serve_forever, name="dashboard-site", daemon=True)
    thread.start()
    scheme = "http" if ssl_context is None else "https"
    try:
        yield app, f"{scheme}://127.0.0.1:{server.server_port}{PREFIX}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        app.extensions["cio_rudder"].forwarder.close()


@pytest.fixture
def https_certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if not shutil.which("openssl"):
        unavailable("no openssl command: apt-get install openssl", "the HTTPS browser test")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]
    subprocess.run(
        ["openssl", "req", "-x509", *new_key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_with_flask_wtf_over_https_the_actions_work_in_a_browser(
    browser: Any, https_certificate: tuple[str, str], tmp_path: Path
) -> None:
    """Flask-WTF refuses a form posted over HTTPS without a same-origin Referer: the pages must let
    the browser send one."""
    from flask_wtf.csrf import CSRFProtect

    with dashboard_site(tmp_path, ssl_context=https_certificate) as (app, dashboard_url):
        CSRFProtect(app)
        app.register_blueprint(dashboard, url_prefix=PREFIX)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        page.goto(dashboard_url + "/")
        page.click("button:has-text('Pause sending')")
        assert "paused" in page.locator(".flash").inner_text()
        context.close()
        assert get_outbox(app).status().paused


def test_a_long_address_leaves_the_reasons_readable_and_the_buttons_on_the_page(
    browser: Any, tmp_path: Path
) -> None:
    """An address can be 254 characters long: it wraps, and every column stays on screen."""
    long_email = "firstname.lastname." + "x" * 222 + "@example.com"
    with dashboard_site(tmp_path) as (app, dashboard_url):
        app.register_blueprint(dashboard, url_prefix=PREFIX)
        store = get_outbox(app).store
        for n, email in enumerate([long_email, "ada@example.com"]):
            store.add_rejected(
                f"01LONGADDRESS{n}", b"{}", "no userId or anonymousId: " + "why " * 20, email=email
            )
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        for path in ["/dead-letters", "/events?q=example.com", "/event?id=01LONGADDRESS0"]:
            page.goto(dashboard_url + path)
            assert page.evaluate("document.documentElement.scrollWidth") <= 1100, path
            for reason in page.locator("td.reason").all():
                assert reason.bounding_box()["width"] >= 200, path
        page.close()
