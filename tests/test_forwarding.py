"""The sync forwarder: what it posts to RudderStack, and how each answer maps to Customer.io's."""

from __future__ import annotations

import base64
import gzip
import json
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

import pytest
import requests
import responses
from flask import Flask
from werkzeug.test import TestResponse

from flask_cio_rudder import signals, transform
from flask_cio_rudder.testing import FakeDataPlane

from .conftest import EMAIL_EVENTS, sample
from .helpers import odd_data_plane, record_signals, send_answer

Post = Callable[..., TestResponse]
DATA_PLANE = "https://dp.example.com"
WRITE_KEY = "secret-write-key"


@pytest.fixture
def sync_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(
        CIO_RUDDER_FORWARDER="sync",
        CIO_RUDDER_WRITE_KEY=WRITE_KEY,
        CIO_RUDDER_DATA_PLANE_URL=DATA_PLANE + "/",
        PROPAGATE_EXCEPTIONS=False,
    )


@pytest.fixture
def outcomes(sync_app: Flask) -> Any:
    with record_signals(sync_app, signals.event_forwarded, signals.forward_failed) as recorded:
        yield recorded


@responses.activate
def test_an_accepted_event_is_posted_to_v1_batch_with_basic_auth_and_gzip(
    sync_app: Flask, post: Post, outcomes: list[Any]
) -> None:
    responses.post(f"{DATA_PLANE}/v1/batch", body="OK")
    body = sample("bounced")
    assert post(sync_app.test_client(), body).json["status"] == "accepted"
    (call,) = responses.calls
    request = call.request
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.headers["Content-Type"] == "application/json"
    sent = json.loads(gzip.decompress(request.body))  # type: ignore[arg-type]
    assert sent == {"batch": [transform(body)]}
    [(outcome, kwargs)] = outcomes
    assert (outcome, kwargs["payloads"]) == ("event-forwarded", sent["batch"])
    assert kwargs["duration"] > 0


@responses.activate
def test_timeouts_keep_the_request_inside_customerios_four_seconds(sync_app: Flask, post: Post) -> None:
    responses.post(f"{DATA_PLANE}/v1/batch", body="OK")
    post(sync_app.test_client(), sample("opened"))
    connect, read = responses.calls[0].request.req_kwargs["timeout"]
    assert connect + read < 4


