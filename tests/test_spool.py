"""The spool's promises: what a process accepted survives its SIGKILL at any moment, once.

Each process appends accepted events to a spool file of its own and moves them into the
SQLite outbox in batches (``flask_cio_rudder/spool.py``). The processes killed here are
real: a child Python process appends, or moves, and stops at a chosen point (it says so
on stdout, then waits on stdin); the test SIGKILLs it there and adopts what it left, as
any mover, ``status`` or ``flush`` of a live process does. Nothing waits a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from flask_cio_rudder import get_outbox
from flask_cio_rudder.spool import Spool, decode_records, encode_record, spool_for
from flask_cio_rudder.store import OutboxStore, Pending, store_from_url
from flask_cio_rudder.store.base import payload_summary
from flask_cio_rudder.testing import FakeDataPlane

from .conftest import sample
from .helpers import wait_until, write_lock_held

ROOT = Path(__file__).resolve().parents[1]

# -- records -------------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)  # any str, lone surrogates and NUL included
payloads = st.text(max_size=200).map(lambda text: json.dumps({"event": text}))
records = st.lists(st.tuples(ids, payloads, st.floats(0, 2e9)), max_size=8)


@given(records)
def test_records_read_back_as_written(written: list[tuple[str, str, float]]) -> None:
    data = b"".join(encode_record(*record) for record in written)
    assert decode_records(data) == ([Pending(*record) for record in written], 0)


@given(records.filter(bool), st.data())
def test_a_record_cut_short_by_a_crash_is_skipped_and_what_came_before_is_kept(
    written: list[tuple[str, str, float]], data: st.DataObject
) -> None:
    encoded = [encode_record(*record) for record in written]
    whole = b"".join(encoded[:-1])
    cut = data.draw(st.integers(0, len(encoded[-1]) - 1), label="bytes of the last record written")
    decoded, torn = decode_records(whole + encoded[-1][:cut])
    assert decoded == [Pending(*record) for record in written[:-1]]
    assert torn == cut


@given(records.filter(bool), st.data())
def test_a_garbled_record_is_never_read_as_an_event(
    written: list[tuple[str, str, float]], data: st.DataObject
) -> None:
    """Any byte of the last record changed (a power loss in "process-crash" mode): it is dropped."""
    encoded = [encode_record(*record) for record in written]
    last = bytearray(encoded[-1])
    where = data.draw(st.integers(0, len(last) - 1), label="byte changed")
    last[where] ^= data.draw(st.integers(1, 255), label="xor")
    decoded, torn = decode_records(b"".join(encoded[:-1]) + bytes(last))
    assert decoded == [Pending(*record) for record in written[:-1]]
    assert torn == len(last)


# -- one process ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OutboxStore]:
    made = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    try:
        yield made
    finally:
        made.close()


def make_spool(store: OutboxStore, **options: Any) -> Spool:
    spool = spool_for(store, durability="process-crash", **options)
    assert spool is not None
    return spool


def app_not_sending(
    make_app: Callable[..., Flask], tmp_path: Path, data_plane: FakeDataPlane, **config: Any
) -> Flask:
    """An app with its SQLite outbox in ``tmp_path`` and no sender: what it accepts stays there."""
    return make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_WRITE_KEY=data_plane.write_key,
        CIO_RUDDER_DATA_PLANE_URL=data_plane.url,
        CIO_RUDDER_OUTBOX_SENDER=False,
        **config,
    )


def pending_ids(store: OutboxStore) -> list[str]:
    return [event.event_id for event in store.pending(10_000)]


def test_moved_events_are_pending_in_the_store_and_the_file_is_emptied(store: OutboxStore) -> None:
    spool = make_spool(store)
    for number in range(3):
        spool.append(f"e{number}", json.dumps({"n": number}))
    assert spool.holds("e1") and not store.is_known("e1")
    assert spool.move() == 3
    assert pending_ids(store) == ["e0", "e1", "e2"] and not spool.holds("e1")
    (name,) = os.listdir(spool.directory)
    assert os.path.getsize(os.path.join(spool.directory, name)) == 0
    spool.stop()
    assert os.listdir(spool.directory) == []  # a clean exit leaves nothing to adopt


def test_moved_events_keep_the_search_columns_the_webhook_gave(store: OutboxStore) -> None:
    """The webhook passes each event's name and address along, so the mover does not decode it again."""
    spool = make_spool(store)
    spool.append("e1", json.dumps({"n": 1}), event_name="Email Bounced", email="Ann@example.com")
    assert spool.move() == 1
    (found,) = store.find(email="ann@example.com")
    assert (found.event_id, found.event_name) == ("e1", "Email Bounced")
    spool.stop()


