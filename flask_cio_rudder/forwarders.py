"""Forwarders: where accepted events go after the host app's receivers have run.

A forwarder is chosen per app with ``CIO_RUDDER_FORWARDER``: ``"outbox"`` (the
default) keeps each event in a durable outbox (SQLite or PostgreSQL, see
:mod:`flask_cio_rudder.outbox`) that a background sender delivers,
``"sync"`` posts each event to RudderStack inside the webhook request, ``"none"``
keeps nothing (for apps that only want the signals), and any :class:`Forwarder`
subclass (or a callable taking the app and returning a forwarder) sends events elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable

import requests
from flask import Flask

from . import signals
from .event import CioEvent
from .rudderstack import configuration_hint, data_plane_from_config

__all__ = [
    "ForwardError",
    "Forwarder",
    "ForwarderFactory",
    "NullForwarder",
    "SyncForwarder",
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
    answered without signalling or sending it again (per process). A durable
    forwarder overrides :meth:`is_duplicate`, and :meth:`accept` if it keeps the
    ids itself (:class:`~flask_cio_rudder.outbox.OutboxForwarder` does, and has no ``send``).
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
            reason, retry = self.data_plane.unreachable(error), True
            answered = f"could not reach RudderStack ({type(error).__name__})"  # the address to the log only
        else:
            if response.stored:
                duration = time.perf_counter() - started
                signals.send_logged(
                    signals.event_forwarded, self.app, payloads=[event.payload], duration=duration
                )
                return
            # 400 and 413 are about the event itself: sending it again cannot help. It was accepted
            # (its receivers ran), so it is reported as the outbox reports dead letters; nothing is kept.
            reason, retry = self.data_plane.describe(response), response.status_code not in (400, 413)
            hint = configuration_hint(response.status_code)
            if hint is not None:
                reason = f"{reason}; {hint}"
            answered = f"RudderStack answered {response.status_code}"  # its words go to the log only
            if response.status_code == 200:  # a web page: see Answer.stored
                answered += " with a web page: check CIO_RUDDER_DATA_PLANE_URL"
        if retry:
            logger.error("Forwarding to RudderStack failed: %s", reason)
        else:
            logger.error(
                "RudderStack refused Customer.io event %s, which is not sent again: %s (the sync forwarder "
                "keeps nothing; the outbox forwarder keeps such events as dead letters)",
                event.event_id,
                reason,
            )
        duration = time.perf_counter() - started
        signals.send_logged(
            signals.forward_failed,
            self.app,
            payloads=[event.payload],
            reason=reason,
            retry=retry,
            duration=duration,
        )
        if retry:  # the webhook's 503: Customer.io keeps its text in a delivery log
            raise ForwardError(answered)

    def close(self) -> None:
        self.data_plane.close()
