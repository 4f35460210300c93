"""Bodies that break Customer.io's schema but that RudderStack's own source forwards reach RudderStack.

Minimal and mistyped bodies of the six email events and of other object types go through
the default forwarder (the outbox) to a RudderStack-compatible server on loopback; each
forwarded event is checked field by field against the rules in RudderStack's transformer
(written out here by hand, not computed by the code under test).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from flask_cio_rudder import get_outbox, signals
from flask_cio_rudder.testing import FakeDataPlane, record_events

from .conftest import EMAIL_EVENTS, sample
from .helpers import record_signals

Post = Callable[..., TestResponse]

TIMESTAMP = 1585250199
TIMESTAMP_ISO = "2020-03-26T19:16:39.000Z"
EMAIL_NAMES = {
    "delivered": "Email Delivered",
    "opened": "Email Opened",
    "clicked": "Email Link Clicked",
    "bounced": "Email Bounced",
    "spammed": "Email Marked as Spam",
    "unsubscribed": "Email Unsubscribed",
}
MESSAGE_ID_NAMESPACE = uuid.UUID("0b8f3a52-61c4-5a0e-9d3b-6f1c2b0c7e41")  # documented in the README


@pytest.fixture
def outbox_app(make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane) -> Iterator[Flask]:
    """The default configuration (outbox, compatible validation); sending happens on ``flush()``."""
    yield make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
    )


def expected_event(event_id: str, name: str, *, properties: dict[str, Any], **top: Any) -> dict[str, Any]:
    """RudderStack's event: its fixed fields, the given ones, and the documented ``messageId``."""
    traits = top.pop("traits", None)
    context: dict[str, Any] = {"library": {"name": "unknown", "version": "unknown"}}
    context["integration"] = {"name": "Customer.io"}
    if traits is not None:
        context["traits"] = traits
    return {
        "type": "track",
        "event": name,
        "messageId": str(uuid.uuid5(MESSAGE_ID_NAMESPACE, event_id)),
        "context": context,
        "integrations": {"Customer.io": False},
        "properties": {"eventId": event_id, **properties},
        "originalTimestamp": TIMESTAMP_ISO,
        "sentAt": TIMESTAMP_ISO,
        **top,
    }


def delivered(app: Flask, plane: FakeDataPlane) -> list[dict[str, Any]]:
    get_outbox(app).flush()
    return plane.events


@pytest.mark.parametrize("metric", EMAIL_EVENTS)
def test_a_minimal_email_event_is_accepted_signalled_and_forwarded(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, metric: str
) -> None:
    """Only an id: no delivery_id, recipient, subject, href, link_id or failure_message."""
    body = {
        "event_id": f"01MIN{metric}",
        "object_type": "email",
        "metric": metric,
        "timestamp": TIMESTAMP,
        "data": {"customer_id": "42"},
    }
    email_signal = getattr(signals, f"email_{metric}")
    with record_signals(outbox_app, signals.event_received, email_signal, signals.event_rejected) as calls:
        response = post(outbox_app.test_client(), body)
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    assert [name for name, _ in calls] == ["event-received", f"email-{metric}"]
    event = calls[0][1]["event"]
    assert set(event.problems) <= {
        "data.delivery_id",
        "data.recipient",
        "data.subject",
        "data.href",
        "data.link_id",
        "data.failure_message",
    }
    # An unsubscribe with no delivery_id is the person's (Customer.io's person_unsubscribed): none missing.
    assert ("data.recipient" in event.problems) is (metric != "unsubscribed")
    # A receiver reads what it needs without a KeyError.
    assert (event.recipient, event.subject, event.failure_message, event.href, event.link_id) == (None,) * 5
    assert event.email is None
    assert event.user_id == "42"
    assert delivered(outbox_app, data_plane) == [
        expected_event(body["event_id"], EMAIL_NAMES[metric], properties={}, userId="42")
    ]


@pytest.mark.parametrize("metric", EMAIL_EVENTS)
def test_a_mistyped_email_event_is_forwarded_with_its_values_as_they_came(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, metric: str
) -> None:
    """A number where the schema says string, a string where it says integer: copied untouched."""
    body = sample(metric)
    body["event_id"] = f"01TYPE{metric}"
    body["timestamp"] = TIMESTAMP
    body["data"] = {
        "customer_id": 12345,
        "trigger_id": "7",
        "link_id": "9",
        "delivery_id": 55,
        "subject": 3,
        "recipient": "ada@example.com",
        "failure_message": ["mailbox full"],
        "identifiers": {"id": 12345, "email": "ada@example.com", "cio_id": 77},
    }
    with record_events(outbox_app) as events:
        response = post(outbox_app.test_client(), body)
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    [event] = events
    assert {"data.customer_id", "data.trigger_id", "data.link_id", "data.subject"} <= set(event.problems)
    assert event.user_id == "12345"
    assert event.subject == "3"
    assert event.link_id == "9"
    assert event.failure_message is None  # a list is no text
    assert delivered(outbox_app, data_plane) == [
        expected_event(
            body["event_id"],
            EMAIL_NAMES[metric],
            userId=12345,
            traits={"email": "ada@example.com", "cioId": 77},
            properties={
                "triggerId": "7",
                "deliveryId": 55,
                "emailSubject": 3,
                "link": {"id": "9"},
                "reason": ["mailbox full"],
            },
        )
    ]


