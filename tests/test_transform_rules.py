"""The rules of ``docs/rudderstack.md`` section 1, as tests of ``flask_cio_rudder.transform``.

Everything RudderStack's own Customer.io source does is written out here again, as data
(the event name table, the field mapping, the identity and timestamp rules), without
reading the library's tables, so that a slip in either place shows up as a failure.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import types
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_cio_rudder import InvalidEvent, transform
from flask_cio_rudder.schemas import is_text
from flask_cio_rudder.transform import MESSAGE_ID_NAMESPACE, RudderStackTrack, dump, message_id

from .conftest import CONFORMANCE

# Reproducible in CI: no example database, the same examples on every run. No deadline:
# a loaded two-core CI machine must not turn a slow example into a failure.
REPRODUCIBLE = settings(database=None, derandomize=True, deadline=None)

UNKNOWN = "Unknown Event"
EVENT_ID = "01E4C4CT6YDC7Y5M7FE1GWWPQJ"
ABSENT = object()  # "this key is not in the event at all"

CASES = json.loads(CONFORMANCE.read_text())

# RudderStack's table: (object_type lower-cased, metric exactly as sent) -> event name.
EVENT_NAMES = {
    ("customer", "subscribed"): "Customer Subscribed",
    ("customer", "unsubscribed"): "Customer Unsubscribed",
    ("email", "delivered"): "Email Delivered",
    ("email", "opened"): "Email Opened",
    ("email", "clicked"): "Email Link Clicked",
    ("email", "bounced"): "Email Bounced",
    ("email", "spammed"): "Email Marked as Spam",
    ("email", "unsubscribed"): "Email Unsubscribed",
    ("email", "subscribed"): "Email Subscribed",
    ("email", "converted"): "Email Converted",
    ("email", "sent"): "Email Sent",
    ("email", "attempted"): "Email Attempted",
    ("email", "drafted"): "Email Drafted",
    ("email", "deferred"): "Email Deferred",
    ("email", "dropped"): "Email Dropped",
    ("email", "failed"): "Email Failed",
    ("sms", "delivered"): "SMS Delivered",
    ("sms", "sent"): "SMS Sent",
    ("sms", "attempted"): "SMS Attempted",
    ("sms", "drafted"): "SMS Drafted",
    ("sms", "bounced"): "SMS Bounced",
    ("sms", "converted"): "SMS Converted",
    ("sms", "failed"): "SMS Failed",
    ("sms", "clicked"): "SMS Link Clicked",
    ("push", "delivered"): "Push Delivered",
    ("push", "opened"): "Push Opened",
    ("push", "sent"): "Push Sent",
    ("push", "attempted"): "Push Attempted",
    ("push", "drafted"): "Push Drafted",
    ("push", "bounced"): "Push Bounced",
    ("push", "converted"): "Push Converted",
    ("push", "dropped"): "Push Dropped",
    ("push", "failed"): "Push Failed",
    ("push", "clicked"): "Push Link Clicked",
    ("slack", "sent"): "Slack Message Sent",
    ("slack", "attempted"): "Slack Message Attempted",
    ("slack", "drafted"): "Slack Message Drafted",
    ("slack", "failed"): "Slack Message Failed",
    ("slack", "clicked"): "Slack Message Link Clicked",
    ("webhook", "sent"): "Webhook Message Sent",
    ("webhook", "attempted"): "Webhook Message Attempted",
    ("webhook", "drafted"): "Webhook Message Drafted",
    ("webhook", "failed"): "Webhook Message Failed",
    ("webhook", "clicked"): "Webhook Message Link Clicked",
}

# RudderStack's mapping: destination <- the first of these body paths that is not null or missing.
MAPPING = [
    ("properties.eventId", ["event_id", "data.event_id"]),
    ("properties.triggerId", ["data.trigger_id"]),
    ("userId", ["data.customer_id", "data.identifiers.id"]),
    ("properties.deliveryId", ["data.delivery_id"]),
    ("properties.actionId", ["data.action_id"]),
    ("properties.broadcastId", ["data.broadcast_id"]),
    ("properties.journeyId", ["data.journey_id"]),
    ("properties.parentActionId", ["data.parent_action_id"]),
    ("context.traits.email", ["data.identifiers.email", "data.recipient", "data.email_address"]),
    ("context.traits.cioId", ["data.identifiers.cio_id"]),
    ("properties.content", ["data.content"]),
    ("properties.contentId", ["data.content_id"]),
    ("properties.emailSubject", ["data.subject"]),
    ("properties.link.url", ["data.href"]),
    ("properties.link.id", ["data.link_id"]),
    ("properties.reason", ["data.failure_message", "data.recipients.failure_message"]),
    ("properties.campaignId", ["data.campaign_id"]),
    ("properties.deviceId", ["data.device_id"]),
    ("properties.devicePlatform", ["data.device_platform"]),
    ("properties.recipients", ["data.recipients"]),
    ("properties.type", ["data.event_type"]),
    ("properties.newsletterId", ["data.newsletter_id"]),
    ("properties.transactionalMessageId", ["data.transactional_message_id"]),
]

# Every field the six first-class email events require, so any (object_type, metric) validates.
COMPLETE_DATA = {
    "customer_id": "42",
    "delivery_id": "RMehBAAAAXE7r_ONUGXly9DBGkpq1JS31w==",
    "recipient": "ada@example.com",
    "subject": "Your March invoice",
    "href": "https://example.com/invoices/3",
    "link_id": 2,
    "failure_message": "550 mailbox unavailable",
}

FIRST_CLASS_EMAIL_METRICS = ("delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed")

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
YEAR_1 = -62135596800  # 0001-01-01T00:00:00Z
YEAR_1000 = -30610224000  # 1000-01-01T00:00:00Z
YEAR_9999_END = 253402300799  # 9999-12-31T23:59:59Z
PAST_9999 = 253402300800  # 10000-01-01T00:00:00Z


def body(data: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A webhook body: a push event for customer 42 unless told otherwise; ``ABSENT`` drops a key."""
    made: dict[str, Any] = {
        "event_id": EVENT_ID,
        "object_type": "push",
        "metric": "sent",
        "timestamp": 1585250199,
        "data": {"customer_id": "42"} if data is None else data,
    }
    made.update(top)
    return {key: value for key, value in made.items() if value is not ABSENT}