@pytest.mark.parametrize("email", [" Ann@Example.COM ", 15551234567, 4.5, True, None])
def test_the_webhook_fills_the_columns_an_adopter_would_read_from_the_event(
    tmp_path: Path,
    make_app: Callable[..., Flask],
    post: Callable[..., TestResponse],
    data_plane: FakeDataPlane,
    email: object,
) -> None:
    """Searches find an event alike whether its own process moved it or another adopted its file."""
    app = app_not_sending(make_app, tmp_path, data_plane)
    body = sample("bounced")
    body["data"]["identifiers"]["email"] = email
    assert post(app.test_client(), body).get_json()["status"] == "accepted"
    outbox = get_outbox(app)
    assert outbox.spool is not None
    outbox.spool.move()  # the mover thread may have moved it already
    (moved,) = outbox.store.find(event_id=body["event_id"])
    assert (moved.event_name, moved.email) == payload_summary(moved.payload or "")


@pytest.mark.skipif(sys.platform == "win32", reason="the outbox's write lock uses flock, which Windows lacks")
def test_stopping_behind_another_processs_write_lock_returns_and_loses_nothing(
    store: OutboxStore, tmp_path: Path
) -> None:
    """A bulk purge holds the write lock while gunicorn recycles a worker: the worker must still exit,
    as none replaces it until then. What it could not move is moved once the lock is free."""
    store.add("warm", "{}")  # the tables exist
    spool = make_spool(store)
    spool.ensure_running()
    with write_lock_held(tmp_path / "outbox.sqlite3"):
        spool.append("e0", "{}")
        stopping = threading.Thread(target=spool.stop, kwargs={"timeout": 0.5})
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive(), "stop() waited for the other process's lock"
    wait_until(lambda: store.is_known("e0"), 10, "the mover's last move, once the lock is free")


def web_process_that_does_not_send(
    make_app: Callable[..., Flask], tmp_path: Path, shutdown_timeout: float
) -> Flask:
    """An app on an SQLite outbox with CIO_RUDDER_OUTBOX_SENDER = False: a worker process sends."""
    return make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_SHUTDOWN_TIMEOUT=shutdown_timeout,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="the outbox's write lock uses flock, which Windows lacks")
def test_closing_a_web_process_that_does_not_send_returns_behind_another_processs_write_lock(
    tmp_path: Path, make_app: Callable[..., Flask], post: Callable[..., TestResponse]
) -> None:
    """CIO_RUDDER_OUTBOX_SENDER = False (a worker process sends): closing the store waited for the
    spool's stuck last move, so the web worker did not exit while another process held the lock."""
    app = web_process_that_does_not_send(
        make_app, tmp_path, 0
    )  # the spool's last move is still waited for, a second
    outbox = get_outbox(app)
    assert post(app.test_client(), sample("opened")).json["status"] == "accepted"
    wait_until(lambda: outbox.store.is_known(sample("opened")["event_id"]), 10, "the first event is moved")
    with write_lock_held(tmp_path / "outbox.sqlite3"):
        body = sample("clicked")
        assert post(app.test_client(), body).json["status"] == "accepted"
        closing = threading.Thread(target=outbox.close)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "close() waited for the other process's lock"
    wait_until(lambda: outbox.store.is_known(body["event_id"]), 10, "the last move, once the lock is free")
    wait_until(lambda: os.listdir(outbox.spool.directory) == [], 10, "its moved file is deleted")


@pytest.mark.skipif(sys.platform == "win32", reason="the outbox's write lock uses flock, which Windows lacks")
def test_closing_a_web_process_with_nothing_left_to_move_returns_behind_another_processs_write_lock(
    tmp_path: Path, make_app: Callable[..., Flask], post: Callable[..., TestResponse]
) -> None:
    """CIO_RUDDER_OUTBOX_SENDER = False: closing the store's connections (which takes the write lock, to
    checkpoint) waited without end for a process stopped inside a transaction (docker pause, SIGSTOP)."""
    app = web_process_that_does_not_send(make_app, tmp_path, 0.5)
    outbox = get_outbox(app)
    assert post(app.test_client(), sample("opened")).json["status"] == "accepted"
    wait_until(lambda: outbox.store.is_known(sample("opened")["event_id"]), 10, "the event is moved")
    with write_lock_held(tmp_path / "outbox.sqlite3"):
        closing = threading.Thread(target=outbox.close)
        closing.start()
        closing.join(10)
        assert not closing.is_alive(), "close() waited for the other process's lock"


