"""Run the example app end to end on loopback: ``python -m example_app.demo``.

Starts a fake RudderStack data plane and the app on free local ports, posts the six
sample Customer.io email events signed as Customer.io signs them, shows what each
step did, posts one event again to show it is not forwarded twice, and stops.
Needs no network, no RudderStack account and no Customer.io account.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable

import requests
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from flask_cio_rudder import signals
from flask_cio_rudder.samples import EMAIL_METRICS, email_sample
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers

from . import create_app
from .admin import USER

__all__ = ["main"]

EMAIL_EVENTS = EMAIL_METRICS
SUPPRESSING = {"bounced", "spammed", "unsubscribed"}
TIMEOUT = 5.0  # seconds; everything is on loopback, so only a bug gets near it


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler without the access log, which would clutter the output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve ``app`` over real HTTP on a free loopback port in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="example-app", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# Sent by the outbox's background sender, not during the request: shown in step 3 instead.
# Signals about each event's fate in the request; delivery and per-request metrics signals are left out.
NOT_SHOWN = {"event_forwarded", "forward_failed", "webhook_answered"}


@contextmanager
def record_signals(app: Flask) -> Iterator[list[str]]:
    """Collect the names of the signals ``app`` sends during requests inside the block, in order."""
    fired: list[str] = []

    def recorder(name: str) -> Callable[..., None]:
        def record(sender: Flask, **extra: Any) -> None:
            fired.append(name)

        return record

    with ExitStack() as stack:
        for name in sorted(set(signals.__all__) - NOT_SHOWN):
            signal = getattr(signals, name)
            stack.enter_context(signal.connected_to(recorder(name), sender=app))
        yield fired


class DeliveryWatch:
    """Counts the events the background sender reports as forwarded, so the demo can wait for them."""

    def __init__(self, app: Flask) -> None:
        self.forwarded = 0
        self.batches = 0
        self._changed = threading.Condition()
        self._app = app

    def __enter__(self) -> DeliveryWatch:
        signals.event_forwarded.connect(self._record, sender=self._app)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signals.event_forwarded.disconnect(self._record, sender=self._app)

    def _record(self, sender: Flask, payloads: list[dict[str, Any]], **extra: Any) -> None:
        with self._changed:
            self.forwarded += len(payloads)
            self.batches += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` events were forwarded or ``timeout`` seconds passed."""
        with self._changed:
            return self._changed.wait_for(lambda: self.forwarded >= count, timeout)


def sample_body(metric: str) -> bytes:
    """A sample event serialised as Customer.io sends it (compact JSON)."""
    return encode(email_sample(metric))


def main() -> int:
    """Run the demo; 0 if every step did what it should, 1 otherwise."""
    signing_key = secrets.token_hex(16)
    password = secrets.token_hex(16)  # for /suppressions, as admin (see example_app.admin)
    with tempfile.TemporaryDirectory() as tmp, FakeDataPlane() as plane:
        database = Path(tmp) / "suppressions.sqlite3"
        outbox = Path(tmp) / "cio_rudder_outbox.sqlite3"
        app = create_app(
            {
                "CIO_RUDDER_SIGNING_KEY": signing_key,
                "CIO_RUDDER_WRITE_KEY": plane.write_key,
                "CIO_RUDDER_DATA_PLANE_URL": plane.url,
                "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{outbox}",
                "SUPPRESSION_DATABASE": str(database),
                "DASHBOARD_PASSWORD": password,
                "SECRET_KEY": secrets.token_hex(32),
            }
        )
        try:
            with serve(app) as base_url, requests.Session() as http, record_signals(app) as fired:
                http.auth = (USER, password)  # the webhook ignores it; /suppressions needs it
                webhook = base_url + app.config["CIO_RUDDER_WEBHOOK_PATH"]
                print("Flask-CIO-Rudder demo")
                print(f"  fake RudderStack data plane  {plane.url}")
                print(f"  example app webhook          {webhook}")
                print(f"  suppression database         {database}")
                print(f"  outbox                       {outbox}")
                with DeliveryWatch(app) as watch:
                    return _run(http, base_url, webhook, signing_key, plane, fired, watch)
        except requests.RequestException as error:
            print(f"FAILED: could not talk to the app ({type(error).__name__}: {error})")
            return 1
        finally:
            # Close the forwarder's connections before the data plane stops.
            app.extensions["cio_rudder"].forwarder.close()