def at(value: Any, path: str) -> Any:
    """The value at a dotted path, ``ABSENT`` when a step is missing or not an object."""
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return ABSENT
        value = value[key]
    return value


def put(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value


def js_iso(seconds: float) -> str:
    """JavaScript's ``new Date(seconds * 1000).toISOString()``: milliseconds truncated toward zero."""
    milliseconds = seconds * 1000 if isinstance(seconds, int) else math.trunc(seconds * 1000)
    moment = EPOCH + timedelta(milliseconds=milliseconds)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def js_string(value: Any) -> str:
    """How JavaScript writes a JSON value into a string (numbers roughly: no metric holds a digit)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join("" if item is None else js_string(item) for item in value)
    if isinstance(value, dict):
        return "[object Object]"
    return repr(value)


def js_truthy(value: Any) -> bool:
    """JavaScript's truth of a JSON value: null, false, 0 and "" are false, everything else true."""
    return value not in (None, False, 0, "") or isinstance(value, (list, dict))


def expected_event(source: dict[str, Any]) -> dict[str, Any]:
    """What RudderStack's transformer makes of a valid body, by the rules in rudderstack.md."""
    object_type, metric = source.get("object_type"), source.get("metric")
    name = UNKNOWN
    if isinstance(object_type, str):  # its table's key is `${object_type}.${metric}`, in JavaScript
        name = EVENT_NAMES.get((object_type.lower(), js_string(metric)), UNKNOWN)
    event: dict[str, Any] = {
        "type": "track",
        "event": name,
        "context": {
            "library": {"name": "unknown", "version": "unknown"},
            "integration": {"name": "Customer.io"},
        },
        "integrations": {"Customer.io": False},
    }
    for destination, paths in MAPPING:
        for path in paths:
            value = at(source, path)
            if value is not ABSENT and value is not None:
                put(event, destination, value)
                break
    email = at(event, "context.traits.email")
    if event.get("userId") is None and email is not ABSENT and js_truthy(email):
        event["anonymousId"] = email
    timestamp = source.get("timestamp")
    if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
        event["originalTimestamp"] = event["sentAt"] = js_iso(timestamp)
    return event


def without_message_id(event: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(event.get("messageId"), str)
    return {key: value for key, value in event.items() if key != "messageId"}


# -- the upstream conformance cases ---------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case["name"].split(" | ")[0] for case in CASES])
def test_upstream_case_is_reproduced_key_for_key(case: dict[str, Any]) -> None:
    source = copy.deepcopy(case["input"])
    event = transform(source)
    assert without_message_id(event) == case["expected_output"]
    assert source == case["input"], "transform must not change the body it is given"
    assert json.loads(json.dumps(event, allow_nan=False)) == event


@pytest.mark.parametrize("case", CASES[:6], ids=[case["name"].split(" | ")[0] for case in CASES[:6]])
def test_any_mapping_is_read_as_a_json_object(case: dict[str, Any]) -> None:
    """transform() takes a mapping: nested OrderedDicts (json.loads with object_pairs_hook) lost
    everything below the top level, the userId and the traits included, without a word."""
    ordered = json.loads(json.dumps(case["input"]), object_pairs_hook=collections.OrderedDict)
    assert transform(ordered) == transform(case["input"])
    read_only = json.loads(json.dumps(case["input"]), object_hook=types.MappingProxyType)  # no dict at all
    event = transform(read_only)
    assert event == transform(case["input"]) and json.loads(json.dumps(event)) == event


def test_message_id_is_a_uuid_that_depends_only_on_event_id() -> None:
    first = transform(body())
    retry = transform(
        body(data={"customer_id": "7", "recipient": "x@example.com"}, timestamp=1, metric="failed")
    )
    other = transform(body(event_id="01E4C4CT6YDC7Y5M7FE1GWWPQK"))
    assert first["messageId"] == retry["messageId"] == transform(body())["messageId"]
    assert other["messageId"] != first["messageId"]
    assert str(uuid.UUID(first["messageId"])) == first["messageId"]


@REPRODUCIBLE
@given(st.text(min_size=1), st.text(min_size=1))
def test_message_ids_are_equal_exactly_when_event_ids_are(first: str, second: str) -> None:
    one = transform(body(event_id=first))["messageId"]
    assert one == transform(body(event_id=first))["messageId"]
    assert (one == transform(body(event_id=second))["messageId"]) == (first == second)


@REPRODUCIBLE
@given(st.text(min_size=1).filter(is_text))
def test_the_message_id_is_uuid5_of_the_event_id(event_id: str) -> None:
    assert message_id(event_id) == str(uuid.uuid5(MESSAGE_ID_NAMESPACE, event_id))


# -- event names ----------------------------------------------------------------------------


@pytest.mark.parametrize(("pair", "name"), EVENT_NAMES.items(), ids=[f"{o}+{m}" for o, m in EVENT_NAMES])
def test_event_name_of_each_pair(pair: tuple[str, str], name: str) -> None:
    object_type, metric = pair
    assert transform(body(COMPLETE_DATA, object_type=object_type, metric=metric))["event"] == name
    for variant in (object_type.upper(), object_type.title()):
        assert transform(body(COMPLETE_DATA, object_type=variant, metric=metric))["event"] == name
    for variant in (metric.upper(), metric.title()):
        assert transform(body(COMPLETE_DATA, object_type=object_type, metric=variant))["event"] == UNKNOWN


def test_object_type_is_lower_cased_but_metric_is_not() -> None:
    assert transform(body(COMPLETE_DATA, object_type="EMAIL", metric="opened"))["event"] == "Email Opened"
    assert transform(body(COMPLETE_DATA, object_type="email", metric="Opened"))["event"] == UNKNOWN


@pytest.mark.parametrize(
    ("object_type", "metric"),
    [
        ("in_app", "opened"),
        ("in_app", "clicked"),
        ("whatsapp", "delivered"),
        ("whatsapp", "replied"),
        ("email", "undeliverable"),
        ("sms", "replied"),
        ("sms", "opened"),
        ("push", "undeliverable"),
        ("slack", "delivered"),
        ("webhook", "opened"),
        ("customer", "cio_subscription_preferences_changed"),
        ("email", ""),
        ("", "sent"),
        (" email", "sent"),
        ("email", "sent "),
        ("emails", "sent"),
    ],
)
def test_pairs_outside_the_table_are_unknown_events(object_type: str, metric: str) -> None:
    assert transform(body(COMPLETE_DATA, object_type=object_type, metric=metric))["event"] == UNKNOWN


@pytest.mark.parametrize(("object_type", "metric"), [(None, "sent"), ("email", None), (None, None)])
def test_null_object_type_or_metric_is_an_unknown_event(object_type: Any, metric: Any) -> None:
    assert transform(body(COMPLETE_DATA, object_type=object_type, metric=metric))["event"] == UNKNOWN


@pytest.mark.parametrize("dropped", [("object_type",), ("metric",), ("object_type", "metric")])
def test_missing_object_type_or_metric_is_unknown_event(dropped: tuple[str, ...]) -> None:
    source = body(COMPLETE_DATA, **dict.fromkeys(dropped, ABSENT))
    assert transform(source)["event"] == UNKNOWN


@pytest.mark.parametrize(
    ("object_type", "metric"),
    [
        ("email", "constructor"),
        ("email", "__proto__"),
        ("email", "toString"),
        ("email", "hasOwnProperty"),
        ("customer", "valueOf"),
        ("constructor", "name"),
        ("__proto__", "toString"),
        ("toString", "length"),
        ("constructor", "constructor"),
    ],
)
def test_javascript_object_internals_are_unknown_events(object_type: str, metric: str) -> None:
    assert transform(body(COMPLETE_DATA, object_type=object_type, metric=metric))["event"] == UNKNOWN


@REPRODUCIBLE
@given(
    st.one_of(st.sampled_from(sorted({pair[0] for pair in EVENT_NAMES})), st.text(max_size=12)),
    st.one_of(st.sampled_from(sorted({pair[1] for pair in EVENT_NAMES})), st.text(max_size=12)),
    st.sampled_from([str.lower, str.upper, str.title, str.swapcase]),
)
def test_event_name_is_the_table_lookup(object_type: str, metric: str, case: Any) -> None:
    object_type = case(object_type)
    event = transform(body(COMPLETE_DATA, object_type=object_type, metric=metric))
    assert event["event"] == EVENT_NAMES.get((object_type.lower(), metric), UNKNOWN)


# -- field mapping --------------------------------------------------------------------------


def test_every_source_field_lands_where_rudderstack_puts_it() -> None:
    source = body(
        {
            "event_id": "data-level-event-id",
            "trigger_id": 1,
            "customer_id": "42",
            "delivery_id": "dlv",
            "action_id": 96,
            "broadcast_id": 2,
            "journey_id": "jrn",
            "parent_action_id": 3,
            "identifiers": {"id": "id-42", "email": "ada@example.com", "cio_id": "cio-1"},
            "recipient": "recipient@example.com",
            "email_address": "address@example.com",
            "content": "<p>hi</p>",
            "content_id": 4,
            "subject": "Subject",
            "href": "https://example.com",
            "link_id": 5,
            "failure_message": "boom",
            "campaign_id": 6,
            "device_id": "device",
            "device_platform": "ios",
            "recipients": [{"device_id": "device", "device_platform": "ios"}],
            "event_type": "legacy_type",
            "newsletter_id": 7,
            "transactional_message_id": 8,
        },
        object_type="email",
        metric="sent",
        timestamp=1585250199,
    )
    assert without_message_id(transform(source)) == {
        "type": "track",
        "event": "Email Sent",
        "userId": "42",
        "context": {
            "library": {"name": "unknown", "version": "unknown"},
            "integration": {"name": "Customer.io"},
            "traits": {"email": "ada@example.com", "cioId": "cio-1"},
        },
        "integrations": {"Customer.io": False},
        "properties": {
            "eventId": EVENT_ID,
            "triggerId": 1,
            "deliveryId": "dlv",
            "actionId": 96,
            "broadcastId": 2,
            "journeyId": "jrn",
            "parentActionId": 3,
            "content": "<p>hi</p>",
            "contentId": 4,
            "emailSubject": "Subject",
            "link": {"url": "https://example.com", "id": 5},
            "reason": "boom",
            "campaignId": 6,
            "deviceId": "device",
            "devicePlatform": "ios",
            "recipients": [{"device_id": "device", "device_platform": "ios"}],
            "type": "legacy_type",
            "newsletterId": 7,
            "transactionalMessageId": 8,
        },
        "originalTimestamp": "2020-03-26T19:16:39.000Z",
        "sentAt": "2020-03-26T19:16:39.000Z",
    }


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"customer_id": "42", "identifiers": {"id": "7"}}, "userId", "42"),
        ({"customer_id": None, "identifiers": {"id": "7"}}, "userId", "7"),
        ({"identifiers": {"id": "7"}}, "userId", "7"),
        ({"customer_id": "", "identifiers": {"id": "7"}}, "userId", ""),
        ({"customer_id": None, "identifiers": {"id": None}}, "userId", ABSENT),
        ({"identifiers": None}, "userId", ABSENT),
        (
            {"identifiers": {"email": "a@x"}, "recipient": "b@x", "email_address": "c@x"},
            "context.traits.email",
            "a@x",
        ),
        (
            {"identifiers": {"email": None}, "recipient": "b@x", "email_address": "c@x"},
            "context.traits.email",
            "b@x",
        ),
        ({"recipient": None, "email_address": "c@x"}, "context.traits.email", "c@x"),
        ({"identifiers": None, "email_address": "c@x"}, "context.traits.email", "c@x"),
        ({"recipient": "", "email_address": "c@x"}, "context.traits.email", ""),
        ({"identifiers": {"email": ""}, "recipient": "b@x"}, "context.traits.email", ""),
        ({"failure_message": "own", "recipients": {"failure_message": "nested"}}, "properties.reason", "own"),
        (
            {"failure_message": None, "recipients": {"failure_message": "nested"}},
            "properties.reason",
            "nested",
        ),
        ({"recipients": [{"failure_message": "in an array"}]}, "properties.reason", ABSENT),
        ({"event_id": "from-data"}, "properties.eventId", EVENT_ID),
    ],
)
def test_first_non_null_source_wins(data: dict[str, Any], path: str, expected: Any) -> None:
    assert at(transform(body(data)), path) == expected


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("subject", "", "properties.emailSubject"),
        ("content", "", "properties.content"),
        ("delivery_id", "", "properties.deliveryId"),
        ("journey_id", "", "properties.journeyId"),
        ("failure_message", "", "properties.reason"),
        ("href", "", "properties.link.url"),
        ("trigger_id", 0, "properties.triggerId"),
        ("campaign_id", 0, "properties.campaignId"),
        ("link_id", 0, "properties.link.id"),
        ("parent_action_id", 0, "properties.parentActionId"),
        ("device_id", 0, "properties.deviceId"),
        ("device_id", False, "properties.deviceId"),
        ("device_platform", "", "properties.devicePlatform"),
        ("event_type", False, "properties.type"),
        ("recipients", [], "properties.recipients"),
        ("recipients", {}, "properties.recipients"),
    ],
)
def test_empty_zero_and_false_are_copied(key: str, value: Any, path: str) -> None:
    copied = at(transform(body({"customer_id": "42", key: value})), path)
    assert copied == value
    assert type(copied) is type(value)


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("device_id", 123, "properties.deviceId"),
        ("device_id", "123", "properties.deviceId"),
        ("event_type", 1.5, "properties.type"),
        ("device_platform", ["ios"], "properties.devicePlatform"),
        ("trigger_id", 12, "properties.triggerId"),
        ("journey_id", "12", "properties.journeyId"),
    ],
)
def test_values_are_copied_without_type_conversion(key: str, value: Any, path: str) -> None:
    copied = at(transform(body({"customer_id": "42", key: value})), path)
    assert copied == value
    assert type(copied) is type(value)


