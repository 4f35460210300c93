"""The outbox forwarder, its sender and its operators' commands, on each store backend.

Accepted means kept, duplicates collapse, the sender follows RudderStack's answers, and
``flask cio-rudder ...`` says what it did. The store itself is covered by the contract
suite (``test_store_contract.py``); here it is only reached through its public API.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, suppress
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

import click
import pytest
from click.testing import CliRunner
from flask import Flask
from flask.cli import FlaskGroup, run_command
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from flask_cio_rudder import ForwardError, Outbox, get_outbox, signals, transform
from flask_cio_rudder.sender import Sender
from flask_cio_rudder.spool import decode_records, encode_record, spool_for
from flask_cio_rudder.store import Pending, StoreUnavailable, store_from_url
from flask_cio_rudder.testing import FakeDataPlane

from .conftest import EMAIL_EVENTS, sample
from .helpers import (
    Clock,
    free_port,
    in_function,
    odd_data_plane,
    record_signals,
    refuse,
    send_answer,
    wait_until,
)
from .stores import Backend, backend_fixture, postgres_fixture  # noqa: F401  (fixtures)

Post = Callable[..., TestResponse]


def payload(event_id: str, **changes: Any) -> dict[str, Any]:
    body = sample("opened") | {"event_id": event_id}
    return transform(body) | changes


def stored(event_id: str, **changes: Any) -> str:
    """The RudderStack event of a sample, as the JSON text the outbox keeps."""
    return json.dumps(payload(event_id, **changes))


@pytest.fixture
def outbox_config(backend: Backend, data_plane: FakeDataPlane) -> dict[str, Any]:
    return {
        "CIO_RUDDER_FORWARDER": "outbox",
        **backend.app_config(),
        "CIO_RUDDER_OUTBOX_SENDER": False,  # the tests drive the sender with flush()
        "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
        "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
        # A loaded CI machine can take over a second to answer a batch: a shorter read timeout would
        # resend a batch the plane stored, as it must, and the tests counting deliveries would see it twice.
        "CIO_RUDDER_TIMEOUT": (1.0, 10.0),
    }


@pytest.fixture
def outbox_app(make_app: Callable[..., Flask], outbox_config: dict[str, Any]) -> Flask:
    return make_app(**outbox_config)


def accept(app: Flask, count: int, **changes: Any) -> list[str]:
    """Put ``count`` events straight into the app's outbox; returns their ids."""
    ids = [f"01EVENT{n:06d}" for n in range(count)]
    get_outbox(app).store.add_many(Pending(event_id, stored(event_id, **changes)) for event_id in ids)
    return ids


@pytest.fixture
def outcomes(outbox_app: Flask) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    with record_signals(outbox_app, signals.event_forwarded, signals.forward_failed) as recorded:
        yield recorded


# -- the webhook with the outbox ------------------------------------------------------------------


def spooled_ids(app: Flask) -> set[str]:
    """The event ids in the app's spool files, read from disk as a process adopting them would."""
    spool = get_outbox(app).spool
    assert spool is not None
    ids = set()
    for name in os.listdir(spool.directory):
        records, _ = decode_records(Path(spool.directory, name).read_bytes())
        ids.update(record.event_id for record in records)
    return ids


def test_an_accepted_event_is_in_the_outbox_before_the_answer(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane, backend: Backend
) -> None:
    body = sample("bounced")
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    if backend.name == "sqlite":
        # On disk in this process's spool, or already moved from there (the spool is looked at
        # first: it is emptied only after the move's commit). Either survives a SIGKILL.
        assert body["event_id"] in spooled_ids(outbox_app) or backend.store().is_known(body["event_id"])
    else:
        assert backend.store().is_known(body["event_id"])  # another connection sees it: it is committed


def test_a_replayed_event_is_a_duplicate_even_after_a_restart(
    outbox_app: Flask, make_app: Callable[..., Flask], outbox_config: dict[str, Any], post: Post
) -> None:
    body = sample("clicked")
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    get_outbox(outbox_app).close()  # the first process ends (its spool moved into the store)
    restarted = make_app(**outbox_config)
    assert post(restarted.test_client(), body).json["status"] == "duplicate"


def test_a_rejected_body_is_kept_as_a_dead_letter(outbox_app: Flask, post: Post) -> None:
    body = sample("bounced")
    body["data"] = {"delivery_id": "d1"}  # nobody to attribute it to: RudderStack would refuse it
    assert post(outbox_app.test_client(), body).json["status"] == "rejected"
    (letter,) = get_outbox(outbox_app).dead_letters()
    assert (letter.event_id, json.loads(letter.body or "")) == (body["event_id"], body)
    assert "no userId or anonymousId" in letter.reason
    assert letter.reason.startswith("no userId or anonymousId")


def test_an_outbox_that_cannot_be_written_answers_503_to_accepted_and_rejected_bodies(
    outbox_app: Flask, post: Post, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **options: Any) -> Any:
        raise StoreUnavailable("the SQLite outbox x cannot be used: disk I/O error")

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    store = get_outbox(outbox_app).store
    monkeypatch.setattr(store, "add", broken)
    if get_outbox(outbox_app).spool is not None:  # SQLite: accepting appends to the spool
        monkeypatch.setattr(get_outbox(outbox_app).spool, "append", disk_full)
    with caplog.at_level(logging.ERROR, "flask_cio_rudder"):
        response = post(outbox_app.test_client(), sample("opened"))
    assert response.status_code == 503
    assert "could not write the outbox" in response.json["error"]
    # Why goes to the app's log; Customer.io's delivery log gets no paths or hosts.
    assert re.search("No space left on device|disk I/O error", caplog.text)
    assert not re.search("No space left on device|disk I/O error", response.json["error"])

    monkeypatch.setattr(store, "is_known", broken)
    with pytest.raises(ForwardError, match="could not read the outbox"):  # the view answers 503 for it
        outbox_app.extensions["cio_rudder"].forwarder.is_duplicate("01E4C4CT6YDC7Y5M7FE1GWWPQB")

    # A body that cannot be accepted is not dropped either: Customer.io sends it again later.
    monkeypatch.setattr(store, "add_rejected", broken)
    with caplog.at_level(logging.ERROR, "flask_cio_rudder"):
        response = post(outbox_app.test_client(), {"event_id": "no identity"})
    assert response.status_code == 503
    assert "could not keep a rejected body as a dead letter" in response.json["error"]
    assert re.search("No space left on device|disk I/O error", caplog.text)
    monkeypatch.undo()
    assert post(outbox_app.test_client(), {"event_id": "no identity"}).json["status"] == "rejected"
    assert [letter.event_id for letter in get_outbox(outbox_app).dead_letters()] == ["no identity"]


def test_the_background_sender_delivers_without_being_asked(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, post: Post
) -> None:
    app = make_app(**{**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True})
    bodies = [sample(metric) for metric in EMAIL_EVENTS]
    for body in bodies:
        post(app.test_client(), body)
    wait_until(lambda: len(data_plane.events) == len(bodies), what="the six events reach the data plane")
    assert sorted(data_plane.events, key=lambda e: e["messageId"]) == sorted(
        (transform(body) for body in bodies), key=lambda e: e["messageId"]
    )
    wait_until(lambda: get_outbox(app).status().delivered == len(bodies), what="all six are marked delivered")


# -- the sender against a data plane on loopback -----------------------------------------------------


def test_batches_hold_at_most_100_events(
    outbox_app: Flask, data_plane: FakeDataPlane, outcomes: list[tuple[str, dict[str, Any]]]
) -> None:
    accept(outbox_app, 250)
    report = get_outbox(outbox_app).flush()
    assert (report.delivered, report.error, report.complete) == (250, None, True)
    assert [len(batch) for batch in data_plane.batches] == [100, 100, 50]
    assert [len(kwargs["payloads"]) for _, kwargs in outcomes] == [100, 100, 50]
    assert len({event["messageId"] for event in data_plane.events}) == 250
    assert get_outbox(outbox_app).status().delivered == 250


def test_a_batch_handed_over_by_the_mover_is_sent_once_and_never_after_its_lease_ran_out(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path
) -> None:
    """The spool's mover leases what it moves to this process's sender and hands it over (SQLite only)."""
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox_app = make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=url))
    outbox = get_outbox(outbox_app)
    store, sender, week = outbox.store, outbox.sender, 7 * 24 * 3600.0
    handed = store.add_claimed([Pending(f"handed-{n}", stored(f"handed-{n}")) for n in range(3)], 60.0, week)
    assert len(handed.events) == 3 and store.claim(100, 60.0, week).events == []  # held for the sender
    sender.offer(handed)
    assert outbox.flush().delivered == 3
    late = store.add_claimed([Pending(f"late-{n}", stored(f"late-{n}")) for n in range(2)], -1.0, week)
    with closing(store_from_url(url)) as other:  # the lease ran out: another sender took them
        taken = other.claim(100, 60.0, week)
    assert sorted(event.event_id for event in taken.events) == ["late-0", "late-1"]
    sender.lease = 2.0  # all of it the margin kept for marking: no time left to send the offer
    sender.offer(late)
    assert outbox.flush().delivered == 0  # dropped, not sent a second time
    assert sorted(event["properties"]["eventId"] for event in data_plane.events) == [
        f"handed-{n}" for n in range(3)
    ]


def app_with_a_sender_clock(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Flask, list[float]]:
    """An app on an SQLite outbox whose sender's monotonic clock is ``now[0]``, moved by hand."""
    import flask_cio_rudder.sender as sender_module

    app = make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'o.sqlite3'}"))
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter, time=time.time)
    monkeypatch.setattr(sender_module, "time", clock)
    return app, now


