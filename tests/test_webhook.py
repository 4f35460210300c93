"""The response policy of the README, row by row: through the real route, and with the fast path on.

The opt-in fast path (``CIO_RUDDER_FAST_PATH``) must answer every request as the route does,
so each test here runs twice. What the fast path skips of Flask is in test_fast_path.py.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask, abort, current_app, request
from werkzeug.test import TestResponse

from flask_cio_rudder import get_outbox, signals
from flask_cio_rudder.testing import encode, record_events, signature_headers

from .conftest import EMAIL_EVENTS, SIGNING_KEY, WEBHOOK, sample
from .helpers import record_signals

Post = Callable[..., TestResponse]


@pytest.fixture(params=[False, True], ids=["route", "fast path"])
def make_app(request: pytest.FixtureRequest, make_app: Callable[..., Flask]) -> Callable[..., Flask]:
    """conftest's ``make_app``, once with the fast path off (the default) and once with it on."""
    return functools.partial(make_app, CIO_RUDDER_FAST_PATH=request.param)


# Every signal about what happened to a body (webhook_answered, sent for every request, is in test_metrics).
EVERY_SIGNAL = [getattr(signals, name) for name in signals.__all__ if name != "webhook_answered"]


def names(calls: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in calls]


@pytest.mark.parametrize("metric", EMAIL_EVENTS)
def test_an_authentic_new_event_is_accepted_and_signalled(app: Flask, post: Post, metric: str) -> None:
    body = sample(metric)
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), body)
    assert response.status_code == 200
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    assert names(recorder) == ["event-received", f"email-{metric}"]
    event = recorder[0][1]["event"]
    assert recorder[1][1]["event"] is event
    assert event.event_id == body["event_id"]
    assert event.metric == metric
    assert event.raw == body
    assert event.data == body["data"]


def test_the_event_object_carries_the_fields_host_apps_use(app: Flask, post: Post) -> None:
    body = sample("bounced")
    with record_events(app) as events:
        post(app.test_client(), body)
    (event,) = events
    assert event.name == "Email Bounced"
    assert event.object_type == "email"
    assert event.user_id == "43"
    assert event.anonymous_id is None
    assert event.email == "bob@example.com"
    assert event.timestamp is not None
    assert event.timestamp.isoformat() == "2021-02-11T17:09:49+00:00"
    assert event.payload["properties"]["reason"] == body["data"]["failure_message"]
    with pytest.raises(AttributeError):
        event.name = "changed"  # type: ignore[misc]


def test_other_events_get_only_the_general_signal(app: Flask, post: Post) -> None:
    body = sample("delivered") | {"metric": "sent"}
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        assert post(app.test_client(), body).json["status"] == "accepted"
    assert names(recorder) == ["event-received"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-CIO-Signature": "0" * 64},
        {"X-CIO-Signature": "not-hex"},
        {"X-CIO-Signature": "ab" * 33},
    ],
    ids=["missing", "wrong", "not-hex", "wrong-length"],
)
def test_a_missing_or_wrong_signature_is_401_and_nothing_happens(
    app: Flask, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    raw = encode(sample("bounced"))
    sent = {"Content-Type": "application/json", "X-CIO-Timestamp": "1613063389", **headers}
    with record_signals(app, *EVERY_SIGNAL) as recorder, caplog.at_level(logging.WARNING, "flask_cio_rudder"):
        response = app.test_client().post(WEBHOOK, data=raw, headers=sent)
    assert response.status_code == 401
    assert response.is_json
    assert "X-CIO-Signature" in response.json["error"]
    assert recorder == []
    assert "Refused a Customer.io webhook" in caplog.text
    assert SIGNING_KEY not in caplog.text + response.get_data(as_text=True)
    # A well-formed signature the key does not make: the operator learns which setting to check.
    assert ("set CIO_RUDDER_SIGNING_KEY" in caplog.text) is (headers == {"X-CIO-Signature": "0" * 64})
    assert "CIO_RUDDER" not in response.get_data(as_text=True)


def test_a_body_signed_with_another_key_is_401(app: Flask, post: Post) -> None:
    assert post(app.test_client(), sample("opened"), key="someone-else").status_code == 401


def test_rotated_keys_are_all_accepted(make_app: Callable[..., Flask], post: Post) -> None:
    app = make_app(CIO_RUDDER_SIGNING_KEY=["new-key", SIGNING_KEY])
    assert post(app.test_client(), sample("opened"), key="new-key").status_code == 200
    assert post(app.test_client(), sample("clicked"), key=SIGNING_KEY).status_code == 200


def test_an_old_timestamp_is_401_when_a_maximum_age_is_set(make_app: Callable[..., Flask]) -> None:
    app = make_app(CIO_RUDDER_MAX_TIMESTAMP_AGE=300)
    raw = encode(sample("opened"))
    stale = signature_headers(raw, SIGNING_KEY, timestamp=1_000_000_000)
    assert app.test_client().post(WEBHOOK, data=raw, headers=stale).status_code == 401
    fresh = signature_headers(raw, SIGNING_KEY)
    assert app.test_client().post(WEBHOOK, data=raw, headers=fresh).status_code == 200


def test_unsigned_requests_are_accepted_when_verification_is_off(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_VERIFY_SIGNATURE=False, CIO_RUDDER_SIGNING_KEY=None)
    assert post(app.test_client(), sample("opened"), key=None).status_code == 200


def test_a_body_over_the_limit_is_413_and_nothing_happens(make_app: Callable[..., Flask], post: Post) -> None:
    app = make_app(CIO_RUDDER_MAX_BODY_BYTES=100)
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), sample("opened"))
    assert response.status_code == 413
    assert "CIO_RUDDER_MAX_BODY_BYTES" in response.json["error"]
    assert recorder == []


