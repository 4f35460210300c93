"""The one place that decides whether the webhook accepts a body, and says why not.

Only what the pipeline itself needs decides acceptance: a JSON object with a
string ``event_id`` (the key retries are recognised by), a ``timestamp`` that is a
real time if it is a number, a value JSON can carry, an identity RudderStack takes
(``userId`` or ``anonymousId``) and at most 32 KB. An event RudderStack's own
Customer.io source would forward is forwarded from here too.

Customer.io's schema (:mod:`flask_cio_rudder.schemas`) is checked as information:
what a body breaks of it lands in ``event.problems`` and in one log line per field
and event type. With ``CIO_RUDDER_VALIDATION = "strict"`` such bodies are rejected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from .event import CioEvent, as_text
from .rudderstack import identifiable
from .schemas import EMAIL_ENVELOPES, GENERIC_ENVELOPE, envelope_schema_for, to_datetime
from .shortcut import Shortcut
from .transform import InvalidEvent, build

__all__ = ["MAX_EVENT_BYTES", "MODES", "Validation", "spec_problems"]

logger = logging.getLogger("flask_cio_rudder")

#: ``CIO_RUDDER_VALIDATION`` values.
MODES = ("compatible", "strict")

#: RudderStack's documented limit for one event; the gateway refuses larger ones.
MAX_EVENT_BYTES = 32 * 1024

_SHORTCUTS = {schema: Shortcut(schema) for schema in (GENERIC_ENVELOPE, *EMAIL_ENVELOPES.values())}


class Validation:
    """Turns a decoded body into a :class:`CioEvent`, or raises :class:`InvalidEvent` saying why not."""

    def __init__(self, mode: str = "compatible") -> None:
        if mode not in MODES:
            raise RuntimeError(f"CIO_RUDDER_VALIDATION must be 'compatible' or 'strict', not {mode!r}.")
        self.strict = mode == "strict"
        self._reported: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> CioEvent:
        payload, payload_json = build(body)
        problems, messages = spec_problems(body)
        if problems and self.strict:
            raise InvalidEvent(f"invalid fields: {', '.join(sorted(problems))}", messages)
        if not identifiable(payload):
            if payload.get("userId") is not None:  # there, but blank: it stops the look for an email too
                raise InvalidEvent(
                    "no userId or anonymousId: the body's data.customer_id (else data.identifiers.id) is "
                    "blank, as Customer.io sends it for a person who was deleted; RudderStack takes it as "
                    "the userId all the same, so it sets no anonymousId from the email, and refuses the event"
                )
            raise InvalidEvent(
                "no userId or anonymousId: the body has no data.customer_id, data.identifiers.id "
                "or email, and RudderStack refuses events without one"
            )
        size = len(payload_json.encode("utf-8"))  # the bytes sent to RudderStack
        if size > MAX_EVENT_BYTES:
            raise InvalidEvent(
                f"the RudderStack event is {size} bytes; RudderStack accepts at most {MAX_EVENT_BYTES}"
            )
        if problems:
            self._report(payload["event"], problems)
        data = body.get("data")
        traits = payload["context"].get("traits", {})
        object_type, metric = body.get("object_type"), body.get("metric")
        return CioEvent(
            event_id=body["event_id"],
            object_type=object_type if isinstance(object_type, str) else None,
            metric=metric if isinstance(metric, str) else None,
            name=payload["event"],
            timestamp=to_datetime(body.get("timestamp")),
            user_id=as_text(payload.get("userId")),
            anonymous_id=as_text(payload.get("anonymousId")),
            email=as_text(traits.get("email")),
            data=data if isinstance(data, dict) else {},
            raw=body,
            payload=payload,
            payload_json=payload_json,
            problems=problems,
        )

    def _report(self, event_name: str, problems: Mapping[str, str]) -> None:
        """Log each problem once per field and event type: a stream of alike events logs one line."""
        with self._lock:
            new = {path: text for path, text in problems.items() if (event_name, path) not in self._reported}
            self._reported.update((event_name, path) for path in new)
        for path, text in sorted(new.items()):
            logger.info(
                "Accepted %s events that break Customer.io's schema at %s (%s); RudderStack's source "
                "forwards them too. Logged once per field and event type; "
                'CIO_RUDDER_VALIDATION = "strict" rejects them instead.',
                event_name,
                path,
                text,
            )


def spec_problems(body: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``body`` breaks of Customer.io's schema: ``{field path: message}`` and marshmallow's messages."""
    schema = envelope_schema_for(body)
    if _SHORTCUTS[schema](body):
        return {}, {}
    messages: dict[str, Any] = schema.validate(body)
    return dict(_flatten(messages)), messages


def _flatten(messages: Mapping[Any, Any], prefix: str = "") -> list[tuple[str, str]]:
    """marshmallow's nested messages as ``("data.recipient", "Missing data for required field.")``."""
    found = []
    for key, value in messages.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.extend(_flatten(value, f"{path}."))
        else:
            found.append((path, " ".join(value) if isinstance(value, list) else str(value)))
    return found
