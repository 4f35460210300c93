"""The event object host apps receive in every signal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["CioEvent", "as_text"]


def as_text(value: object) -> str | None:
    """A JSON value as text: strings as they are, numbers written out, anything else ``None``.

    Customer.io's schema says ``customer_id: "42"``, but bodies carry ``42`` too; a
    receiver reading ``event.user_id`` should get ``"42"`` either way.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True)
class CioEvent:
    """One accepted Customer.io reporting event, with the RudderStack event made from it.

    ``raw`` is the decoded body exactly as Customer.io sent it and ``data`` its
    ``data`` object; ``payload`` is the RudderStack ``track`` event that is
    forwarded. Treat all three as read-only. The email fields below
    (``recipient``, ``subject``, ...) read ``data`` safely: a field that is
    missing, ``null`` or of no usable type is ``None``, never a ``KeyError``.
    """

    #: Customer.io's unique id for this event (a ULID); the key retries are deduplicated on.
    event_id: str
    #: ``email``, ``customer``, ``push``, ``sms``, ... exactly as sent (``None`` if absent or not text).
    object_type: str | None
    #: ``delivered``, ``opened``, ``bounced``, ... exactly as sent (``None`` if absent or not text).
    metric: str | None
    #: The RudderStack event name, such as ``"Email Bounced"`` or ``"Unknown Event"``.
    name: str
    #: When it happened (aware, UTC), or ``None`` when the body had no numeric timestamp.
    timestamp: datetime | None
    #: RudderStack ``userId`` as text: ``data.customer_id``, else ``data.identifiers.id``.
    user_id: str | None
    #: RudderStack ``anonymousId``: the email, only when there is no ``user_id``.
    anonymous_id: str | None
    #: The person's address: ``data.identifiers.email``, else ``data.recipient``, else ``data.email_address``.
    email: str | None
    data: dict[str, Any]
    raw: dict[str, Any]
    payload: dict[str, Any]
    #: ``payload`` as compact JSON: the exact text sent to RudderStack (UTF-8 on the wire).
    payload_json: str
    #: What the body breaks of Customer.io's schema, field path to message (``{}`` when nothing).
    #: Only information: in the default ``"compatible"`` validation such events are accepted.
    problems: Mapping[str, str] = field(default_factory=dict)

    @property
    def recipient(self) -> str | None:
        """``data.recipient``: the address the message went to (a phone number for sms)."""
        return as_text(self.data.get("recipient"))

    @property
    def subject(self) -> str | None:
        """``data.subject``: the message's subject line."""
        return as_text(self.data.get("subject"))

    @property
    def delivery_id(self) -> str | None:
        """``data.delivery_id``: Customer.io's id of the message delivery."""
        return as_text(self.data.get("delivery_id"))

    @property
    def failure_message(self) -> str | None:
        """``data.failure_message``: why a bounced, dropped or failed message failed."""
        return as_text(self.data.get("failure_message"))

    @property
    def href(self) -> str | None:
        """``data.href``: the link a clicked event was for."""
        return as_text(self.data.get("href"))

    @property
    def link_id(self) -> int | str | None:
        """``data.link_id``: Customer.io's id of that link, as sent (a number, or text)."""
        value = self.data.get("link_id")
        return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
