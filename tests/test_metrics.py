"""Prometheus metrics: what an operator graphs and alerts on, counted from real requests and deliveries."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from flask import Flask
from prometheus_client import REGISTRY
from werkzeug.test import TestResponse

import flask_cio_rudder
from flask_cio_rudder import get_outbox, signals
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers

from . import metrics_app
from .conftest import sample
from .helpers import free_port, wait_until

Post = Callable[..., TestResponse]


def value(name: str, **labels: str) -> float:
    """A sample's current value in the default registry (0 before it was first counted)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def metered(make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane) -> Flask:
    return make_app(
        CIO_RUDDER_METRICS=True,
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_MAX_BODY_BYTES=2000,
        PROPAGATE_EXCEPTIONS=False,
    )


def test_every_webhook_answer_is_counted_by_outcome(metered: Flask, post: Post) -> None:
    client = metered.test_client()
    outcomes = [
        "accepted",
        "duplicate",
        "rejected",
        "refused_signature",
        "too_large",
        "malformed",
        "error",
    ]
    before = {outcome: value("cio_rudder_webhooks_total", outcome=outcome) for outcome in outcomes}
    durations = value("cio_rudder_webhook_duration_seconds_count")

    body = sample("bounced")
    assert post(client, body).json["status"] == "accepted"
    assert post(client, body).json["status"] == "duplicate"
    assert post(client, {"event_id": "01NOBODY", "data": {}}).json["status"] == "rejected"
    assert post(client, sample("opened"), key="wrong").status_code == 401
    assert post(client, encode(sample("opened")) + b" " * 2000).status_code == 413
    assert post(client, b"[1, 2]").status_code == 400

    def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("the host app's database is down")

    with signals.email_spammed.connected_to(broken, sender=metered):
        assert post(client, sample("spammed")).status_code == 500

    counted = {
        outcome: value("cio_rudder_webhooks_total", outcome=outcome) - before[outcome] for outcome in outcomes
    }
    assert counted == dict.fromkeys(outcomes, 1.0)
    assert value("cio_rudder_webhook_duration_seconds_count") - durations == len(outcomes)

    metered.config["MAX_CONTENT_LENGTH"] = 1000  # Flask's own limit, below CIO_RUDDER_MAX_BODY_BYTES
    assert post(client, encode(sample("opened")) + b" " * 1000).status_code == 413
    assert value("cio_rudder_webhooks_total", outcome="too_large") - before["too_large"] == 2


