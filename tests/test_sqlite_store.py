"""What only the SQLite store does: WAL and durability, the lock file, and its fork rule."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from flask_cio_rudder import get_outbox
from flask_cio_rudder.store import OutboxStore, Pending, sqlite, store_from_url
from flask_cio_rudder.store.forkguard import ForkGuard
from flask_cio_rudder.store.sqlite import SQLiteStore, holder_alive, this_process

from .conftest import sample
from .helpers import Clock, in_function, wait_until, write_lock_held

Post = Callable[..., TestResponse]


@pytest.mark.parametrize(("durability", "synchronous"), [("process-crash", 1), ("power-loss", 2)])
def test_durability_sets_wal_and_the_sync_level(tmp_path: Path, durability: str, synchronous: int) -> None:
    store = SQLiteStore(str(tmp_path / "o.sqlite3"), durability=durability)
    try:
        with store._connected() as db:  # reads SQLite's own settings, writes nothing
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("PRAGMA synchronous").fetchone() == (synchronous,)
    finally:
        store.close()


def test_an_unknown_durability_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_OUTBOX_DURABILITY"):
        SQLiteStore(str(tmp_path / "o.sqlite3"), durability="paranoid")


def test_a_holder_is_this_process_until_it_is_gone() -> None:
    assert holder_alive(this_process())
    pid, started, namespace = this_process().split(":", 2)
    if started:  # /proc tells start times: the same pid with another start time is another process
        assert not holder_alive(f"{pid}:{int(started) + 1}:{namespace}")
        assert not holder_alive(f"{pid}:{int(started) + 1}")  # as holders were written before namespaces
    assert not holder_alive("not-a-pid:0")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_a_new_outbox_and_its_spool_are_readable_by_their_owner_only(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """They hold people's addresses and events; the usual umask (022) would let every local user read them."""
    old_umask = os.umask(0o022)
    try:
        app = make_app(
            CIO_RUDDER_FORWARDER="outbox",
            CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'new' / 'outbox.sqlite3'}",
            CIO_RUDDER_OUTBOX_SENDER=False,
            CIO_RUDDER_WRITE_KEY="k",
            CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
        )
        get_outbox(app).spool.append("e1", "{}")  # type: ignore[union-attr]  (SQLite: a spool)
    finally:
        os.umask(old_umask)
    made = [tmp_path / "new", *sorted((tmp_path / "new").rglob("*"))]
    assert len(made) >= 6  # the folder, the database, -wal, -shm, .lock, the spool folder and its file
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in made}
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes


def _can_unshare_pids() -> bool:
    try:
        found = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    except OSError:
        return False
    return found.returncode == 0


_HOLD_A_BATCH = """
import sys
from flask_cio_rudder.store.sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1])
print(len(store.claim(10, lease=60, max_age=3600).events), flush=True)
sys.stdin.read()  # holds the batch until the test closes our stdin
"""


@pytest.mark.skipif(not _can_unshare_pids(), reason="needs `unshare --pid` (Linux, root): another container")
def test_a_batch_held_in_another_pid_namespace_stays_held_until_its_lease_ends(tmp_path: Path) -> None:
    """Containers sharing the outbox's volume: the other's process ids mean nothing here."""
    path = str(tmp_path / "outbox.sqlite3")
    store = SQLiteStore(path)
    store.add("e1", "{}")
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _HOLD_A_BATCH, path]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as other:
        assert other.stdout is not None and other.stdin is not None
        try:
            assert other.stdout.readline() == b"1\n"  # the other container claimed it
            assert store.claim(10, lease=60, max_age=3600).events == []
            assert store.status().in_flight == 1
        finally:
            other.stdin.close()
    store.close()


