"""The outbox: accepted means kept, duplicates collapse, the sender follows RudderStack's answers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sqlite3
import stat
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from flask_cio_rudder import CioRudder, OutboxForwarder, get_outbox, transform
from flask_cio_rudder.outbox import Outbox
from flask_cio_rudder.testing import FakeDataPlane

from .conftest import EMAIL_EVENTS, record_outcomes, sample

Post = Callable[..., TestResponse]


class Clock:
    """A clock the test moves by hand, so leases and ages need no waiting."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def payload(event_id: str, **changes: Any) -> dict[str, Any]:
    body = sample("opened") | {"event_id": event_id}
    return transform(body) | changes


def stored(event_id: str, **changes: Any) -> str:
    """The RudderStack event of a sample, as the JSON text the outbox keeps."""
    return json.dumps(payload(event_id, **changes))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the store ------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(tmp_path: Path, clock: Clock) -> Outbox:
    store = Outbox(str(tmp_path / "outbox.sqlite3"), clock=clock)
    yield store
    store.close()


def test_an_added_event_is_known_and_adding_it_again_changes_nothing(outbox: Outbox) -> None:
    assert outbox.add("e1", stored("e1")) is True
    assert outbox.is_known("e1")
    assert outbox.add("e1", stored("e1", event="changed")) is False
    _, claimed = outbox.claim(100, lease=60, max_age=3600)
    assert [json.loads(c.payload_json)["event"] for c in claimed] == ["Email Opened"]


def test_a_rejected_body_is_a_dead_letter_that_does_not_block_a_later_valid_event(outbox: Outbox) -> None:
    outbox.add_rejected("e1", b'{"event_id": "e1", "data": "oops"}', "invalid fields: data")
    outbox.add_rejected(None, b'{"no": "id"}', "invalid fields: event_id")
    assert not outbox.is_known("e1")
    letters = {letter.event_id: letter for letter in outbox.dead_letters()}
    assert letters["e1"].reason == "invalid fields: data"
    assert letters["e1"].body == '{"event_id": "e1", "data": "oops"}'
    assert not letters["e1"].requeueable
    assert any(key.startswith("no-event-id:") for key in letters)
    assert outbox.add("e1", stored("e1")) is True
    assert outbox.status().pending == 1


def test_a_claim_is_leased_until_the_lease_runs_out(outbox: Outbox, clock: Clock) -> None:
    for n in range(3):
        outbox.add(f"e{n}", stored(f"e{n}"))
    first_owner, first = outbox.claim(100, lease=60, max_age=3600)
    assert len(first) == 3
    assert outbox.claim(100, lease=60, max_age=3600)[1] == []  # another sender gets nothing
    clock.now += 61  # the first sender died: its lease runs out
    second_owner, second = outbox.claim(100, lease=60, max_age=3600)
    assert [c.event_id for c in second] == ["e0", "e1", "e2"]
    outbox.delivered(first_owner, ["e0", "e1", "e2"])  # a late answer to a stale lease is ignored
    assert outbox.status().pending == 3
    outbox.delivered(second_owner, ["e0", "e1", "e2"])
    assert outbox.status().delivered == 3


def test_claims_are_oldest_first_and_bounded(outbox: Outbox, clock: Clock) -> None:
    for n in range(5):
        clock.now += 1
        outbox.add(f"e{n}", stored(f"e{n}"))
    _, claimed = outbox.claim(2, lease=60, max_age=3600)
    assert [c.event_id for c in claimed] == ["e0", "e1"]


def test_a_released_event_is_pending_again_with_the_error(outbox: Outbox) -> None:
    outbox.add("e1", stored("e1"))
    owner, _ = outbox.claim(100, lease=60, max_age=3600)
    outbox.release(owner, ["e1"], "RudderStack answered 503")
    status = outbox.status()
    assert (status.pending, status.last_error) == (1, "RudderStack answered 503")
    assert len(outbox.claim(100, lease=60, max_age=3600)[1]) == 1


def test_an_event_older_than_the_maximum_age_becomes_a_dead_letter(outbox: Outbox, clock: Clock) -> None:
    outbox.add("old", stored("old"))
    owner, _ = outbox.claim(100, lease=60, max_age=3600)
    outbox.release(owner, ["old"], "RudderStack answered 503")
    clock.now += 3601
    outbox.add("new", stored("new"))
    _, claimed = outbox.claim(100, lease=60, max_age=3600)
    assert [c.event_id for c in claimed] == ["new"]
    (letter,) = outbox.dead_letters()
    assert letter.event_id == "old"
    assert "CIO_RUDDER_OUTBOX_MAX_AGE" in letter.reason
    assert "RudderStack answered 503" in letter.reason