def post_chunked(app: Flask, raw: bytes) -> TestResponse:
    """Post ``raw``, signed, without a Content-Length, as a server passes a chunked body on."""
    return app.test_client().post(
        WEBHOOK,
        headers={**signature_headers(raw, SIGNING_KEY), "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": io.BytesIO(raw), "wsgi.input_terminated": True},
    )


def test_a_chunked_body_over_the_limit_is_413(make_app: Callable[..., Flask]) -> None:
    app = make_app(CIO_RUDDER_MAX_BODY_BYTES=100)
    assert post_chunked(app, encode(sample("opened"))).status_code == 413


def test_flasks_own_max_content_length_still_answers_413(make_app: Callable[..., Flask], post: Post) -> None:
    """The body is read from the WSGI input directly, except where Flask's own limit must speak."""
    app = make_app(MAX_CONTENT_LENGTH=100)
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), sample("opened"))
    assert response.status_code == 413
    assert recorder == []
    roomy = make_app(MAX_CONTENT_LENGTH=100_000)
    assert post(roomy.test_client(), sample("opened")).json["status"] == "accepted"


def test_a_chunked_body_over_flasks_max_content_length_is_413_not_a_bad_signature(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """Werkzeug's stream stops at MAX_CONTENT_LENGTH and says so only on the read past it: the
    signature was checked over the cut body, a 401 logged as a forgery, for an authentic event."""
    app = make_app(MAX_CONTENT_LENGTH=100)
    response = post_chunked(app, encode(sample("opened")))
    assert response.status_code == 413
    assert response.json == {"error": "the body is larger than Flask's MAX_CONTENT_LENGTH (100 bytes)"}
    assert "Refused" not in caplog.text


def test_a_chunked_body_of_exactly_flasks_max_content_length_is_accepted(
    make_app: Callable[..., Flask],
) -> None:
    raw = encode(sample("opened"))
    response = post_chunked(make_app(MAX_CONTENT_LENGTH=len(raw)), raw)
    assert (response.status_code, response.json["status"]) == (200, "accepted")


def test_a_body_shorter_than_its_content_length_is_400_not_a_forgery(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """The client hung up mid-body. Before, the fast path accepted what came; the route checked the
    signature over an empty body and logged a refused forgery."""
    app = make_app()
    raw = encode(sample("opened"))
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = app.test_client().post(
            WEBHOOK,
            headers=signature_headers(raw, SIGNING_KEY),
            environ_overrides={"wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw) + 20)},
        )
    assert response.status_code == 400
    assert response.json == {
        "error": f"the body ended before its Content-Length ({len(raw) + 20} bytes): the client hung up"
    }
    assert recorder == [] and "Refused" not in caplog.text


@pytest.mark.parametrize(
    ("configured", "posted"), [("/hooks/cio", "/hooks/cio/"), ("/hooks/cio/", "/hooks/cio")]
)
def test_the_webhook_answers_with_or_without_a_trailing_slash(
    make_app: Callable[..., Flask], configured: str, posted: str
) -> None:
    """A slash more or less in the URL pasted into Customer.io was a 404 or a redirect: either stalls
    every later event for an hour."""
    app = make_app(CIO_RUDDER_WEBHOOK_PATH=configured)
    raw = encode(sample("opened"))
    response = app.test_client().post(posted, data=raw, headers=signature_headers(raw, SIGNING_KEY))
    assert (response.status_code, response.json["status"]) == (200, "accepted")


def test_two_trailing_slashes_get_flasks_answer_with_the_fast_path_too(
    make_app: Callable[..., Flask],
) -> None:
    """Werkzeug redirects "//" to "/" on the route; the fast path, which took every trailing slash
    away, answered 200 to the same request."""
    app = make_app(CIO_RUDDER_WEBHOOK_PATH="/hooks/cio")
    raw = encode(sample("opened"))
    response = app.test_client().post("/hooks/cio//", data=raw, headers=signature_headers(raw, SIGNING_KEY))
    assert (response.status_code, response.location) == (308, "http://localhost/hooks/cio/")


def test_spaces_around_the_signature_headers_are_not_part_of_them(make_app: Callable[..., Flask]) -> None:
    """gunicorn strips them, werkzeug's server keeps them: the answer must not depend on the server."""
    raw = encode(sample("opened"))
    headers = {name: f"  {value}\t" for name, value in signature_headers(raw, SIGNING_KEY).items()}
    assert make_app().test_client().post(WEBHOOK, data=raw, headers=headers).json["status"] == "accepted"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "must be a JSON object"),
        (b"[]", "must be a JSON object"),
        (b'"hello"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
    ids=["broken", "nan", "not-utf8", "deep", "array", "string", "null"],
)
def test_a_body_that_is_not_a_json_object_is_400(app: Flask, post: Post, raw: bytes, problem: str) -> None:
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), raw)
    assert response.status_code == 400
    assert problem in response.json["error"]
    assert recorder == []


