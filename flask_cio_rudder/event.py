"""The event object host apps receive in every signal."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["CioEvent"]


@dataclass(frozen=True)
class CioEvent:
    """One accepted Customer.io reporting event, with the RudderStack event made from it.

    ``raw`` is the decoded body exactly as Customer.io sent it and ``data`` its
    ``data`` object; ``payload`` is the RudderStack ``track`` event that is
    forwarded. Treat all three as read-only.
    """

    #: Customer.io's unique id for this event (a ULID); the key retries are deduplicated on.
    event_id: str
    #: ``email``, ``customer``, ``push``, ``sms``, ... exactly as sent (``None`` if absent).
    object_type: str | None
    #: ``delivered``, ``opened``, ``bounced``, ... exactly as sent (``None`` if absent).
    metric: str | None
    #: The RudderStack event name, such as ``"Email Bounced"`` or ``"Unknown Event"``.
    name: str
    #: When it happened (aware, UTC), or ``None`` when the body had no usable timestamp.
    timestamp: datetime | None
    #: RudderStack ``userId``: ``data.customer_id``, else ``data.identifiers.id``.
    user_id: str | None
    #: RudderStack ``anonymousId``: the email, only when there is no ``user_id``.
    anonymous_id: str | None
    #: The person's address: ``data.identifiers.email``, else ``data.recipient``, else ``data.email_address``.
    email: str | None
    data: dict[str, Any]
    raw: dict[str, Any]
    payload: dict[str, Any]
    #: ``payload`` as compact ASCII JSON: the exact text sent to RudderStack.
    payload_json: str
