"""The helpers host apps use in their own tests."""

from __future__ import annotations

import gzip
import json
from typing import Callable

import pytest
import requests
from flask import Flask

from flask_cio_rudder.signature import verify
from flask_cio_rudder.testing import FakeDataPlane, encode, record_events, signature_headers

from .conftest import SIGNING_KEY, WEBHOOK, sample

EVENT = {"type": "track", "event": "Email Opened", "userId": "42"}


def test_signature_headers_sign_bytes_str_and_mappings_alike() -> None:
    body = sample("opened")
    for form in (body, encode(body), encode(body).decode()):
        headers = signature_headers(form, SIGNING_KEY, timestamp=1700000000)
        assert headers["X-CIO-Timestamp"] == "1700000000"
        verify(encode(body), headers["X-CIO-Timestamp"], headers["X-CIO-Signature"], [SIGNING_KEY])


def test_signature_headers_take_the_configured_signing_key_even_a_rotation_list(
    make_app: Callable[..., Flask],
) -> None:
    """As the README's test passes it: ``app.config["CIO_RUDDER_SIGNING_KEY"]``, whatever its form."""
    app = make_app(CIO_RUDDER_SIGNING_KEY=["new-key", SIGNING_KEY])
    body = encode(sample("opened"))
    headers = signature_headers(body, app.config["CIO_RUDDER_SIGNING_KEY"])
    verify(
        body, headers["X-CIO-Timestamp"], headers["X-CIO-Signature"], ["new-key"]
    )  # the first: the new one
    assert app.test_client().post(WEBHOOK, data=body, headers=headers).json["status"] == "accepted"


def test_record_events_collects_only_this_apps_events(make_app: Callable[..., Flask]) -> None:
    app, other = make_app(), make_app()
    raw = encode(sample("bounced"))
    with record_events(app) as events:
        other.test_client().post(WEBHOOK, data=raw, headers=signature_headers(raw, SIGNING_KEY))
        assert events == []
        app.test_client().post(WEBHOOK, data=raw, headers=signature_headers(raw, SIGNING_KEY))
    assert [event.name for event in events] == ["Email Bounced"]
    app.test_client().post(
        WEBHOOK, data=encode(sample("opened")), headers=signature_headers(sample("opened"), SIGNING_KEY)
    )
    assert len(events) == 1  # the recorder is disconnected after the block


def post_batch(
    plane: FakeDataPlane, batch: list[object], key: str | None = None, timeout: float = 5
) -> requests.Response:
    return requests.post(
        f"{plane.url}/v1/batch",
        data=gzip.compress(json.dumps({"batch": batch}).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        auth=(key or plane.write_key, ""),
        timeout=timeout,
    )


def test_fake_data_plane_stores_batches_like_rudderstack(data_plane: FakeDataPlane) -> None:
    numeric_id = {"type": "track", "userId": 0}  # the gateway reads any non-blank value as an id
    assert post_batch(data_plane, [EVENT, numeric_id]).status_code == 200
    assert data_plane.events == [EVENT, numeric_id]


@pytest.mark.parametrize(
    ("batch", "key", "status"),
    [
        ([EVENT], "wrong-key", 401),
        ([], None, 400),
        ([EVENT, {"type": "track", "event": "x"}], None, 400),
        ([EVENT, {"type": "track", "userId": ""}], None, 400),
        ([EVENT, {"type": "track", "userId": None, "anonymousId": "  "}], None, 400),
    ],
    ids=["wrong-key", "empty", "no-identity", "blank-identity", "null-and-whitespace-identity"],
)
def test_fake_data_plane_refuses_what_the_gateway_refuses(
    data_plane: FakeDataPlane, batch: list[object], key: str | None, status: int
) -> None:
    assert post_batch(data_plane, batch, key).status_code == status
    assert data_plane.events == []


def test_fake_data_plane_refuses_requests_over_4000_kb(data_plane: FakeDataPlane) -> None:
    big = [dict(EVENT, properties={"content": "x" * 30_000}) for _ in range(140)]
    assert post_batch(data_plane, big).status_code == 413


def test_fake_data_plane_misbehaves_on_request(data_plane: FakeDataPlane) -> None:
    data_plane.fail_next(500, times=2)
    data_plane.reset_next()
    data_plane.hang_next(60)  # answered (and its batch stored) only when the plane stops
    assert post_batch(data_plane, [EVENT]).status_code == 500
    assert post_batch(data_plane, [EVENT]).status_code == 500
    with pytest.raises(requests.ConnectionError):
        post_batch(data_plane, [EVENT])
    with pytest.raises(requests.Timeout):
        post_batch(data_plane, [EVENT], timeout=0.2)
    assert post_batch(data_plane, [EVENT]).status_code == 200
    assert data_plane.events == [EVENT]
