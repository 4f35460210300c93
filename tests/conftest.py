"""Shared fixtures: a fresh app per test, signed posting, sample bodies, a fake data plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_cio_rudder import CioRudder
from flask_cio_rudder.samples import EMAIL_METRICS, email_sample
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers

SIGNING_KEY = "test-signing-key"
WEBHOOK = "/webhooks/customerio"
EMAIL_EVENTS = list(EMAIL_METRICS)
CONFORMANCE = (
    Path(__file__).parent / "data" / "upstream_cases.json"
)  # RudderStack's own cases; see data/README.md


def sample(metric: str) -> dict[str, Any]:
    """A fresh copy of the sample body of one of the six email events."""
    return email_sample(metric)


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Build an app with the extension; keyword arguments are config overrides."""
    built: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = Flask(__name__)
        app.config.update(
            TESTING=True,
            CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
            CIO_RUDDER_FORWARDER="none",
        )
        app.config.update(config)
        CioRudder(app)
        built.append(app)
        return app

    yield make
    for app in built:
        app.extensions["cio_rudder"].forwarder.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def post() -> Callable[..., TestResponse]:
    """Post a body to the webhook, signed as Customer.io would (``key=None`` leaves it unsigned)."""

    def post(
        client: FlaskClient, body: Any, key: str | None = SIGNING_KEY, headers: dict[str, str] | None = None
    ) -> TestResponse:
        raw = body if isinstance(body, bytes) else encode(body)
        sent = signature_headers(raw, key) if key is not None else {"Content-Type": "application/json"}
        sent.update(headers or {})
        return client.post(WEBHOOK, data=raw, headers=sent)

    return post


@pytest.fixture
def data_plane() -> Iterator[FakeDataPlane]:
    with FakeDataPlane() as plane:
        yield plane