def test_unmapped_fields_are_dropped() -> None:
    marker = "MUST-NOT-BE-FORWARDED"
    source = body(
        {
            "customer_id": "42",
            "identifiers": {"id": "42", "phone": marker},
            "headers": {"X-Mailer": marker},
            "attributes": {"plan": marker},
            "trigger_event_id": marker,
            "machine": False,
            "proxied": True,
            "unknown_field": marker,
        },
        object_type="email",
        metric="sent",
        extra_top_level=marker,
    )
    event = transform(source)
    assert marker not in json.dumps(event)
    assert set(event) == {
        "type",
        "event",
        "messageId",
        "userId",
        "context",
        "integrations",
        "properties",
        "originalTimestamp",
        "sentAt",
    }
    assert set(event["context"]) == {"library", "integration"}
    assert event["properties"] == {"eventId": EVENT_ID}


def test_recipients_are_copied_whole_with_inner_keys_untouched() -> None:
    recipients = [
        {
            "device_id": "d1",
            "device_platform": "android",
            "failure_message": None,
            "nested": {"snake_case": [1]},
        },
        {"device_id": "d2", "extra": {"a_b": {"c_d": True}}},
    ]
    event = transform(body({"customer_id": "42", "recipients": copy.deepcopy(recipients)}))
    assert event["properties"]["recipients"] == recipients