def test_dead_letters_can_be_requeued_all_or_by_id(outbox: Outbox) -> None:
    for event_id in ("a", "b", "c"):
        outbox.add(event_id, stored(event_id))
    owner, _ = outbox.claim(100, lease=60, max_age=3600)
    outbox.dead(owner, ["a", "b", "c"], "RudderStack answered 400")
    outbox.add_rejected("r", b'{"event_id": "r"}', "invalid")
    assert outbox.requeue(["a", "missing"]) == 1
    assert outbox.status().pending == 1
    assert outbox.requeue() == 2  # b and c; the rejected body has nothing to send
    assert outbox.status().dead == 1


def test_purge_deletes_only_old_delivered_events(outbox: Outbox, clock: Clock) -> None:
    outbox.add("old", stored("old"))
    owner, _ = outbox.claim(100, lease=60, max_age=3600)
    outbox.delivered(owner, ["old"])
    clock.now += 86400
    outbox.add("pending", stored("pending"))
    assert outbox.purge_delivered(older_than=3600) == 1
    assert outbox.status().pending == 1
    assert outbox.purge_delivered(older_than=0) == 0


def test_status_reports_the_oldest_pending_age(outbox: Outbox, clock: Clock) -> None:
    assert outbox.status().oldest_pending_age is None
    outbox.add("e1", stored("e1"))
    clock.now += 90
    assert outbox.status().oldest_pending_age == 90


@pytest.mark.parametrize(("durability", "synchronous"), [("process-crash", 1), ("power-loss", 2)])
def test_durability_sets_wal_and_the_sync_level(tmp_path: Path, durability: str, synchronous: int) -> None:
    store = Outbox(str(tmp_path / "o.sqlite3"), durability=durability)
    db = store._db()
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (synchronous,)
    store.close()


@pytest.mark.skipif(sys.platform == "win32", reason="the outbox's write lock uses flock, which Windows lacks")
def test_a_writer_waits_for_the_write_lock_instead_of_failing(outbox: Outbox) -> None:
    import fcntl

    connected, go, added = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        outbox.is_known("e1")  # this thread's connection is open before the lock is taken
        connected.set()
        go.wait(10)
        outbox.add("e1", stored("e1"))
        added.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert connected.wait(10)
    with open(outbox.path + ".lock", "ab") as other_process:  # its own open file, as another process has
        fcntl.flock(other_process, fcntl.LOCK_EX)
        go.set()
        assert not added.wait(0.3)  # queued on the lock, not failed and not written around it
        fcntl.flock(other_process, fcntl.LOCK_UN)
    thread.join(10)
    assert added.is_set() and outbox.is_known("e1")


@pytest.mark.skipif(sys.platform == "win32", reason="no lock file on Windows")
def test_the_lock_file_gets_the_database_files_permissions(tmp_path: Path) -> None:
    # So that whoever may write the outbox (an operator's `flask cio-rudder` in the app's
    # group, say) may also take its lock.
    path = tmp_path / "outbox.sqlite3"
    sqlite3.connect(path).close()
    path.chmod(0o660)
    Outbox(str(path)).close()
    assert stat.S_IMODE((tmp_path / "outbox.sqlite3.lock").stat().st_mode) == 0o660 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_and_add(path: str, start: Any, event_id: str, results: Any) -> None:
    try:
        start.wait(30)
        outbox = Outbox(path)
        outbox.add(event_id, stored(event_id))
        outbox.close()
        results.put("ok")
    except Exception as error:  # reported to the test, which names it
        results.put(repr(error))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="starts processes with fork()")
# Forking while other tests' threads run is what gunicorn does and what the outbox's fork
# hooks are for; Python 3.12+ warns about it in general.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_starting_at_once_on_a_new_outbox_all_open_it(tmp_path: Path) -> None:
    # gunicorn starts its workers together; each opens the outbox and the first turns the
    # new file to WAL mode, which SQLite does not wait for: a worker then failed to boot.
    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(30):
        path = str(tmp_path / f"outbox-{trial}.sqlite3")
        start, results = context.Barrier(8), context.Queue()
        workers = [
            context.Process(target=_open_and_add, args=(path, start, f"e{n}", results), daemon=True)
            for n in range(8)
        ]
        try:
            for worker in workers:
                worker.start()
            failures += [outcome for outcome in (results.get(timeout=60) for _ in workers) if outcome != "ok"]
        finally:
            for worker in workers:
                worker.join(10)
                if worker.is_alive():
                    worker.terminate()
    assert failures == []


def test_an_unknown_durability_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_OUTBOX_DURABILITY"):
        Outbox(str(tmp_path / "o.sqlite3"), durability="paranoid")


# -- the webhook with the outbox ------------------------------------------------------------------


