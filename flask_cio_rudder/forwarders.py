"""Forwarders: where accepted events go after the host app's receivers have run.

A forwarder is chosen per app with ``CIO_RUDDER_FORWARDER``: ``"outbox"`` (the
default) keeps each event in a SQLite outbox that a background sender delivers,
``"sync"`` posts each event to RudderStack inside the webhook request, ``"none"``
keeps nothing (for apps that only want the signals), and any :class:`Forwarder`
subclass (or a callable taking the app and returning a forwarder) sends events elsewhere.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import requests
from flask import Flask

from . import signals
from .event import CioEvent
from .outbox import DeadLetter, Outbox, OutboxStatus
from .rudderstack import data_plane_from_config, describe
from .sender import Sender

__all__ = [
    "ForwardError",
    "Forwarder",
    "NullForwarder",
    "OutboxForwarder",
    "SyncForwarder",
    "create_forwarder",
]

logger = logging.getLogger("flask_cio_rudder")

ForwarderFactory = Callable[[Flask], "Forwarder"]


class ForwardError(Exception):
    """The event could not be kept now: the webhook answers 503 and Customer.io sends it again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RecentIds:
    """A bounded, thread-safe set of the most recently accepted event ids."""

    def __init__(self, size: int) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def __contains__(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._ids

    def add(self, event_id: str) -> None:
        with self._lock:
            self._ids[event_id] = None
            if len(self._ids) > self._size:
                self._ids.popitem(last=False)


class Forwarder:
    """Base class of forwarders; one instance serves one app.

    Subclasses implement :meth:`send`. The base keeps the ids of the last
    ``RECENT_IDS`` accepted events in memory so that a retried delivery is
    answered without signalling or sending it again (per process; a durable
    forwarder overrides :meth:`is_duplicate`).
    """

    RECENT_IDS = 10_000

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._recent = _RecentIds(self.RECENT_IDS)

    def is_duplicate(self, event_id: str) -> bool:
        """Whether this event was already accepted."""
        return event_id in self._recent

    def accept(self, event: CioEvent) -> None:
        """Keep or deliver ``event``; return only once it is safe. Raises :class:`ForwardError`."""
        self.send(event)
        self._recent.add(event.event_id)

    def send(self, event: CioEvent) -> None:
        """Deliver ``event.payload``; raise :class:`ForwardError` if that cannot be done now."""
        raise NotImplementedError

    def reject(self, body: bytes, event_id: str | None, reason: str, errors: Mapping[str, Any]) -> None:
        """Keep a rejected body (the bytes as received) as a dead letter.

        The base class logs the id and the reason, not the body: it holds personal data.
        """
        logger.warning("Rejected Customer.io event %s: %s", event_id or "(no event_id)", reason)

    def close(self) -> None:
        """Release connections and threads; called when the process exits."""


class NullForwarder(Forwarder):
    """Sends nothing: for apps that only want the signals."""

    def send(self, event: CioEvent) -> None:
        pass


class SyncForwarder(Forwarder):
    """Posts each event to RudderStack's ``/v1/batch`` inside the webhook request.

    Customer.io waits 4 seconds, so the timeouts (``CIO_RUDDER_TIMEOUT``, by default
    1 s to connect and 2 s to read) stay well inside that and there is no retry
    here: a failure answers 503 and Customer.io's own retry sends the event again.
    """

    def __init__(self, app: Flask) -> None:
        super().__init__(app)
        self.data_plane = data_plane_from_config(app.config, (1.0, 2.0))

    def send(self, event: CioEvent) -> None:
        started = time.perf_counter()
        try:
            response = self.data_plane.post_batch([event.payload_json])
        except requests.RequestException as error:
            reason, retry = f"could not reach RudderStack ({type(error).__name__})", True
        else:
            if response.status_code == 200:
                duration = time.perf_counter() - started
                signals.event_forwarded.send(self.app, payloads=[event.payload], duration=duration)
                return
            # 400 and 413 are about the event itself: sending it again cannot help. It was accepted
            # (its receivers ran), so it is reported as the outbox reports dead letters; nothing is kept.
            reason, retry = describe(response), response.status_code not in (400, 413)
        logger.error("Forwarding to RudderStack failed: %s", reason)
        duration = time.perf_counter() - started
        signals.forward_failed.send(
            self.app, payloads=[event.payload], reason=reason, retry=retry, duration=duration
        )
        if retry:
            raise ForwardError(reason)

    def close(self) -> None:
        self.data_plane.close()


class OutboxForwarder(Forwarder):
    """Keeps every accepted event in a SQLite outbox before the webhook answers.

    Nothing about RudderStack is awaited in the request: a background sender in
    each process delivers the outbox (see :mod:`flask_cio_rudder.sender`).
    Duplicates are found in the outbox, so they collapse across processes and restarts.
    """

    def __init__(self, app: Flask) -> None:
        super().__init__(app)
        config = app.config
        data_plane_from_config(config, _OUTBOX_TIMEOUT).close()  # fail fast on a missing setting
        batch_size = config["CIO_RUDDER_OUTBOX_BATCH_SIZE"]
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100:
            raise RuntimeError("CIO_RUDDER_OUTBOX_BATCH_SIZE must be a whole number from 1 to 100.")
        path = config["CIO_RUDDER_OUTBOX_PATH"] or os.path.join(
            app.instance_path, "cio_rudder_outbox.sqlite3"
        )
        self.outbox = Outbox(path, durability=config["CIO_RUDDER_OUTBOX_DURABILITY"])
        self.sender = Sender(
            app,
            self.outbox,
            lambda: data_plane_from_config(config, _OUTBOX_TIMEOUT),
            batch_size=batch_size,
            lease=config["CIO_RUDDER_OUTBOX_LEASE"],
            max_age=config["CIO_RUDDER_OUTBOX_MAX_AGE"],
            shutdown_timeout=config["CIO_RUDDER_SHUTDOWN_TIMEOUT"],
        )
        self.background = bool(config["CIO_RUDDER_OUTBOX_SENDER"])
        if self.background:
            self.sender.ensure_running()

    def is_duplicate(self, event_id: str) -> bool:
        return self.outbox.is_known(event_id)

    def accept(self, event: CioEvent) -> None:
        try:
            self.outbox.add(event.event_id, event.payload_json)
        except sqlite3.Error as error:
            raise ForwardError(f"could not write the outbox: {error}") from error
        if self.background:
            self.sender.ensure_running()
            self.sender.wake()

    def reject(self, body: bytes, event_id: str | None, reason: str, errors: Mapping[str, Any]) -> None:
        super().reject(body, event_id, reason, errors)
        self.outbox.add_rejected(event_id, body, reason)

    # The operator's API (also behind ``flask cio-rudder ...``).

    def status(self) -> OutboxStatus:
        """Counts of pending, delivered and dead events, the oldest pending age, the last error."""
        return self.outbox.status()

    def flush(self, timeout: float = 30.0) -> int:
        """Send what is due now, from this thread, for at most ``timeout`` seconds; returns how many."""
        return self.sender.flush(timeout)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.outbox.dead_letters(limit)

    def requeue(self, event_ids: Sequence[str] | None = None) -> int:
        """Send dead letters again: all of them, or those with these ids."""
        count = self.outbox.requeue(event_ids)
        self.sender.wake()
        return count

    def purge_delivered(self, older_than: float) -> int:
        """Delete delivered events older than ``older_than`` seconds."""
        return self.outbox.purge_delivered(older_than)

    def close(self) -> None:
        self.sender.stop()
        self.outbox.close()


# Outside a web request the sender can wait longer than Customer.io would.
_OUTBOX_TIMEOUT = (3.0, 10.0)

_BUILT_IN: dict[str, ForwarderFactory] = {
    "outbox": OutboxForwarder,
    "sync": SyncForwarder,
    "none": NullForwarder,
}


def create_forwarder(app: Flask, choice: str | ForwarderFactory) -> Forwarder:
    """Build the forwarder that ``CIO_RUDDER_FORWARDER`` names for ``app``."""
    if isinstance(choice, str):
        if choice not in _BUILT_IN:
            names = ", ".join(repr(name) for name in _BUILT_IN)
            raise RuntimeError(
                f"CIO_RUDDER_FORWARDER = {choice!r} is unknown: use one of {names}, or a Forwarder subclass."
            )
        choice = _BUILT_IN[choice]
    if not callable(choice):
        raise RuntimeError("CIO_RUDDER_FORWARDER must be a name or a Forwarder subclass.")
    forwarder = choice(app)
    if not isinstance(forwarder, Forwarder):
        raise RuntimeError("CIO_RUDDER_FORWARDER must build a flask_cio_rudder.Forwarder.")
    return forwarder