@pytest.mark.parametrize(
    ("object_type", "metric", "name"),
    [
        ("push", "opened", "Push Opened"),
        ("sms", "delivered", "SMS Delivered"),
        ("customer", "subscribed", "Customer Subscribed"),
        ("slack", "clicked", "Slack Message Link Clicked"),
        ("in_app", "opened", "Unknown Event"),
        ("whatsapp", "replied", "Unknown Event"),
    ],
)
def test_other_object_types_with_only_an_email_are_forwarded_anonymously(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, object_type: str, metric: str, name: str
) -> None:
    body = {
        "event_id": f"01OTHER{object_type}",
        "object_type": object_type,
        "metric": metric,
        "timestamp": TIMESTAMP,
        "data": {"identifiers": {"id": None, "email": "bo@example.com"}, "device_id": 0, "content_id": "x"},
    }
    with record_signals(outbox_app, signals.event_received, signals.email_opened) as calls:
        response = post(outbox_app.test_client(), body)
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    assert [name for name, _ in calls] == ["event-received"]
    assert calls[0][1]["event"].anonymous_id == "bo@example.com"
    assert delivered(outbox_app, data_plane) == [
        expected_event(
            body["event_id"],
            name,
            anonymousId="bo@example.com",
            traits={"email": "bo@example.com"},
            properties={"deviceId": 0, "contentId": "x"},
        )
    ]


@pytest.mark.parametrize(
    ("metric", "name"), [(["clicked"], "Email Link Clicked"), (["opened", 1], "Unknown Event")]
)
def test_a_metric_in_a_list_names_the_event_as_rudderstack_names_it(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, metric: Any, name: str
) -> None:
    """Its transformer writes the metric into a string: JavaScript joins a list's items with commas."""
    body = {
        "event_id": "01LISTMETRIC",
        "object_type": "email",
        "metric": metric,
        "data": {"customer_id": "7"},
    }
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    assert [event["event"] for event in delivered(outbox_app, data_plane)] == [name]


@pytest.mark.parametrize("email", [[], {}, ["bo@example.com"]])
def test_an_email_that_is_a_list_or_an_object_is_the_anonymous_id_as_rudderstack_makes_it(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, email: Any
) -> None:
    """Its transformer (JavaScript) takes any list or object for true, even an empty one."""
    body = {"event_id": "01ODDEMAIL", "object_type": "email", "metric": "opened", "data": {}}
    body["data"]["identifiers"] = {"email": email}
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    [event] = delivered(outbox_app, data_plane)
    assert (event["anonymousId"], event["context"]["traits"]) == (email, {"email": email})


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"customer_id": ""},
        {"customer_id": None, "identifiers": {"email": ""}},
        {"recipient": "  "},
        {"customer_id": "\u200b"},  # the gateway drops invisible characters before it looks
        {"identifiers": {"email": "\ufeff\u3164 "}},
    ],
    ids=[
        "no-id",
        "blank-customer-id",
        "null-id-blank-email",
        "whitespace-recipient",
        "invisible-customer-id",
        "invisible-email",
    ],
)
def test_what_rudderstack_would_refuse_is_still_rejected_in_compatible_mode(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, data: dict[str, Any]
) -> None:
    body = {"event_id": "01NOBODY", "object_type": "email", "metric": "delivered", "data": data}
    with record_signals(outbox_app, signals.event_received, signals.event_rejected) as calls:
        response = post(outbox_app.test_client(), body)
    assert response.json["status"] == "rejected"
    assert "no userId or anonymousId" in response.json["reason"]
    assert [name for name, _ in calls] == ["event-rejected"]
    assert delivered(outbox_app, data_plane) == []
    [letter] = get_outbox(outbox_app).dead_letters()
    assert letter.event_id == "01NOBODY"


def test_an_id_holding_a_lone_surrogate_is_forwarded_as_the_gateway_takes_it(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane
) -> None:
    """The gateway's JSON decoder reads ``"\\ud800"`` as U+FFFD, an id it keeps: RudderStack's source
    forwards such an event, so it must be forwarded from here too."""
    raw = (
        b'{"event_id":"01SURROGATE","object_type":"email","metric":"opened","data":{"customer_id":"\\ud800"}}'
    )
    response = post(outbox_app.test_client(), raw)
    assert response.json == {"status": "accepted", "event_id": "01SURROGATE"}
    [event] = delivered(outbox_app, data_plane)
    assert event["userId"] == "\ud800"


def test_strict_mode_rejects_the_same_minimal_body_as_a_dead_letter(
    make_app: Callable[..., Flask], tmp_path: Path, post: Post, data_plane: FakeDataPlane
) -> None:
    app = make_app(
        CIO_RUDDER_VALIDATION="strict",
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
    )
    body = {
        "event_id": "01STRICT",
        "object_type": "email",
        "metric": "bounced",
        "data": {"customer_id": "42"},
    }
    with record_signals(app, signals.event_received, signals.event_rejected) as calls:
        response = post(app.test_client(), body)
    assert response.json["status"] == "rejected"
    assert response.json["reason"] == (
        "invalid fields: data.delivery_id, data.failure_message, data.recipient, data.subject"
    )
    assert [name for name, _ in calls] == ["event-rejected"]
    [letter] = get_outbox(app).dead_letters()
    assert (letter.event_id, letter.requeueable) == ("01STRICT", False)
    assert delivered(app, data_plane) == []
