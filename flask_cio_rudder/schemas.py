"""marshmallow schemas of a Customer.io webhook body, as Customer.io's spec describes it.

Field types and required fields follow Customer.io's Reporting Webhooks description.
What a body breaks of them is reported on the event (``event.problems``); only with
``CIO_RUDDER_VALIDATION = "strict"`` does it reject the body (see
:mod:`flask_cio_rudder.validation`). Every schema sets ``unknown = EXCLUDE``
explicitly (it does not cascade): Customer.io adds fields over time and a new field
must never count as a problem. The RudderStack event is built from the untouched body.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

__all__ = [
    "EMAIL_ENVELOPES",
    "GENERIC_ENVELOPE",
    "Envelope",
    "envelope_schema_for",
    "is_text",
    "to_datetime",
    "unix_seconds",
]

# Python's datetime (and JavaScript's toISOString with four-digit years) cover
# years 1 to 9999; anything outside is not a Unix time in seconds.
_MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
_END_SECONDS = 253402300800  # 10000-01-01T00:00:00Z: the first moment past year 9999


def unix_seconds(value: object) -> int | float | None:
    """Return ``value`` as Unix seconds, ``None`` where RudderStack ignores it.

    RudderStack only reads a JSON number; ``null``, booleans and strings (even
    numeric ones) give an event without time fields. Numbers outside years
    1-9999, such as milliseconds, raise :class:`ValidationError` instead of
    becoming the year 52204 as RudderStack's transformer makes them.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not (_MIN_SECONDS <= value < _END_SECONDS) or math.isnan(value):
        raise ValidationError(
            f"{value!r} is not a Unix time in seconds (years 1 to 9999); "
            "Customer.io sends seconds, so this looks like milliseconds or a corrupt value."
        )
    return value


def to_datetime(value: object) -> datetime | None:
    """Customer.io's ``timestamp`` as an aware UTC datetime, ``None`` where RudderStack ignores it."""
    seconds = unix_seconds(value)
    return None if seconds is None else _utc(seconds)


@functools.lru_cache(maxsize=1024)  # events of the same second, which a busy stream is full of
def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class UnixTimestamp(fields.Field):  # type: ignore[type-arg]
    """Loads Customer.io's ``timestamp`` as an aware UTC datetime, or ``None``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        return to_datetime(value)

    @staticmethod
    def quick_accepts(value: object) -> bool:
        """For :class:`~flask_cio_rudder.shortcut.Shortcut`: would this value load?"""
        try:
            unix_seconds(value)
        except ValidationError:
            return False
        return True


def is_text(value: str) -> bool:
    """Whether ``value`` is real Unicode text (JSON can carry lone surrogates such as ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_unicode(value: str) -> None:
    """An id must be real text: see :func:`is_text`."""
    if not is_text(value):
        raise ValidationError("Not valid Unicode text (it holds a lone UTF-16 surrogate).")


class _Schema(Schema):
    class Meta:
        unknown = EXCLUDE


def _optional_string() -> fields.String:
    return fields.String(allow_none=True)


def _optional_integer() -> fields.Integer:
    return fields.Integer(strict=True, allow_none=True)


def _required_string() -> fields.String:
    return fields.String(required=True)


class Identifiers(_Schema):
    """``data.identifiers``: who the event is about."""

    id = _optional_string()
    email = _optional_string()
    cio_id = _optional_string()


class MessageData(_Schema):
    """``data`` fields shared by every event, typed as Customer.io documents them."""

    customer_id = _optional_string()
    identifiers = fields.Nested(Identifiers, allow_none=True)
    email_address = _optional_string()
    delivery_id = _optional_string()
    trigger_id = _optional_integer()
    broadcast_id = _optional_integer()
    campaign_id = _optional_integer()
    action_id = _optional_integer()
    parent_action_id = _optional_integer()
    journey_id = _optional_string()
    newsletter_id = _optional_integer()
    content_id = _optional_integer()
    # transactional_message_id: Customer.io gives it no type, so any JSON value is accepted.
    recipient = _optional_string()
    subject = _optional_string()
    content = _optional_string()
    href = _optional_string()
    link_id = _optional_integer()
    failure_message = _optional_string()


class _EmailData(MessageData):
    delivery_id = _required_string()
    recipient = _required_string()


class EmailDeliveredData(_EmailData):
    subject = _required_string()


class EmailOpenedData(_EmailData):
    proxied = fields.Boolean(allow_none=True)
    prefetched = fields.Boolean(allow_none=True)
    synthetic = fields.Boolean(allow_none=True)


class EmailClickedData(_EmailData):
    subject = _required_string()
    href = _required_string()
    link_id = fields.Integer(strict=True, required=True)
    machine = fields.Boolean(allow_none=True)


class EmailBouncedData(_EmailData):
    subject = _required_string()
    failure_message = _required_string()


class EmailSpammedData(_EmailData):
    subject = _required_string()


class EmailUnsubscribedData(_EmailData):
    subject = _required_string()


class Envelope(_Schema):
    """The top level of every webhook body."""

    event_id = fields.String(required=True, validate=[validate.Length(min=1), _valid_unicode])
    object_type = fields.String(allow_none=True, load_default=None)
    metric = fields.String(allow_none=True, load_default=None)
    timestamp = UnixTimestamp(load_default=None, allow_none=True)
    data = fields.Nested(MessageData, required=True)


class EmailDeliveredEnvelope(Envelope):
    data = fields.Nested(EmailDeliveredData, required=True)


class EmailOpenedEnvelope(Envelope):
    data = fields.Nested(EmailOpenedData, required=True)


class EmailClickedEnvelope(Envelope):
    data = fields.Nested(EmailClickedData, required=True)


class EmailBouncedEnvelope(Envelope):
    data = fields.Nested(EmailBouncedData, required=True)


class EmailSpammedEnvelope(Envelope):
    data = fields.Nested(EmailSpammedData, required=True)


class EmailUnsubscribedEnvelope(Envelope):
    data = fields.Nested(EmailUnsubscribedData, required=True)


# Instances are built once, at import: they are reusable and building one is not free.
GENERIC_ENVELOPE = Envelope()
# The six email events this project treats as first-class get the stricter schemas.
EMAIL_ENVELOPES: dict[str, Envelope] = {
    "delivered": EmailDeliveredEnvelope(),
    "opened": EmailOpenedEnvelope(),
    "clicked": EmailClickedEnvelope(),
    "bounced": EmailBouncedEnvelope(),
    "spammed": EmailSpammedEnvelope(),
    "unsubscribed": EmailUnsubscribedEnvelope(),
}


def envelope_schema_for(body: Mapping[str, Any]) -> Envelope:
    """Pick the schema for this body: a strict one for the six email events, else the generic one.

    An email ``unsubscribed`` with no ``data.delivery_id`` is no message's event: it is the person's
    subscription change that an email triggered (Customer.io's ``person_unsubscribed``, reported
    with the email channel as ``object_type``), which has no recipient nor subject to require.
    """
    object_type = body.get("object_type")
    metric = body.get("metric")
    if isinstance(object_type, str) and object_type.lower() == "email" and isinstance(metric, str):
        data = body.get("data")
        if metric == "unsubscribed" and not (isinstance(data, Mapping) and "delivery_id" in data):
            return GENERIC_ENVELOPE
        return EMAIL_ENVELOPES.get(metric, GENERIC_ENVELOPE)
    return GENERIC_ENVELOPE