def test_events_only_the_store_holds_are_sent_while_the_mover_keeps_handing_events_over(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adopted from a dead process, accepted while sending failed, requeued: the sender claims them
    from the store at least every STORE_EVERY seconds, not only once traffic pauses."""
    outbox_app, now = app_with_a_sender_clock(make_app, data_plane, tmp_path, monkeypatch)
    outbox = get_outbox(outbox_app)
    store, sender, week = outbox.store, outbox.sender, 7 * 24 * 3600.0

    def hand_over(name: str) -> None:  # what the spool's mover does with each event it moves
        sender.offer(store.add_claimed([Pending(name, stored(name))], 60.0, week))

    hand_over("live-0")
    sender.send_batch()  # the store is asked first: empty yet
    waiting = accept(outbox_app, 3)  # only in the store
    for n in range(1, 6):
        now[0] += 0.3
        hand_over(f"live-{n}")
        sender.send_batch()
    sent = [[event["properties"]["eventId"] for event in batch] for batch in data_plane.batches]
    assert sent[:5] == [["live-0"], ["live-1"], ["live-2"], ["live-3"], waiting]  # 1.2 s on: the store's turn
    outbox.flush()
    assert (store.status().delivered, store.status().pending) == (9, 0)


def test_what_the_mover_handed_over_before_a_pause_is_not_sent_until_the_resume(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause before RudderStack's maintenance: the sender kept posting every batch the spool's mover
    had handed it, as long as it had one, though each claim from the store said paused."""
    outbox_app, now = app_with_a_sender_clock(make_app, data_plane, tmp_path, monkeypatch)
    outbox = get_outbox(outbox_app)
    store, sender, week = outbox.store, outbox.sender, 7 * 24 * 3600.0
    for n in range(3):  # what the spool's mover does with each event it moves
        sender.offer(store.add_claimed([Pending(f"handed-{n}", stored(f"handed-{n}"))], 60.0, week))
    outbox.pause()
    for _ in range(3):
        assert sender.send_batch().paused
        now[0] += 0.4  # the store's turn comes again after STORE_EVERY, offers or not
    assert data_plane.batches == []
    outbox.resume()
    assert outbox.flush().delivered == 3 and len(data_plane.events) == 3


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_failures_keep_the_events_and_retry(
    outbox_app: Flask, data_plane: FakeDataPlane, outcomes: list[tuple[str, dict[str, Any]]], status: int
) -> None:
    accept(outbox_app, 5)
    data_plane.fail_next(status)
    report = get_outbox(outbox_app).flush()
    assert report.delivered == 0 and f"RudderStack answered {status}" in (report.error or "")
    current = get_outbox(outbox_app).status()
    assert current.pending == 5
    assert f"RudderStack answered {status}" in (current.last_error or "")
    assert outcomes[0][0] == "forward-failed"
    assert outcomes[0][1]["retry"] is True
    get_outbox(outbox_app).flush()
    assert len(data_plane.events) == 5


def test_after_a_long_outage_the_sender_tries_again_within_a_minute(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """The backoff doubles from a second; capped at five minutes, a data plane back after an outage
    got nothing for up to five more (a review measured 175 s)."""
    app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": f"http://127.0.0.1:{free_port()}"})
    accept(app, 1)
    for _ in range(12):  # refused twelve times: 2**11 s of backoff, uncapped
        assert "could not reach RudderStack" in (get_outbox(app).flush().error or "")
    sender = get_outbox(app).sender
    assert min(sender.retry_delay() for _ in range(50)) >= 30.0
    assert max(sender.retry_delay() for _ in range(50)) <= 60.0


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("header", "wait"),
    [
        ("30", 30.0),
        ("86400", Sender.RETRY_AFTER_CAP),
        ("Tue, 14 Nov 2023 22:15:20 GMT", 120.0),
        ("soon", None),
        ("²", None),
    ],
)
def test_retry_after_sets_the_wait_before_the_next_attempt_capped_at_five_minutes(
    outbox_app: Flask, data_plane: FakeDataPlane, status: int, header: str, wait: float | None
) -> None:
    sender = get_outbox(outbox_app).sender
    sender.clock = Clock(1_700_000_000.0)  # 2023-11-14 22:13:20 GMT: the date above is 120 s later
    accept(outbox_app, 2)
    data_plane.fail_next(status, retry_after=header)
    report = get_outbox(outbox_app).flush()
    assert report.delivered == 0 and get_outbox(outbox_app).status().pending == 2
    if wait is None:  # unreadable: the usual jittered backoff
        assert "Retry-After" not in (report.error or "")
        assert Sender.RETRY_BASE / 2 <= sender.retry_delay() <= Sender.RETRY_BASE
    else:
        assert "s (Retry-After)" in (report.error or "")
        assert sender.retry_delay() == wait
    assert get_outbox(outbox_app).flush().delivered == 2
    assert sender.retry_delay() <= Sender.RETRY_BASE  # a success forgets what was asked


def test_a_retry_after_of_zero_gets_the_backoff_not_a_busy_loop(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    sender = get_outbox(outbox_app).sender
    accept(outbox_app, 2)
    for failures in (1, 2, 3):  # "at once", on every answer: the wait still grows
        data_plane.fail_next(429, retry_after="0")
        assert get_outbox(outbox_app).flush().delivered == 0
        ceiling = Sender.RETRY_BASE * 2 ** (failures - 1)
        assert ceiling / 2 <= sender.retry_delay() <= ceiling


@pytest.mark.parametrize("flush", ["flush()", "flask cio-rudder flush"])
def test_a_request_rate_cap_spaces_the_requests(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, flush: str
) -> None:
    app = make_app(**outbox_config, CIO_RUDDER_MAX_REQUESTS_PER_SECOND=2, CIO_RUDDER_OUTBOX_BATCH_SIZE=1)
    sender = get_outbox(app).sender
    clock = Clock(0.0)
    sender.pacer.clock = clock
    waits: list[float] = []

    def wait_turn(seconds: float) -> bool:  # the hand-moved clock stands in for waiting
        waits.append(seconds)
        clock.now += seconds
        return True

    sender.wait_turn = wait_turn
    accept(app, 5)
    if flush == "flush()":
        assert get_outbox(app).flush().delivered == 5
    else:  # the command stops the app's own sender first: its flush must keep the cap all the same
        assert "sent 5 events" in app.test_cli_runner().invoke(args=["cio-rudder", "flush"]).output
    assert data_plane.requests == 5
    assert clock.now == 2.0  # five requests at two a second: the last one 2 s after the first
    assert waits == [0.5] * 4


def test_a_flush_gives_back_a_batch_whose_turn_under_the_cap_comes_after_its_timeout(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane
) -> None:
    app = make_app(**outbox_config, CIO_RUDDER_MAX_REQUESTS_PER_SECOND=0.1, CIO_RUDDER_OUTBOX_BATCH_SIZE=1)
    sender = get_outbox(app).sender
    clock = Clock(0.0)
    sender.pacer.clock = clock
    sender.wait_turn = lambda seconds: pytest.fail(f"waited {seconds} s for a turn past the flush's timeout")
    accept(app, 2)
    with record_signals(app, signals.forward_failed) as failures:
        report = get_outbox(app).flush(timeout=5)
    assert report.delivered == 1  # the second's turn is 10 s later: not waited for
    assert "CIO_RUDDER_MAX_REQUESTS_PER_SECOND" in (report.error or "")
    assert report.status is not None and report.status.pending == 1
    assert failures == []  # no request was made: no delivery failed
    clock.now = 10.0  # its turn has come, and nothing else took it meanwhile
    assert get_outbox(app).flush(timeout=5).delivered == 1
    assert data_plane.requests == 2


def test_stopping_cuts_the_wait_for_a_turn_under_the_cap_and_leaves_the_batch_pending(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane
) -> None:
    """A worker told to stop while its next request's turn is 20 s away stops within its timeout."""
    app = make_app(
        **{
            **outbox_config,
            "CIO_RUDDER_OUTBOX_SENDER": True,
            "CIO_RUDDER_MAX_REQUESTS_PER_SECOND": 0.05,
            "CIO_RUDDER_OUTBOX_BATCH_SIZE": 1,
            "CIO_RUDDER_SHUTDOWN_TIMEOUT": 0.5,
        }
    )
    sender = get_outbox(app).sender
    accept(app, 2)
    sender.serve()  # as this process's first request does
    thread = sender._thread
    assert thread is not None
    wait_until(lambda: in_function(thread, "_wait_turn"), what="the second request waits for its turn")
    sender.stop()
    assert not thread.is_alive()  # stop() joined it: it did not sleep out the 20 s
    assert data_plane.requests == 1 and get_outbox(app).status().pending == 1


def test_the_sender_purges_events_delivered_longer_ago_than_kept_and_nothing_else(
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    data_plane: FakeDataPlane,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Delivered events are kept to recognise Customer.io's retries; kept for ever, they filled the
    disk (about a kilobyte each, 2.4 GB an hour at 690 webhooks a second)."""
    app = make_app(**{**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True})
    outbox = get_outbox(app)
    old = accept(app, 3)
    claim = outbox.store.claim(100, 60.0, 3600.0)  # delivered by another process, say
    outbox.store.mark_delivered(claim.owner, old)
    month = 31 * 24 * 3600.0
    outbox.store.clock = lambda: time.time() + month  # a month on: the first three are past 30 days
    outbox.store.add_many(Pending(f"01LATER{n:06d}", stored(f"01LATER{n:06d}")) for n in range(2))
    outbox.store.add_rejected("01REJECTED", b"{}", "rejected at validation")
    caplog.set_level(logging.INFO, logger="flask_cio_rudder")
    outbox.sender.serve()
    wait_until(lambda: outbox.status().pending == 0, 10, "the two later events are delivered")
    status = outbox.status()
    assert (status.delivered, status.dead) == (2, 1)  # the three delivered a month ago are gone
    assert all(outbox.find(event_id) == [] for event_id in old)
    assert "Purged 3 events delivered more than 30 days ago" in caplog.text


def test_events_past_the_maximum_age_become_dead_letters_with_a_warning(
    outbox_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    """A long outage, or a pause, turns the oldest events into dead letters: 8,916 at once went by
    with no log line, where an operator looks first."""
    outbox = get_outbox(outbox_app)
    accept(outbox_app, 2)
    outbox.store.clock = lambda: time.time() + 8 * 24 * 3600  # a week and a day on
    with caplog.at_level(logging.WARNING, logger="flask_cio_rudder"):
        outbox.flush()
    assert outbox.status().dead == 2
    assert "2 Customer.io events not delivered within CIO_RUDDER_OUTBOX_MAX_AGE (604800 s)" in caplog.text
    assert "requeue what should still go" in caplog.text


def test_a_flush_purges_old_delivered_events_where_no_thread_sends(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """CIO_RUDDER_OUTBOX_SENDER = False and `flask cio-rudder flush` from cron: no sender thread runs
    to purge, and the disk filled all the same."""
    delivering = make_app(**outbox_config)
    accept(delivering, 3)
    assert get_outbox(delivering).flush().delivered == 3
    a_month_later = make_app(**outbox_config)  # the next cron run: a process of its own
    outbox = get_outbox(a_month_later)
    outbox.store.clock = lambda: time.time() + 31 * 24 * 3600
    report = outbox.flush()
    assert report.status is not None and (report.status.delivered, report.status.pending) == (0, 0)


@pytest.mark.parametrize("kept", [None, 7 * 24 * 3600, 90 * 24 * 3600.0])
def test_delivered_events_are_kept_for_ever_or_at_least_a_week(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], kept: float | None
) -> None:
    app = make_app(**outbox_config, CIO_RUDDER_OUTBOX_KEEP_DELIVERED=kept)
    assert get_outbox(app).sender.keep_delivered == kept


@pytest.mark.parametrize("kept", [3600, 6 * 24 * 3600, 0, -1, "30d", float("inf")])
def test_keeping_delivered_events_less_than_customerios_retries_fails_at_init_naming_the_key(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], kept: object
) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_OUTBOX_KEEP_DELIVERED must be"):
        make_app(**outbox_config, CIO_RUDDER_OUTBOX_KEEP_DELIVERED=kept)


def test_an_unknown_durability_fails_at_init_naming_the_key_whatever_the_store(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_OUTBOX_DURABILITY must be one of"):
        make_app(**outbox_config, CIO_RUDDER_OUTBOX_DURABILITY="paranoid")


@pytest.mark.parametrize("rate", [0, -1, "fast", True])
def test_a_bad_request_rate_cap_fails_at_init_naming_the_key(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], rate: Any
) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_MAX_REQUESTS_PER_SECOND"):
        make_app(**outbox_config, CIO_RUDDER_MAX_REQUESTS_PER_SECOND=rate)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("CIO_RUDDER_OUTBOX_BATCH_SIZE", True, "CIO_RUDDER_OUTBOX_BATCH_SIZE must be a whole number"),
        ("CIO_RUDDER_OUTBOX_BATCH_SIZE", 101, "CIO_RUDDER_OUTBOX_BATCH_SIZE must be a whole number"),
        ("CIO_RUDDER_OUTBOX_PATH", 5, "CIO_RUDDER_OUTBOX_PATH must be a file path"),
        (
            "CIO_RUDDER_WRITE_KEY",
            123456,
            "CIO_RUDDER_WRITE_KEY must be text.* a key of digits becomes a number",
        ),
        # An unset variable: not the default SQLite file on a container's disk that goes with it.
        ("CIO_RUDDER_OUTBOX_URL", "", "CIO_RUDDER_OUTBOX_URL is empty"),
        ("CIO_RUDDER_OUTBOX_URL", None, "CIO_RUDDER_OUTBOX_URL is empty"),
    ],
)
def test_a_setting_of_the_wrong_kind_fails_at_init_saying_what_it_must_be(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, key: str, value: Any, message: str
) -> None:
    """Not read as batch size 1, a file named "5" in the current folder, or a write key that "is not set"."""
    config = base_config(data_plane) | {key: value}
    with pytest.raises(RuntimeError, match=message) as raised:
        make_app(**config)
    assert "123456" not in str(raised.value)  # a write key is a secret, even a wrong one


@pytest.mark.parametrize("pasted", ["2bXyWriteKey\u200bSECRET", "2bXyWriteKeySECRET\n", "2bXyWriteKéySECRET"])
def test_a_write_key_pasted_with_a_stray_character_fails_at_init_naming_the_key_not_quoting_it(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, pasted: str
) -> None:
    """Not a UnicodeEncodeError from requests on each post, which held the whole key."""
    message = "CIO_RUDDER_WRITE_KEY (starts or ends with a space|holds a character that is not ASCII)"
    with pytest.raises(RuntimeError, match=message) as raised:
        make_app(**base_config(data_plane) | {"CIO_RUDDER_WRITE_KEY": pasted})
    assert "SECRET" not in str(raised.value) and raised.value.__cause__ is None


def test_a_paused_outbox_keeps_accepting_and_sends_once_resumed(
    outbox_app: Flask,
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    post: Post,
    data_plane: FakeDataPlane,
) -> None:
    worker = make_app(**outbox_config)  # another process using the same outbox
    get_outbox(outbox_app).pause()
    assert post(outbox_app.test_client(), sample("bounced")).json["status"] == "accepted"
    # Another process sees it once the accepting process's spool thread moved it (on SQLite, ~0.1 s).
    wait_until(lambda: get_outbox(worker).status().pending == 1, what="the event is in the shared outbox")
    report = get_outbox(worker).flush()
    assert (report.delivered, data_plane.requests) == (0, 0)
    assert report.status is not None and report.status.paused and not report.complete
    assert report.explain() == ["1 not sent: sending is paused; `flask cio-rudder resume` starts it again"]
    get_outbox(outbox_app).resume()
    assert get_outbox(worker).flush().delivered == 1
    assert [event["event"] for event in data_plane.events] == ["Email Bounced"]


@pytest.mark.parametrize("misbehave", ["hang", "reset"])
def test_timeouts_and_reset_connections_keep_the_events(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, misbehave: str
) -> None:
    app = make_app(**{**outbox_config, "CIO_RUDDER_TIMEOUT": (1.0, 1.0)})
    accept(app, 3)
    if misbehave == "hang":
        data_plane.hang_next(60)  # answered (and its batch stored) only when the plane stops
    else:
        data_plane.reset_next()
    get_outbox(app).flush()
    assert "could not reach RudderStack" in (get_outbox(app).status().last_error or "")
    assert get_outbox(app).status().pending == 3
    patient = make_app(**outbox_config)  # the fixture's 10 s read timeout: a slow answer is not cut
    get_outbox(patient).flush()
    assert len(data_plane.events) == 3


def test_a_data_plane_that_is_down_keeps_the_events(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane
) -> None:
    app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": f"http://127.0.0.1:{free_port()}"})
    accept(app, 4)
    assert "could not reach RudderStack" in (get_outbox(app).flush().error or "")
    assert get_outbox(app).status().pending == 4
    back = make_app(**outbox_config)
    get_outbox(back).flush()
    assert len(data_plane.events) == 4


def test_a_batch_too_large_is_split_until_it_fits(outbox_app: Flask, data_plane: FakeDataPlane) -> None:
    accept(outbox_app, 8)
    event_size = len(str(payload("01EVENT000000")))
    data_plane.MAX_REQUEST_BYTES = event_size * 3  # two or three events fit, eight do not
    get_outbox(outbox_app).flush()
    assert len(data_plane.events) == 8
    assert max(len(batch) for batch in data_plane.batches) <= 3


def test_one_bad_event_in_a_batch_becomes_a_dead_letter_and_the_rest_are_sent(
    outbox_app: Flask, data_plane: FakeDataPlane, outcomes: list[tuple[str, dict[str, Any]]]
) -> None:
    ids = accept(outbox_app, 9)
    bad = payload("01BAD")
    del bad["userId"]  # RudderStack's gateway refuses the whole batch for this one event
    get_outbox(outbox_app).store.add("01BAD", json.dumps(bad))
    report = get_outbox(outbox_app).flush()
    assert (report.delivered, report.dead) == (9, 1)
    assert sorted(event["properties"]["eventId"] for event in data_plane.events) == ids
    (letter,) = get_outbox(outbox_app).dead_letters()
    assert letter.event_id == "01BAD"
    assert "RudderStack answered 400" in letter.reason
    assert [kwargs["retry"] for name, kwargs in outcomes if name == "forward-failed"] == [False]


def test_splitting_a_refused_batch_stops_where_the_claims_lease_ends(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    """Past its lease another sender may claim the batch: the halves must not be posted after it."""
    bad = payload("01BAD")
    del bad["userId"]
    get_outbox(outbox_app).store.add("01BAD", json.dumps(bad))  # first of the batch: the first half
    accept(outbox_app, 3)
    sender = get_outbox(outbox_app).sender
    sender.lease = 3.0  # one second for requests, once the margin kept for marking the batch is taken
    data_plane.hang_next(0.6, times=2)  # the whole batch is refused after 0.6 s, then the half with "bad"
    report = sender.send_batch()
    assert (report.claimed, report.delivered, report.dead) == (4, 0, 0)
    assert report.error is not None and data_plane.events == []
    assert get_outbox(outbox_app).status().pending == 4  # given back, for the next claim


def test_a_post_that_outlives_closing_keeps_its_batch_until_it_ends(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, post: Post
) -> None:
    """A worker recycled while RudderStack is slow: the batch it is posting stays its own, not sent twice."""
    config = {**outbox_config, "CIO_RUDDER_TIMEOUT": (1.0, 10.0)}
    app = make_app(**{**config, "CIO_RUDDER_OUTBOX_SENDER": True, "CIO_RUDDER_SHUTDOWN_TIMEOUT": 0.2})
    other = make_app(**config)  # another server on the same outbox
    data_plane.hang_next(3.0)  # longer than closing waits (the shutdown timeout + 1 s)
    post(app.test_client(), sample("opened"))
    wait_until(lambda: data_plane.requests == 1, what="the sender's post starts")
    get_outbox(app).close()
    assert get_outbox(other).flush(timeout=1).delivered == 0  # still leased to the post in flight
    wait_until(lambda: get_outbox(other).status().delivered == 1, what="the slow post ends and is marked")
    assert len(data_plane.events) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirecting_data_plane_keeps_the_events_and_names_the_setting(
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """Followed, a 301 or 302 becomes a GET without the batch, and the 200 of the page it leads to
    (a login, a landing page) would count as delivered: the events would be lost."""
    posted: list[str] = []

    def answer(request: BaseHTTPRequestHandler) -> None:
        posted.append(f"{request.command} {request.path}")
        if request.path == "/v1/batch":
            request.send_response(status)
            request.send_header("Location", "/welcome")
        else:
            request.send_response(200)
        request.send_header("Content-Length", "0")
        request.end_headers()

    with odd_data_plane(answer) as url:
        app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": url})
        accept(app, 3)
        with caplog.at_level(logging.WARNING, "flask_cio_rudder"):
            assert get_outbox(app).flush().delivered == 0
    assert posted == ["POST /v1/batch"]
    outbox_status = get_outbox(app).status()
    assert (outbox_status.pending, outbox_status.delivered) == (3, 0)
    assert outbox_status.last_error is not None
    assert f"RudderStack answered {status}: a redirect to /welcome" in outbox_status.last_error
    assert (
        "set CIO_RUDDER_DATA_PLANE_URL to the address it leads to, without /v1/batch"
        in outbox_status.last_error
    )
    assert [record.levelno for record in caplog.records].count(logging.ERROR) == 1


@pytest.mark.parametrize(
    ("content_type", "page"),
    [
        ("text/html; charset=utf-8", b"<!doctype html><title>Welcome</title>"),
        (None, b"\n  <HTML><body>This domain is for sale</body></HTML>"),
        ("text/plain", b"<html><body>Log in to continue</body></html>"),
        ("text/html", b"\xef\xbb\xbf<!DOCTYPE html><title>Parked</title>"),  # a byte order mark first
        (None, b"\xef\xbb\xbf<html></html>"),
        ("text/html", b"\r\n  \t" * 1500 + b"<!DOCTYPE html><title>Welcome</title>"),  # past what is read
    ],
    ids=[
        "as text/html",
        "with no type",
        "as text/plain",
        "BOM, as text/html",
        "BOM, no type",
        "7 KB blank first",
    ],
)
def test_a_web_page_answered_with_200_keeps_the_events_and_names_the_setting(
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    content_type: str | None,
    page: bytes,
) -> None:
    """A website, a parked domain or a proxy's login page at the data plane's URL may answer any
    POST with 200 and a page: taken for a delivery, the events would be lost."""

    with odd_data_plane(lambda request: send_answer(request, 200, page, content_type)) as url:
        app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": url})
        accept(app, 3)
        with caplog.at_level(logging.WARNING, "flask_cio_rudder"):
            assert get_outbox(app).flush().delivered == 0
    outbox_status = get_outbox(app).status()
    assert (outbox_status.pending, outbox_status.delivered) == (3, 0)
    assert outbox_status.last_error is not None
    assert "RudderStack answered 200: a web page" in outbox_status.last_error
    assert "check CIO_RUDDER_DATA_PLANE_URL" in outbox_status.last_error
    assert [record.levelno for record in caplog.records].count(logging.ERROR) == 1


def test_a_stand_in_data_plane_that_answers_ok_as_html_is_delivered_to(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """A data plane stubbed in Flask (``return "OK"``) answers ``text/html``: it is no web page."""
    stub = Flask("stub")
    stub.post("/v1/batch")(lambda: "OK")
    ok = stub.test_client().post("/v1/batch")

    with odd_data_plane(
        lambda request: send_answer(request, ok.status_code, ok.data, ok.content_type)
    ) as url:
        app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": url})
        accept(app, 2)
        assert get_outbox(app).flush().delivered == 2


def test_a_cookie_the_data_plane_sets_comes_back_with_the_next_batch(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """A load balancer in front of the data plane that pins its clients with a cookie (sticky
    sessions) gets it back, as from any HTTP client."""
    cookies: list[str | None] = []

    def answer(request: BaseHTTPRequestHandler) -> None:
        cookies.append(request.headers.get("Cookie"))
        send_answer(request, 200, b"OK", headers={"Set-Cookie": "AWSALB=pinned; Path=/"})

    with odd_data_plane(answer) as url:
        config = {**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": url, "CIO_RUDDER_OUTBOX_BATCH_SIZE": 1}
        app = make_app(**config)
        accept(app, 2)
        assert get_outbox(app).flush().delivered == 2
    assert cookies == [None, "AWSALB=pinned"]


def test_an_endless_answer_is_read_no_further_than_its_start(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """A proxy that streams a page without end must not fill the sender's memory: read in full, the
    answer would never end (each read comes within the timeout)."""
    total = 256 * 1024 * 1024
    written = [0]

    def answer(request: BaseHTTPRequestHandler) -> None:
        request.send_response(502)
        request.send_header("Content-Length", str(total))
        request.end_headers()
        chunk = b"<p>Bad gateway</p>" * 3600
        with suppress(OSError):  # the client hangs up
            while written[0] < total:
                request.wfile.write(chunk)
                written[0] += len(chunk)

    with odd_data_plane(answer) as url:
        app = make_app(**{**outbox_config, "CIO_RUDDER_DATA_PLANE_URL": url})
        accept(app, 1)
        assert get_outbox(app).flush().delivered == 0
    last_error = get_outbox(app).status().last_error
    assert last_error is not None and last_error.startswith("RudderStack answered 502: <p>Bad gateway</p>")
    assert written[0] < total // 8  # what the kernel's buffers took before the sender hung up


@pytest.mark.parametrize(
    ("path", "setting"), [("", "CIO_RUDDER_WRITE_KEY"), ("/wrong", "CIO_RUDDER_DATA_PLANE_URL")]
)
def test_a_configuration_error_keeps_everything_and_logs_one_error_naming_the_setting(
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    data_plane: FakeDataPlane,
    caplog: pytest.LogCaptureFixture,
    path: str,
    setting: str,
) -> None:
    app = make_app(
        **{
            **outbox_config,
            "CIO_RUDDER_WRITE_KEY": "wrong-key"
            if setting == "CIO_RUDDER_WRITE_KEY"
            else data_plane.write_key,
            "CIO_RUDDER_DATA_PLANE_URL": data_plane.url + path,
        }
    )
    accept(app, 3)
    with caplog.at_level(logging.WARNING, "flask_cio_rudder"):
        for _ in range(3):
            get_outbox(app).flush()
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert setting in errors[0].getMessage()
    assert "wrong-key" not in caplog.text
    assert get_outbox(app).status().pending == 3
    assert data_plane.events == []


def test_under_random_failures_every_event_is_delivered_or_dead_and_none_twice(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    ids = accept(outbox_app, 300)
    for status in (500, 429, 503):
        data_plane.fail_next(status, times=2)
    data_plane.reset_next(2)
    outbox = get_outbox(outbox_app)
    for _ in range(50):
        if outbox.flush().complete:
            break
    counts = Counter(event["messageId"] for event in data_plane.events)
    assert len(counts) == len(ids)
    assert set(counts.values()) == {1}
    assert outbox.status().delivered == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_after_a_fork_the_sender_uses_the_settings_read_at_start_not_app_config(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    accept(outbox_app, 3)
    outbox_app.config["CIO_RUDDER_DATA_PLANE_URL"] = "http://changed.invalid"  # read once, at init_app
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if get_outbox(outbox_app).flush(10).delivered == 3 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(data_plane.events) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_an_outbox_closed_before_a_fork_stays_closed_in_the_child(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any]
) -> None:
    """A test suite's closed apps, or one closed before ``multiprocessing`` forks, start no thread again."""
    app = make_app(**outbox_config | {"CIO_RUDDER_OUTBOX_SENDER": True})
    outbox = get_outbox(app)
    assert outbox.sender._thread is not None
    outbox.close()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            outbox.sender.ensure_running()  # as a request in the child would
            if outbox.spool is not None:
                outbox.spool.ensure_running()
            names = [thread.name for thread in threading.enumerate()]
            code = 2 if any(name.startswith("cio-rudder") for name in names) else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- configuration ----------------------------------------------------------------------------------


def base_config(data_plane: FakeDataPlane, **config: Any) -> dict[str, Any]:
    return {
        "CIO_RUDDER_FORWARDER": "outbox",
        "CIO_RUDDER_OUTBOX_SENDER": False,
        "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
        "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
        **config,
    }


def test_a_relative_sqlite_url_is_in_the_instance_folder_and_four_slashes_are_absolute(
    tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    from flask_cio_rudder import CioRudder

    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(base_config(data_plane, CIO_RUDDER_SIGNING_KEY="k"))
    CioRudder(app)
    try:
        assert get_outbox(app).path == str(tmp_path / "instance" / "cio_rudder_outbox.sqlite3")
    finally:
        app.extensions["cio_rudder"].forwarder.close()
    absolute = tmp_path / "elsewhere" / "box.sqlite3"
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        base_config(data_plane, CIO_RUDDER_SIGNING_KEY="k", CIO_RUDDER_OUTBOX_URL=f"sqlite:///{absolute}")
    )
    CioRudder(app)
    try:
        assert get_outbox(app).path == str(absolute) and absolute.exists()
        assert get_outbox(app).url == f"sqlite:///{absolute}"
    finally:
        app.extensions["cio_rudder"].forwarder.close()


def test_the_old_path_setting_still_works_with_a_deprecation_warning(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    with pytest.warns(DeprecationWarning, match="CIO_RUDDER_OUTBOX_URL"):
        app = make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "old.sqlite3")))
    assert get_outbox(app).path == str(tmp_path / "old.sqlite3")
    with pytest.warns(DeprecationWarning):  # an unset variable beside it: the path still names the file
        unset = base_config(data_plane, CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "old.sqlite3"))
        app = make_app(**unset | {"CIO_RUDDER_OUTBOX_URL": None})
    assert get_outbox(app).path == str(tmp_path / "old.sqlite3")
    with pytest.raises(RuntimeError, match="keep CIO_RUDDER_OUTBOX_URL only") as raised:
        make_app(
            **base_config(
                data_plane,
                CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "old.sqlite3"),
                CIO_RUDDER_OUTBOX_URL="postgresql://app:pw@in/url?x@db/app",  # the URL is not quoted
            )
        )
    assert "in/url" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://cache:pw-in-url@host/0", "unknown scheme 'redis'"),
        ("redis://cache:pw/in/url@host/0", "unknown scheme 'redis'"),  # a / its owner did not encode
        ("redis://cache:pw@in@url@host/0", "unknown scheme 'redis'"),
        ("redis://cache:pw?in@url@host/0", "unknown scheme 'redis'"),
        ("outbox.sqlite3", "must be a URL"),
        ("host=db user=app password=pw-in-url dbname=app", "must be a URL"),  # libpq's key=value form
        ("host=db password='pw-in-url and more' dbname=app", "must be a URL"),
        ("sqlite://host/outbox.sqlite3", "not an SQLite file URL"),
        ("sqlite://app:pw/in/url@host/outbox.sqlite3", "not an SQLite file URL"),
        # Text that is no URL is not quoted at all: where a password is in it cannot be told.
        ("postgresql:/app:kX9/pw-in-url@db/app", "must be a URL"),  # a mistyped ://
        ("app:pw/in/url@db/app", "must be a URL"),
        ('{"username": "app", "password": "pw-in-url", "host": "db"}', "must be a URL"),  # a pasted secret
        ("Host=db;Username=app;Password=pw-in-url;Ssl Mode=Require", "must be a URL"),  # Npgsql's form
        ("app:pw-in-url@db://app", "no scheme before its ://"),
        ('"postgresql://app:pw-in-url@db/app"', "a quote, a space or a prefix such as jdbc:"),
        (b"postgresql://app:pw-in-url@db/app", "must be a URL \\(a str\\).*not a bytes"),
        ("postgresql+asyncpg://app:pw@in/url?x@db/app", "unknown scheme 'postgresql\\+asyncpg'"),
    ],
)
def test_a_bad_outbox_url_fails_at_init_naming_the_key_without_the_password(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, url: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message) as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=url))
    assert "CIO_RUDDER_OUTBOX_URL" in str(raised.value)
    secrets = ("pw-in-url", "pw/in/url", "in@url", "pw?in", "in/url")
    assert not any(secret in str(raised.value) for secret in secrets)