@pytest.mark.parametrize(
    ("data", "link"),
    [
        ({"href": "https://example.com/a", "link_id": 3}, {"url": "https://example.com/a", "id": 3}),
        ({"href": "https://example.com/a"}, {"url": "https://example.com/a"}),
        ({"link_id": 3}, {"id": 3}),
        ({"href": None, "link_id": 3}, {"id": 3}),
        ({"href": None, "link_id": None}, ABSENT),
        ({}, ABSENT),
    ],
)
def test_properties_link_is_built_from_href_and_link_id(data: dict[str, Any], link: Any) -> None:
    assert at(transform(body({"customer_id": "42", **data})), "properties.link") == link


@pytest.mark.parametrize(
    ("data", "traits"),
    [
        ({"customer_id": "42"}, ABSENT),
        ({"customer_id": "42", "identifiers": {"id": "42"}}, ABSENT),
        ({"customer_id": "42", "identifiers": {"email": None, "cio_id": None}, "recipient": None}, ABSENT),
        ({"customer_id": "42", "identifiers": {"cio_id": "c1"}}, {"cioId": "c1"}),
        ({"customer_id": "42", "email_address": "a@x"}, {"email": "a@x"}),
        ({"customer_id": "42", "recipient": "+15555550100"}, {"email": "+15555550100"}),
    ],
)
def test_context_traits_only_when_something_maps(data: dict[str, Any], traits: Any) -> None:
    assert at(transform(body(data)), "context.traits") == traits


