"""Helpers for testing a host app that uses Flask-CIO-Rudder.

>>> headers = signature_headers(body, key="my-signing-key")
>>> with record_events(app) as events:
...     client.post("/webhooks/customerio", data=body, headers=headers)
>>> events[0].name
'Email Bounced'
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from flask import Flask

from . import signals
from .event import CioEvent
from .signature import sign

__all__ = ["encode", "record_events", "signature_headers"]


def encode(body: Mapping[str, Any]) -> bytes:
    """Serialise a webhook body the way Customer.io does: compact JSON, UTF-8."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def signature_headers(
    body: bytes | str | Mapping[str, Any], key: str, timestamp: int | None = None
) -> dict[str, str]:
    """The headers Customer.io sends with ``body``, signed with ``key``.

    Post exactly the bytes that were signed: pass ``bytes`` (or ``str``), or a
    mapping, which is signed as :func:`encode` serialises it.
    """
    if isinstance(body, Mapping):
        body = encode(body)
    elif isinstance(body, str):
        body = body.encode("utf-8")
    sent_at = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-CIO-Timestamp": sent_at,
        "X-CIO-Signature": sign(body, sent_at, key),
    }


@contextmanager
def record_events(app: Flask) -> Iterator[list[CioEvent]]:
    """Collect the events ``app`` accepts inside the ``with`` block, in order."""
    events: list[CioEvent] = []

    def record(sender: Flask, event: CioEvent, **extra: Any) -> None:
        events.append(event)

    with signals.event_received.connected_to(record, sender=app):
        yield events
