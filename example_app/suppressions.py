"""A suppression list in SQLite, kept by Flask-CIO-Rudder's signals.

An address is suppressed when its mail bounced, when its owner marked it as spam, and
when they unsubscribed: from a message's link (``email`` / ``unsubscribed``) or elsewhere,
such as the subscription centre or the API (``customer`` / ``unsubscribed``). A later
``subscribed`` event lifts the unsubscribe, not a bounce or a complaint.

Customer.io delivers at least once and in order (it holds later webhooks back until one
succeeds), and runs these receivers again on a retry: every write is idempotent, an
``INSERT OR IGNORE`` keyed on the address and the reason.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, render_template_string, request

from flask_cio_rudder import CioEvent, signals

__all__ = ["Suppression", "SuppressionStore", "init_app", "store_for"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    email TEXT NOT NULL,
    reason TEXT NOT NULL CHECK (reason IN ('bounced', 'spammed', 'unsubscribed')),
    event_id TEXT NOT NULL,
    suppressed_at TEXT NOT NULL,
    PRIMARY KEY (email, reason)
)
"""

#: Seconds a write waits for another writer (a backup, an ``sqlite3`` shell); Customer.io waits 4.
_BUSY_TIMEOUT = 2.0
#: The most rows ``/suppressions`` shows at once; ``?offset=`` pages through the rest.
PAGE = 500


@dataclass(frozen=True)
class Suppression:
    """One reason an address is suppressed: which Customer.io event said so, and when it happened."""

    email: str
    reason: str
    event_id: str
    suppressed_at: str


class SuppressionStore:
    """The suppression table in one SQLite file; a connection per call, so any thread may use it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def create(self) -> None:
        """Make the file (readable by its owner only: it lists people's addresses) and its table."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            connection.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction."""
        with closing(sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT)) as connection, connection:
            yield connection

    def add(self, email: str, reason: str, event_id: str, suppressed_at: datetime) -> bool:
        """Suppress ``email`` for ``reason`` unless it is; ``True`` if a row was added (idempotent)."""
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO suppressions (email, reason, event_id, suppressed_at) "
                "VALUES (?, ?, ?, ?)",
                (_address(email), reason, event_id, _when(suppressed_at)),
            )
            return cursor.rowcount == 1

    def lift_unsubscribe(self, email: str, subscribed_at: datetime) -> bool:
        """Lift an unsubscribe made before ``subscribed_at``; ``True`` if there was one."""
        with self._connect() as connection:
            cursor = connection.execute(
                "DELETE FROM suppressions WHERE email = ? AND reason = 'unsubscribed' AND suppressed_at <= ?",
                (_address(email), _when(subscribed_at)),
            )
            return cursor.rowcount > 0

    def all(self) -> list[Suppression]:
        """Every suppression, oldest first."""
        return self.page(0, -1)[0]  # SQLite's LIMIT -1: no limit

    def page(self, offset: int, limit: int) -> tuple[list[Suppression], int]:
        """Up to ``limit`` suppressions from ``offset``, oldest first, and how many there are in all."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT email, reason, event_id, suppressed_at FROM suppressions "
                "ORDER BY suppressed_at, email, reason LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            (total,) = connection.execute("SELECT count(*) FROM suppressions").fetchone()
        return [Suppression(*row) for row in rows], total

    def is_suppressed(self, email: str) -> bool:
        """Whether mail to ``email`` must not be sent; check this before sending."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT 1 FROM suppressions WHERE email = ?", (_address(email),)
            ).fetchone()
        return row is not None


def _address(email: str) -> str:
    return email.strip().lower()


def _when(moment: datetime) -> str:
    """UTC, to the second, as text that sorts as time does."""
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def store_for(app: Flask) -> SuppressionStore:
    """The suppression store of ``app``, set up by :func:`init_app`."""
    store: SuppressionStore = app.extensions["suppressions"]
    return store


def _address_of(event: CioEvent) -> str | None:
    """The address the message went to, which can differ from the profile's email; a minimal body may
    lack it (Customer.io's schema says it is there, but RudderStack forwards it anyway), and an event
    about the person, not a message, has only the profile's."""
    address = event.recipient or event.email
    if not address:
        # Raising would answer 500 and stall Customer.io's stream; log and move on.
        logger.warning("Customer.io event %s has no email address", event.event_id)
    return address