@pytest.mark.parametrize(
    "table", ["order", "Group", "sqlite_events", "1st", "a-b", "cast", "raise", "sqlite"]
)
def test_a_table_name_sqlite_cannot_take_fails_at_init_naming_the_setting(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path, table: str
) -> None:
    """Not "near 'order': syntax error. Check CIO_RUDDER_OUTBOX_URL", which blamed the file."""
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    with pytest.raises(RuntimeError, match=r"^CIO_RUDDER_OUTBOX_TABLE") as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=url, CIO_RUDDER_OUTBOX_TABLE=table))
    assert "CIO_RUDDER_OUTBOX_URL" not in str(raised.value)


def test_an_sqlite_outbox_that_cannot_be_made_fails_at_init_naming_the_key(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path
) -> None:
    taken = tmp_path / "a-folder.sqlite3"
    taken.mkdir()
    with pytest.raises(RuntimeError, match=r"a-folder\.sqlite3 cannot be used") as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=f"sqlite:///{taken}"))
    assert "Check CIO_RUDDER_OUTBOX_URL" in str(raised.value)


_EXIT_FLUSH_APP = """
import sys, tempfile
from flask import Flask, current_app
from flask_cio_rudder import CioRudder, signals
from flask_cio_rudder.samples import email_sample
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers

plane = FakeDataPlane().start()
app = Flask("exiting")
app.config.update(
    CIO_RUDDER_SIGNING_KEY="k", CIO_RUDDER_WRITE_KEY=plane.write_key, CIO_RUDDER_DATA_PLANE_URL=plane.url,
    CIO_RUDDER_OUTBOX_URL=f"sqlite:///{sys.argv[1]}",
)
CioRudder(app)

@signals.event_forwarded.connect_via(app)
async def told(sender, payloads, **extra):
    print("told", len(payloads), "in", current_app.name, flush=True)

plane.hang_next(1.5)  # the first post outlasts the script: it is answered while the interpreter exits
for metric in ("opened", "clicked", "bounced"):
    raw = encode(email_sample(metric))
    assert app.test_client().post("/webhooks/customerio", data=raw, headers=signature_headers(raw, "k")).json
"""