def test_a_mover_that_could_not_start_is_started_by_the_next_request(
    store: OutboxStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of threads for a moment (RuntimeError: can't start new thread): the spool must not be
    left unmoved for the process's life, its file locked against adoption."""
    spool = make_spool(store)
    spool.append("e0", "{}")

    def out_of_threads(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", out_of_threads)
        with pytest.raises(RuntimeError):
            spool.ensure_running()
    spool.ensure_running()  # the next request's
    wait_until(lambda: store.is_known("e0"), 10, "the mover moves the event")
    spool.stop()


def test_a_file_of_a_dead_process_that_cannot_be_opened_does_not_stop_the_others(
    store: OutboxStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file another user left (a killed replay run as root, say): the rest is adopted, and the
    problem is said once, naming the file."""
    spool = make_spool(store)
    os.makedirs(spool.directory)
    for name, event_id in (("1-a.spool", "locked-out"), ("2-b.spool", "readable")):
        with open(os.path.join(spool.directory, name), "wb") as file:
            file.write(encode_record(event_id, json.dumps({"id": event_id}), 1.0))
    real_open = os.open

    def open_as_another_user(path: str, *args: Any, **kwargs: Any) -> int:
        if path.endswith("1-a.spool"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_as_another_user)
    assert spool.move() == 1 and spool.move() == 0
    assert pending_ids(store) == ["readable"]
    assert caplog.text.count("Cannot take over the spool file") == 1 and "1-a.spool" in caplog.text
    monkeypatch.setattr(os, "open", real_open)
    assert spool.move() == 1  # once its owner fixed the permissions
    assert sorted(pending_ids(store)) == ["locked-out", "readable"]
    spool.stop()


def test_appends_while_moving_are_each_moved_once_across_new_files(store: OutboxStore) -> None:
    """A file that grew large is replaced and deleted once moved; appends go on meanwhile."""
    spool = make_spool(store)
    spool.ROTATE_BYTES = 2_000  # a few records per file
    appended = [f"e{number:04d}" for number in range(400)]

    def append_all() -> None:
        for event_id in appended:
            spool.append(event_id, json.dumps({"id": event_id}))

    writer = threading.Thread(target=append_all)
    writer.start()
    moved = 0
    while writer.is_alive():
        moved += spool.move()
    writer.join()
    moved += spool.move()
    assert moved == len(appended)
    assert pending_ids(store) == appended
    assert len(os.listdir(spool.directory)) <= 1  # the moved, retired files are gone
    spool.stop()


def test_a_retry_accepted_by_two_processes_before_the_move_is_kept_once(store: OutboxStore) -> None:
    """Two spools (two files, two locks) stand for two web processes that each accepted the retry."""
    first, second = make_spool(store), make_spool(store)
    first.append("retried", json.dumps({"copy": 1}))
    second.append("retried", json.dumps({"copy": 2}))
    first.move()
    second.move()
    claim = store.claim(10, 60, 7 * 24 * 3600)
    assert [(event.event_id, json.loads(event.payload_json)) for event in claim.events] == [
        ("retried", {"copy": 1})
    ]
    store.mark_delivered(claim.owner, ["retried"])
    third = make_spool(store)
    third.append("retried", json.dumps({"copy": 3}))  # a late replay, after the delivery
    third.move()
    assert store.status().delivered == 1 and store.status().pending == 0
    for spool in (first, second, third):
        spool.stop()


def test_power_loss_durability_fsyncs_each_append_before_the_webhook_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_app: Callable[..., Flask],
    data_plane: FakeDataPlane,
    post: Callable[..., TestResponse],
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    app = app_not_sending(make_app, tmp_path, data_plane, CIO_RUDDER_OUTBOX_DURABILITY="power-loss")
    spool = get_outbox(app).spool
    assert spool is not None and spool.fsync
    monkeypatch.setattr(os, "fsync", recording_fsync)
    for number, metric in enumerate(("opened", "clicked")):
        synced.clear()
        body = sample(metric) | {"event_id": f"durable-{number}"}
        assert post(app.test_client(), body).json["status"] == "accepted"
        spooled = {
            os.stat(os.path.join(spool.directory, name)).st_ino for name in os.listdir(spool.directory)
        }
        assert spooled & set(synced), "the spool file was not fsync'ed before the answer"


# -- processes killed at chosen points -----------------------------------------------------------

CHILD = """
import json, sys
from flask_cio_rudder.spool import Spool, spool_for
from flask_cio_rudder.store import store_from_url

url, count, stop_at = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = store_from_url(url)


class Stopping(Spool):
    def _add(self, records, *, own):
        if stop_at == "inside the move":
            def stopping():  # add_many reads this inside its transaction
                for number, record in enumerate(records):
                    if number == len(records) // 2:
                        print(stop_at, flush=True)
                        sys.stdin.read()
                    yield record
            self.store.add_many(stopping())
        elif stop_at == "after the hand-off":  # leased to this process's sender, not sent
            self.store.add_claimed(records, 600.0, 7 * 24 * 3600)
            print(stop_at, flush=True)
            sys.stdin.read()
        else:
            self.store.add_many(records)
            print(stop_at, flush=True)  # "after the move": committed, not yet forgotten
            sys.stdin.read()


spool = Stopping(spool_for(store, durability="process-crash").directory, store)
for number in range(count):
    spool.append(f"killed-{number:03d}", json.dumps({"number": number}))
if stop_at == "after the answer":
    print(stop_at, flush=True)  # appended (the webhook would have answered), nothing moved
    sys.stdin.read()
spool.move(adopt=False)
"""


def run_until_killed(url: str, count: int, stop_at: str) -> None:
    """Run the child until it reaches ``stop_at``, then SIGKILL it there."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(count), stop_at],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        said = child.stdout.readline().strip()
        assert said == stop_at, child.communicate(timeout=30)[1]
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_at", ["after the answer", "inside the move", "after the move", "after the hand-off"]
)
def test_events_of_a_process_killed_at_any_point_are_adopted_once(store: OutboxStore, stop_at: str) -> None:
    """SIGKILL between the answer and the move, inside the move's transaction, or after its commit
    (with the events leased to the dead process's sender, in the hand-off: free at once)."""
    survivor = make_spool(store)
    run_until_killed(store.url, 20, stop_at)
    assert survivor.move() == 20  # the dead process's file, whatever it had moved before
    assert pending_ids(store) == [f"killed-{number:03d}" for number in range(20)]
    assert store.status().pending == 20
    assert os.listdir(survivor.directory) == []  # adopted files are deleted
    assert survivor.move() == 0
    claim = store.claim(100, 60.0, 7 * 24 * 3600)
    assert sorted(event.event_id for event in claim.events) == pending_ids(store)


@pytest.mark.skipif(sys.platform == "win32", reason="spool files are locked with flock, which Windows lacks")
@pytest.mark.parametrize("step", ["before the lock", "after the other mover deleted it"])
def test_a_new_file_another_mover_takes_before_its_lock_is_replaced_not_an_error(
    store: OutboxStore, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Workers forked together (gunicorn --preload) start their movers, which adopt any file not
    locked, while each opens its first file: one may take another's file between its creation
    and its lock, and delete it as a dead process's. The webhook answered 503 for that."""
    import fcntl

    first, other = make_spool(store), make_spool(store)
    real_open, real_flock = os.open, fcntl.flock
    held: list[int] = []

    def open_and_let_the_other_look(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if path.endswith(".new") and flags & os.O_CREAT and not held:
            if step == "before the lock":  # the other mover has it locked while it looks
                held.append(real_open(path, os.O_RDWR))
                real_flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                held.append(-1)
                other.move()  # takes it for a dead process's, deletes it, lets go of it
        return fd

    monkeypatch.setattr(os, "open", open_and_let_the_other_look)
    try:
        first.append("e1", json.dumps({"n": 1}))
    finally:
        if held and held[0] >= 0:
            os.close(held[0])
    monkeypatch.undo()
    assert held and first.holds("e1")
    assert first.move() == 1 and pending_ids(store) == ["e1"]
    first.stop()
    other.stop()


@pytest.mark.slow
def test_a_live_process_keeps_its_file_until_it_dies(store: OutboxStore) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, store.url, "5", "after the answer"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    survivor = make_spool(store)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "after the answer", child.stderr
        assert survivor.move() == 0  # locked by a live process: it moves its own
        assert len(os.listdir(survivor.directory)) == 1
    finally:
        child.kill()
        child.communicate(timeout=30)
    wait_until(lambda: survivor.move() == 5, what="the dead child's five events are adopted")
    assert store.status().pending == 5


@pytest.mark.slow
def test_a_forked_child_writes_its_own_file_and_the_parent_adopts_it_when_the_child_dies(
    store: OutboxStore,
) -> None:
    """After ``fork()`` (gunicorn ``--preload``) the child never appends to its parent's file."""
    spool = make_spool(store)
    spool.append("parent-0", json.dumps({}))
    pid = os.fork()
    if pid == 0:  # the child: append, then die without moving anything
        try:
            spool.append("child-0", json.dumps({}))
            spool.append("child-1", json.dumps({}))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(os.listdir(spool.directory)) == 2  # the parent's file and the child's
    assert spool.move() == 3
    assert pending_ids(store) == ["child-0", "child-1", "parent-0"]
    spool.stop()