def test_an_outbox_that_cannot_be_written_is_counted_as_retry_later(
    metered: Flask, post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask_cio_rudder import ForwardError

    def broken(event: Any) -> None:
        raise ForwardError("disk full")

    monkeypatch.setattr(metered.extensions["cio_rudder"].forwarder, "accept", broken)
    before = value("cio_rudder_webhooks_total", outcome="retry_later")
    opened = value("cio_rudder_events_total", event="Email Opened")
    assert post(metered.test_client(), sample("opened")).status_code == 503
    assert value("cio_rudder_webhooks_total", outcome="retry_later") - before == 1
    assert value("cio_rudder_events_total", event="Email Opened") == opened  # not kept: not counted


def test_an_event_is_counted_once_when_kept_not_for_a_request_a_receiver_failed(
    metered: Flask, post: Post
) -> None:
    client, body = metered.test_client(), sample("spammed")
    before = value("cio_rudder_events_total", event="Email Marked as Spam")

    def broken(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("the host app's database is down")

    with signals.email_spammed.connected_to(broken, sender=metered):
        assert post(client, body).status_code == 500
    assert post(client, body).json["status"] == "accepted"  # Customer.io's retry
    assert post(client, body).json["status"] == "duplicate"
    assert value("cio_rudder_events_total", event="Email Marked as Spam") - before == 1


def test_accepted_events_are_counted_by_email_event_with_the_rest_as_other(
    metered: Flask, post: Post
) -> None:
    client = metered.test_client()
    names = ["Email Bounced", "Email Link Clicked", "other"]
    before = {name: value("cio_rudder_events_total", event=name) for name in names}
    post(client, sample("bounced"))
    post(client, sample("clicked"))
    post(client, sample("opened") | {"event_id": "01PUSH", "object_type": "push"})
    post(client, sample("opened") | {"event_id": "01SMS", "object_type": "sms", "metric": "sent"})
    counted = {name: value("cio_rudder_events_total", event=name) - before[name] for name in names}
    assert counted == {"Email Bounced": 1, "Email Link Clicked": 1, "other": 2}


def test_deliveries_are_counted_by_result_with_their_duration(
    metered: Flask, post: Post, data_plane: FakeDataPlane
) -> None:
    results = ["delivered", "failed"]
    before = {result: value("cio_rudder_delivery_attempts_total", result=result) for result in results}
    delivered_before = value("cio_rudder_delivered_events_total")
    batches_before = value("cio_rudder_batch_duration_seconds_count")
    for metric in ["opened", "clicked", "bounced"]:
        post(metered.test_client(), sample(metric))
    data_plane.fail_next(500)
    get_outbox(metered).flush()  # the first attempt fails and stops the flush
    get_outbox(metered).flush()
    counted = {
        result: value("cio_rudder_delivery_attempts_total", result=result) - before[result]
        for result in results
    }
    assert counted == {"delivered": 1, "failed": 1}
    assert value("cio_rudder_delivered_events_total") - delivered_before == 3
    assert value("cio_rudder_batch_duration_seconds_count") - batches_before == 2


def test_the_outbox_state_is_read_when_scraped(metered: Flask, post: Post) -> None:
    from flask_cio_rudder.metrics import metrics_response

    for metric in ["opened", "clicked"]:
        post(metered.test_client(), sample(metric))
    post(metered.test_client(), {"event_id": "01NOBODY", "data": {}})

    def scrape() -> dict[str, float]:
        with metered.app_context():
            text = metrics_response().get_data(as_text=True)
        return {
            name: float(number)
            for name, number in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
        }

    label = f'{{app="{metered.name}"}}'
    lines = scrape()
    assert lines[f"cio_rudder_pending_events{label}"] == 2
    assert lines[f"cio_rudder_dead_letters{label}"] == 1
    assert lines[f"cio_rudder_oldest_pending_age_seconds{label}"] >= 0
    assert lines[f"cio_rudder_sending_paused{label}"] == 0
    assert lines[f"cio_rudder_outbox_up{label}"] == 1
    get_outbox(metered).pause()
    assert scrape()[f"cio_rudder_sending_paused{label}"] == 1


def test_an_outbox_that_cannot_be_read_reports_down_not_empty(
    metered: Flask, post: Post, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The alert on the oldest pending age must not go quiet when the outbox cannot be read: its
    gauges are left out, not reported as 0, and cio_rudder_outbox_up says why."""
    from flask_cio_rudder.metrics import metrics_response

    post(metered.test_client(), sample("opened"))
    assert get_outbox(metered).status().pending == 1
    (tmp_path / "outbox.sqlite3").rename(tmp_path / "moved-away.sqlite3")  # as a wrong volume mount would
    with metered.app_context():
        text = metrics_response().get_data(as_text=True)
    assert f'cio_rudder_outbox_up{{app="{metered.name}"}} 0.0' in text
    assert "cio_rudder_pending_events{" not in text and "cio_rudder_oldest_pending_age_seconds{" not in text
    assert "could not be read" in caplog.text


def test_metrics_without_prometheus_client_fail_fast_naming_the_extra(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "flask_cio_rudder.metrics")
    monkeypatch.delattr(flask_cio_rudder, "metrics")
    with pytest.raises(ImportError, match=r'pip install "Flask-CIO-Rudder\[metrics\]"'):
        make_app(CIO_RUDDER_METRICS=True)
    monkeypatch.undo()
    importlib.import_module("flask_cio_rudder.metrics")


def test_metrics_are_off_by_default(make_app: Callable[..., Flask], post: Post) -> None:
    app = make_app()
    before = value("cio_rudder_webhooks_total", outcome="accepted")
    post(app.test_client(), sample("opened"))
    assert value("cio_rudder_webhooks_total", outcome="accepted") == before
    assert not list(signals.webhook_answered.receivers_for(app))


@pytest.mark.slow
def test_under_gunicorn_the_counters_of_every_worker_add_up(tmp_path: Path) -> None:
    """prometheus_client's multiprocess mode: whichever worker answers the scrape reports them all."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "tests.metrics_app:create_app()",
        ],
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/metrics"), timeout=30, what="gunicorn serves /metrics")
        workers = set()
        posted = 0
        while len(workers) < 2 or posted < 20:  # until both workers have answered some
            assert posted < 500, "one worker answered every request"
            body = sample("opened") | {"event_id": f"01GUNICORN{posted}"}
            response = requests.post(
                f"{url}/webhooks/customerio",
                data=encode(body),
                headers=signature_headers(encode(body), metrics_app.SIGNING_KEY),
                timeout=10,
            )
            assert response.json()["status"] == "accepted"
            workers.add(response.headers["X-Worker"])
            posted += 1
        scraped = requests.get(f"{url}/metrics", timeout=10).text
        samples = dict(
            line.rsplit(" ", 1) for line in scraped.splitlines() if line and not line.startswith("#")
        )
        assert float(samples['cio_rudder_webhooks_total{outcome="accepted"}']) == posted
        assert float(samples['cio_rudder_events_total{event="Email Opened"}']) == posted
    finally:
        server.terminate()
        server.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_an_unexpected_failure_to_read_the_outbox_still_serves_the_counters(
    metered: Flask, post: Post, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_cio_rudder.metrics import metrics_response

    post(metered.test_client(), sample("opened"))

    def unreadable() -> None:
        raise OSError(5, "Input/output error")  # a spool file on a failing disk, say

    monkeypatch.setattr(get_outbox(metered), "status", unreadable)
    with metered.app_context():
        response = metrics_response()
    text = response.get_data(as_text=True)
    assert response.status_code == 200 and "cio_rudder_webhooks_total{" in text
    assert f'cio_rudder_outbox_up{{app="{metered.name}"}} 0.0' in text
    assert "Input/output error" in caplog.text
