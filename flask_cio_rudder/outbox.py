"""The outbox: a SQLite file where accepted events wait until RudderStack has them.

One row per Customer.io ``event_id``. A row is ``pending`` until a sender claims it
(a lease, so a sender killed mid-batch leaves it to another after the lease runs
out), then ``delivered``, or ``dead`` with the reason when RudderStack will never
take it. Every process that serves the app opens the same file; SQLite's locking
(WAL mode, ``BEGIN IMMEDIATE`` to claim) keeps two senders off the same rows.

Writers wait on a lock file (``<outbox>.lock``, ``flock``; not on Windows) rather
than on SQLite's own busy handler, which sleeps 1, 2, 5, 10... ms between tries:
under load a web request would otherwise wait milliseconds for a lock freed
microseconds later. A commit that checkpoints the WAL (SQLite does every 1,000
pages) holds that lock meanwhile, so no writer appends during the checkpoint and
the WAL usually starts over small (a reader's snapshot can still hold it back).
The lock file must stay while the app runs: it is the lock, not a marker.

An SQLite connection must never cross a ``fork()`` (gunicorn ``--preload`` forks
workers from a process whose sender thread may be inside a transaction; the child
would then wait forever for a lock nobody holds). So every use of a connection
holds ``_fork_lock``, and a fork first takes that lock and closes every connection.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

if sys.platform != "win32":
    import fcntl

__all__ = ["DURABILITY", "Claimed", "DeadLetter", "Outbox", "OutboxStatus"]

#: ``CIO_RUDDER_OUTBOX_DURABILITY`` values and the SQLite ``synchronous`` setting of each.
#: "process-crash": a commit survives the process being killed (the WAL is written
#: before the answer), but the last commits can be lost if the machine loses power.
#: "power-loss": every commit is also fsync'ed, so it survives power loss; slower.
DURABILITY = {"process-crash": "NORMAL", "power-loss": "FULL"}

_fork_lock = threading.RLock()
_live_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()


def _close_all_before_fork() -> None:
    _fork_lock.acquire()  # waits until no thread of this process is inside SQLite
    for outbox in list(_live_outboxes):
        outbox.close()


def _release_after_fork() -> None:
    _fork_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_close_all_before_fork,
        after_in_parent=_release_after_fork,
        after_in_child=_release_after_fork,
    )

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,     -- 'pending', 'delivered' or 'dead'
    payload      TEXT,              -- the RudderStack event (JSON); NULL if rejected at validation
    body         TEXT,              -- the body as received, kept only for rejected ones
    reason       TEXT,              -- dead: why; pending: the last delivery error
    accepted_at  REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_owner  TEXT,
    lease_until  REAL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS events_by_state ON events (state, accepted_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


def _open_lock_file(database: str) -> int | None:
    """The descriptor of the outbox's lock file, created with the database's permissions.

    ``None`` on Windows, which has no ``flock``: there SQLite's busy timeout is all there is.
    """
    if sys.platform == "win32":
        return None
    try:
        mode = stat.S_IMODE(os.stat(database).st_mode)
    except FileNotFoundError:
        mode = 0o644  # what SQLite gives a new database file
    return os.open(database + ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)


@contextmanager
def _locked(lock_file: int | None) -> Iterator[None]:
    """Hold the outbox's write lock, waiting for any process that holds it. Not re-entrant: never nest."""
    if lock_file is None:
        yield
        return
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


def _close(db: sqlite3.Connection | None, lock_file: int | None) -> None:
    """Close a connection under the write lock (closing the last one checkpoints the WAL), then the lock."""
    with _locked(lock_file):
        if db is not None:
            db.close()
    if lock_file is not None:
        os.close(lock_file)


@dataclass(frozen=True)
class Claimed:
    """An event a sender has leased: its id and its RudderStack event as JSON text."""

    event_id: str
    payload_json: str


@dataclass(frozen=True)
class DeadLetter:
    """An event that will not be delivered unless requeued, and why."""

    event_id: str
    reason: str
    accepted_at: float
    attempts: int
    requeueable: bool  # False for bodies rejected at validation: there is nothing to send
    body: str | None  # for those, the body exactly as received


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None  # seconds
    last_error: str | None
    last_error_at: float | None


