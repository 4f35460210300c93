"""The example app as a user relies on it: webhook route, suppression list, ``/suppressions``, the demo."""

from __future__ import annotations

import base64
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from example_app import create_app, demo, suppressions
from example_app.admin import PREFIX, USER
from example_app.suppressions import store_for
from flask_cio_rudder import CioRudder, get_outbox, signals
from flask_cio_rudder.testing import FakeDataPlane, encode, record_events, signature_headers

from .conftest import sample

KEY = "example-app-test-key"
PASSWORD = "example-admin-password"
SUPPRESSED = {  # metric -> the address in its sample
    "bounced": "bob@example.com",
    "spammed": "carol@example.com",
    "unsubscribed": "dan@example.com",
}
RUDDERSTACK_NAMES = {
    "bounced": "Email Bounced",
    "spammed": "Email Marked as Spam",
    "unsubscribed": "Email Unsubscribed",
}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "suppressions.sqlite3"


def settings(database: Path, tmp_path: Path, data_plane: FakeDataPlane) -> dict[str, Any]:
    """The example app's settings for a test: the outbox in ``tmp_path``, a fake data plane, no sender."""
    return {
        "CIO_RUDDER_SIGNING_KEY": KEY,
        "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
        "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
        "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        "CIO_RUDDER_OUTBOX_SENDER": False,
        "SUPPRESSION_DATABASE": str(database),
        "DASHBOARD_PASSWORD": PASSWORD,
        "SECRET_KEY": "example-app-test-secret",
    }


@pytest.fixture
def example(database: Path, tmp_path: Path, data_plane: FakeDataPlane) -> Iterator[Flask]:
    """The example app as configured for real (the outbox), pointed at a fake data plane on loopback.

    The outbox's background sender is off: tests send with ``flush()`` to see what went out.
    """
    example = create_app({"TESTING": True, **settings(database, tmp_path, data_plane)})
    yield example
    example.extensions["cio_rudder"].forwarder.close()


@pytest.fixture
def example_client(example: Flask) -> FlaskClient:
    return example.test_client()


def basic(user: str, password: str) -> dict[str, str]:
    """An HTTP Basic ``Authorization`` header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def post(client: FlaskClient, body: dict[str, Any], key: str = KEY) -> TestResponse:
    """Post ``body`` to the webhook, signed as Customer.io signs it."""
    raw = encode(body)
    return client.post("/webhooks/customerio", data=raw, headers=signature_headers(raw, key))


def forwarded(example: Flask, plane: FakeDataPlane) -> list[dict[str, Any]]:
    """Send what the example's outbox holds, then return every event the data plane stored."""
    get_outbox(example).flush()
    return plane.events


def rows(database: Path) -> list[tuple[str, str, str]]:
    """The suppression table as stored on disk, read without the app."""
    with closing(sqlite3.connect(database)) as connection:
        found = connection.execute("SELECT email, reason, event_id FROM suppressions ORDER BY email")
        return list(found.fetchall())


