"""Turn a Customer.io webhook body into the RudderStack ``track`` event.

The output is, key for key, what RudderStack's own Customer.io source produces
(``rudder-transformer``'s ``src/sources/customerio``), plus one documented
addition: a ``messageId`` derived from ``event_id``, so that a retried delivery
collapses downstream. The field mapping is the :class:`RudderStackTrack` schema
below: each line names a destination and the body paths it is copied from.
Nothing here checks Customer.io's schema: RudderStack's source does not either,
and :mod:`flask_cio_rudder.validation` decides what the webhook accepts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
import weakref
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Callable

from marshmallow import Schema, ValidationError, fields, missing

from . import jsoncodec
from .schemas import is_text, unix_seconds

__all__ = ["InvalidEvent", "RudderStackTrack", "build", "dump", "event_name", "message_id", "transform"]

#: Namespace of the deterministic ``messageId``: ``uuid5(MESSAGE_ID_NAMESPACE, event_id)``.
MESSAGE_ID_NAMESPACE = uuid.UUID("0b8f3a52-61c4-5a0e-9d3b-6f1c2b0c7e41")

# RudderStack's lookup table: (object_type lower-cased, metric as sent) -> event name.
_EVENT_NAMES: dict[str, dict[str, str]] = {
    "customer": {"subscribed": "Customer Subscribed", "unsubscribed": "Customer Unsubscribed"},
    "email": {
        "delivered": "Email Delivered",
        "opened": "Email Opened",
        "clicked": "Email Link Clicked",
        "bounced": "Email Bounced",
        "spammed": "Email Marked as Spam",
        "unsubscribed": "Email Unsubscribed",
        "subscribed": "Email Subscribed",
        "converted": "Email Converted",
        "sent": "Email Sent",
        "attempted": "Email Attempted",
        "drafted": "Email Drafted",
        "deferred": "Email Deferred",
        "dropped": "Email Dropped",
        "failed": "Email Failed",
    },
    "sms": {
        "delivered": "SMS Delivered",
        "sent": "SMS Sent",
        "attempted": "SMS Attempted",
        "drafted": "SMS Drafted",
        "bounced": "SMS Bounced",
        "converted": "SMS Converted",
        "failed": "SMS Failed",
        "clicked": "SMS Link Clicked",
    },
    "push": {
        "delivered": "Push Delivered",
        "opened": "Push Opened",
        "sent": "Push Sent",
        "attempted": "Push Attempted",
        "drafted": "Push Drafted",
        "bounced": "Push Bounced",
        "converted": "Push Converted",
        "dropped": "Push Dropped",
        "failed": "Push Failed",
        "clicked": "Push Link Clicked",
    },
    "slack": {
        "sent": "Slack Message Sent",
        "attempted": "Slack Message Attempted",
        "drafted": "Slack Message Drafted",
        "failed": "Slack Message Failed",
        "clicked": "Slack Message Link Clicked",
    },
    "webhook": {
        "sent": "Webhook Message Sent",
        "attempted": "Webhook Message Attempted",
        "drafted": "Webhook Message Drafted",
        "failed": "Webhook Message Failed",
        "clicked": "Webhook Message Link Clicked",
    },
}
UNKNOWN_EVENT = "Unknown Event"


class InvalidEvent(ValueError):
    """A body that cannot be accepted. ``errors`` maps each field to what is wrong with it."""

    def __init__(self, reason: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors: dict[str, Any] = errors or {}


def event_name(object_type: object, metric: object) -> str:
    """RudderStack's name for this pair, ``"Unknown Event"`` for anything not in its table."""
    metric = _as_javascript_text(metric)
    if not isinstance(object_type, str) or metric is None:
        return UNKNOWN_EVENT
    return _EVENT_NAMES.get(object_type.lower(), {}).get(metric, UNKNOWN_EVENT)