def test_an_async_delivery_receiver_is_told_of_what_the_last_flush_at_exit_delivers(tmp_path: Path) -> None:
    """asgiref's thread pool, which ensure_sync uses, cannot start while the interpreter exits."""
    script = tmp_path / "exiting.py"
    script.write_text(_EXIT_FLUSH_APP)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "outbox.sqlite3")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["told 3 in exiting"], run.stdout + run.stderr
    assert "raised" not in run.stderr, run.stderr


@pytest.mark.parametrize("table", ["events", "meta"])
def test_an_sqlite_file_holding_the_apps_own_table_of_that_name_fails_at_init_naming_the_settings(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, tmp_path: Path, table: str
) -> None:
    """Not "no such column: state ... the app's user must be able to make and write that file"."""
    shared = tmp_path / "app.db"
    with closing(sqlite3.connect(shared)) as db, db:
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, title TEXT)")
        db.execute(f"INSERT INTO {table} (title) VALUES ('the app''s own')")
    with pytest.raises(
        RuntimeError, match=f"already has a table '{table}' that is not the outbox's"
    ) as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=f"sqlite:///{shared}"))
    assert "CIO_RUDDER_OUTBOX_TABLE" in str(raised.value) and "must be able to" not in str(raised.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["app.db"]  # no -wal, -shm or .lock made
    with closing(sqlite3.connect(shared)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not turned to WAL
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [(table,)]
        assert db.execute(f"SELECT title FROM {table}").fetchall() == [("the app's own",)]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw@db/app", "postgresql://app:***@db/app"),
        (
            "postgresql://app:pw@db/app?application_name=a@b",
            "postgresql://app:***@db/app?application_name=a@b",
        ),
        ("postgresql://db:5432/app?application_name=a@b", "postgresql://db:5432/app?application_name=a@b"),
        ("postgresql://127.0.0.1/te@st", "postgresql://127.0.0.1/te@st"),
        (
            "postgresql://db/app?sslpassword=pw&password=pw",
            "postgresql://db/app?sslpassword=***&password=***",
        ),
        ("host=db password='p w' dbname=app", "host=db password=*** dbname=app"),
        # libpq decodes a setting's name, and a value runs to the next & (a tab included).
        ("postgresql://app@db/app?pass%77ord=pw&x=1", "postgresql://app@db/app?pass%77ord=***&x=1"),
        ("postgresql://app@db/app?%70assword=pw\tpw", "postgresql://app@db/app?%70assword=***"),
        # A ? or & in the credentials or the database name starts no setting of the query.
        ("postgresql://app:a&b=c@db/app?sslpassword=pw", "postgresql://app:***@db/app?sslpassword=***"),
        ("postgresql://app:a?b=c@db/app?password=pw", "postgresql://app:***@db/app?password=***"),
        ("postgresql://app@db/my&db=x?password=pw", "postgresql://app@db/my&db=x?password=***"),
        (
            "host=db password=pw application_name=https://app",
            "host=db password=*** application_name=https://app",
        ),
        # Text that is no URL as libpq reads one: quoted, after a space, a whole .env line, a typo.
        ('"postgresql://u:pw@db/app"', '"postgresql://u:***@db/app"'),
        (" postgresql://u:pw@db/app", " postgresql://u:***@db/app"),
        ("CIO_RUDDER_OUTBOX_URL=postgresql://u:pw@db/app", "CIO_RUDDER_OUTBOX_URL=postgresql://u:***@db/app"),
        ("jdbc:postgresql://db/app?user=u&password=pw", "jdbc:postgresql://db/app?user=u&password=***"),
        ("postgresql:u:pw@db", "postgresql:***@db"),
        ("postgresql//u:pw@db/app", "postgresql//u:***@db/app"),
        ("postgresql://u@db/app&password=pw", "postgresql://u@db/app&password=***"),
        (
            "postgresql://u@db/app?sslmode=require?password=pw",
            "postgresql://u@db/app?sslmode=require?password=***",
        ),
        ("postgresql://db1:5432,db2/app?user=app@corp", "postgresql://db1:5432,db2/app?user=app@corp"),
        ("postgresql://db1:5432,db2/app?password=p@s", "postgresql://db1:5432,db2/app?password=***"),
        (
            "host=db password='my pw' application_name=https://app",
            "host=db password=*** application_name=https://app",
        ),
        ("host=db password=a?pw application_name=http://x", "host=db password=*** application_name=http://x"),
        ("postgresql://u@db/app&password=a?pw", "postgresql://u@db/app&password=***"),
        ("postgresql://u@db/app?oauth_client_secret=pw", "postgresql://u@db/app?oauth_client_secret=***"),
        ("host='db'password=pw", "host='db'password=***"),
        ("password=pw\\ pw", "password=***"),
        ("host=db password=pw://x", "host=db password=***"),
        # A password's bare @ or / that libpq reads into the host or the database name is masked too.
        ("postgresql://u:a@b/c@db/app", "postgresql://u:***@db/app"),
        ("postgresql://u:a?b/c@db/app?sslmode=require", "postgresql://u:***@db/app?sslmode=require"),
        ("postgresql://u:12/3@db/app", "postgresql://u:***@db/app"),
        ("postgresql://u:a:1/b@[::1]:5432/app", "postgresql://u:***@[::1]:5432/app"),
        ("postgresql://u:a@b/c?d@db/app", "postgresql://u:***@db/app"),  # a ? with no setting: no query
        ("postgresql://u:1/b?c@db/app", "postgresql://u:***@db/app"),
        # An @ in the query, or in a path with no host before it, is nobody's password.
        ("postgresql://u:pw@db?application_name=me@web1", "postgresql://u:***@db?application_name=me@web1"),
        (
            "postgresql://u:pw@db/app?sslrootcert=/me@corp/ca.pem",
            "postgresql://u:***@db/app?sslrootcert=/me@corp/ca.pem",
        ),
        ("sqlite:///C:/Users/me@corp/outbox.sqlite3", "sqlite:///C:/Users/me@corp/outbox.sqlite3"),
    ],
)
def test_status_and_errors_show_the_outbox_url_without_its_password(url: str, shown: str) -> None:
    """What ``status``, the dashboard and errors print: the password masked, the rest as given."""
    from flask_cio_rudder.store import redact_url

    assert redact_url(url) == shown