@pytest.mark.skipif(sys.platform == "win32", reason="the outbox's write lock uses flock, which Windows lacks")
def test_writers_and_a_new_outbox_wait_for_the_write_lock_instead_of_failing(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "outbox.sqlite3"
    store = SQLiteStore(str(path))
    outcomes: list[str] = []

    def add() -> None:
        store.add("e1", "{}")
        outcomes.append("added")

    def open_another() -> None:  # a worker starting while another holds the lock (SQLite's WAL switch)
        SQLiteStore(str(tmp_path / "new.sqlite3")).close()
        outcomes.append("opened")

    with open(str(path) + ".lock", "ab") as other, open(str(tmp_path / "new.sqlite3.lock"), "ab") as new:
        fcntl.flock(other, fcntl.LOCK_EX)  # as another process holding each lock
        fcntl.flock(new, fcntl.LOCK_EX)
        threads = [threading.Thread(target=add), threading.Thread(target=open_another)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: all(in_function(thread, "_locked") for thread in threads),
            10,
            "both threads wait for the lock file",
        )
        assert outcomes == []  # queued on the lock, not failed and not written around it
        fcntl.flock(other, fcntl.LOCK_UN)
        fcntl.flock(new, fcntl.LOCK_UN)
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["added", "opened"] and store.is_known("e1")
    store.close()


@pytest.mark.skipif(sys.platform == "win32", reason="no lock file on Windows")
def test_the_lock_file_gets_the_database_files_permissions(tmp_path: Path) -> None:
    # So that whoever may write the outbox (an operator's `flask cio-rudder` in the app's
    # group, say) may also take its lock.
    path = tmp_path / "outbox.sqlite3"
    SQLiteStore(str(path)).close()
    (tmp_path / "outbox.sqlite3.lock").unlink()
    path.chmod(0o660)
    SQLiteStore(str(path)).close()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "outbox.sqlite3.lock").stat().st_mode) == 0o660 & ~mask


