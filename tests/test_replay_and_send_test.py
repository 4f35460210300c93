"""``flask cio-rudder replay FILE`` and ``flask cio-rudder send-test URL``, as operators run them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask, redirect, request

from example_app.demo import serve
from flask_cio_rudder import get_outbox, signals
from flask_cio_rudder.testing import FakeDataPlane, record_events

from .conftest import EMAIL_EVENTS, SIGNING_KEY, WEBHOOK, sample
from .helpers import free_port, record_signals

NO_IDENTITY = {"event_id": "01NOBODY", "object_type": "email", "metric": "sent", "data": {}}


@pytest.fixture
def outbox_app(make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane) -> Flask:
    return make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
    )


def write_lines(path: Path, *lines: Any) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_replay_runs_each_line_through_the_webhook_stages_without_signals(
    outbox_app: Flask, tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    bounced, opened = sample("bounced"), sample("opened")
    log = write_lines(tmp_path / "bodies.jsonl", bounced, "", opened, bounced, NO_IDENTITY, "[1, 2]", "{oops")
    with record_signals(outbox_app, signals.event_received, signals.event_rejected) as fired:
        result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(log)])
    assert result.exit_code == 1, result.output  # some lines were left out: a script must see it
    assert "one JSON object per line" in result.output
    assert "6 bodies from" in result.output
    assert "2 accepted, 1 duplicate, 1 rejected, 2 not JSON objects (no signals sent" in result.output
    assert (
        "1  no userId or anonymousId" in result.output and "rejected (kept as dead letters)" in result.output
    )
    assert (
        "line 6: the body must be a JSON object" in result.output
        and "line 7: the body is not valid JSON" in result.output
    )
    assert fired == []
    outbox = get_outbox(outbox_app)
    assert (outbox.status().pending, outbox.status().dead) == (2, 1)
    assert outbox.flush().delivered == 2
    assert sorted(event["event"] for event in data_plane.events) == ["Email Bounced", "Email Opened"]


def test_replay_of_a_json_array_with_signals_announces_what_it_accepts(
    outbox_app: Flask, tmp_path: Path
) -> None:
    path = tmp_path / "bodies.json"
    path.write_text(json.dumps([sample("clicked"), NO_IDENTITY]))
    with record_signals(outbox_app, signals.email_clicked, signals.event_rejected) as fired:
        result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(path), "--signals"])
    assert "1 accepted, 0 duplicate, 1 rejected, 0 not JSON objects\n" in result.output
    assert [name for name, _ in fired] == ["email-clicked", "event-rejected"]
    again = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(path)])
    assert "0 accepted, 1 duplicate, 1 rejected" in again.output  # safe to run twice


def test_replay_reads_what_jq_and_editors_write(
    outbox_app: Flask, tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    """Lines split at a U+2028 that jq -c leaves unescaped in a string; an array after a byte order
    mark was one bad body; an array holding a lone surrogate escape was refused whole."""
    subjects = ["Hello\u2028world", "Sale \x85 today", "Bad \ud800 surrogate"]
    bodies = [sample("opened") | {"event_id": f"01LINE{n}"} for n in range(3)]
    for body, subject in zip(bodies, subjects):
        body["data"] = body["data"] | {"subject": subject}
    lines = tmp_path / "jq.jsonl"
    lines.write_text(
        "\r\n".join(json.dumps(body, ensure_ascii=False) for body in bodies[:2]), encoding="utf-8"
    )
    array = tmp_path / "array.json"
    array.write_text(
        "\ufeff" + json.dumps([body | {"event_id": f"01ITEM{n}"} for n, body in enumerate(bodies)])
    )
    run = outbox_app.test_cli_runner().invoke
    for path, count in ((lines, 2), (array, 3)):
        result = run(args=["cio-rudder", "replay", str(path)])
        assert result.exit_code == 0, result.output
        assert f"{count} accepted, 0 duplicate, 0 rejected, 0 not JSON objects" in result.output
    assert get_outbox(outbox_app).flush().delivered == 5
    sent = sorted(event["properties"]["emailSubject"] for event in data_plane.events)
    assert sent == sorted(subjects[:2] + subjects)


def test_replay_keeps_a_body_too_deep_to_decode_and_says_why_a_file_cannot_be_read(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    """Line by line, as the webhook does: kept as a dead letter. A whole array that deep cannot be
    read at all: one line saying what to do, not a traceback. And a new outbox is no outbox the app uses."""
    config = {
        "CIO_RUDDER_FORWARDER": "outbox",
        "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{tmp_path / 'typo' / 'outbox.sqlite3'}",
        "CIO_RUDDER_OUTBOX_SENDER": False,
        "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
        "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
    }
    deep = '{"event_id":"E1","data":{"customer_id":"42","list":' + "[" * 20_000 + "]" * 20_000 + "}}"
    lines = write_lines(tmp_path / "bodies.jsonl", deep)
    result = make_app(**config).test_cli_runner().invoke(args=["cio-rudder", "replay", str(lines)])
    assert "note: there was no outbox at sqlite:///" in result.output
    assert "0 accepted, 0 duplicate, 1 rejected" in result.output
    assert "the body is nested too deeply to be read" in result.output
    app = make_app(**config)
    assert get_outbox(app).count_dead_letters() == 1

    for text, said in (
        (
            "[" + deep + "]",
            "it is one JSON array nested too deeply to be read whole: write one body per line",
        ),
        ("[{}, oops]", "it starts with [ but is not one JSON array (Expecting value"),
    ):
        broken = tmp_path / "bodies.json"
        broken.write_text(text)
        result = app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(broken)])
        assert result.exit_code == 1 and f"cannot read {broken}: {said}" in result.output
        assert "Traceback" not in result.output


def test_a_receiver_that_raises_stops_the_replay_saying_where_and_what_is_done(
    outbox_app: Flask, tmp_path: Path
) -> None:
    log = write_lines(tmp_path / "bodies.jsonl", sample("opened"), sample("bounced"), sample("clicked"))

    def refuse_bounces(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("the suppression list is down")

    signals.email_bounced.connect(refuse_bounces, outbox_app)
    try:
        result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(log), "--signals"])
    finally:
        signals.email_bounced.disconnect(refuse_bounces, outbox_app)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # an error line, no traceback
    assert "1 body from" in result.output and "1 accepted" in result.output
    assert "stopped at line 2: RuntimeError: the suppression list is down" in result.output
    again = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "replay", str(log)])
    assert again.exit_code == 0 and "2 accepted, 1 duplicate" in again.output


def test_replay_validates_as_the_app_does(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    strict = make_app(CIO_RUDDER_VALIDATION="strict")
    body = sample("bounced")
    del body["data"]["failure_message"]  # breaks Customer.io's schema; only "strict" rejects it
    log = write_lines(tmp_path / "bodies.jsonl", body)
    result = strict.test_cli_runner().invoke(args=["cio-rudder", "replay", str(log)])
    assert "0 accepted, 0 duplicate, 1 rejected" in result.output
    assert "invalid fields: data.failure_message" in result.output
    assert "not kept: the app has no outbox" in result.output  # no dead letter to look for later


def test_send_test_posts_six_signed_samples_with_fresh_ids_and_reports_each_answer(
    make_app: Callable[..., Flask],
) -> None:
    deployed = make_app()
    local = make_app(CIO_RUDDER_SIGNING_KEY=["other-key", SIGNING_KEY])  # rotated: the first key signs
    with serve(deployed) as base_url, record_events(deployed) as received:
        url = base_url + "/webhooks/customerio"
        wrong_key = local.test_cli_runner().invoke(args=["cio-rudder", "send-test", url])
        fine = make_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY).test_cli_runner()
        first = fine.invoke(args=["cio-rudder", "send-test", url])
        second = fine.invoke(args=["cio-rudder", "send-test", url])
        wrong_path = fine.invoke(args=["cio-rudder", "send-test", base_url + "/webhook/customerio"])
    assert wrong_path.exit_code == 1
    assert "is its path the app's CIO_RUDDER_WEBHOOK_PATH (/webhooks/customerio here)?" in wrong_path.output
    assert wrong_key.exit_code == 1 and "0 of 6 accepted" in wrong_key.output
    assert "the first key of the list" in wrong_key.output and "refused the signature" in wrong_key.output
    for result in (first, second):
        assert result.exit_code == 0, result.output
        assert result.output.count(" 200  accepted  (") == 6 and "OK: 6 of 6 accepted" in result.output
    assert "fresh event_id" in first.output
    assert sorted(event.metric for event in received) == sorted(2 * EMAIL_EVENTS)
    assert len({event.event_id for event in received}) == 12
    for wrong, named in (
        (["app.example.com/webhooks/customerio"], "URL"),
        ([url, "--timeout", "0"], "--timeout"),
    ):
        refused = fine.invoke(args=["cio-rudder", "send-test", *wrong])
        assert refused.exit_code == 2 and "Invalid value for" in refused.output and named in refused.output


def test_send_test_shows_a_redirect_as_the_answer_and_says_what_to_do(make_app: Callable[..., Flask]) -> None:
    """A login hook's redirect is no 2xx for Customer.io: followed, its login page read as an answer."""
    deployed = make_app()

    @deployed.before_request
    def login_required() -> Any:
        return None if request.path == "/login" else redirect("/login")

    deployed.add_url_rule("/login", "login", lambda: "<form>please log in</form>")
    with serve(deployed) as base_url:
        result = make_app().test_cli_runner().invoke(args=["cio-rudder", "send-test", base_url + WEBHOOK])
    assert result.exit_code == 1 and "0 of 6 accepted" in result.output
    assert result.output.count(" 302  a redirect to /login  (") == 6, result.output
    assert "skip it where request.blueprint == 'cio_rudder'" in result.output


def test_send_test_says_when_nothing_answers(app: Flask) -> None:
    result = app.test_cli_runner().invoke(
        args=["cio-rudder", "send-test", f"http://127.0.0.1:{free_port()}/hook", "--timeout", "2"]
    )
    assert result.exit_code == 1
    assert "no answer (ConnectionError)" in result.output and "0 of 6 accepted" in result.output