@given(
    start=st.sampled_from(["KQ", "90"]),  # a password starting with digits looks like a port before a bare /
    password=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    rest=st.sampled_from(["db/app", "db:5432/app?sslmode=require", "db1,db2:5433/app", "[::1]:5432/a", "db"]),
)
def test_no_part_of_a_password_shows_however_it_is_written(start: str, password: str, rest: str) -> None:
    """Whatever a password holds, percent-encoded or not, no end of it shows in what is printed."""
    url = f"postgresql://app:{start}{password}ZX@{rest}"
    from flask_cio_rudder.store import redact_url

    shown = redact_url(url)
    assert start not in shown and "ZX" not in shown, shown


def test_a_postgresql_url_without_the_extra_names_the_extra(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "flask_cio_rudder.store.postgres", raising=False)
    with pytest.raises(RuntimeError, match=r'pip install "Flask-CIO-Rudder\[postgres\]"') as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL="postgresql://app:pw-in-url@db/app"))
    assert "CIO_RUDDER_OUTBOX_URL" in str(raised.value) and "pw-in-url" not in str(raised.value)


@pytest.mark.parametrize("password", ["pw/in/url", "pw@in@url"])
def test_a_postgresql_password_with_a_bare_at_or_slash_fails_at_init_saying_how_to_encode_it(
    make_app: Callable[..., Flask], data_plane: FakeDataPlane, password: str
) -> None:
    """libpq would read the password's tail as the host name, and its errors would quote it."""
    pytest.importorskip("psycopg", reason='psycopg is not installed: pip install -e ".[postgres,test]"')
    with pytest.raises(RuntimeError, match="percent-encoded") as raised:
        make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=f"postgresql://app:{password}@db/app"))
    assert "CIO_RUDDER_OUTBOX_URL" in str(raised.value)
    assert not any(part in str(raised.value) for part in ("pw/in", "in/url", "in@url"))
    for url in (  # an @ in the query or the database name is no password's
        "postgresql://db/app?application_name=a@b",
        "postgresql://u:p@db/app?application_name=a@b",
        "postgresql://127.0.0.1/te@st",
        "postgresql://db:5432/te@st",
        "postgresql://[::1]/te@st",
        "postgresql://db1:5432,db2/app?application_name=me@corp",  # hosts, one with a port
        "postgresql://db.example.com:5432?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&user=app@db",
    ):
        store_from_url(url).close()
    with pytest.raises(RuntimeError, match="percent-encoded"):  # a ? before the bare @ changes nothing
        store_from_url("postgresql://app:pw?in@url@db/app")
    with pytest.raises(
        RuntimeError, match="a percent-escape in it is no UTF-8"
    ) as raised:  # libpq's would quote it
        store_from_url("postgresql://app:pw%E9in%FFurl@db/app")
    assert "CIO_RUDDER_OUTBOX_URL" in str(raised.value) and "0xe9" not in str(raised.value)
    with pytest.raises(
        RuntimeError, match="another encoding"
    ) as raised:  # a byte os.environ could not decode
        store_from_url("postgresql://app:pw\udce9in@db/app")
    assert "CIO_RUDDER_OUTBOX_URL" in str(raised.value) and "dce9" not in str(raised.value)
    with pytest.raises(RuntimeError, match="or its database name an @"):  # the tail of a/b@c, read as a name
        store_from_url("postgresql://app:pw@in/url@db/app")