# -- identity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "user_id", "anonymous_id"),
    [
        ({"customer_id": "42", "identifiers": {"email": "a@x"}}, "42", ABSENT),
        ({"identifiers": {"id": "7", "email": "a@x"}}, "7", ABSENT),
        ({"identifiers": {"id": None, "email": "a@x"}}, ABSENT, "a@x"),
        ({"customer_id": None, "identifiers": {"id": None}, "recipient": "b@x"}, ABSENT, "b@x"),
        ({"recipient": "+15555550100"}, ABSENT, "+15555550100"),
        ({"email_address": "c@x"}, ABSENT, "c@x"),
        ({"customer_id": "", "identifiers": {"email": "a@x"}}, "", ABSENT),
        ({"customer_id": ""}, "", ABSENT),
        ({"identifiers": {"email": ""}}, ABSENT, ABSENT),
        ({"recipient": None}, ABSENT, ABSENT),
        ({}, ABSENT, ABSENT),
    ],
)
def test_user_id_and_anonymous_id(data: dict[str, Any], user_id: Any, anonymous_id: Any) -> None:
    event = transform(body(data))
    assert at(event, "userId") == user_id
    assert at(event, "anonymousId") == anonymous_id


def _optional(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(ABSENT), st.none(), st.just(""), values)