def _post(http: requests.Session, webhook: str, metric: str, key: str, fired: list[str]) -> str:
    """Post one signed sample; print and return its status (``accepted``, ``duplicate``, ...)."""
    fired.clear()
    body = sample_body(metric)
    response = http.post(webhook, data=body, headers=signature_headers(body, key), timeout=TIMEOUT)
    status = str(response.json().get("status")) if response.ok else response.reason
    print(f"  email_{metric:<14} {response.status_code} {status:<10} {', '.join(fired) or '(no signals)'}")
    return status if response.ok else f"HTTP {response.status_code}"


def _run(
    http: requests.Session,
    base_url: str,
    webhook: str,
    key: str,
    plane: FakeDataPlane,
    fired: list[str],
    watch: DeliveryWatch,
) -> int:
    """The demo's steps, printed as they happen; returns the exit status."""
    problems: list[str] = []

    print("\n1. Six signed Customer.io email events, one by one (answer, signals sent during the request)")
    answers = [_post(http, webhook, metric, key, fired) for metric in EMAIL_EVENTS]
    accepted = answers.count("accepted")
    print(f"  {accepted} of {len(EMAIL_EVENTS)} accepted")
    if accepted != len(EMAIL_EVENTS):
        problems.append(f"only {accepted} of {len(EMAIL_EVENTS)} events were accepted")

    print("\n2. Suppression list (GET /suppressions)")
    rows = _print_suppressions(http, base_url)
    if sorted(row["reason"] for row in rows) != sorted(SUPPRESSING):
        problems.append("the suppression list does not hold one bounced, one spammed, one unsubscribed")

    print("\n3. Events the outbox's background sender delivered to the fake data plane")
    if not watch.wait_for(len(EMAIL_EVENTS), TIMEOUT):
        problems.append(f"the sender forwarded {watch.forwarded} events within {TIMEOUT:.0f} s")
    print(f"  event_forwarded: {watch.forwarded} events in {watch.batches} batch(es)")
    print("  (event, userId, messageId)")
    for event in plane.events:
        print(f"  {event['event']:<22} {event.get('userId', '-'):<4} {event['messageId']}")
    received = len(plane.events)
    print(f"  fake data plane received {received} events")
    if received != len(EMAIL_EVENTS):
        problems.append(f"the data plane received {received} events, not {len(EMAIL_EVENTS)}")

    print("\n4. The bounced event again: Customer.io delivers at least once")
    again = _post(http, webhook, "bounced", key, fired)
    rows = _print_suppressions(http, base_url, quiet=True)
    print(f"  data plane still holds {len(plane.events)} events, suppression list {len(rows)} rows")
    if again != "duplicate" or len(plane.events) != received or fired:
        problems.append("the repeated event was not answered as a duplicate without side effects")

    print()
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        return 1
    print("OK: every event accepted once, three addresses suppressed, the duplicate ignored.")
    return 0


def _print_suppressions(http: requests.Session, base_url: str, quiet: bool = False) -> list[dict[str, str]]:
    """Fetch ``/suppressions`` as JSON, print it unless ``quiet``, and return its rows."""
    response = http.get(base_url + "/suppressions", timeout=TIMEOUT)
    response.raise_for_status()
    rows: list[dict[str, str]] = response.json()["suppressions"]
    if not quiet:
        for row in rows:
            print(f"  {row['email']:<18} {row['reason']:<13} {row['event_id']}  {row['suppressed_at']}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