def test_a_body_that_breaks_customerios_schema_is_accepted_and_says_what_it_breaks(
    app: Flask, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    """The default, "compatible": RudderStack's own source forwards such bodies, so this does too."""
    body = sample("bounced")
    del body["data"]["failure_message"]
    body["data"]["link_id"] = "7"
    with record_signals(app, *EVERY_SIGNAL) as recorder, caplog.at_level(logging.INFO, "flask_cio_rudder"):
        response = post(app.test_client(), body)
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    assert names(recorder) == ["event-received", "email-bounced"]
    event = recorder[0][1]["event"]
    assert event.problems == {
        "data.failure_message": "Missing data for required field.",
        "data.link_id": "Not a valid integer.",
    }
    assert event.failure_message is None
    assert event.payload["properties"]["link"] == {"id": "7"}  # copied as it came, as RudderStack does
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 2
    assert all("Email Bounced" in line for line in logged)
    assert body["data"]["recipient"] not in " ".join(logged)  # never the body


def test_schema_problems_are_logged_once_per_field_and_event_type(
    app: Flask, post: Post, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    with caplog.at_level(logging.INFO, "flask_cio_rudder"):
        for number, metric in enumerate(["bounced", "bounced", "bounced", "spammed"]):
            body = sample(metric) | {"event_id": f"01PROBLEM{number}"}
            del body["data"]["subject"]
            assert post(client, body).json["status"] == "accepted"
    logged = sorted(record.getMessage().split(" events ")[0] for record in caplog.records)
    assert logged == ["Accepted Email Bounced", "Accepted Email Marked as Spam"]


def test_in_strict_mode_a_body_that_breaks_the_schema_is_2xx_rejected_with_the_fields(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_VALIDATION="strict")
    body = sample("bounced")
    del body["data"]["failure_message"]
    body["data"]["link_id"] = "7"
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), body)
    assert response.status_code == 200
    answer = response.json
    assert answer["status"] == "rejected"
    assert answer["event_id"] == body["event_id"]
    assert answer["errors"] == {
        "data": {"failure_message": ["Missing data for required field."], "link_id": ["Not a valid integer."]}
    }
    assert answer["reason"] == "invalid fields: data.failure_message, data.link_id"
    assert names(recorder) == ["event-rejected"]
    rejected = recorder[0][1]
    assert rejected["body"] == body
    assert rejected["errors"] == answer["errors"]


