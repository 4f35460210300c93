"""Blinker signals the extension sends; connect receivers to react in the host app.

Every signal is sent with the Flask app as sender and keyword-only data, so a
receiver looks like ``def on_bounce(app, event, **extra)``. Receivers run inside
the webhook request: one that raises makes the request a 500 (``abort(code)``: that
code), nothing is kept, and Customer.io's retry runs the receivers again. Write them to be idempotent.
``event_forwarded`` and ``forward_failed`` report what has already happened: a receiver
of theirs that raises is logged and changes nothing. A receiver may be ``async def``: it runs
to its end where it is sent, as Flask runs an async view (``Flask[async]``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

from blinker import NamedSignal, Namespace
from flask import Flask

logger = logging.getLogger("flask_cio_rudder")

__all__ = [
    "email_bounced",
    "email_clicked",
    "email_delivered",
    "email_opened",
    "email_spammed",
    "email_unsubscribed",
    "event_forwarded",
    "event_received",
    "event_rejected",
    "forward_failed",
    "webhook_answered",
]

_signals = Namespace()

#: Every accepted event, ``event=`` a :class:`~flask_cio_rudder.CioEvent`.
event_received = _signals.signal("event-received")

#: The six first-class email events, ``event=`` a :class:`~flask_cio_rudder.CioEvent`.
email_delivered = _signals.signal("email-delivered")
email_opened = _signals.signal("email-opened")
email_clicked = _signals.signal("email-clicked")
email_bounced = _signals.signal("email-bounced")
email_spammed = _signals.signal("email-spammed")
email_unsubscribed = _signals.signal("email-unsubscribed")

#: An authentic body that could not be accepted: ``reason=`` (one line),
#: ``errors=`` (field name to messages, may be empty), ``body=`` (the decoded body; ``{}`` for
#: an object nested too deeply to decode).
event_rejected = _signals.signal("event-rejected")

#: RudderStack stored a batch: ``payloads=`` the list of RudderStack events sent,
#: ``duration=`` the seconds the request took.
event_forwarded = _signals.signal("event-forwarded")

#: A batch was not stored: ``payloads=`` the events, ``reason=`` what went wrong,
#: ``retry=`` whether the events will be sent again (``False``: kept as dead letters or refused),
#: ``duration=`` the seconds the request took.
forward_failed = _signals.signal("forward-failed")

#: Every answer of the webhook route: ``outcome=`` one of ``accepted``, ``duplicate``, ``rejected``,
#: ``refused_signature`` (401), ``too_large`` (413), ``malformed`` (400), ``retry_later`` (503) or
#: ``error`` (a receiver raised: 500), ``duration=`` the seconds the route took, and ``event=`` the
#: :class:`~flask_cio_rudder.CioEvent` when accepted or a duplicate (else ``None``). For metrics;
#: a receiver of this signal must not raise.
webhook_answered = _signals.signal("webhook-answered")


def send(signal: NamedSignal, app: Flask, **data: Any) -> None:
    """Send ``signal`` from ``app``; an ``async def`` receiver runs through ``app.ensure_sync``, as an
    async view does (blinker alone refuses one, and the request would fail)."""
    signal.send(app, _async_wrapper=app.ensure_sync, **data)


def send_logged(signal: NamedSignal, app: Flask, **data: Any) -> None:
    """Send a signal about something done (a delivery): a receiver that raises is logged, not raised,
    since an answer or a retry cannot undo it."""
    try:
        signal.send(app, _async_wrapper=_in_own_loop, **data)
    except Exception:
        logger.exception("A receiver of %s raised", signal.name)


def _in_own_loop(receiver: Callable[..., Any]) -> Callable[..., Any]:
    """An ``async def`` delivery receiver run to its end in an event loop of its own. Not through
    ``ensure_sync``: its thread pool cannot start once the interpreter exits, when the sender's last
    flush sends these signals; and no loop runs in the sender's thread or a WSGI request's."""

    @functools.wraps(receiver)
    def run(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(receiver(*args, **kwargs))

    return run