@responses.activate
@pytest.mark.parametrize("status", [401, 500])
def test_an_answer_that_quotes_the_write_key_is_logged_and_answered_without_it(
    sync_app: Flask, post: Post, outcomes: list[Any], caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """A proxy or a data plane that echoes the key (or the Basic credentials carrying it)."""
    credentials = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    echo = f"Invalid write key {WRITE_KEY}: Authorization: Basic {credentials} " + "x" * 300
    responses.post(f"{DATA_PLANE}/v1/batch", body=echo, status=status)
    response = post(sync_app.test_client(), sample("opened"))
    assert response.status_code == 503
    assert (
        response.json["error"]
        == f"the event was not kept (RudderStack answered {status}); send it again later"
    )
    reason = outcomes[0][1]["reason"]
    assert reason.startswith(
        f"RudderStack answered {status}: Invalid write key ***: Authorization: Basic ***"
    )
    for seen in (caplog.text, reason):
        assert WRITE_KEY not in seen and credentials.rstrip("=") not in seen


@responses.activate
def test_an_answer_cannot_forge_log_lines_nor_steer_a_terminal(
    sync_app: Flask, post: Post, outcomes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever answers (a proxy, anything on the way over http) is quoted on one line, in plain text."""
    forged = "oops\r\nINFO flask_cio_rudder: Delivered 100 Customer.io events\u2028\x1b[2K\x85done"
    responses.post(f"{DATA_PLANE}/v1/batch", body=forged, status=500)
    post(sync_app.test_client(), sample("opened"))
    reason = outcomes[0][1]["reason"]
    assert (
        reason
        == "RudderStack answered 500: oops  INFO flask_cio_rudder: Delivered 100 Customer.io events  [2K done"
    )
    [record] = [record for record in caplog.records if "RudderStack answered 500" in record.getMessage()]
    assert record.getMessage().splitlines() == [record.getMessage()]


@responses.activate
@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 401, 404])
def test_a_transient_or_configuration_failure_is_503_so_customerio_retries(
    sync_app: Flask, post: Post, outcomes: list[Any], status: int
) -> None:
    responses.post(f"{DATA_PLANE}/v1/batch", body="nope", status=status)
    body = sample("delivered")
    response = post(sync_app.test_client(), body)
    assert response.status_code == 503
    assert f"RudderStack answered {status}" in response.json["error"]
    assert outcomes[0][0] == "forward-failed"
    assert outcomes[0][1]["retry"] is True
    # Not remembered: Customer.io's retry is forwarded once RudderStack is back.
    responses.replace(responses.POST, f"{DATA_PLANE}/v1/batch", body="OK")
    assert post(sync_app.test_client(), body).json["status"] == "accepted"


@responses.activate
@pytest.mark.parametrize(
    "error", [requests.ConnectionError("refused"), requests.Timeout("slow")], ids=["refused", "timeout"]
)
def test_an_unreachable_data_plane_is_503(
    sync_app: Flask, post: Post, outcomes: list[Any], error: Exception
) -> None:
    responses.post(f"{DATA_PLANE}/v1/batch", body=error)
    response = post(sync_app.test_client(), sample("delivered"))
    assert response.status_code == 503
    assert "could not reach RudderStack" in response.json["error"]
    assert WRITE_KEY not in response.get_data(as_text=True)
    # The log and the signal say where, and what to check: a mistyped host read as a network failure.
    assert outcomes[0][1]["reason"] == (
        f"could not reach RudderStack at {DATA_PLANE} ({type(error).__name__}): "
        "check CIO_RUDDER_DATA_PLANE_URL, and that the data plane is up"
    )


@responses.activate
@pytest.mark.parametrize(
    ("status", "key"), [(401, "CIO_RUDDER_WRITE_KEY"), (404, "CIO_RUDDER_DATA_PLANE_URL")]
)
def test_a_configuration_failure_names_the_setting_to_check(
    sync_app: Flask, post: Post, outcomes: list[Any], status: int, key: str
) -> None:
    responses.post(f"{DATA_PLANE}/v1/batch", body="nope", status=status)
    assert post(sync_app.test_client(), sample("delivered")).status_code == 503
    assert outcomes[0][1]["reason"].startswith(f"RudderStack answered {status}: nope; check {key}")


@responses.activate
@pytest.mark.parametrize("charset", ["utf8mb4", "idna", "utf\x008"])
def test_an_answer_in_a_charset_python_cannot_read_is_still_read(
    sync_app: Flask, post: Post, outcomes: list[Any], charset: str
) -> None:
    """A proxy's ``charset=utf8mb4`` raised LookupError (``idna``, UnicodeError) after RudderStack had
    stored the batch."""
    headers = {"Content-Type": f"text/plain; charset={charset}"}
    responses.post(f"{DATA_PLANE}/v1/batch", body="OK", headers=headers)
    assert post(sync_app.test_client(), sample("opened")).json["status"] == "accepted"
    responses.replace(responses.POST, f"{DATA_PLANE}/v1/batch", body="busy", status=503, headers=headers)
    assert post(sync_app.test_client(), sample("clicked")).status_code == 503
    assert outcomes[-1][1]["reason"] == "RudderStack answered 503: busy"


@responses.activate
def test_a_web_page_answered_with_200_is_503_so_customerio_retries(
    sync_app: Flask, post: Post, outcomes: list[Any]
) -> None:
    """Whatever serves a page at the data plane's URL is not RudderStack: the event is not stored."""
    responses.post(
        f"{DATA_PLANE}/v1/batch", body="<!doctype html><title>Welcome</title>", content_type="text/html"
    )
    response = post(sync_app.test_client(), sample("delivered"))
    assert response.status_code == 503
    assert "with a web page: check CIO_RUDDER_DATA_PLANE_URL" in response.json["error"]
    assert (outcomes[0][0], outcomes[0][1]["retry"]) == ("forward-failed", True)


@responses.activate
@pytest.mark.parametrize("status", [400, 413])
def test_an_event_rudderstack_refuses_is_2xx_and_reported_as_a_failed_delivery_not_a_rejection(
    sync_app: Flask, post: Post, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The event passed every check and its receivers ran: it was accepted, so it is not also "rejected".
    RudderStack refusing it is a delivery outcome (``forward_failed``, ``retry=False``), as in the outbox;
    the log says which event is lost, where a failure that is retried says nothing of the kind."""
    responses.post(f"{DATA_PLANE}/v1/batch", body="Invalid request body", status=status)
    body = sample("delivered")
    every = [signals.event_received, signals.email_delivered, signals.event_rejected, signals.forward_failed]
    with record_signals(sync_app, *every) as calls:
        response = post(sync_app.test_client(), body)
    assert response.status_code == 200
    assert response.json == {"status": "accepted", "event_id": body["event_id"]}
    assert [name for name, _ in calls] == ["event-received", "email-delivered", "forward-failed"]
    failed = calls[-1][1]
    assert failed["retry"] is False
    assert failed["reason"] == f"RudderStack answered {status}: Invalid request body"
    assert [payload["properties"]["eventId"] for payload in failed["payloads"]] == [body["event_id"]]
    assert f"RudderStack refused Customer.io event {body['event_id']}, which is not sent again" in caplog.text


# Not sync's default (1, 2): a loaded machine may take 2 s to answer (the default is checked offline).
@pytest.mark.parametrize("timeout", [(1, 10), [1, 10]], ids=["timeout as a tuple", "timeout as a JSON list"])
def test_the_six_email_events_reach_a_real_data_plane_on_loopback(
    make_app: Callable[..., Flask], post: Post, data_plane: FakeDataPlane, timeout: Any
) -> None:
    """A (connect, read) timeout may come as a list, as JSON from the environment gives it
    (FLASK_CIO_RUDDER_TIMEOUT='[1, 10]'): requests itself takes only a tuple."""
    app = make_app(
        CIO_RUDDER_FORWARDER="sync",
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_TIMEOUT=timeout,
    )
    bodies = [sample(metric) for metric in EMAIL_EVENTS]
    for body in bodies:
        assert post(app.test_client(), body).json["status"] == "accepted"
    assert data_plane.events == [transform(body) for body in bodies]


def test_a_wrong_write_key_is_503_and_the_event_is_not_lost(
    make_app: Callable[..., Flask], post: Post, data_plane: FakeDataPlane
) -> None:
    app = make_app(
        CIO_RUDDER_FORWARDER="sync",
        CIO_RUDDER_WRITE_KEY="wrong",
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_TIMEOUT=(1, 10),  # the 401, not a read timeout on a loaded machine
        PROPAGATE_EXCEPTIONS=False,
    )
    response = post(app.test_client(), sample("opened"))
    assert response.status_code == 503
    assert "RudderStack answered 401" in response.json["error"]
    assert data_plane.events == []


@pytest.mark.parametrize("bypassed", [False, True], ids=["through HTTP_PROXY", "NO_PROXY names it"])
def test_the_proxy_the_environment_names_carries_the_batches(
    make_app: Callable[..., Flask], post: Post, monkeypatch: pytest.MonkeyPatch, bypassed: bool
) -> None:
    """Behind a corporate proxy, ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` work as they do for
    requests (which the sender asks once, at start-up)."""
    seen: list[str] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        seen.append(handler.path)
        send_answer(handler, 200, b"OK")

    with odd_data_plane(answer) as proxy:
        for variable in ("http_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):  # lower case would win
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", "rudderstack.invalid" if bypassed else "")
        app = make_app(
            CIO_RUDDER_FORWARDER="sync",
            CIO_RUDDER_WRITE_KEY=WRITE_KEY,
            CIO_RUDDER_DATA_PLANE_URL="http://rudderstack.invalid",  # resolves nowhere but in the proxy
            CIO_RUDDER_TIMEOUT=(1, 10),
            PROPAGATE_EXCEPTIONS=False,
        )
        response = post(app.test_client(), sample("opened"))
    if bypassed:
        assert (response.status_code, seen) == (503, [])
    else:
        assert (response.status_code, seen) == (200, ["http://rudderstack.invalid/v1/batch"])


@responses.activate
def test_an_async_delivery_receiver_is_told_of_the_delivery(sync_app: Flask, post: Post) -> None:
    pytest.importorskip("asgiref", reason='Flask[async] is not installed: pip install -e ".[test]"')
    responses.post(f"{DATA_PLANE}/v1/batch", body="OK")
    told = []

    async def on_forwarded(app: Flask, payloads: list[dict[str, Any]], **data: Any) -> None:
        told.extend(payload["properties"]["eventId"] for payload in payloads)

    with signals.event_forwarded.connected_to(on_forwarded, sync_app):
        assert post(sync_app.test_client(), sample("opened")).status_code == 200
    assert told == [sample("opened")["event_id"]]


@responses.activate
@pytest.mark.parametrize(
    ("status", "signal"), [(200, signals.event_forwarded), (500, signals.forward_failed)], ids=["200", "500"]
)
def test_a_raising_delivery_receiver_changes_neither_the_answer_nor_what_is_sent(
    sync_app: Flask, post: Post, caplog: pytest.LogCaptureFixture, status: int, signal: Any
) -> None:
    """RudderStack has already stored (or refused) the event: a receiver's bug must not turn that into a
    500, which would make Customer.io send the event, and sync post it, again and again."""
    responses.post(f"{DATA_PLANE}/v1/batch", body="answer", status=status)

    def broken(app: Flask, **data: Any) -> None:
        raise RuntimeError("a bug in a delivery receiver")

    signal.connect(broken, sync_app)
    try:
        response = post(sync_app.test_client(), sample("opened"))
    finally:
        signal.disconnect(broken, sync_app)
    assert response.status_code == (200 if status == 200 else 503)
    assert len(responses.calls) == 1
    assert f"A receiver of {signal.name} raised" in caplog.text