class Outbox:
    """Durable store of accepted events, shared by every process that opens the same path.

    Safe to use from many threads: each thread (and each process after a fork)
    gets its own SQLite connection.
    """

    def __init__(
        self, path: str, *, durability: str = "process-crash", clock: Callable[[], float] = time.time
    ) -> None:
        if durability not in DURABILITY:
            choices = ", ".join(repr(name) for name in DURABILITY)
            raise RuntimeError(f"CIO_RUDDER_OUTBOX_DURABILITY must be one of {choices}, not {durability!r}.")
        self.path = path
        self.clock = clock
        self._synchronous = DURABILITY[durability]
        self._local = threading.local()
        self._opened: list[tuple[sqlite3.Connection, int | None]] = []
        self._opened_lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with self._writing() as db:
            db.executescript(_SCHEMA)
        _live_outboxes.add(self)

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def _connected(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held so that no fork happens while it is in use."""
        with _fork_lock:
            yield self._db()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use in this thread and process."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # after a fork that ran no fork hooks
            lock_file = _open_lock_file(self.path)
            db = None  # a connection inherited through a fork is left alone, never closed here
            try:
                # Turning a new file to WAL needs an exclusive lock that SQLite's busy timeout
                # does not wait for: two workers starting at once would fail ("database is locked").
                with _locked(lock_file):
                    db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self._synchronous}")
            except BaseException:
                _close(db, lock_file)
                raise
            self._local.db, self._local.lock_file, self._local.pid = db, lock_file, os.getpid()
            with self._opened_lock:
                self._opened.append((db, lock_file))
        return db

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, holding the outbox's write lock (waits, in any process, until free).

        The wait has no timeout, as a lock held only for one statement or transaction needs none.
        """
        with self._connected() as db, _locked(self._local.lock_file):
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front, so claims never race."""
        with self._writing() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every connection of this process; each thread reopens its own on next use."""
        with _fork_lock:
            opened, self._opened = self._opened, []
            self._local = threading.local()
            for db, lock_file in opened:
                _close(db, lock_file)

    # -- the web request's side ----------------------------------------------------------------

    def is_known(self, event_id: str) -> bool:
        """Whether this event was already accepted (rejected bodies do not count)."""
        with self._connected() as db:
            query = "SELECT 1 FROM events WHERE event_id = ? AND payload IS NOT NULL"
            return db.execute(query, (event_id,)).fetchone() is not None

    def add(self, event_id: str, payload_json: str) -> bool:
        """Keep an accepted event as pending; ``False`` if it was already there. Durable on return."""
        with self._writing() as db:
            cursor = db.execute(
                "INSERT INTO events (event_id, state, payload, accepted_at) VALUES (?, 'pending', ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET state = 'pending', payload = excluded.payload, "
                "body = NULL, reason = NULL, accepted_at = excluded.accepted_at WHERE events.payload IS NULL",
                (event_id, payload_json, self.clock()),
            )
            return cursor.rowcount == 1

    def add_rejected(self, event_id: str | None, body: bytes, reason: str) -> None:
        """Keep a body that could not be accepted (as received) as a dead letter, with the reason."""
        text = body.decode("utf-8", "backslashreplace")
        if event_id is None:
            event_id = "no-event-id:" + hashlib.sha256(body).hexdigest()[:32]
        with self._writing() as db:
            db.execute(
                "INSERT INTO events (event_id, state, body, reason, accepted_at) VALUES (?, 'dead', ?, ?, ?) "
                "ON CONFLICT (event_id) DO NOTHING",
                (event_id, text, reason, self.clock()),
            )

    # -- the sender's side ---------------------------------------------------------------------

    def claim(self, limit: int, lease: float, max_age: float) -> tuple[str, list[Claimed]]:
        """Lease up to ``limit`` pending events, oldest first; returns the lease id and the events.

        Events accepted more than ``max_age`` seconds ago become dead letters instead.
        """
        now = self.clock()
        owner = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute(
                "UPDATE events SET state = 'dead', lease_owner = NULL, lease_until = NULL, "
                "reason = 'not delivered within CIO_RUDDER_OUTBOX_MAX_AGE (' || ? || ' s); last error: ' "
                "|| COALESCE(reason, 'none') WHERE state = 'pending' AND accepted_at < ?",
                (int(max_age), now - max_age),
            )
            rows = db.execute(
                "SELECT event_id, payload FROM events WHERE state = 'pending' "
                "AND (lease_until IS NULL OR lease_until < ?) ORDER BY accepted_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE events SET lease_owner = ?, lease_until = ? WHERE event_id = ?",
                [(owner, now + lease, event_id) for event_id, _ in rows],
            )
        return owner, [Claimed(event_id, payload_json) for event_id, payload_json in rows]

    def delivered(self, owner: str, event_ids: Sequence[str]) -> None:
        self._finish(
            "UPDATE events SET state = 'delivered', delivered_at = ?, reason = NULL, "
            "attempts = attempts + 1, lease_owner = NULL, lease_until = NULL "
            "WHERE event_id = ? AND lease_owner = ?",
            [(self.clock(), event_id, owner) for event_id in event_ids],
        )

    def release(self, owner: str, event_ids: Sequence[str], error: str) -> None:
        """Give leased events back as pending after a failed attempt, noting the error."""
        self._finish(
            "UPDATE events SET reason = ?, attempts = attempts + 1, lease_owner = NULL, lease_until = NULL "
            "WHERE event_id = ? AND lease_owner = ?",
            [(error, event_id, owner) for event_id in event_ids],
        )
        self._set_meta({"last_error": error, "last_error_at": str(self.clock())})

    def dead(self, owner: str, event_ids: Sequence[str], reason: str) -> None:
        """Make leased events dead letters: RudderStack will not take them as they are."""
        self._finish(
            "UPDATE events SET state = 'dead', reason = ?, attempts = attempts + 1, "
            "lease_owner = NULL, lease_until = NULL WHERE event_id = ? AND lease_owner = ?",
            [(reason, event_id, owner) for event_id in event_ids],
        )

    def _finish(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        with self._transaction() as db:
            db.executemany(statement, rows)

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    # -- operators -----------------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        with self._connected() as db:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM events GROUP BY state").fetchall())
            (oldest,) = db.execute("SELECT MIN(accepted_at) FROM events WHERE state = 'pending'").fetchone()
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        return OutboxStatus(
            pending=counts.get("pending", 0),
            delivered=counts.get("delivered", 0),
            dead=counts.get("dead", 0),
            oldest_pending_age=None if oldest is None else max(0.0, self.clock() - oldest),
            last_error=meta.get("last_error"),
            last_error_at=float(meta["last_error_at"]) if "last_error_at" in meta else None,
        )

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._connected() as db:
            rows = db.execute(
                "SELECT event_id, reason, accepted_at, attempts, payload IS NOT NULL, body FROM events "
                "WHERE state = 'dead' ORDER BY accepted_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            DeadLetter(event_id, reason, accepted_at, attempts, bool(requeueable), body)
            for event_id, reason, accepted_at, attempts, requeueable, body in rows
        ]

    def requeue(self, event_ids: Sequence[str] | None = None) -> int:
        """Make dead letters pending again (all, or these ids); returns how many.

        Their age starts again now, so ``CIO_RUDDER_OUTBOX_MAX_AGE`` does not kill them at once.
        """
        query = (
            "UPDATE events SET state = 'pending', reason = NULL, attempts = 0, accepted_at = ? "
            "WHERE state = 'dead' AND payload IS NOT NULL"
        )
        with self._transaction() as db:
            if event_ids is None:
                return db.execute(query, (self.clock(),)).rowcount
            return sum(
                db.execute(query + " AND event_id = ?", (self.clock(), event_id)).rowcount
                for event_id in event_ids
            )

    def purge_delivered(self, older_than: float) -> int:
        """Delete delivered rows delivered more than ``older_than`` seconds ago; returns how many.

        Their ids are forgotten too, so a replay of such an old event would be accepted again.
        """
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM events WHERE state = 'delivered' AND delivered_at < ?",
                (self.clock() - older_than,),
            ).rowcount