def _as_javascript_text(value: object) -> str | None:
    """``value`` as RudderStack's transformer writes it into its table's key, where that can name a
    metric: a string as it is, a list as JavaScript joins one (``["clicked"]`` is ``"clicked"``).
    ``None`` for the rest (numbers, booleans, null, objects), which never name a metric.

    A join of nested lists is the join of their strings in order, where null and an empty list
    each count as one empty string: walked with a stack, as a body can nest a thousand deep.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return None
    texts = []
    unjoined = [iter(value)]  # the lists being joined, the innermost last
    while unjoined:
        item = next(unjoined[-1], _JOINED)
        if item is _JOINED:
            unjoined.pop()
        elif isinstance(item, list) and item:
            unjoined.append(iter(item))
        elif item is None or isinstance(item, list):
            texts.append("")
        elif isinstance(item, str):
            texts.append(item)
        else:
            return None
    return ",".join(texts)


_JOINED = object()  # what a list being joined gives once its items are all taken


def describe_body(body: object) -> tuple[str | None, str | None]:
    """The RudderStack event name and the email address of a decoded body, even one that was rejected.

    For operators' searches: ``(None, None)`` for anything but an object, an email only when it is text.
    """
    if not isinstance(body, dict):
        return None, None
    email = EMAIL.get_value(body, "email")
    return event_name(body.get("object_type"), body.get("metric")), email if isinstance(email, str) else None


def message_id(event_id: str) -> str:
    """The deterministic RudderStack ``messageId`` of an event: ``str(uuid5(namespace, event_id))``.

    Spelled out as RFC 4122 (and ``uuid.uuid5``) computes it, without building a ``UUID``
    object: a third of the time on the webhook's path. ``tests/test_transform_rules.py``
    holds it equal to ``uuid.uuid5`` on generated ids.
    """
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + event_id.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_NAMESPACE_BYTES = MESSAGE_ID_NAMESPACE.bytes


@functools.lru_cache(maxsize=1024)  # both time fields of an event, and events of the same moment
def _iso_milliseconds(seconds: float) -> str:
    """Format like JavaScript's ``new Date(seconds * 1000).toISOString()``, years padded to four digits."""
    milliseconds = int(seconds * 1000)  # JavaScript's Date truncates toward zero too
    moment = _EPOCH + timedelta(milliseconds=milliseconds)
    return moment.isoformat(timespec="milliseconds") + "Z"  # naive UTC, so no offset to strip


_EPOCH = datetime(1970, 1, 1)


class FirstOf(fields.Field):  # type: ignore[type-arg]
    """Dumps the first value at these dotted body paths that is not null or missing, untouched."""

    def __init__(self, *paths: str) -> None:
        super().__init__()
        self.paths = [tuple(path.split(".")) for path in paths]

    def get_value(self, obj: Any, attr: str, accessor: Any = None, default: Any = missing) -> Any:
        for keys in self.paths:
            value = obj
            for key in keys:  # walk down nested JSON objects; anything else means absent
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                return value
        return missing


class Section(fields.Field):  # type: ignore[type-arg]
    """A nested object dumped from the whole body; left out when nothing maps into it."""

    def __init__(self, schema: type[Schema]) -> None:
        super().__init__()
        self.section = schema()

    def get_value(self, obj: Any, attr: str, accessor: Any = None, default: Any = missing) -> Any:
        return self.section.dump(obj) or missing


class Computed(fields.Field):  # type: ignore[type-arg]
    """A value computed from the whole body by ``function``; left out when it returns ``missing``."""

    def __init__(self, function: Callable[[dict[str, Any]], Any]) -> None:
        super().__init__()
        self.function = function

    def get_value(self, obj: Any, attr: str, accessor: Any = None, default: Any = missing) -> Any:
        return self.function(obj)


class Fixed(fields.Field):  # type: ignore[type-arg]
    """A constant; an object is copied for each event so that no two events share one."""

    def __init__(self, value: str | dict[str, Any]) -> None:
        super().__init__()
        self.value = value

    def get_value(self, obj: Any, attr: str, accessor: Any = None, default: Any = missing) -> Any:
        return dict(self.value) if isinstance(self.value, dict) else self.value


# Declared once because two rules read them: the identity rule needs both.
USER_ID = FirstOf("data.customer_id", "data.identifiers.id")
EMAIL = FirstOf("data.identifiers.email", "data.recipient", "data.email_address")


def _event(body: dict[str, Any]) -> str:
    return event_name(body.get("object_type"), body.get("metric"))


def _iso_timestamp(body: dict[str, Any]) -> Any:
    """The body's ``timestamp`` (Unix seconds) as ISO-8601 UTC with milliseconds, if it is a number."""
    seconds = unix_seconds(body.get("timestamp"))
    return missing if seconds is None else _iso_milliseconds(seconds)


def _anonymous_id(body: dict[str, Any]) -> Any:
    """RudderStack's identity rule: no ``userId`` but an email means ``anonymousId`` = that email."""
    if USER_ID.get_value(body, "userId") is not missing:
        return missing
    email = EMAIL.get_value(body, "email")
    return email if email is not missing and _truthy_in_javascript(email) else missing


def _truthy_in_javascript(value: object) -> bool:
    """Whether RudderStack's transformer (JavaScript) takes ``value`` for true: as Python does,
    except that every list and object is true, empty or not."""
    return isinstance(value, (list, dict)) or bool(value)


class Link(Schema):
    url = FirstOf("data.href")
    id = FirstOf("data.link_id")