class TransactionHeldOpen:
    """Another thread's bulk add, held open mid-transaction (one event in, one to come) until released."""

    def __init__(self, store: OutboxStore) -> None:
        inside, self._go = threading.Event(), threading.Event()

        def slow_events() -> Iterator[Pending]:
            yield Pending("first", "{}")
            inside.set()
            self._go.wait(30)  # the transaction stays open meanwhile
            yield Pending("second", "{}")

        self._adder = threading.Thread(target=lambda: store.add_many(slow_events()))
        self._adder.start()
        assert inside.wait(10)

    def release(self) -> None:
        """Let the transaction commit, with both events."""
        self._go.set()
        self._adder.join(10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_waits_for_an_open_transaction_and_the_child_can_write(tmp_path: Path) -> None:
    """gunicorn --preload forks while the master's sender may be inside a transaction.

    A connection carried across a fork inside a transaction leaves the child waiting forever
    for a lock nobody holds; so a fork waits until no thread is inside SQLite. Here a bulk add
    is held open mid-transaction while another thread forks: the fork must wait, then the
    child must write.
    """
    store = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    held = TransactionHeldOpen(store)
    child: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if store.add("from-child", "{}") else 2
            finally:
                os._exit(code)
        child.append(pid)

    forker = threading.Thread(target=fork)
    forker.start()
    wait_until(
        lambda: in_function(forker, "_close_all_before_fork"), 10, "the fork waits for the transaction"
    )
    assert child == []
    held.release()
    forker.join(10)
    _, status = os.waitpid(child[0], 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.is_known("second") and store.is_known("from-child")
    store.close()


def test_the_fork_guard_waits_for_every_use_to_end_however_they_nest() -> None:
    """A fork must wait for a use nested in another (a lookup inside a transaction) to end too.

    And the thread that holds the guard exclusively (the fork) may use SQLite meanwhile
    without waiting for itself or being counted as a user afterwards.
    """
    guard = ForkGuard()
    forked = threading.Event()

    def fork() -> None:
        with guard.exclusive(), guard.shared():  # the forking thread's own use: no wait for itself
            forked.set()

    forker = threading.Thread(target=fork)
    with guard.shared():
        with guard.shared():
            pass
        forker.start()  # the outer use is still open after the inner one ended
        wait_until(lambda: in_function(forker, "acquire"), 10, "the fork waits for the outer use")
        assert not forked.is_set()
    forker.join(10)
    assert forked.is_set()
    with guard.exclusive():  # nothing left counted as in use: taken at once
        pass


def test_a_read_is_not_held_up_by_another_threads_open_transaction(tmp_path: Path) -> None:
    """The web request's duplicate lookup must not wait for the spool mover's or the sender's commit."""
    store = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    store.add("old", "{}")
    seen: list[bool] = []
    look = threading.Event()

    def reader() -> None:  # a web worker's request thread: its connection is open before the transaction
        seen.append(store.is_known("old"))
        look.wait(30)
        seen.append(store.is_known("old"))
        seen.append(store.is_known("first"))

    request_thread = threading.Thread(target=reader)
    request_thread.start()
    wait_until(lambda: seen == [True], 10, "the request thread has its connection")
    held = TransactionHeldOpen(store)
    try:
        look.set()
        wait_until(
            lambda: not request_thread.is_alive(), 10, "the lookups answer while the transaction is open"
        )
        assert seen == [True, True, False]  # "first" is not committed yet: the last commit is what is seen
    finally:
        held.release()
    assert store.is_known("second")
    store.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc/self/fd (Linux)")
def test_a_thread_that_ends_closes_its_connection(tmp_path: Path) -> None:
    """``flask run`` and werkzeug's threaded server start a thread per request, and each request's
    duplicate lookup opens that thread's connection: kept forever, the files would run out."""
    store = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    store.add("old", "{}")
    answers: list[bool] = []

    def requests(count: int) -> int:
        """Serve ``count`` lookups, each on a thread of its own; then the files this process has open."""
        for number in range(count):
            request_thread = threading.Thread(
                target=lambda n=number: answers.append(store.is_known(f"id{n}"))
            )
            request_thread.start()
            request_thread.join()
        return len(os.listdir("/proc/self/fd"))

    after_some = requests(20)
    assert requests(300) <= after_some  # no more files open for 300 more requests
    assert answers == [False] * 320
    assert store.is_known("old")  # this thread's own connection still works
    store.close()


def _sqlite_app(make_app: Callable[..., Flask], path: Path) -> Flask:
    return make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{path}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
    )


@pytest.mark.skipif(sys.platform == "win32", reason="no lock file on Windows")
def test_while_another_process_holds_the_write_lock_webhooks_are_answered_without_waiting_for_it(
    make_app: Callable[..., Flask], post: Post, tmp_path: Path
) -> None:
    """Another process may hold it for long (one stopped inside a transaction); Customer.io
    waits 4 s. A new thread's first event (a new worker, ``flask run``) is spooled without the lock, and a
    body to keep as a dead letter gets a 503 within seconds, for Customer.io to send again."""
    path = tmp_path / "outbox.sqlite3"
    app = _sqlite_app(make_app, path)
    answers: list[tuple[str, int]] = []

    def webhook(body: dict[str, Any]) -> None:  # on a thread of its own, as a new worker's request
        answers.append((body["event_id"], post(app.test_client(), body).status_code))

    def on_a_new_thread(body: dict[str, Any]) -> None:
        thread = threading.Thread(target=webhook, args=(body,))
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the request waits for the lock"

    rejected = {"event_id": "01NOIDENTITY", "metric": "opened", "data": {}}
    with write_lock_held(path):
        on_a_new_thread(sample("delivered"))
        # Its thread's connection is left to close, as each request's is under flask run; while the lock
        # is held elsewhere no thread can close it, so the next new thread finds it there.
        wait_until(lambda: bool(sqlite._ended), 10, "the ended thread's connection is queued for closing")
        on_a_new_thread(sample("opened"))
        on_a_new_thread(rejected)
    assert answers == [
        (sample("delivered")["event_id"], 200),
        (sample("opened")["event_id"], 200),
        ("01NOIDENTITY", 503),
    ]
    assert post(app.test_client(), rejected).json["status"] == "rejected"  # Customer.io's retry
    assert get_outbox(app).count_dead_letters() == 1


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_an_outbox_file_removed_while_the_app_runs_is_a_503_not_an_event_kept_in_no_file(
    make_app: Callable[..., Flask], post: Post, tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    """Writing on into the removed file's open connection answered 200 for events lost at exit; a thread
    that connects afterwards must not take the new file for the store's either (its spool mover cannot)."""
    path = tmp_path / "data" / "outbox.sqlite3"
    app = _sqlite_app(make_app, path)
    assert post(app.test_client(), sample("opened")).status_code == 200
    if change == "removed":  # an operator's mistake, or a volume swapped under the app
        # Moved away in one step: rmtree would race the spool's mover, which writes in that folder.
        os.rename(path.parent, tmp_path / "gone")
    else:  # a backup restored with mv
        shutil.copy(path, tmp_path / "backup.sqlite3")
        os.replace(tmp_path / "backup.sqlite3", path)
    answers: list[TestResponse] = []
    for body in (sample("clicked"), sample("bounced")):  # on this thread, then on a new one
        if not answers:
            answers.append(post(app.test_client(), body))
        else:
            thread = threading.Thread(target=lambda body=body: answers.append(post(app.test_client(), body)))
            thread.start()
            thread.join(20)
    assert [response.status_code for response in answers] == [503, 503]
    assert "could not read the outbox" in answers[0].json["error"]
    assert (
        f"the SQLite outbox {path} was removed or replaced while the app ran: restart the app" in caplog.text
    )


@pytest.mark.parametrize("change", ["purge delivered", "purge dead letters", "requeue"])
def test_a_bulk_change_commits_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A purge or requeue of many rows commits a chunk at a time: movers, senders and rejected bodies
    waiting for the write lock get it between commits, not only after the whole change (300,000 rows
    in one transaction held it for 1.9 s). What each commit changed is done, whatever comes after."""
    clock = Clock()
    store = SQLiteStore(str(tmp_path / "outbox.sqlite3"), clock=clock)
    monkeypatch.setattr(store, "BULK_ROWS", 2)
    for n in range(5):
        store.add(f"e{n}", "{}")
    claim = store.claim(100, lease=60, max_age=3600)
    if change == "purge delivered":
        store.mark_delivered(claim.owner, [event.event_id for event in claim.events])
    else:
        store.mark_dead(claim.owner, [event.event_id for event in claim.events], "RudderStack answered 400")
    clock.now += 10

    def left() -> int:  # rows the change has still to touch
        return store.count_delivered(5) if change == "purge delivered" else store.count_dead_letters()

    left_at_each_commit: list[int] = []
    one_transaction = store._transaction

    @contextmanager
    def watched_transaction() -> Iterator[Any]:
        with one_transaction() as db:
            yield db
        left_at_each_commit.append(left())

    monkeypatch.setattr(store, "_transaction", watched_transaction)
    if change == "purge delivered":
        assert store.purge_delivered(older_than=5) == 5
    elif change == "purge dead letters":
        assert store.purge_dead() == 5
    else:
        assert store.requeue() == 5
    assert left_at_each_commit == [3, 1, 0]
    assert store.status().pending == (5 if change == "requeue" else 0)
    if change == "purge delivered":
        assert store.status().last_delivered_at == clock.now - 10  # still told after the purge
    store.close()


def test_a_requeue_in_chunks_requeues_each_dead_letter_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RudderStack refuses the requeued events again between two commits: the next chunk found them
    dead again, requeued them again, counted them twice, and could go on for as long as that lasted."""
    clock = Clock()
    store = SQLiteStore(str(tmp_path / "outbox.sqlite3"), clock=clock)
    sender = SQLiteStore(str(tmp_path / "outbox.sqlite3"), clock=clock)  # in another process
    for n in range(6):
        store.add(f"e{n}", "{}")
    claim = store.claim(100, lease=60, max_age=3600)
    store.mark_dead(claim.owner, [event.event_id for event in claim.events], "RudderStack answered 400")
    monkeypatch.setattr(store, "BULK_ROWS", 2)
    one_transaction = store._transaction

    commits = []

    @contextmanager
    def refused_again_between_commits() -> Iterator[Any]:
        with one_transaction() as db:
            yield db
        commits.append(1)
        assert len(commits) < 10, "the requeue keeps finding the events it requeued"
        again = sender.claim(100, lease=60, max_age=3600)
        sender.mark_dead(again.owner, [event.event_id for event in again.events], "RudderStack answered 400")

    monkeypatch.setattr(store, "_transaction", refused_again_between_commits)
    assert store.requeue() == 6
    assert store.count_dead_letters() == 6  # each sent once more, and refused once more
    store.close()
    sender.close()


def test_status_reads_one_snapshot_so_no_more_is_in_flight_than_pending(tmp_path: Path) -> None:
    """The spool's mover adds a batch already leased to its sender: added between status()'s count
    of pending events and its count of leased ones, it showed 65 pending and 100 in flight."""
    store = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    mover = store_from_url(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    try:
        store.add("e0", "{}")
        added: list[int] = []

        def a_batch_moved_between_the_reads(statement: str) -> None:
            if "lease_holder" in statement and not added:  # the status's last read is starting
                batch = [Pending(f"m{n}", "{}") for n in range(3)]
                added.append(len(mover.add_claimed(batch, 600.0, 3600.0).events))

        store._db().set_trace_callback(a_batch_moved_between_the_reads)  # type: ignore[attr-defined]
        status = store.status()
        store._db().set_trace_callback(None)  # type: ignore[attr-defined]
        assert added == [3]
        assert (status.pending, status.in_flight) == (1, 0)  # as it was when the reading began
        assert (store.status().pending, store.status().in_flight) == (4, 3)
    finally:
        store.close()
        mover.close()