@pytest.fixture
def outbox_app(make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane) -> Flask:
    return make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "outbox.sqlite3"),
        CIO_RUDDER_OUTBOX_SENDER=False,  # the tests drive the sender with flush()
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_TIMEOUT=(1.0, 1.0),
    )


def test_an_accepted_event_is_in_the_outbox_before_the_answer(
    outbox_app: Flask, post: Post, data_plane: FakeDataPlane
) -> None:
    body = sample("bounced")
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    assert data_plane.requests == 0  # nothing about RudderStack was awaited
    reopened = Outbox(outbox_app.config["CIO_RUDDER_OUTBOX_PATH"])
    assert reopened.is_known(body["event_id"])
    reopened.close()


def test_a_replayed_event_is_a_duplicate_even_after_a_restart(
    outbox_app: Flask, make_app: Callable[..., Flask], post: Post
) -> None:
    body = sample("clicked")
    assert post(outbox_app.test_client(), body).json["status"] == "accepted"
    restarted = make_app(**{k: v for k, v in outbox_app.config.items() if k.startswith("CIO_RUDDER_")})
    assert post(restarted.test_client(), body).json["status"] == "duplicate"


def test_a_rejected_body_is_kept_as_a_dead_letter(outbox_app: Flask, post: Post) -> None:
    body = sample("bounced")
    body["data"] = {"delivery_id": "d1"}  # nobody to attribute it to: RudderStack would refuse it
    assert post(outbox_app.test_client(), body).json["status"] == "rejected"
    (letter,) = get_outbox(outbox_app).dead_letters()
    assert (letter.event_id, json.loads(letter.body or "")) == (body["event_id"], body)
    assert "no userId or anonymousId" in letter.reason


def test_an_outbox_that_cannot_be_written_answers_503(
    outbox_app: Flask, post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(get_outbox(outbox_app).outbox, "add", broken)
    response = post(outbox_app.test_client(), sample("opened"))
    assert response.status_code == 503
    assert "could not write the outbox" in response.json["error"]


def test_the_background_sender_delivers_without_being_asked(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane, post: Post
) -> None:
    app = make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "outbox.sqlite3"),
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
    )
    bodies = [sample(metric) for metric in EMAIL_EVENTS]
    for body in bodies:
        post(app.test_client(), body)
    wait_until(lambda: len(data_plane.events) == len(bodies))
    assert data_plane.events == [transform(body) for body in bodies]
    wait_until(lambda: get_outbox(app).status().delivered == len(bodies))


# -- the sender against a real data plane on loopback -----------------------------------------------


def accept(app: Flask, count: int, **changes: Any) -> list[str]:
    """Put ``count`` events straight into the app's outbox; returns their ids."""
    outbox = get_outbox(app).outbox
    ids = [f"01EVENT{n:06d}" for n in range(count)]
    for event_id in ids:
        outbox.add(event_id, stored(event_id, **changes))
    return ids


@pytest.fixture
def outcomes(outbox_app: Flask) -> Any:
    with record_outcomes(outbox_app) as recorded:
        yield recorded


def test_batches_hold_at_most_100_events(outbox_app: Flask, data_plane: FakeDataPlane, outcomes: Any) -> None:
    accept(outbox_app, 250)
    assert get_outbox(outbox_app).flush() == 250
    assert [len(batch) for batch in data_plane.batches] == [100, 100, 50]
    assert [len(kwargs["payloads"]) for _, kwargs in outcomes] == [100, 100, 50]
    message_ids = [event["messageId"] for event in data_plane.events]
    assert len(set(message_ids)) == 250
    assert get_outbox(outbox_app).status().delivered == 250


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_failures_keep_the_events_and_retry(
    outbox_app: Flask, data_plane: FakeDataPlane, outcomes: Any, status: int
) -> None:
    accept(outbox_app, 5)
    data_plane.fail_next(status)
    assert get_outbox(outbox_app).flush() == 5
    current = get_outbox(outbox_app).status()
    assert current.pending == 5
    assert f"RudderStack answered {status}" in (current.last_error or "")
    assert outcomes[0][0] == "failed"
    assert outcomes[0][1]["retry"] is True
    get_outbox(outbox_app).flush()
    assert len(data_plane.events) == 5


@pytest.mark.parametrize("misbehave", ["hang", "reset"])
def test_timeouts_and_reset_connections_keep_the_events(
    outbox_app: Flask, data_plane: FakeDataPlane, misbehave: str
) -> None:
    accept(outbox_app, 3)
    if misbehave == "hang":
        data_plane.hang_next(5)
    else:
        data_plane.reset_next()
    get_outbox(outbox_app).flush()
    assert "could not reach RudderStack" in (get_outbox(outbox_app).status().last_error or "")
    assert get_outbox(outbox_app).status().pending == 3
    get_outbox(outbox_app).flush()
    assert len(data_plane.events) == 3