@pytest.mark.service
def test_an_unreachable_postgresql_answers_503_and_no_password_is_logged_or_answered(
    make_app: Callable[..., Flask],
    data_plane: FakeDataPlane,
    post: Post,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer, which Customer.io keeps, names neither the host nor the user."""
    pytest.importorskip("psycopg", reason='psycopg is not installed: pip install -e ".[postgres,test]"')
    url = f"postgresql://app:pw-in-url@127.0.0.1:{free_port()}/test"
    from flask_cio_rudder.store.postgres import PostgresStore

    monkeypatch.setattr(PostgresStore, "POOL_TIMEOUT", 0.2)  # nothing listens: no need to wait 2 s
    app = make_app(**base_config(data_plane, CIO_RUDDER_OUTBOX_URL=url))
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as in production
    with caplog.at_level(logging.DEBUG):
        response = post(app.test_client(), sample("opened"))
        flushed = app.test_cli_runner().invoke(args=["cio-rudder", "flush", "--timeout", "1"])
    answer = response.get_data(as_text=True)
    assert "could not read the outbox" in answer and "127.0.0.1" not in answer and "app" not in answer
    assert flushed.exit_code == 1 and "cannot be read" in flushed.output
    assert "cannot be used" in caplog.text  # why, for the app's operators
    assert "pw-in-url" not in answer + caplog.text + flushed.output
    assert response.status_code == 503


def test_get_outbox_returns_the_outbox_of_the_current_app(outbox_app: Flask) -> None:
    with outbox_app.app_context():
        outbox = get_outbox()
    assert isinstance(outbox, Outbox)
    with pytest.warns(DeprecationWarning, match="get_outbox"):
        assert outbox.outbox is outbox
    with pytest.raises(RuntimeError, match="not registered"):
        get_outbox(Flask("other"))


# -- the operators' commands ------------------------------------------------------------------------


def test_cli_status_flush_dead_letters_requeue_and_purge(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    runner = outbox_app.test_cli_runner()
    accept(outbox_app, 3)
    bad = payload("01BAD")
    del bad["userId"]
    get_outbox(outbox_app).store.add("01BAD", json.dumps(bad))

    status = runner.invoke(args=["cio-rudder", "status"])
    assert "pending:            4" in status.output

    flushed = runner.invoke(args=["cio-rudder", "flush"])
    assert flushed.exit_code == 0, flushed.output
    assert "sent 3 events; 0 still pending" in flushed.output
    assert "1 dead letter:" in flushed.output

    letters = runner.invoke(args=["cio-rudder", "dead-letters"])
    assert letters.output.startswith("01BAD  ") and "Email Opened" in letters.output
    assert letters.output.rstrip().endswith("RudderStack answered 400: non-identifiable request")
    get_outbox(outbox_app).store.add_rejected("01REJECTED", b"{}", "no userId or anonymousId")
    cut = runner.invoke(args=["cio-rudder", "dead-letters", "--limit", "1"])
    assert cut.output.startswith("01BAD  ") and cut.output.endswith("... and 1 more (--limit)\n")

    assert runner.invoke(args=["cio-rudder", "requeue"]).exit_code == 2
    both = runner.invoke(args=["cio-rudder", "requeue", "--all", "--event", "opened"])
    assert both.exit_code == 2 and "use one of: event ids, --all, or filters" in both.output
    twice = runner.invoke(
        args=["cio-rudder", "requeue", "01BAD", "01BAD", "01REJECTED", "01TYPO", "--dry-run"]
    )
    assert "not dead letters (nothing to requeue): 01TYPO" in twice.output
    assert "would requeue 1 event; 1 rejected body cannot be sent" in twice.output
    assert "requeued 1 event" in runner.invoke(args=["cio-rudder", "requeue", "01BAD", "--yes"]).output
    assert "requeued 0 events" in runner.invoke(args=["cio-rudder", "requeue", "--all"]).output
    typo = runner.invoke(args=["cio-rudder", "requeue", "01TYPO", "--yes"])
    assert typo.exit_code == 1 and "not dead letters (nothing to requeue): 01TYPO" in typo.output
    assert runner.invoke(args=["cio-rudder", "flush", "--timeout", "0"]).exit_code == 2

    assert "purged 0" in runner.invoke(args=["cio-rudder", "purge", "--older-than", "1d", "-y"]).output
    dry = runner.invoke(args=["cio-rudder", "purge", "--older-than", "0s", "--dry-run"])
    assert "would purge 3 events delivered" in dry.output
    assert "purged 3" in runner.invoke(args=["cio-rudder", "purge", "--older-than", "0s", "-y"]).output
    for age in ("soon", "-1d", "nan", "7"):  # a bare 7 (days? seconds?) would delete almost everything
        refused = runner.invoke(args=["cio-rudder", "purge", "--older-than", age, "-y"])
        assert (
            refused.exit_code == 2 and "is not an age" in refused.output and "--older-than" in refused.output
        )


def test_cli_status_tells_an_error_that_is_over_from_one_that_is_not(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    """Read as the current state, an error RudderStack has long recovered from sends an operator
    chasing a problem that is gone."""
    runner = outbox_app.test_cli_runner()
    data_plane.fail_next(503)
    accept(outbox_app, 1)
    assert get_outbox(outbox_app).flush().delivered == 0
    failing = runner.invoke(args=["cio-rudder", "status"]).output
    assert "last delivery:      -\n" in failing
    assert re.search(r"last error: +RudderStack answered 503.* \(\d+s ago\)\n", failing)
    assert get_outbox(outbox_app).flush().delivered == 1
    over = runner.invoke(args=["cio-rudder", "status"]).output
    assert re.search(r"last delivery: +\d+s ago\n", over)
    since = r"last error: +RudderStack answered 503.* \(\d+s ago; events were delivered since\)\n"
    assert re.search(since, over)


def test_cli_status_counts_ages_by_the_outboxs_clock(outbox_app: Flask, data_plane: FakeDataPlane) -> None:
    """A PostgreSQL server's clock an hour ahead of the web server's made "last error" read "-3600s ago"."""
    store = get_outbox(outbox_app).store
    store.clock = lambda: time.time() + 3600  # the times the outbox keeps, as a server ahead of us keeps them
    data_plane.fail_next(503)
    accept(outbox_app, 1)
    assert get_outbox(outbox_app).flush().delivered == 0
    assert get_outbox(outbox_app).flush().delivered == 1
    shown = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "status"]).output
    since = r"last error: +RudderStack answered 503.* \(\d+s ago; events were delivered since\)\n"
    assert re.search(since, shown)
    assert re.search(r"last delivery: +\d+s ago\n", shown)


def test_cli_pause_stops_sending_everywhere_and_status_shows_it(
    outbox_app: Flask,
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    data_plane: FakeDataPlane,
) -> None:
    runner = outbox_app.test_cli_runner()
    accept(outbox_app, 2)
    assert "sending is paused" in runner.invoke(args=["cio-rudder", "pause"]).output
    assert "sending:            PAUSED" in runner.invoke(args=["cio-rudder", "status"]).output
    status = json.loads(runner.invoke(args=["cio-rudder", "status", "--json"]).output)
    assert (status["paused"], status["pending"], status["dead"]) == (True, 2, 0)
    worker = make_app(**outbox_config)  # the worker process: pausing was not done there
    flushed = worker.test_cli_runner().invoke(args=["cio-rudder", "flush"])
    assert flushed.exit_code == 1 and "sending is paused" in flushed.output and data_plane.requests == 0
    assert "sending resumed" in runner.invoke(args=["cio-rudder", "resume"]).output
    assert "sent 2 events" in worker.test_cli_runner().invoke(args=["cio-rudder", "flush"]).output
    assert json.loads(runner.invoke(args=["cio-rudder", "status", "--json"]).output)["paused"] is False


def test_requeue_dry_run_counts_the_rejected_bodies_it_cannot_send(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    refuse(outbox_app, data_plane, sample("bounced"))
    for n in range(2):  # bodies refused at validation: nothing to send again
        get_outbox(outbox_app).store.add_rejected(f"R{n}", b"{}", "invalid", event_name="Email Bounced")
    dry = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "requeue", "--all", "--dry-run"])
    assert "would requeue 1 event; 2 rejected bodies cannot be sent\n" in dry.output


def test_cli_dead_letters_and_requeue_filter_and_requeue_asks_first(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    runner = outbox_app.test_cli_runner()
    bounced, opened = sample("bounced"), sample("opened")
    refuse(outbox_app, data_plane, bounced, opened)
    invoke = lambda *args, **options: runner.invoke(args=["cio-rudder", *args], **options)  # noqa: E731
    assert invoke("dead-letters", "--event", "email bounced").output.startswith(bounced["event_id"])
    assert invoke("dead-letters", "--email", "BOB@example.com").output.count("\n") == 1
    assert invoke("dead-letters", "--reason", "simulated").output.count("\n") == 2
    assert invoke("dead-letters", "--since", "1h").output.count("\n") == 2
    assert invoke("dead-letters", "--since", "2999-01-01").output == "no dead letters match\n"
    assert invoke("dead-letters", "--since", "2999-01-01", "--json").output == ""
    shown = re.search(r"  (\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ)  ", invoke("dead-letters").output)
    assert shown, "each line shows its time in UTC, marked so"
    assert invoke("dead-letters", "--since", shown.group(1)).output.count("\n") == 2  # and --since takes it
    yesterday = invoke("dead-letters", "--since", "yesterday")
    assert yesterday.exit_code == 2 and "Invalid value for --since" in yesterday.output
    for limit in ("0", "-1"):  # 0 said "no dead letters" while there were some; -1 listed all, or failed
        refused = invoke("dead-letters", "--limit", limit)
        assert refused.exit_code == 2 and "Invalid value for '--limit'" in refused.output
    assert invoke("dead-letters", "--limit", "1").output.endswith("\n... and 1 more (--limit)\n")
    for option in ("--since", "--reason", "--event", "--email"):  # a script's empty variable matches nothing
        empty = invoke("requeue", option, "", "--yes")
        assert empty.exit_code == 2 and option in empty.output and "it is empty" in empty.output
    assert get_outbox(outbox_app).count_dead_letters() == 2

    dry = invoke("requeue", "--event", "bounced", "--dry-run")
    assert "would requeue 1 event\n" in dry.output and get_outbox(outbox_app).count_dead_letters() == 2
    declined = invoke("requeue", "--event", "bounced", input="n\n")
    assert "Requeue 1 event (" in declined.output and declined.exit_code == 1
    assert get_outbox(outbox_app).count_dead_letters() == 2
    assert invoke("requeue", "--all", "--event", "bounced").exit_code == 2  # one way of choosing at a time
    accepted = invoke("requeue", "--event", "bounced", input="y\n")
    assert "requeued 1 event" in accepted.output
    assert get_outbox(outbox_app).flush().delivered == 1
    assert [event["event"] for event in data_plane.events] == ["Email Bounced"]


def test_cli_purge_dead_letters_by_filter_after_confirmation(
    outbox_app: Flask, data_plane: FakeDataPlane, post: Post
) -> None:
    runner = outbox_app.test_cli_runner()
    invoke = lambda *args, **options: runner.invoke(args=["cio-rudder", *args], **options)  # noqa: E731
    refuse(outbox_app, data_plane, sample("opened"))
    post(outbox_app.test_client(), {"event_id": "01NOBODY", "object_type": "email", "metric": "sent"})
    assert invoke("purge", "--reason", "userId").exit_code == 2  # filters are for dead letters
    both = invoke("purge", "--older-than", "30d", "--dead-letters")
    assert (both.exit_code, "not both" in both.output) == (2, True)
    assert (
        "would purge 1 dead letter"
        in invoke("purge", "--dead-letters", "--reason", "userid", "--dry-run").output
    )
    assert invoke("purge", "--dead-letters", "--reason", "userid").exit_code == 1  # nobody answered: aborted
    assert get_outbox(outbox_app).count_dead_letters() == 2
    assert (
        "purged 1 dead letter" in invoke("purge", "--dead-letters", "--reason", "userid", input="y\n").output
    )
    assert [letter.reason for letter in get_outbox(outbox_app).dead_letters()] == [
        "RudderStack answered 400: simulated failure"
    ]
    assert "purged 1 dead letter" in invoke("purge", "--dead-letters", "--yes").output


@pytest.mark.parametrize("command", ["requeue", "purge"])
def test_cli_bulk_changes_stop_when_more_match_than_the_operator_confirmed(
    outbox_app: Flask, data_plane: FakeDataPlane, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Dead letters keep coming while the question waits: "Delete 1 dead letter?" must not delete 2."""
    import click

    refuse(outbox_app, data_plane, sample("opened"))

    def answered_yes_meanwhile_another_came(question: str, **options: Any) -> bool:
        refuse(outbox_app, data_plane, sample("clicked"))
        return True

    monkeypatch.setattr(click, "confirm", answered_yes_meanwhile_another_came)
    args = ["cio-rudder", command, "--event", "Email"] + (["--dead-letters"] if command == "purge" else [])
    result = outbox_app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1
    assert "2 match now, not the 1 you confirmed: nothing was changed; run it again." in result.output
    assert (get_outbox(outbox_app).count_dead_letters(), get_outbox(outbox_app).status().pending) == (2, 0)


def test_cli_purge_of_old_deliveries_deletes_no_more_than_it_asked_about(
    outbox_app: Flask, data_plane: FakeDataPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The question counted the events delivered more than 10 s before it was asked; the purge then
    took a cutoff of its own, 10 s before the answer, and deleted those delivered meanwhile too."""
    import click

    import flask_cio_rudder.cli as cli_module

    clock = Clock()
    outbox = get_outbox(outbox_app)
    monkeypatch.setattr(outbox.store, "clock", clock)
    monkeypatch.setattr(cli_module, "time", types.SimpleNamespace(monotonic=clock))
    accept(outbox_app, 1)
    assert outbox.flush().delivered == 1
    clock.now += 15

    def answered_after_a_while(question: str, **options: Any) -> bool:
        assert question == "Delete the 1 event delivered more than 10s ago?"
        outbox.store.add(
            "01LATER", stored("01LATER")
        )  # delivered while the question waited, 20 s before the answer
        assert outbox.flush().delivered == 1
        clock.now += 20
        return True

    monkeypatch.setattr(click, "confirm", answered_after_a_while)
    result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "purge", "--older-than", "10s"])
    assert result.exit_code == 0 and "purged 1 delivered event" in result.output
    assert outbox.status().delivered == 1


def test_cli_flush_says_why_events_are_still_pending(outbox_app: Flask, data_plane: FakeDataPlane) -> None:
    accept(outbox_app, 2)
    data_plane.fail_next(503)
    result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "flush"])
    assert result.exit_code == 1
    assert "2 still pending" in result.output
    assert "2 not sent: RudderStack answered 503" in result.output and "retried with backoff" in result.output


def test_cli_flush_names_a_live_sender_that_holds_a_batch(
    outbox_app: Flask, data_plane: FakeDataPlane, backend: Backend
) -> None:
    accept(outbox_app, 4)
    backend.store().claim(3, 600, 3600)  # a sender elsewhere is sending these now
    result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "flush"])
    assert result.exit_code == 1
    assert "sent 1 event; 3 still pending" in result.output
    assert "3 held by a live sender (pid" in result.output


def test_cli_create_table_prints_or_applies_the_sql(outbox_app: Flask, backend: Backend) -> None:
    runner = outbox_app.test_cli_runner()
    printed = runner.invoke(args=["cio-rudder", "create-table", "--sql"])
    assert printed.exit_code == 0 and "CREATE TABLE IF NOT EXISTS" in printed.output
    assert backend.table in printed.output
    applied = runner.invoke(args=["cio-rudder", "create-table"])
    assert applied.exit_code == 0 and "tables are ready" in applied.output


def test_cli_explains_when_the_app_does_not_use_the_outbox(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["cio-rudder", "status"])
    assert result.exit_code == 1
    assert "CIO_RUDDER_FORWARDER = 'outbox'" in result.output
    with pytest.raises(RuntimeError, match="CIO_RUDDER_FORWARDER = 'outbox'"):
        get_outbox(app)


def test_under_a_flask_command_the_sender_starts_with_the_first_accepted_event(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, post: Post
) -> None:
    """``flask cio-rudder status`` must not send; a custom command that serves the app must."""
    running: list[bool] = []

    def create_app() -> Flask:  # as flask --app loads it: inside the command line's click context
        app = make_app(**{**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True})

        @app.cli.command("serve")
        def serve() -> None:
            running.append(get_outbox(app).sender.running)
            assert post(app.test_client(), sample("opened")).json["status"] == "accepted"
            running.append(get_outbox(app).sender.running)
            wait_until(lambda: len(data_plane.events) == 1, 10, "the command's sender delivers")

        return app

    result = CliRunner().invoke(FlaskGroup(create_app=create_app), ["serve"])
    assert result.exit_code == 0, result.output
    assert running == [False, True]


def test_a_process_that_serves_nothing_sends_nothing_not_even_at_exit_and_its_first_request_starts_it(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane
) -> None:
    """An RQ job, a Celery worker or a script that loads the app must not send the outbox's backlog:
    it would claim a batch and often die mid-post (RQ ends each job with ``os._exit``), and the next
    one would post the same batch again. Any request the process serves makes it a sender."""
    config = {**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True}
    loaded_only = make_app(**config)
    ids = accept(loaded_only, 3)
    get_outbox(loaded_only).close()  # what exiting does: its last flush
    assert data_plane.requests == 0
    assert get_outbox(loaded_only).status().pending == 3

    serving = make_app(**config)
    assert serving.test_client().get("/health").status_code == 404  # any request of the host app
    wait_until(lambda: len(data_plane.events) == 3, 10, "the first request's process sends")
    assert sorted(event["properties"]["eventId"] for event in data_plane.events) == ids


def test_a_process_whose_webhooks_the_fast_path_answers_as_duplicates_sends_all_the_same(
    make_app: Callable[..., Flask], outbox_config: dict[str, Any], data_plane: FakeDataPlane, post: Post
) -> None:
    """After a restart, Customer.io's retries of events kept before it are answered "duplicate" by the
    fast path, which passes no before_request hook: the process never counted as serving."""
    app = make_app(**{**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True, "CIO_RUDDER_FAST_PATH": True})
    body = sample("opened")
    get_outbox(app).store.add(body["event_id"], stored(body["event_id"]))  # kept before the restart
    answer = post(app.test_client(), body)
    assert answer.json == {"status": "duplicate", "event_id": body["event_id"]}
    wait_until(lambda: len(data_plane.events) == 1, 10, "the process sends the event it holds")


@pytest.mark.parametrize(
    ("reload", "debug", "in_reloaders_child", "sends"),
    [
        (True, "0", False, False),  # flask run --reload: this process only watches files
        (None, "1", False, False),  # flask run --debug: the same, by flask run's default
        (True, "0", True, True),  # the reloader's child serves the app
        (False, "1", False, True),  # flask run --debug --no-reload: one process serves
        (None, "0", False, True),  # flask run
    ],
)
def test_under_flask_run_the_reloaders_watching_process_does_not_send(
    make_app: Callable[..., Flask],
    outbox_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    reload: bool | None,
    debug: str,
    in_reloaders_child: bool,
    sends: bool,
) -> None:
    """Else it sends, for the whole session, with the settings it first read, whatever the reloaded
    child reads: fix a data plane URL and events still go to the old one."""
    monkeypatch.setenv("FLASK_DEBUG", debug)
    if in_reloaders_child:
        monkeypatch.setenv("WERKZEUG_RUN_MAIN", "true")
    else:
        monkeypatch.delenv("WERKZEUG_RUN_MAIN", raising=False)
    with click.Context(run_command, info_name="run") as context:  # as flask run loads the app
        context.params["reload"] = reload
        app = make_app(**{**outbox_config, "CIO_RUDDER_OUTBOX_SENDER": True})
    assert get_outbox(app).sender.running is sends


def test_cli_copy_pending_refuses_a_missing_file_and_takes_in_what_the_sources_spool_holds(
    outbox_app: Flask, tmp_path: Path
) -> None:
    runner = outbox_app.test_cli_runner()
    missing = tmp_path / "typo" / "old.sqlite3"
    refused = runner.invoke(args=["cio-rudder", "copy-pending", f"sqlite:///{missing}"])
    assert refused.exit_code == 1 and "does not exist" in refused.output
    assert not missing.parent.exists()  # nothing made where the mistyped path points
    folder = runner.invoke(args=["cio-rudder", "copy-pending", f"sqlite:///{tmp_path}"])
    assert folder.exit_code == 1 and "a folder, not an SQLite file" in folder.output
    remote = runner.invoke(args=["cio-rudder", "copy-pending", "sqlite://oldhost/outbox.sqlite3"])
    assert remote.exit_code == 2 and "Invalid value for SOURCE_URL: SOURCE_URL" in remote.output
    other = tmp_path / "app.sqlite3"  # some other database, named by mistake
    with closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    bad_table = runner.invoke(args=["cio-rudder", "copy-pending", f"sqlite:///{other}", "--table", "a-b"])
    assert bad_table.exit_code == 2 and "Invalid value for --table: --table must be a table name" in (
        bad_table.output
    )
    wrong_file = runner.invoke(args=["cio-rudder", "copy-pending", f"sqlite:///{other}"])
    assert wrong_file.exit_code == 1 and "has no outbox table 'events'" in wrong_file.output
    with closing(sqlite3.connect(other)) as db:  # left as it was: not switched to WAL, no lock file
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("app.")) == ["app.sqlite3"]

    old_url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = store_from_url(old_url)
    old.add("01INSTORE", stored("01INSTORE"))
    spool = spool_for(old, durability="process-crash")
    assert spool is not None
    os.makedirs(spool.directory)
    # What a SIGKILLed web worker of the old deployment leaves: an unlocked file of answered events.
    Path(spool.directory, "killed.spool").write_bytes(encode_record("01SPOOLED", stored("01SPOOLED"), 1.0))
    old.close()
    wrong = runner.invoke(args=["cio-rudder", "copy-pending", old_url, "--table", "outbox"])
    assert (
        wrong.exit_code == 1 and "has no outbox table 'outbox'" in wrong.output and "--table" in wrong.output
    )
    with closing(sqlite3.connect(tmp_path / "old.sqlite3")) as db:  # the source is only read
        assert {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
            "events",
            "meta",
        }
    copied = runner.invoke(args=["cio-rudder", "copy-pending", old_url])
    assert copied.exit_code == 0, copied.output
    assert "moved 1 event that" in copied.output and "copied 2 pending events" in copied.output
    assert get_outbox(outbox_app).status().pending == 2


@pytest.mark.service
def test_pending_events_move_from_an_sqlite_outbox_to_postgresql_without_loss(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane, postgres: Backend
) -> None:
    """The README's procedure: point the app at PostgreSQL, copy the old file's pending events, send."""
    old_url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = store_from_url(old_url)
    ids = [f"01OLD{n:05d}" for n in range(2500)]  # more than one page
    old.add_many(Pending(event_id, stored(event_id)) for event_id in ids)
    claim = old.claim(1, 60, 3600)
    old.mark_delivered(claim.owner, [claim.events[0].event_id])  # already sent: stays behind
    old.add_rejected("01REJECTED", b"{}", "invalid")
    old.close()

    app = make_app(**base_config(data_plane, **postgres.app_config()))
    get_outbox(app).store.add("01NEW", stored("01NEW"))  # accepted on PostgreSQL meanwhile
    runner = app.test_cli_runner()
    backwards = runner.invoke(args=["cio-rudder", "copy-pending", postgres.url, "--table", "cio_typo"])
    assert backwards.exit_code == 1 and "has no outbox table 'cio_typo'" in backwards.output
    with closing(store_from_url(postgres.url, table="cio_typo", create=False)) as typo:
        assert not typo.has_tables()  # none made
    first = runner.invoke(args=["cio-rudder", "copy-pending", old_url])
    assert first.exit_code == 0, first.output
    assert "copied 2499 pending events" in first.output and "1 dead letter, not copied" in first.output
    again = runner.invoke(args=["cio-rudder", "copy-pending", old_url])
    assert "copied 0 pending events" in again.output and "(2499 already there)" in again.output

    outbox = get_outbox(app)
    while not outbox.flush().complete:
        pass
    counts = Counter(event["properties"]["eventId"] for event in data_plane.events)
    assert set(counts) == set(ids[1:]) | {"01NEW"}
    assert set(counts.values()) == {1}


def test_a_command_says_when_it_found_no_outbox_and_made_an_empty_one(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    """A mistyped path, or a file moved away while the app ran: "pending: 0" alone would say all is well."""
    config = base_config(data_plane) | {
        "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{tmp_path / 'typo' / 'outbox.sqlite3'}"
    }
    first = make_app(**config).test_cli_runner().invoke(args=["cio-rudder", "status"])
    assert first.exit_code == 0
    assert "note: there was no outbox at sqlite:///" in first.output
    assert "run the command with the app's CIO_RUDDER_OUTBOX_URL" in first.output
    again = make_app(**config).test_cli_runner().invoke(args=["cio-rudder", "status"])  # it is there now
    assert again.exit_code == 0 and "note:" not in again.output