@REPRODUCIBLE
@given(
    customer_id=_optional(st.text(max_size=8)),
    identifier=_optional(st.text(max_size=8)),
    identifier_email=_optional(st.emails()),
    recipient=_optional(st.text(max_size=12)),
    email_address=_optional(st.emails()),
    with_identifiers=st.booleans(),
)
def test_identity_rules_hold_for_any_combination(
    customer_id: Any,
    identifier: Any,
    identifier_email: Any,
    recipient: Any,
    email_address: Any,
    with_identifiers: bool,
) -> None:
    data = {"customer_id": customer_id, "recipient": recipient, "email_address": email_address}
    if with_identifiers:
        identifiers = {"id": identifier, "email": identifier_email}
        data["identifiers"] = {key: value for key, value in identifiers.items() if value is not ABSENT}
    else:
        identifier = identifier_email = ABSENT
    data = {key: value for key, value in data.items() if value is not ABSENT}
    event = transform(body(data, object_type="customer", metric="subscribed"))

    user_id = next((value for value in (customer_id, identifier) if value not in (ABSENT, None)), ABSENT)
    email = next(
        (value for value in (identifier_email, recipient, email_address) if value not in (ABSENT, None)),
        ABSENT,
    )
    assert at(event, "userId") == user_id
    assert at(event, "context.traits.email") == email
    if user_id is ABSENT and email is not ABSENT and email != "":
        assert event["anonymousId"] == email
    else:
        assert "anonymousId" not in event


# -- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "iso"),
    [
        (1585250199, "2020-03-26T19:16:39.000Z"),
        (1585250199.5, "2020-03-26T19:16:39.500Z"),
        (1585250199.123, "2020-03-26T19:16:39.123Z"),
        (1585250199.9999, "2020-03-26T19:16:39.999Z"),  # truncated like JavaScript, not rounded
        (1e9, "2001-09-09T01:46:40.000Z"),
        (0, "1970-01-01T00:00:00.000Z"),
        (-1, "1969-12-31T23:59:59.000Z"),
        (-0.0015, "1969-12-31T23:59:59.999Z"),  # truncated toward zero: -1 ms
        (YEAR_1000, "1000-01-01T00:00:00.000Z"),
        (YEAR_9999_END, "9999-12-31T23:59:59.000Z"),
        (YEAR_9999_END + 0.9999, "9999-12-31T23:59:59.999Z"),  # still the year 9999
    ],
)
def test_unix_seconds_become_iso_milliseconds(timestamp: float, iso: str) -> None:
    event = transform(body(timestamp=timestamp))
    assert event["originalTimestamp"] == iso
    assert event["sentAt"] == iso
    assert "timestamp" not in event


@pytest.mark.parametrize(
    ("timestamp", "iso"),
    [(YEAR_1, "0001-01-01T00:00:00.000Z"), (YEAR_1000 - 1, "0999-12-31T23:59:59.000Z")],
)
def test_years_before_1000_have_four_digits(timestamp: int, iso: str) -> None:
    assert transform(body(timestamp=timestamp))["originalTimestamp"] == iso


@REPRODUCIBLE
@given(
    st.one_of(
        st.integers(min_value=YEAR_1000, max_value=YEAR_9999_END),
        st.floats(min_value=YEAR_1000, max_value=YEAR_9999_END),
        st.floats(min_value=-1e6, max_value=1e6),
    )
)
def test_any_seconds_in_range_format_like_javascript(timestamp: float) -> None:
    # Years 1 to 999 are left to test_years_before_1000_have_four_digits (a known bug).
    event = transform(body(timestamp=timestamp))
    assert event["originalTimestamp"] == event["sentAt"] == js_iso(timestamp)