def test_a_data_plane_that_is_down_keeps_the_events(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    down = FakeDataPlane()  # bound but never started: connections are refused
    down.stop()
    config = dict(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "outbox.sqlite3"),
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
    )
    app = make_app(CIO_RUDDER_DATA_PLANE_URL=down.url, **config)
    accept(app, 4)
    get_outbox(app).flush()
    assert get_outbox(app).status().pending == 4
    back = make_app(CIO_RUDDER_DATA_PLANE_URL=data_plane.url, **config)
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
    outbox_app: Flask, data_plane: FakeDataPlane, outcomes: Any
) -> None:
    ids = accept(outbox_app, 9)
    bad = payload("01BAD")
    del bad["userId"]  # RudderStack's gateway refuses the whole batch for this one event
    get_outbox(outbox_app).outbox.add("01BAD", json.dumps(bad))
    get_outbox(outbox_app).flush()
    assert sorted(event["properties"]["eventId"] for event in data_plane.events) == ids
    (letter,) = get_outbox(outbox_app).dead_letters()
    assert letter.event_id == "01BAD"
    assert "RudderStack answered 400" in letter.reason
    assert [kwargs["retry"] for name, kwargs in outcomes if name == "failed"] == [False]


@pytest.mark.parametrize(
    ("path", "setting"), [("", "CIO_RUDDER_WRITE_KEY"), ("/wrong", "CIO_RUDDER_DATA_PLANE_URL")]
)
def test_a_configuration_error_keeps_everything_and_logs_one_error_naming_the_setting(
    make_app: Callable[..., Flask],
    tmp_path: Path,
    data_plane: FakeDataPlane,
    caplog: pytest.LogCaptureFixture,
    path: str,
    setting: str,
) -> None:
    app = make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_PATH=str(tmp_path / "outbox.sqlite3"),
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY="wrong-key" if setting == "CIO_RUDDER_WRITE_KEY" else data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url + path,
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
        outbox.flush()
        if outbox.status().pending == 0:
            break
    counts = Counter(event["messageId"] for event in data_plane.events)
    assert len(counts) == len(ids)
    assert set(counts.values()) == {1}
    assert outbox.status().delivered == len(ids)


# -- the operators' commands ------------------------------------------------------------------------


def test_cli_status_flush_dead_letters_requeue_and_purge(
    outbox_app: Flask, data_plane: FakeDataPlane
) -> None:
    runner = outbox_app.test_cli_runner()
    accept(outbox_app, 3)
    bad = payload("01BAD")
    del bad["userId"]
    get_outbox(outbox_app).outbox.add("01BAD", json.dumps(bad))

    status = runner.invoke(args=["cio-rudder", "status"])
    assert "pending:            4" in status.output

    flushed = runner.invoke(args=["cio-rudder", "flush"])
    assert flushed.exit_code == 0, flushed.output
    assert "0 still pending" in flushed.output

    letters = runner.invoke(args=["cio-rudder", "dead-letters"])
    assert "01BAD  RudderStack answered 400" in letters.output

    assert runner.invoke(args=["cio-rudder", "requeue"]).exit_code == 2
    assert "requeued 1 events" in runner.invoke(args=["cio-rudder", "requeue", "01BAD"]).output
    assert "requeued 0 events" in runner.invoke(args=["cio-rudder", "requeue", "--all"]).output

    assert "purged 0" in runner.invoke(args=["cio-rudder", "purge", "--older-than", "1d"]).output
    assert "purged 3" in runner.invoke(args=["cio-rudder", "purge", "--older-than", "0s"]).output
    assert runner.invoke(args=["cio-rudder", "purge", "--older-than", "soon"]).exit_code == 2


def test_cli_flush_fails_while_events_are_still_pending(outbox_app: Flask, data_plane: FakeDataPlane) -> None:
    accept(outbox_app, 2)
    data_plane.fail_next(503)
    result = outbox_app.test_cli_runner().invoke(args=["cio-rudder", "flush"])
    assert result.exit_code == 1
    assert "2 still pending" in result.output


def test_cli_explains_when_the_app_does_not_use_the_outbox(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["cio-rudder", "status"])
    assert result.exit_code == 1
    assert "CIO_RUDDER_FORWARDER = 'outbox'" in result.output
    with pytest.raises(RuntimeError, match="CIO_RUDDER_FORWARDER = 'outbox'"):
        get_outbox(app)


def test_get_outbox_uses_the_current_app(outbox_app: Flask) -> None:
    with outbox_app.app_context():
        assert isinstance(get_outbox(), OutboxForwarder)
    with pytest.raises(RuntimeError, match="not registered"):
        get_outbox(Flask("other"))
    assert CioRudder  # the extension under test
