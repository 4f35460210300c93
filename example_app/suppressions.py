"""A suppression list in SQLite, filled by Flask-CIO-Rudder's bounce, spam and unsubscribe signals.

Customer.io delivers at least once and runs these receivers again on a retry, so
every write is an ``INSERT OR IGNORE`` keyed on the address: the first reason an
address was suppressed for is kept, later events for it change nothing.
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

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template_string, request

from flask_cio_rudder import CioEvent, signals

__all__ = ["Suppression", "SuppressionStore", "init_app", "store_for"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    email TEXT PRIMARY KEY,
    reason TEXT NOT NULL CHECK (reason IN ('bounced', 'spammed', 'unsubscribed')),
    event_id TEXT NOT NULL,
    suppressed_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Suppression:
    """One suppressed address: why, which Customer.io event said so, and when it happened."""

    email: str
    reason: str
    event_id: str
    suppressed_at: str


class SuppressionStore:
    """The suppression table in one SQLite file; a connection per call, so any thread may use it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction, on a table created on first use."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path)) as connection, connection:
            connection.execute(_SCHEMA)
            yield connection

    def add(self, email: str, reason: str, event_id: str, suppressed_at: datetime) -> bool:
        """Suppress ``email`` unless it already is; ``True`` if a row was added (idempotent)."""
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO suppressions (email, reason, event_id, suppressed_at) "
                "VALUES (?, ?, ?, ?)",
                (email.strip().lower(), reason, event_id, suppressed_at.isoformat(timespec="seconds")),
            )
            return cursor.rowcount == 1

    def all(self) -> list[Suppression]:
        """Every suppressed address, oldest first."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT email, reason, event_id, suppressed_at FROM suppressions "
                "ORDER BY suppressed_at, email"
            ).fetchall()
        return [Suppression(*row) for row in rows]

    def is_suppressed(self, email: str) -> bool:
        """Whether mail to ``email`` must not be sent; check this before sending."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT 1 FROM suppressions WHERE email = ?", (email.strip().lower(),)
            ).fetchone()
        return row is not None


def store_for(app: Flask) -> SuppressionStore:
    """The suppression store of ``app``, set up by :func:`init_app`."""
    store: SuppressionStore = app.extensions["suppressions"]
    return store


def suppress(sender: Flask, event: CioEvent, reason: str) -> None:
    """Record ``event``'s address with ``reason``; runs inside the webhook request."""
    # The address the message went to, which can differ from the profile's email; a minimal
    # body may lack it (Customer.io's schema says it is there, but RudderStack forwards it anyway).
    address = event.recipient or event.email
    if not address:
        # Raising would answer 500 and stall Customer.io's stream; log and move on.
        logger.warning("Customer.io event %s has no email address to suppress", event.event_id)
        return
    # The event's own time, not ours: a retry or a held-back event may arrive days later.
    happened_at = event.timestamp or datetime.now(timezone.utc)
    store_for(sender).add(address, reason, event.event_id, happened_at)


# Module-level receivers: blinker holds receivers weakly, so a nested function would vanish.
def on_bounced(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """A bounce: the receiving server refused the address."""
    suppress(sender, event, "bounced")


def on_spammed(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """A spam complaint: mailing again hurts the sending reputation."""
    suppress(sender, event, "spammed")


def on_unsubscribed(sender: Flask, event: CioEvent, **extra: Any) -> None:
    """An unsubscribe: the person asked for no more mail."""
    suppress(sender, event, "unsubscribed")


bp = Blueprint("suppressions", __name__)

_TABLE = """<!doctype html>
<title>Suppression list</title>
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
    """The suppression list: JSON, or an HTML table for browsers. Personal data: ``admin`` protects it."""
    suppressions = store_for(current_app).all()
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        return render_template_string(_TABLE, suppressions=suppressions)  # autoescaped
    return jsonify(suppressions=[asdict(s) for s in suppressions])


def init_app(app: Flask) -> None:
    """Give ``app`` a suppression store, its receivers and the ``/suppressions`` page."""
    app.config.setdefault("SUPPRESSION_DATABASE", os.path.join(app.instance_path, "suppressions.sqlite3"))
    app.extensions["suppressions"] = SuppressionStore(app.config["SUPPRESSION_DATABASE"])
    # sender=app: only this app's events, so several apps in one process keep separate lists.
    signals.email_bounced.connect(on_bounced, sender=app)
    signals.email_spammed.connect(on_spammed, sender=app)
    signals.email_unsubscribed.connect(on_unsubscribed, sender=app)
    app.register_blueprint(bp)