@pytest.mark.parametrize(
    "timestamp",
    [ABSENT, None, True, False, "", "abc", "1585250199", "2020-03-26T19:16:39Z", "2020-03-26T19:16:39.000Z"],
)
def test_no_time_fields_for_timestamps_rudderstack_ignores(timestamp: Any) -> None:
    event = transform(body(timestamp=timestamp))
    assert "originalTimestamp" not in event
    assert "sentAt" not in event
    assert "timestamp" not in event


@pytest.mark.parametrize(
    "timestamp",
    [
        1585250179000,  # milliseconds: RudderStack makes it the year 52204
        1e13,  # past JavaScript's date range: RudderStack crashes
        PAST_9999,
        -62135596801,  # before the year 1
        10**30,
        -(10**30),
        float("inf"),
        float("-inf"),
        float("nan"),
    ],
)
def test_numbers_outside_years_1_to_9999_are_rejected(timestamp: float) -> None:
    with pytest.raises(InvalidEvent) as raised:
        transform(body(timestamp=timestamp))
    assert "timestamp" in raised.value.errors


# -- bodies RudderStack's transformer crashes on or misreads ---------------------------------


@pytest.mark.parametrize("source", [None, [], [body()], "", "x", 5, 1.5, True], ids=repr)
def test_a_body_that_is_not_an_object_is_invalid(source: Any) -> None:
    with pytest.raises(InvalidEvent) as raised:
        transform(source)
    assert "JSON object" in str(raised.value)


@pytest.mark.parametrize("object_type", [5, 1.5, True, [], ["email"], {}, {"email": "sent"}], ids=repr)
def test_a_non_string_object_type_is_an_unknown_event(object_type: Any) -> None:
    """RudderStack's transformer crashes on these; here they get the name it gives anything unknown."""
    event = transform(body(COMPLETE_DATA, object_type=object_type))
    assert event["event"] == "Unknown Event"
    assert event["userId"] == COMPLETE_DATA["customer_id"]


def test_transform_leaves_its_input_alone_and_shares_nothing_between_events() -> None:
    source = body({"customer_id": "42", "identifiers": {"email": "a@x"}, "recipients": [{"id": 1}]})
    kept = copy.deepcopy(source)
    first = transform(source)
    first["context"]["library"]["name"] = "changed"
    first["integrations"]["Customer.io"] = True
    assert source == kept
    second = transform(source)
    assert second["context"]["library"] == {"name": "unknown", "version": "unknown"}
    assert second["integrations"] == {"Customer.io": False}


# -- generated bodies -----------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
STRING_KEYS = [
    "customer_id",
    "email_address",
    "delivery_id",
    "journey_id",
    "recipient",
    "subject",
    "content",
    "href",
    "failure_message",
]
INTEGER_KEYS = [
    "trigger_id",
    "broadcast_id",
    "campaign_id",
    "action_id",
    "parent_action_id",
    "newsletter_id",
    "content_id",
    "transactional_message_id",
    "link_id",
]
BOOLEAN_KEYS = ["proxied", "prefetched", "synthetic", "machine"]
FREE_KEYS = [
    "device_id",
    "device_platform",
    "recipients",
    "event_type",
    "event_id",
    "headers",
    "trigger_event_id",
]
TOP_KEYS = ["event_id", "object_type", "metric", "timestamp", "data"]
DATA_KEYS = STRING_KEYS + INTEGER_KEYS + BOOLEAN_KEYS + FREE_KEYS + ["identifiers"]
NAMES = st.one_of(
    st.sampled_from(sorted({pair[0] for pair in EVENT_NAMES} | {pair[1] for pair in EVENT_NAMES})),
    st.text(max_size=8),
)


