"""Flask's contract on the webhook, and what the opt-in fast path skips of it.

By default the webhook is a Flask route like any other: the host app's request hooks run,
receivers can use ``flask.request``, ``app.errorhandler`` answers for it. With
``CIO_RUDDER_FAST_PATH`` on, authentic valid events (new or duplicate) are answered before
Flask's request machinery, in an app context only; every other request still goes through
Flask. That the fast path answers every request as the route does is in test_webhook.py
and test_bad_input.py, which run each of their tests with it on too.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from flask import Flask, Response, current_app, g, has_request_context, request
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_cio_rudder import Forwarder, ForwardError, signals
from flask_cio_rudder.testing import encode, signature_headers

from .conftest import SIGNING_KEY, WEBHOOK, sample
from .helpers import record_signals

Post = Callable[..., TestResponse]
EVERY_HOOK = ["before_request", "after_request", "teardown_request", "teardown_appcontext"]


def record_hooks(app: Flask) -> list[str]:
    """The host app's request and app-context hooks, recording their names in the order they run."""
    calls: list[str] = []

    @app.before_request
    def before() -> None:
        calls.append("before_request")

    @app.after_request
    def after(response: Response) -> Response:
        calls.append("after_request")
        return response

    @app.teardown_request
    def teardown_request(error: BaseException | None) -> None:
        calls.append("teardown_request")

    @app.teardown_appcontext
    def teardown_appcontext(error: BaseException | None) -> None:
        calls.append("teardown_appcontext")

    return calls