def _happened_at(event: CioEvent) -> datetime:
    """The event's own time, not ours: a retry or a held-back event may arrive days later."""
    return event.timestamp or datetime.now(timezone.utc)


@contextmanager
def _unless_locked() -> Iterator[None]:
    """A change of the store; if the file stays locked, the answer is a 503: nothing is kept, and
    Customer.io sends the event again soon (a 500 would make it wait an hour)."""
    try:
        yield
    except sqlite3.OperationalError as error:
        logger.error("The suppression list could not be written: %s", error)
        abort(503)


def suppress(sender: Flask, event: CioEvent, reason: str) -> None:
    """Record ``event``'s address with ``reason``; runs inside the webhook request."""
    address = _address_of(event)
    if address:
        with _unless_locked():
            store_for(sender).add(address, reason, event.event_id, _happened_at(event))


# Module-level receivers: blinker holds receivers weakly, so a nested function would vanish.
def on_bounced(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """A bounce: the receiving server refused the address."""
    suppress(sender, event, "bounced")


def on_spammed(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """A spam complaint: mailing again hurts the sending reputation."""
    suppress(sender, event, "spammed")


def on_unsubscribed(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """An unsubscribe from a message's link: the person asked for no more mail."""
    suppress(sender, event, "unsubscribed")


def on_event(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """Changes of a person's subscription that no email signal carries: an unsubscribe from elsewhere
    (``customer`` / ``unsubscribed``), and a ``subscribed`` event, from a message or not."""
    if event.object_type == "customer" and event.metric == "unsubscribed":
        suppress(sender, event, "unsubscribed")
    elif event.object_type in ("customer", "email") and event.metric == "subscribed":
        address = _address_of(event)
        if address:
            with _unless_locked():
                store_for(sender).lift_unsubscribe(address, _happened_at(event))


bp = Blueprint("suppressions", __name__)

_TABLE = """<!doctype html>
<title>Suppression list</title>
{% set end = offset + suppressions|length %}
<p>{{ total }} in all{% if suppressions %}, {{ offset + 1 }} to {{ end }} below{% endif %}.
{% if end < total %}<a href="?offset={{ end }}">Next</a>{% endif %}
<table>
  <tr><th>email</th><th>reason</th><th>event_id</th><th>suppressed_at</th></tr>
  {% for s in suppressions %}
  <tr><td>{{ s.email }}</td><td>{{ s.reason }}</td>
      <td>{{ s.event_id }}</td><td>{{ s.suppressed_at }}</td></tr>
  {% endfor %}
</table>
"""


@bp.get("/suppressions")
def list_suppressions() -> Response | str:
    """The suppression list, ``PAGE`` rows from ``?offset=``: JSON, or an HTML table for browsers.
    Personal data: ``admin`` protects it."""
    offset = max(request.args.get("offset", 0, type=int), 0)
    suppressions, total = store_for(current_app).page(offset, PAGE)
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        return render_template_string(_TABLE, suppressions=suppressions, total=total, offset=offset)
    return jsonify(suppressions=[asdict(s) for s in suppressions], total=total)


@bp.after_request
def private(response: Response) -> Response:
    """People's addresses: kept by no cache, shown in no frame, loading nothing (as the dashboard)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'none'"
    return response


def init_app(app: Flask) -> None:
    """Give ``app`` a suppression store, its receivers and the ``/suppressions`` page."""
    app.config.setdefault("SUPPRESSION_DATABASE", os.path.join(app.instance_path, "suppressions.sqlite3"))
    store = SuppressionStore(app.config["SUPPRESSION_DATABASE"])
    store.create()
    app.extensions["suppressions"] = store
    # sender=app: only this app's events, so several apps in one process keep separate lists.
    signals.email_bounced.connect(on_bounced, sender=app)
    signals.email_spammed.connect(on_spammed, sender=app)
    signals.email_unsubscribed.connect(on_unsubscribed, sender=app)
    signals.event_received.connect(on_event, sender=app)
    app.register_blueprint(bp)