@st.composite
def well_typed_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Bodies whose fields have the types Customer.io documents (any of them may be null or absent)."""
    typed = {key: st.none() | st.text(max_size=10) for key in STRING_KEYS}
    typed.update({key: st.none() | st.integers() for key in INTEGER_KEYS})
    typed.update({key: st.none() | st.booleans() for key in BOOLEAN_KEYS})
    typed.update({key: JSON_VALUES for key in FREE_KEYS})
    typed["recipients"] = JSON_VALUES | st.fixed_dictionaries(
        {"failure_message": st.none() | st.text(max_size=5)}
    )
    typed["identifiers"] = st.none() | st.fixed_dictionaries(
        {},
        optional={
            "id": st.none() | st.text(max_size=6),
            "email": st.none() | st.text(max_size=6),
            "cio_id": st.none() | st.text(max_size=6),
            "phone": JSON_VALUES,
        },
    )
    data = draw(st.fixed_dictionaries({}, optional=typed))
    object_type, metric = draw(st.one_of(st.sampled_from(sorted(EVENT_NAMES)), st.tuples(NAMES, NAMES)))
    if object_type.lower() == "email" and metric in FIRST_CLASS_EMAIL_METRICS:
        # The first-class email events require these; Customer.io always sends them.
        data.update({key: value for key, value in COMPLETE_DATA.items() if data.get(key) is None})
    timestamp = draw(
        st.one_of(
            st.just(ABSENT),
            st.none(),
            st.integers(min_value=YEAR_1000, max_value=YEAR_9999_END),
            st.floats(min_value=YEAR_1000, max_value=YEAR_9999_END),
            st.text(max_size=12),
            st.booleans(),
        )
    )
    return body(
        data,
        event_id=draw(st.text(min_size=1, max_size=26)),
        object_type=object_type,
        metric=metric,
        timestamp=timestamp,
    )


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=400)
@given(well_typed_bodies())
def test_well_typed_bodies_give_exactly_rudderstacks_event(source: dict[str, Any]) -> None:
    event = transform(source)
    assert without_message_id(event) == expected_event(source)
    assert json.loads(json.dumps(event, allow_nan=False)) == event


@st.composite
def json_like_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Well-typed bodies with some known keys (top level, ``data``, ``identifiers``) deleted or
    given arbitrary JSON values, and sometimes unknown keys added."""
    source = draw(well_typed_bodies())
    containers = [source]
    if isinstance(source.get("data"), dict):
        containers.append(source["data"])
        if isinstance(source["data"].get("identifiers"), dict):
            containers.append(source["data"]["identifiers"])
    keys = [TOP_KEYS, DATA_KEYS, ["id", "email", "cio_id"]]
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        level = draw(st.integers(min_value=0, max_value=len(containers) - 1))
        key = draw(st.sampled_from(keys[level]) | st.text(max_size=6))
        if draw(st.booleans()):
            containers[level].pop(key, None)
        else:
            containers[level][key] = draw(JSON_VALUES)
    return source


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=500)
@given(json_like_bodies())
def test_any_json_body_is_transformed_faithfully_unless_it_has_no_event_id_or_real_time(
    source: dict[str, Any],
) -> None:
    """Like RudderStack's source, whatever the types; only what the event cannot be made without refuses."""
    kept = copy.deepcopy(source)
    event_id, timestamp = source.get("event_id"), source.get("timestamp")
    numeric = isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool)
    unusable = {
        "event_id": not (isinstance(event_id, str) and event_id),
        "timestamp": numeric and not YEAR_1 <= timestamp < PAST_9999,
    }
    try:
        event = transform(source)
    except InvalidEvent as error:
        [field] = error.errors
        assert unusable[field], error.reason
        return
    finally:
        assert source == kept
    assert not any(unusable.values())
    assert json.loads(json.dumps(event, allow_nan=False)) == event
    assert event["type"] == "track"
    assert event["integrations"] == {"Customer.io": False}
    email = at(event, "context.traits.email")
    assert ("anonymousId" in event) == (
        event.get("userId") is None and email is not ABSENT and js_truthy(email)
    )
    assert without_message_id(event) == expected_event(source)


@pytest.mark.parametrize(
    "data",
    [{"device_id": float("inf")}, {"recipients": [float("-inf")]}, {"event_type": {"a": float("inf")}}],
)
def test_an_event_is_always_valid_json(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent, match="too large for JSON"):
        transform(body({"customer_id": "42", **data}))


def test_an_event_id_with_a_lone_surrogate_is_refused() -> None:
    """It is the deduplication key and the outbox's primary key: it must be real text."""
    source = json.loads(
        '{"event_id": "\\ud800", "object_type": "email", "metric": "sent", "data": {"customer_id": "1"}}'
    )
    with pytest.raises(InvalidEvent, match="lone UTF-16 surrogate") as raised:
        transform(source)
    assert list(raised.value.errors) == ["event_id"]


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=400)
@given(json_like_bodies())
def test_the_fast_dump_is_marshmallows_dump_of_the_same_schema(source: dict[str, Any]) -> None:
    """``dump`` walks ``RudderStackTrack``'s own fields; marshmallow's ``Schema.dump`` is the reference."""
    if not isinstance(source.get("event_id"), str):
        source["event_id"] = "E1"
    if isinstance(source.get("timestamp"), (int, float)):
        source["timestamp"] = 1585250199
    schema = RudderStackTrack()
    assert dump(schema, source) == schema.dump(source)