def test_factory_builds_an_app_with_the_webhook_route(example: Flask) -> None:
    routes = {rule.rule: rule.methods or set() for rule in example.url_map.iter_rules()}
    assert "POST" in routes["/webhooks/customerio"]
    assert "GET" in routes["/suppressions"]
    assert example.config["CIO_RUDDER_FORWARDER"] == "outbox"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIO_RUDDER_SIGNING_KEY", "from-env")
    monkeypatch.setenv("CIO_RUDDER_WRITE_KEY", "write-from-env")
    monkeypatch.setenv("CIO_RUDDER_DATA_PLANE_URL", "https://dataplane.example.com")
    monkeypatch.setenv("SUPPRESSION_DATABASE", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("CIO_RUDDER_OUTBOX_URL", f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    monkeypatch.setenv("SECRET_KEY", "secret-from-env")
    example = create_app({"CIO_RUDDER_OUTBOX_SENDER": False})
    try:
        assert example.config["CIO_RUDDER_SIGNING_KEY"] == "from-env"
        assert example.config["CIO_RUDDER_WRITE_KEY"] == "write-from-env"
        assert example.config["CIO_RUDDER_DATA_PLANE_URL"] == "https://dataplane.example.com"
        assert example.config["SECRET_KEY"] == "secret-from-env"
        assert store_for(example).path == tmp_path / "env.sqlite3"
        assert get_outbox(example).path == str(tmp_path / "outbox.sqlite3")
    finally:
        example.extensions["cio_rudder"].forwarder.close()


@pytest.mark.parametrize(
    "key", ["CIO_RUDDER_SIGNING_KEY", "CIO_RUDDER_WRITE_KEY", "CIO_RUDDER_DATA_PLANE_URL", "SECRET_KEY"]
)
def test_a_missing_key_stops_the_app_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_plane: FakeDataPlane, key: str
) -> None:
    """A copy of the example must not run on a public signing key, nor send to a data plane not its own."""
    monkeypatch.delenv(key, raising=False)
    config = settings(tmp_path / "suppressions.sqlite3", tmp_path, data_plane)
    del config[key]
    with pytest.raises(RuntimeError, match=key):
        create_app(config)


def test_the_database_defaults_to_the_instance_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    monkeypatch.delenv("SUPPRESSION_DATABASE", raising=False)
    config = settings(tmp_path / "unused", tmp_path, data_plane)
    del config["SUPPRESSION_DATABASE"]
    example = create_app(config)
    try:
        assert store_for(example).path == Path(example.instance_path) / "suppressions.sqlite3"
    finally:
        example.extensions["cio_rudder"].forwarder.close()


@pytest.mark.parametrize("metric", sorted(SUPPRESSED))
def test_a_signed_event_suppresses_the_address_with_its_reason(
    example: Flask, example_client: FlaskClient, database: Path, data_plane: FakeDataPlane, metric: str
) -> None:
    response = post(example_client, sample(metric))
    assert response.status_code == 200
    assert response.json == {"status": "accepted", "event_id": sample(metric)["event_id"]}
    assert rows(database) == [(SUPPRESSED[metric], metric, sample(metric)["event_id"])]
    assert [event["event"] for event in forwarded(example, data_plane)] == [RUDDERSTACK_NAMES[metric]]


def test_suppressed_at_is_when_the_event_happened(example: Flask, example_client: FlaskClient) -> None:
    post(example_client, sample("bounced"))
    (suppression,) = store_for(example).all()
    assert suppression.suppressed_at == "2021-02-11T17:09:49+00:00"  # the sample's timestamp, 1613063389
    assert store_for(example).is_suppressed("Bob@Example.com")
    assert not store_for(example).is_suppressed("ada@example.com")


@pytest.mark.parametrize("metric", ["delivered", "opened", "clicked"])
def test_engagement_events_do_not_suppress(
    example: Flask, example_client: FlaskClient, data_plane: FakeDataPlane, metric: str
) -> None:
    with record_events(example) as events:
        response = post(example_client, sample(metric))
    assert response.status_code == 200
    assert [event.metric for event in events] == [metric]  # accepted and signalled...
    assert len(forwarded(example, data_plane)) == 1  # ...and forwarded
    assert store_for(example).all() == []  # but nobody suppressed


def test_the_address_the_message_went_to_is_suppressed(example: Flask, example_client: FlaskClient) -> None:
    body = sample("bounced")
    body["data"]["recipient"] = "bob@old-employer.example"  # the profile's email has changed since
    post(example_client, body)
    assert [s.email for s in store_for(example).all()] == ["bob@old-employer.example"]


@pytest.mark.parametrize("metric", sorted(SUPPRESSED))
def test_a_minimal_body_suppresses_the_profiles_email(
    example: Flask, example_client: FlaskClient, metric: str
) -> None:
    """No recipient, subject or failure_message, as some bodies come: the profile's email is suppressed."""
    body = {
        "event_id": f"01MINIMAL{metric}",
        "object_type": "email",
        "metric": metric,
        "timestamp": 1613063089,
        "data": {"identifiers": {"id": "7", "email": "erin@example.com"}},
    }
    assert post(example_client, body).json == {"status": "accepted", "event_id": body["event_id"]}
    assert [(s.email, s.reason) for s in store_for(example).all()] == [("erin@example.com", metric)]


def test_other_apps_in_the_process_are_left_alone(example: Flask) -> None:
    """The receivers are connected for this app only: another app's events reach neither them nor its list."""
    other = Flask("other")
    other.config.update(TESTING=True, CIO_RUDDER_SIGNING_KEY=KEY, CIO_RUDDER_FORWARDER="none")
    CioRudder(other)
    with record_events(other) as events:
        response = post(other.test_client(), sample("bounced"))
    assert response.status_code == 200
    assert len(events) == 1
    assert store_for(example).all() == []


def test_an_unsigned_event_suppresses_nobody(example: Flask, example_client: FlaskClient) -> None:
    response = post(example_client, sample("bounced"), key="not-the-key")
    assert response.status_code == 401
    assert store_for(example).all() == []


def test_a_duplicate_delivery_adds_no_second_row(
    example: Flask, example_client: FlaskClient, database: Path, data_plane: FakeDataPlane
) -> None:
    event_id = sample("spammed")["event_id"]
    assert post(example_client, sample("spammed")).json == {"status": "accepted", "event_id": event_id}
    assert post(example_client, sample("spammed")).json == {"status": "duplicate", "event_id": event_id}
    assert len(rows(database)) == 1
    assert len(forwarded(example, data_plane)) == 1


def test_receivers_are_idempotent_when_they_run_again(
    example: Flask, example_client: FlaskClient, database: Path
) -> None:
    """Another receiver fails after ours ran: the 500 makes Customer.io retry, and ours runs again."""
    example.config["PROPAGATE_EXCEPTIONS"] = False
    calls = []

    def flaky(sender: Flask, **extra: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the CRM is down")

    with signals.email_unsubscribed.connected_to(flaky, sender=example):
        assert post(example_client, sample("unsubscribed")).status_code == 500
        assert post(example_client, sample("unsubscribed")).json["status"] == "accepted"
    assert rows(database) == [("dan@example.com", "unsubscribed", sample("unsubscribed")["event_id"])]


def test_an_address_keeps_each_reason_once(example_client: FlaskClient, database: Path) -> None:
    post(example_client, sample("bounced"))
    complaint = sample("spammed")
    complaint["data"]["identifiers"]["email"] = complaint["data"]["recipient"] = "BOB@example.com"
    assert post(example_client, complaint).status_code == 200
    post(example_client, complaint | {"event_id": "01ANOTHERCOMPLAINT"})
    assert rows(database) == [
        ("bob@example.com", "bounced", sample("bounced")["event_id"]),
        ("bob@example.com", "spammed", complaint["event_id"]),
    ]


def person_event(
    metric: str, event_id: str, timestamp: int, email: str = "dan@example.com"
) -> dict[str, Any]:
    """A change of a person's subscription made outside a message (the subscription centre, the API),
    as Customer.io's ``customer_subscribed`` example has it."""
    return {
        "event_id": event_id,
        "object_type": "customer",
        "metric": metric,
        "timestamp": timestamp,
        "data": {
            "customer_id": "42",
            "email_address": "dan@example.com",
            "identifiers": {"id": "42", "email": "dan@example.com"},
        },
    }


def test_an_unsubscribe_from_outside_a_message_suppresses_the_profiles_email(
    example: Flask, example_client: FlaskClient, database: Path
) -> None:
    """No email signal carries it: Customer.io sends it as ``customer`` / ``unsubscribed``."""
    assert post(example_client, person_event("unsubscribed", "01PERSONUNSUB", 1700000000)).status_code == 200
    assert rows(database) == [("dan@example.com", "unsubscribed", "01PERSONUNSUB")]
    assert store_for(example).is_suppressed("Dan@Example.com")


@pytest.mark.parametrize("object_type", ["customer", "email"])
def test_a_later_subscribe_lifts_an_unsubscribe_but_not_a_bounce(
    example: Flask, example_client: FlaskClient, database: Path, object_type: str
) -> None:
    unsubscribe = sample("unsubscribed")  # dan@example.com, from a message's link
    bounce = sample("bounced") | {"event_id": "01DANBOUNCED"}
    bounce["data"] = bounce["data"] | {"recipient": "dan@example.com"}
    bounce["data"]["identifiers"] = bounce["data"]["identifiers"] | {"email": "dan@example.com"}
    for body in (unsubscribe, bounce):
        post(example_client, body)
    earlier = person_event("subscribed", "01SUBSCRIBEDBEFORE", unsubscribe["timestamp"] - 60)
    later = person_event("subscribed", "01SUBSCRIBEDAGAIN", unsubscribe["timestamp"] + 60)
    for body in (earlier, later):
        body["object_type"] = object_type
        if object_type == "email":  # from a message: the address it went to
            body["data"]["recipient"] = "dan@example.com"
    post(example_client, earlier)
    assert [reason for _, reason, _ in rows(database)] == ["bounced", "unsubscribed"]
    post(example_client, later)
    assert rows(database) == [("dan@example.com", "bounced", "01DANBOUNCED")]


def test_a_locked_suppression_list_is_a_503_and_the_retry_suppresses(
    example: Flask, example_client: FlaskClient, database: Path
) -> None:
    """A backup or an ``sqlite3`` shell holding the file: 503, which Customer.io retries soon, not a 500
    after SQLite's 5 s (Customer.io gives up at 4 s and waits an hour after a 500)."""
    with closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        assert post(example_client, sample("spammed")).status_code == 503
        other.execute("ROLLBACK")
    assert post(example_client, sample("spammed")).json["status"] == "accepted"  # nothing was kept before
    assert rows(database) == [("carol@example.com", "spammed", sample("spammed")["event_id"])]


def test_the_suppression_list_is_readable_by_its_owner_only(example: Flask, tmp_path: Path) -> None:
    path = tmp_path / "new-folder" / "suppressions.sqlite3"
    suppressions.SuppressionStore(path).create()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_suppressions_lists_them_as_json(example_client: FlaskClient) -> None:
    for metric in ["bounced", "delivered", "unsubscribed"]:
        post(example_client, sample(metric))
    response = example_client.get("/suppressions", headers=basic(USER, PASSWORD))
    assert response.status_code == 200
    assert response.json == {
        "suppressions": [
            {
                "email": "bob@example.com",
                "reason": "bounced",
                "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQD",
                "suppressed_at": "2021-02-11T17:09:49+00:00",
            },
            {
                "email": "dan@example.com",
                "reason": "unsubscribed",
                "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQF",
                "suppressed_at": "2021-02-11T17:13:09+00:00",
            },
        ],
        "total": 2,
    }
    assert response.headers["Cache-Control"] == "no-store"  # people's addresses
    assert response.headers["X-Frame-Options"] == "DENY"


def test_suppressions_come_a_page_at_a_time(
    example: Flask, example_client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suppressions, "PAGE", 2)
    for n in range(5):
        store_for(example).add(f"person{n}@example.com", "bounced", f"01EVENT{n}", datetime(2024, 1, 1 + n))
    pages = [
        example_client.get(f"/suppressions?offset={offset}", headers=basic(USER, PASSWORD)).json
        for offset in (0, 2, 4)
    ]
    assert [[row["email"] for row in page["suppressions"]] for page in pages] == [
        ["person0@example.com", "person1@example.com"],
        ["person2@example.com", "person3@example.com"],
        ["person4@example.com"],
    ]
    assert {page["total"] for page in pages} == {5}


def test_suppressions_is_an_escaped_html_table_for_browsers(example_client: FlaskClient) -> None:
    body = sample("bounced")
    body["data"]["identifiers"]["email"] = body["data"]["recipient"] = "<b>eve</b>@example.com"
    post(example_client, body)
    response = example_client.get(
        "/suppressions", headers={"Accept": "text/html,*/*;q=0.8", **basic(USER, PASSWORD)}
    )
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<td>&lt;b&gt;eve&lt;/b&gt;@example.com</td><td>bounced</td>" in page
    assert "<b>eve</b>" not in page


def test_the_demo_runs_end_to_end(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    planes: list[FakeDataPlane] = []

    class WatchedDataPlane(FakeDataPlane):
        def start(self) -> FakeDataPlane:
            planes.append(self)
            return super().start()

    monkeypatch.setattr(demo, "FakeDataPlane", WatchedDataPlane)
    assert demo.main() == 0
    output = capsys.readouterr().out
    (plane,) = planes
    assert len(plane.events) == 6  # six events forwarded, the duplicate not
    assert "6 of 6 accepted" in output
    for metric in ["delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed"]:
        answer = f"200 accepted   event_received, email_{metric}\n"
        assert f"email_{metric:<14} {answer}" in output
    assert "event_forwarded: 6 events in" in output
    assert "fake data plane received 6 events" in output
    for event in plane.events:  # each one the data plane stored is reported
        assert f"{event['event']:<22} {event['userId']:<4} {event['messageId']}" in output
    assert "email_bounced        200 duplicate  (no signals)" in output
    assert "data plane still holds 6 events, suppression list 3 rows" in output
    for metric, email in SUPPRESSED.items():
        assert any(line.split()[:2] == [email, metric] for line in output.splitlines())
    assert "FAILED" not in output


def test_the_dashboard_and_the_suppression_list_are_behind_http_basic_auth(
    database: Path, tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    """Both show people's email addresses."""
    closed = create_app({**settings(database, tmp_path, data_plane), "DASHBOARD_PASSWORD": None})
    opened = create_app({**settings(database, tmp_path, data_plane), "DASHBOARD_PASSWORD": "demo-password"})
    try:
        assert closed.test_client().get(f"{PREFIX}/", headers=basic(USER, "")).status_code == 503
        client = opened.test_client()
        assert client.get(f"{PREFIX}/").status_code == 401
        assert client.get(f"{PREFIX}/").headers["WWW-Authenticate"].startswith("Basic")
        assert client.get(f"{PREFIX}/dead-letters", headers=basic(USER, "wrong")).status_code == 401
        assert client.post(f"{PREFIX}/pause", headers=basic("root", "demo-password")).status_code == 401
        assert client.get(f"{PREFIX}/", headers=basic(USER, "demo-password")).status_code == 200
        assert post(client, sample("opened")).json["status"] == "accepted"  # the webhook needs no password
        assert client.get("/suppressions").status_code == 401
        assert client.get("/suppressions", headers=basic(USER, "wrong")).status_code == 401
        assert client.get("/suppressions", headers=basic(USER, "demo-password")).status_code == 200
        assert closed.test_client().get("/suppressions", headers=basic(USER, "")).status_code == 503
    finally:
        for app in (closed, opened):
            app.extensions["cio_rudder"].forwarder.close()