def test_by_default_the_webhook_runs_the_host_apps_hooks_and_receivers_see_the_request(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app()
    calls = record_hooks(app)
    seen: list[tuple[str, str]] = []

    def receiver(sender: Flask, event: Any, **extra: Any) -> None:
        seen.append((current_app.name, request.path))

    with signals.email_opened.connected_to(receiver, sender=app):
        assert post(app.test_client(), sample("opened")).json["status"] == "accepted"
    assert seen == [(app.name, WEBHOOK)]
    assert calls == EVERY_HOOK


def post_read(client: FlaskClient, body: dict[str, Any], *, terminated: bool) -> TestResponse:
    """Post ``body`` signed, from a server that ends the input (``terminated``: gunicorn, werkzeug's)
    or not: the webhook reads it by ``Content-Length``, or from werkzeug's stream."""
    raw = encode(body)
    return client.post(
        WEBHOOK,
        data=raw,
        headers=signature_headers(raw, SIGNING_KEY),
        environ_overrides={"wsgi.input_terminated": terminated},
    )


def assert_accepted(answer: TestResponse, body: dict[str, Any]) -> None:
    assert (answer.status_code, answer.json) == (200, {"status": "accepted", "event_id": body["event_id"]})


def test_a_host_hook_that_reads_the_body_first_leaves_it_to_the_webhook(
    make_app: Callable[..., Flask],
) -> None:
    """Audit logging and body-inspecting middleware call ``request.get_data()`` in ``before_request``."""
    app = make_app()
    seen: list[Any] = []

    @app.before_request
    def audit() -> None:
        seen.append(request.get_json(silent=True) or request.get_data())

    client = app.test_client()
    for number, terminated in enumerate((False, True)):
        body = sample("opened") | {"event_id": f"01READFIRST{number}"}
        assert_accepted(post_read(client, body, terminated=terminated), body)
        assert seen[-1] == body


def test_receivers_and_later_hooks_can_read_the_body_the_webhook_read(make_app: Callable[..., Flask]) -> None:
    """As on any Flask route: a receiver or an ``after_request`` audit hook calling ``request.get_json()``."""
    app = make_app()
    seen: list[Any] = []

    def receiver(sender: Flask, event: Any, **extra: Any) -> None:
        seen.append(("receiver", request.get_json()))

    @app.after_request
    def audit(response: Response) -> Response:
        seen.append(("after_request", request.get_json(silent=True)))
        return response

    client = app.test_client()
    with signals.email_opened.connected_to(receiver, sender=app):
        for number, terminated in enumerate((False, True)):
            body = sample("opened") | {"event_id": f"01READAFTER{number}"}
            assert_accepted(post_read(client, body, terminated=terminated), body)
            assert seen[-2:] == [("receiver", body), ("after_request", body)]


def test_the_fast_path_answers_valid_events_in_an_app_context_without_the_request_hooks(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_FAST_PATH=True)
    calls = record_hooks(app)
    seen: list[tuple[bool, bool, str]] = []

    def receiver(sender: Flask, event: Any, **extra: Any) -> None:
        g.event_id = event.event_id  # g works: it lives in the app context
        seen.append((current_app._get_current_object() is app, has_request_context(), g.event_id))

    body, client = sample("opened"), app.test_client()
    with signals.email_opened.connected_to(receiver, sender=app):
        first, again = post(client, body), post(client, body)
    assert (first.status_code, first.json) == (200, {"status": "accepted", "event_id": body["event_id"]})
    assert (again.status_code, again.json) == (200, {"status": "duplicate", "event_id": body["event_id"]})
    assert first.headers["Content-Length"] == str(len(first.get_data()))
    assert seen == [(True, False, body["event_id"])]
    assert calls == ["teardown_appcontext", "teardown_appcontext"]


def test_with_the_fast_path_every_other_request_goes_through_flask_and_its_hooks(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_FAST_PATH=True)
    app.add_url_rule("/elsewhere", "elsewhere", lambda: "the host app's own page")
    calls = record_hooks(app)
    client = app.test_client()
    no_event_id = {**sample("opened"), "event_id": 7}
    answers = [
        post(client, sample("opened"), key="not-the-key").status_code,
        post(client, b"[1]").status_code,
        post(client, no_event_id).json["status"],
        client.get(WEBHOOK).status_code,
        client.get("/elsewhere").status_code,
    ]
    assert answers == [401, 400, "rejected", 405, 200]
    assert calls == EVERY_HOOK * len(answers)


def test_with_the_fast_path_a_forged_request_costs_one_signature_check(
    make_app: Callable[..., Flask], post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route answers the 401 from the fast path's check: a forged body of megabytes must not be
    hashed with every key twice."""
    from flask_cio_rudder import fastpath, signature, webhook

    checks: list[bytes] = []

    def counted(body: bytes, *args: Any, **options: Any) -> None:
        checks.append(body)
        signature.verify(body, *args, **options)

    monkeypatch.setattr(fastpath, "verify", counted)
    monkeypatch.setattr(webhook, "verify", counted)
    client = make_app(CIO_RUDDER_FAST_PATH=True).test_client()
    forged = post(client, sample("opened"), key="not-the-key")
    assert (forged.status_code, len(checks)) == (401, 1)
    assert "X-CIO-Signature does not match" in forged.json["error"]
    assert post(client, sample("opened")).json["status"] == "accepted"  # and a real one is checked anew
    assert len(checks) == 2


def test_with_the_fast_path_a_hook_that_mends_the_signature_headers_gets_its_request_checked_again(
    make_app: Callable[..., Flask],
) -> None:
    """A gateway renamed Customer.io's headers; a host hook names them back for the route. The fast
    path, which saw none, refused the request: the route must check what it sees, not reuse that."""
    app = make_app(CIO_RUDDER_FAST_PATH=True)

    @app.before_request
    def name_them_back() -> None:
        for name in ("TIMESTAMP", "SIGNATURE"):
            if f"HTTP_X_UPSTREAM_CIO_{name}" in request.environ:
                request.environ[f"HTTP_X_CIO_{name}"] = request.environ[f"HTTP_X_UPSTREAM_CIO_{name}"]

    raw = encode(sample("opened"))
    renamed = {
        name.replace("X-CIO-", "X-Upstream-CIO-"): value
        for name, value in signature_headers(raw, SIGNING_KEY).items()
    }
    response = app.test_client().post(WEBHOOK, data=raw, headers=renamed)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["status"] == "accepted"


def test_with_the_fast_path_a_receiver_that_raises_is_answered_by_the_host_apps_error_handler(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_FAST_PATH=True)
    ran: list[str] = []

    def broken(sender: Flask, event: Any, **extra: Any) -> None:
        ran.append(event.event_id)
        raise LookupError("no such customer")

    @app.errorhandler(LookupError)
    def answer(error: LookupError) -> tuple[dict[str, str], int]:
        return {"error": str(error)}, 500

    body = sample("bounced")
    with signals.email_bounced.connected_to(broken, sender=app):
        response = post(app.test_client(), body)
    assert (response.status_code, response.json) == (500, {"error": "no such customer"})
    # The fast path ran it, then Flask's route, serving the request from the start, ran it again.
    assert ran == [body["event_id"]] * 2
    assert post(app.test_client(), body).json["status"] == "accepted"  # nothing was kept: the retry is new


class Full(Forwarder):
    """A forwarder that cannot keep anything now, like an outbox on a full disk or ``sync`` with
    RudderStack down; it counts its attempts."""

    attempts = 0

    def send(self, event: Any) -> None:
        Full.attempts += 1
        raise ForwardError("the disk is full")


@pytest.mark.parametrize("fast", [False, True], ids=["route", "fast path"])
def test_an_event_that_cannot_be_kept_is_503_after_one_attempt_with_or_without_the_fast_path(
    make_app: Callable[..., Flask], post: Post, fast: bool
) -> None:
    """Not handed to Flask for a second try: with ``sync`` that would post it again and wait out a
    second timeout, past Customer.io's 4 s, and run its receivers twice."""
    Full.attempts = 0
    app = make_app(CIO_RUDDER_FAST_PATH=fast, CIO_RUDDER_FORWARDER=Full)
    with record_signals(app, signals.email_delivered, signals.webhook_answered) as calls:
        response = post(app.test_client(), sample("delivered"))
    assert response.status_code == 503
    assert response.json == {"error": "the event was not kept (the disk is full); send it again later"}
    assert Full.attempts == 1
    assert [name for name, _ in calls] == ["email-delivered", "webhook-answered"]
    assert calls[-1][1]["outcome"] == "retry_later"


def test_with_the_fast_path_each_request_is_announced_once(
    make_app: Callable[..., Flask], post: Post
) -> None:
    app = make_app(CIO_RUDDER_FAST_PATH=True)
    body, client = sample("clicked"), app.test_client()
    with record_signals(app, signals.webhook_answered) as calls:
        post(client, body)
        post(client, body)
        post(client, body, key="not-the-key")
    assert [kwargs["outcome"] for _, kwargs in calls] == ["accepted", "duplicate", "refused_signature"]
    assert all(kwargs["duration"] > 0 for _, kwargs in calls)