class Properties(Schema):
    eventId = FirstOf("event_id", "data.event_id")
    triggerId = FirstOf("data.trigger_id")
    deliveryId = FirstOf("data.delivery_id")
    actionId = FirstOf("data.action_id")
    broadcastId = FirstOf("data.broadcast_id")
    journeyId = FirstOf("data.journey_id")
    parentActionId = FirstOf("data.parent_action_id")
    content = FirstOf("data.content")
    contentId = FirstOf("data.content_id")
    emailSubject = FirstOf("data.subject")
    link = Section(Link)
    reason = FirstOf("data.failure_message", "data.recipients.failure_message")
    campaignId = FirstOf("data.campaign_id")
    deviceId = FirstOf("data.device_id")
    devicePlatform = FirstOf("data.device_platform")
    recipients = FirstOf("data.recipients")
    type = FirstOf("data.event_type")
    newsletterId = FirstOf("data.newsletter_id")
    transactionalMessageId = FirstOf("data.transactional_message_id")


class Traits(Schema):
    email = EMAIL
    cioId = FirstOf("data.identifiers.cio_id")


class Context(Schema):
    library = Fixed({"name": "unknown", "version": "unknown"})
    integration = Fixed({"name": "Customer.io"})
    traits = Section(Traits)


class RudderStackTrack(Schema):
    """The RudderStack ``track`` event, dumped from a decoded Customer.io body.

    Each field computes its value from the whole body; one that has nothing to
    map is left out of the event, as RudderStack leaves it out.
    """

    type = Fixed("track")
    event = Computed(_event)
    messageId = Computed(lambda body: message_id(body["event_id"]))
    userId = USER_ID
    anonymousId = Computed(_anonymous_id)
    context = Section(Context)
    integrations = Fixed({"Customer.io": False})
    properties = Section(Properties)
    originalTimestamp = Computed(_iso_timestamp)
    sentAt = Computed(_iso_timestamp)


def dump(schema: Schema, body: dict[str, Any]) -> dict[str, Any]:
    """What ``schema.dump(body)`` returns, for the schemas above, at a fraction of the cost.

    Every field here does its work in ``get_value``; marshmallow's dump wraps each call
    in per-field machinery that adds nothing for them. The schema's own ``dump_fields``
    are compiled once (:func:`compile_dump`) into a table of lookups, so the schema stays
    the one declaration of the mapping (``tests/test_transform_rules.py`` holds the two
    equal on generated bodies).
    """
    compiled = _COMPILED.get(schema)
    if compiled is None:
        compiled = _COMPILED[schema] = compile_dump(schema)
    return compiled(body)


_Lookup = Callable[[dict[str, Any], dict[str, Any]], Any]  # (body, its "data" object) -> value or missing


def compile_dump(schema: Schema) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function that dumps ``schema`` from a body: one lookup per field, read from its declaration.

    Most source paths start at ``data``, so the body's ``data`` object is looked up
    once per event and each lookup starts from there.
    """
    table = _lookups(schema)

    def dump_body(body: dict[str, Any]) -> dict[str, Any]:
        data = body.get("data")
        return _run(table, body, data if isinstance(data, dict) else _EMPTY)

    return dump_body


_EMPTY: dict[str, Any] = {}  # a body without a data object reads as one with an empty one: all absent


def _run(table: list[tuple[str, _Lookup]], body: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    event = {}
    for name, lookup in table:
        value = lookup(body, data)
        if value is not missing:
            event[name] = value
    return event


def _lookups(schema: Schema) -> list[tuple[str, _Lookup]]:
    """``(name, lookup)`` per field of ``schema``, in its order; what each field's ``get_value`` returns."""
    table: list[tuple[str, _Lookup]] = []
    for name, field in schema.dump_fields.items():
        if isinstance(field, FirstOf):
            table.append((name, _first_of(field.paths)))
        elif isinstance(field, Section):
            table.append((name, _section(_lookups(field.section))))
        elif isinstance(field, Fixed) and not isinstance(field.value, dict):
            table.append((name, _constant(field.value)))
        elif isinstance(field, Computed):
            table.append((name, _computed(field.function)))
        else:  # Fixed objects (copied per event) and any other field: as the field says
            table.append((name, _field_value(field, name)))
    return table


def _first_of(paths: list[tuple[str, ...]]) -> _Lookup:
    # Each path as (starts at data?, the keys after that); the walk is FirstOf.get_value's.
    starts = [(True, keys[1:]) if keys[0] == "data" and len(keys) > 1 else (False, keys) for keys in paths]
    if len(starts) == 1 and starts[0][0] and len(starts[0][1]) == 1:
        return _data_key(starts[0][1][0])  # most fields: one key of the data object

    def first_of(body: dict[str, Any], data: dict[str, Any]) -> Any:
        for from_data, keys in starts:
            value: Any = data if from_data else body
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                return value
        return missing

    return first_of