@pytest.mark.parametrize("mode", ["compatible", "strict"])
def test_an_unsubscribe_an_email_triggered_is_an_email_unsubscribe_with_no_message_fields_to_require(
    make_app: Callable[..., Flask], post: Post, mode: str
) -> None:
    """Customer.io's person_unsubscribed, sent with the email channel as its object_type: strict mode
    rejected it for lacking a delivery_id, recipient and subject, and no suppression list heard of it."""
    app = make_app(CIO_RUDDER_VALIDATION=mode)
    body = {
        "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQK",
        "object_type": "email",
        "metric": "unsubscribed",
        "timestamp": 1613063089,
        "data": {
            "customer_id": "42",
            "email_address": "test@example.com",
            "identifiers": {"id": "42", "email": "test@example.com", "cio_id": "d9c106000001"},
        },
    }
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        assert post(app.test_client(), body).json["status"] == "accepted"
    assert names(recorder) == ["event-received", "email-unsubscribed"]
    event = recorder[0][1]["event"]
    assert event.problems == {} and event.payload["event"] == "Email Unsubscribed"
    assert event.email == "test@example.com"


def test_an_unknown_validation_mode_fails_fast_naming_the_key(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_VALIDATION must be 'compatible' or 'strict'"):
        make_app(CIO_RUDDER_VALIDATION="lenient")


def test_an_event_without_any_identity_is_rejected_not_forwarded(app: Flask, post: Post) -> None:
    body = {"event_id": "01NOID", "object_type": "email", "metric": "drafted", "data": {"delivery_id": "x"}}
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        response = post(app.test_client(), body)
    assert response.status_code == 200
    assert response.json["status"] == "rejected"
    assert "no userId or anonymousId" in response.json["reason"]
    assert names(recorder) == ["event-rejected"]


def test_a_blank_customer_id_is_rejected_saying_it_is_blank_not_missing(app: Flask, post: Post) -> None:
    """A deleted person's events: RudderStack takes the blank customer_id as the userId, and then
    neither the identifiers' id nor the email; the reason said the body had none of the three."""
    body = sample("delivered")
    body["data"] |= {"customer_id": "", "identifiers": {"id": "42", "email": "gone@example.com"}}
    response = post(app.test_client(), body)
    assert response.json["status"] == "rejected"
    assert response.json["reason"].startswith("no userId or anonymousId: the body's data.customer_id")


@pytest.mark.parametrize("platform", ["ios", None], ids=["no null", "a null"])
def test_rudderstacks_32_kb_are_counted_in_the_utf8_that_is_sent(
    app: Flask, post: Post, platform: str | None
) -> None:
    def push(event_id: str, characters: int) -> dict[str, Any]:
        recipients = [{"device_id": "d1", "device_platform": platform}]  # carried to RudderStack as is
        data = {"customer_id": "42", "content": "Ж" * characters, "recipients": recipients}
        return {"event_id": event_id, "object_type": "push", "metric": "sent", "timestamp": 1, "data": data}

    with record_events(app) as events:
        fits = post(app.test_client(), push("01FITS", 13_000))  # 26 KB in UTF-8, 78 KB as \u escapes
    assert fits.json["status"] == "accepted"
    assert len(events[0].payload_json.encode()) < 32 * 1024
    too_big = post(app.test_client(), push("01TOOBIG", 17_000))  # 34 KB in UTF-8
    assert too_big.json["status"] == "rejected"
    assert "RudderStack accepts at most 32768" in too_big.json["reason"]


def test_an_already_seen_event_is_2xx_and_neither_signalled_nor_forwarded_again(
    app: Flask, post: Post
) -> None:
    body = sample("spammed")
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        first = post(app.test_client(), body)
        again = post(app.test_client(), body)
    assert first.json["status"] == "accepted"
    assert again.status_code == 200
    assert again.json == {"status": "duplicate", "event_id": body["event_id"]}
    assert names(recorder) == ["event-received", "email-spammed"]


def test_a_receiver_that_raises_is_500_and_nothing_is_kept(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(PROPAGATE_EXCEPTIONS=False)
    body = sample("bounced")

    def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("database is down")

    with signals.email_bounced.connected_to(broken, sender=app):
        assert post(app.test_client(), body).status_code == 500
    # Customer.io retries: the receivers run again and the event is accepted now.
    with record_signals(app, *EVERY_SIGNAL) as recorder:
        assert post(app.test_client(), body).json["status"] == "accepted"
    assert names(recorder) == ["event-received", "email-bounced"]


def test_an_app_wide_login_hook_lets_the_webhook_through_by_its_blueprint_name(
    make_app: Callable[..., Flask], post: Post
) -> None:
    """The README's way to exempt the webhook from a login every other request needs."""
    app = make_app()

    @app.before_request
    def login_required() -> Any:
        if request.blueprint != "cio_rudder":
            abort(401)
        return None

    assert post(app.test_client(), sample("opened")).json["status"] == "accepted"
    assert app.test_client().get("/anything").status_code == 401


def test_an_async_receiver_runs_before_the_answer_as_an_async_view_does(
    make_app: Callable[..., Flask], post: Post
) -> None:
    """``async def`` receivers run through Flask's ``ensure_sync`` (Flask[async]), where blinker alone
    refused them and made every webhook a 500; one that raises is a 500, as a plain one is."""
    pytest.importorskip("asgiref", reason='Flask[async] is not installed: pip install -e ".[test]"')
    app = make_app(PROPAGATE_EXCEPTIONS=False)
    seen = []

    async def suppress(sender: Flask, event: Any, **extra: Any) -> None:
        await asyncio.sleep(0)  # as a receiver awaiting its database would
        seen.append((current_app.name, event.recipient))

    async def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("database is down")

    with signals.email_bounced.connected_to(suppress, sender=app):
        assert post(app.test_client(), sample("bounced")).json["status"] == "accepted"
    assert seen == [(app.name, sample("bounced")["data"]["recipient"])]
    with signals.email_opened.connected_to(broken, sender=app):
        assert post(app.test_client(), sample("opened")).status_code == 500


def test_a_receiver_that_aborts_gets_its_status_and_nothing_is_kept(
    make_app: Callable[..., Flask], post: Post
) -> None:
    """``abort(503)`` in a receiver (its database is down) is Flask's way to choose the answer: it is kept,
    and so is the rule that nothing is kept when a receiver raises."""
    app = make_app()
    body = sample("unsubscribed")

    def unavailable(sender: Flask, **extra: Any) -> None:
        abort(503)

    with record_signals(app, signals.webhook_answered) as answered:
        with signals.email_unsubscribed.connected_to(unavailable, sender=app):
            assert post(app.test_client(), body).status_code == 503
        assert post(app.test_client(), body).json["status"] == "accepted"  # not a duplicate: nothing was kept
    assert [kwargs["outcome"] for _, kwargs in answered] == ["error", "accepted"]


def test_an_event_rejected_receiver_that_raises_is_500_and_no_dead_letter_is_kept(
    make_app: Callable[..., Flask], post: Post, tmp_path: Path
) -> None:
    app = make_app(
        PROPAGATE_EXCEPTIONS=False,
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
    )
    body = {"event_id": "01NOIDENTITY", "metric": "opened", "data": {}}

    def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("database is down")

    with signals.event_rejected.connected_to(broken, sender=app):
        assert post(app.test_client(), body).status_code == 500
    assert get_outbox(app).store.count_dead_letters() == 0
    # Customer.io retries: the receivers run again and the body is kept as a dead letter now.
    assert post(app.test_client(), body).json["status"] == "rejected"
    assert get_outbox(app).store.count_dead_letters() == 1


def test_errors_can_be_customised_with_an_errorhandler(app: Flask, post: Post) -> None:
    from flask_cio_rudder.webhook import InvalidSignature

    @app.errorhandler(InvalidSignature)
    def custom(error: InvalidSignature) -> tuple[str, int]:
        return "go away", 401

    response = post(app.test_client(), sample("opened"), key="wrong")
    assert (response.status_code, response.get_data(as_text=True)) == (401, "go away")


def test_only_post_is_allowed(client: Any) -> None:
    assert client.get(WEBHOOK).status_code == 405