def _data_key(key: str) -> _Lookup:
    """``first_of`` for the path ``data.<key>``, without its loops."""

    def data_key(body: dict[str, Any], data: dict[str, Any]) -> Any:
        value = data.get(key)
        return missing if value is None else value

    return data_key


def _section(table: list[tuple[str, _Lookup]]) -> _Lookup:
    def section(body: dict[str, Any], data: dict[str, Any]) -> Any:
        return _run(table, body, data) or missing

    return section


def _constant(value: Any) -> _Lookup:
    return lambda body, data: value


def _computed(function: Callable[[dict[str, Any]], Any]) -> _Lookup:
    return lambda body, data: function(body)


def _field_value(field: fields.Field, name: str) -> _Lookup:  # type: ignore[type-arg]
    return lambda body, data: field.get_value(body, name)


_COMPILED: weakref.WeakKeyDictionary[Schema, Callable[[dict[str, Any]], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
_TRACK = RudderStackTrack()
# json.dumps would build one encoder per call.
_JSON_UTF8 = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_JSON_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _json_text(payload: dict[str, Any]) -> str:
    """json's text of ``payload``: UTF-8 as orjson writes it (RudderStack's 32 KB are counted in
    what is sent), or ``\\u`` escapes only when a lone surrogate leaves no UTF-8 to write."""
    text = _JSON_UTF8.encode(payload)
    return text if is_text(text) else _JSON_ASCII.encode(payload)


def build(body: object) -> tuple[dict[str, Any], str]:
    """The RudderStack event for ``body`` and its compact JSON text (UTF-8 where it can, else ASCII).

    Raises :class:`InvalidEvent` when no event can be made: the body is not a JSON
    object, has no usable ``event_id`` (the key retries are recognised by), has a
    numeric ``timestamp`` that is no real time, or holds a value JSON cannot carry.
    """
    if not isinstance(body, dict):
        raise InvalidEvent(f"the body must be a JSON object, not {_json_type(body)}")
    event_id = body.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        message = "Missing data for required field." if event_id is None else "Not a non-empty string."
        raise InvalidEvent(
            "no event_id: it is needed to recognise Customer.io's retries", {"event_id": [message]}
        )
    if not is_text(event_id):
        raise InvalidEvent(
            "the event_id is not valid Unicode text (it holds a lone UTF-16 surrogate)",
            {"event_id": ["Not valid Unicode text."]},
        )
    try:
        payload = dump(_TRACK, body)
    except ValidationError as error:  # only the timestamp raises
        raise InvalidEvent(f"invalid timestamp: {error.messages[0]}", {"timestamp": error.messages}) from None
    try:
        return payload, jsoncodec.dumps(payload, _json_text)
    except RecursionError:
        raise InvalidEvent("the event is nested too deeply to be sent as JSON") from None
    except ValueError:  # 1e999 in a body decodes to infinity, which JSON cannot carry
        raise InvalidEvent("the event holds a number too large for JSON, such as 1e999") from None


def transform(body: Mapping[str, Any]) -> dict[str, Any]:
    """Return the RudderStack ``track`` event for one decoded Customer.io webhook body.

    Pure: no I/O, no app needed; the result is always valid for ``json.dumps``. Raises
    :class:`InvalidEvent` for bodies no event can be made from (see :func:`build`).
    Whether RudderStack would take the event (an identity, at most 32 KB) is the
    webhook's decision, not this function's. Any mapping is read as a JSON object.
    """
    return build(_as_decoded(body) if isinstance(body, Mapping) else body)[0]


def _as_decoded(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` as JSON decoding gives it: every mapping in it a ``dict``, every array a
    ``list``. Walked with a stack, as a body may nest a thousand deep; each object is copied once,
    so one met again (or containing itself, which the JSON encoder then refuses) is not walked again."""
    top = dict(body)
    copies: dict[int, Any] = {id(body): top}
    unwalked: list[dict[Any, Any] | list[Any]] = [top]
    while unwalked:
        container = unwalked.pop()
        for key in list(container.keys() if isinstance(container, dict) else range(len(container))):
            value = container[key]
            if id(value) in copies:
                container[key] = copies[id(value)]
            elif isinstance(value, (Mapping, list)):
                copy = copies[id(value)] = dict(value) if isinstance(value, Mapping) else list(value)
                container[key] = copy
                unwalked.append(copy)
    return top


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "an array"}
    return names.get(type(value), "a number")
