"""The SQLite store: one file on the local disk of one machine, shared by every process there.

Every process that serves the app opens the same file; SQLite's locking (WAL mode,
``BEGIN IMMEDIATE`` to claim) keeps two senders off the same rows. A claim's holder
is its process (id, start time and PID namespace): the outbox is on one machine, so a
batch whose process no longer exists is claimed again at once, not after its lease. One
held from another container, whose processes cannot be seen here, waits for its lease.

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
is a shared use of ``_fork_guard``, and a fork first takes it exclusively (waiting until no
thread is inside SQLite) and closes every connection.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from .base import (
    Activity,
    Claim,
    Claimed,
    Clock,
    DeadLetter,
    EventRecord,
    Match,
    OutboxStatus,
    OutboxStore,
    Pending,
    StoreUnavailable,
    body_text,
    check_durability,
    check_table_name,
    clean_text,
    match_conditions,
    minute_of,
    newest_delivery,
    per_minute,
    redact_url,
    rejected_key,
    search_columns,
    search_email,
    storage_key,
)
from .forkguard import fork_guard as _fork_guard

if sys.platform != "win32":
    import fcntl

__all__ = ["SQLiteStore", "holder_alive", "sqlite_path", "this_process"]

#: The SQLite ``synchronous`` setting of each ``CIO_RUDDER_OUTBOX_DURABILITY``.
#: "process-crash": a commit survives the process being killed (the WAL is written
#: before the answer), but the last commits can be lost if the machine loses power.
#: "power-loss": every commit is also fsync'ed, so it survives power loss; slower.
_SYNCHRONOUS = {"process-crash": "NORMAL", "power-loss": "FULL"}

#: The table of outboxes made before the table name could be chosen; its side table is ``meta``.
DEFAULT_TABLE = "events"

_live_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _close_all_before_fork() -> None:
    _fork_guard.acquire()  # waits until no thread of this process is inside SQLite
    for store in list(_live_stores):
        store.close()
    _close_ended()  # also those of stores dropped meanwhile


def _release_after_fork() -> None:
    _fork_guard.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_close_all_before_fork,
        after_in_parent=_release_after_fork,
    )


# -- which process holds a lease -----------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot; ``""`` where unknown); ``None`` if it is gone.

    Linux's ``/proc`` gives the start time, which tells a reused process id from the
    holder; elsewhere only whether some process has that id. A zombie counts as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat_line = file.read()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (macOS, Windows): does any process have this id?
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:  # exists, owned by someone else
            pass
        return ""
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()  # after "pid (command) "
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped
        return None
    return fields[19].decode()  # field 22 of proc(5), starttime


def _pid_namespace() -> str:
    """This process's PID namespace (Linux: ``pid:[4026531836]``; ``""`` elsewhere).

    Containers on one machine that share the outbox's volume each have their own: a
    process id read in one means nothing in another.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


#: Read once: a process keeps its PID namespace, and its forks share it.
_PID_NAMESPACE = _pid_namespace()


def this_process() -> str:
    """This process as a lease holder: ``"<pid>:<start time>:<PID namespace>"``."""
    pid = os.getpid()
    return f"{pid}:{_process_start(pid) or ''}:{_PID_NAMESPACE}"


def holder_alive(holder: str) -> bool:
    """Whether the process named by ``holder`` (see :func:`this_process`) still runs.

    A holder in another PID namespace (another container) cannot be looked up from here:
    it counts as alive, and its batch is free when its lease ends. Holders written
    before the namespace was recorded have none and are looked up here.
    """
    pid_text, _, rest = holder.partition(":")
    started, _, namespace = rest.partition(":")
    if namespace and namespace != _PID_NAMESPACE:
        return True
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now_started = _process_start(pid)
    return now_started is not None and (not started or not now_started or now_started == started)


# -- files and locks ------------------------------------------------------------------------------


def _create_private(database: str) -> bool:
    """Create the database file readable by its owner only, unless it exists (then ``False``): it
    holds people's addresses and events. SQLite gives its ``-wal`` and ``-shm`` files the same mode,
    the lock file and the spool take it too; an operator may widen it for a group."""
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def _open_lock_file(database: str, *, create: bool = True) -> int | None:
    """The descriptor of the outbox's lock file, created with the database's permissions.

    ``None`` on Windows, which has no ``flock``: there SQLite's busy timeout is all there is;
    and, unless ``create``, where there is no lock file (no outbox ever wrote that file).
    """
    if sys.platform == "win32":
        return None
    try:
        mode = stat.S_IMODE(os.stat(database).st_mode)
    except FileNotFoundError:
        mode = 0o644  # what SQLite gives a new database file
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(database + ".lock", flags, mode)
    except FileNotFoundError:
        if create:
            raise
        return None


@contextmanager
def _locked(lock_file: int | None, within: float | None = None) -> Iterator[None]:
    """Hold the outbox's write lock, waiting for any process that holds it: as long as it takes, or
    at most ``within`` seconds (then ``TimeoutError``). Not re-entrant: never nest."""
    if lock_file is None:
        yield
        return
    if within is None:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    else:
        _lock_within(lock_file, within)
    try:
        yield
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)


def _lock_within(lock_file: int, seconds: float) -> None:
    """Take the write lock, trying every few milliseconds (``flock`` itself waits without end)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"another process has held its write lock for {seconds:g} s") from None
            time.sleep(_LOCK_POLL)


def _check_table_names(events: str, meta: str) -> None:
    """Fail naming the setting unless SQLite takes these names unquoted, in the outbox's own
    statements (tried on an in-memory database): a word of SQL (``order``, ``cast``) or a name
    SQLite keeps for itself (``sqlite_...``) would fail with a syntax error that names neither."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as db:
            db.executescript(_TABLES.format(events=events, meta=meta) + _INDEXES.format(events=events))
            db.execute(SQLiteStore._ADD.format(t=events), ("e", "{}", 0.0, None, None, None, None, None))
    except sqlite3.Error:
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_TABLE {events!r} is a word of SQL or a name SQLite keeps for itself: "
            "choose another, such as cio_rudder_outbox."
        ) from None


def _lower(value: str | None) -> str | None:
    """SQL's ``lower()`` as Python's: every letter, not only ASCII ones (used on text columns only)."""
    return None if value is None else str(value).lower()


def _file_id(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names (device, inode), or ``None`` if none."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return None
    return named.st_dev, named.st_ino


def _close(db: sqlite3.Connection | None, lock_file: int | None, within: float | None = None) -> None:
    """Close a connection under the write lock (closing the last one checkpoints the WAL), then the lock.

    ``within``: as for :func:`_locked`; if the lock is not had in time, nothing is closed."""
    with _locked(lock_file, within):
        if db is not None:
            db.close()
    if lock_file is not None:
        os.close(lock_file)


# Connections of threads that ended, (pid, connection, lock file), until a thread that holds no
# lock closes them: a thread's end, or a garbage collection on any thread, may come while that
# thread holds the write lock, and is no place to wait for it.
_ended: deque[tuple[int, sqlite3.Connection, int | None]] = deque()


def _close_ended(within: float | None = None) -> None:
    """Close what threads that ended left, if this process opened it (a forked child leaves the
    parent's alone: its lock file's ``flock`` is shared with the parent). Each waits for the write
    lock at most ``within`` seconds (``None``: as long as it takes); a web request passes 0: it must
    not wait for another process's writer."""
    while _ended:
        try:
            ended = _ended.popleft()
        except IndexError:  # another thread took the last one meanwhile
            return
        pid, db, lock_file = ended
        if pid != os.getpid():
            continue
        try:
            _close(db, lock_file, within)
        except TimeoutError:  # held elsewhere: left for the next thread to start, or the next close()
            _ended.appendleft(ended)
            return


#: Seconds SQLite waits for a lock held by a process outside the lock file (an ``sqlite3`` shell).
_BUSY_TIMEOUT = 30.0
#: Seconds a web request's write waits for the write lock before its answer is a 503.
_REQUEST_WAIT = 2.0
#: Seconds between two tries of a lock waited for with a bound.
_LOCK_POLL = 0.005


class _ThreadConnection:
    """Kept in a thread's ``threading.local`` beside its connection and lock file: when the thread
    ends and lets go of it, they are queued for closing. A server that starts a thread per request
    (``flask run``) opens one per request, and would otherwise run out of file descriptors."""

    def __init__(self, db: sqlite3.Connection, lock_file: int | None) -> None:
        self.close = weakref.finalize(self, _ended.append, (os.getpid(), db, lock_file))
        self.close.atexit = False  # at exit the forwarders close their stores


class _Lease(NamedTuple):
    """A lease given as events are added (claim, end, process); events accepted before ``oldest`` get none."""

    owner: str
    until: float
    holder: str
    oldest: float


_TABLES = """
CREATE TABLE IF NOT EXISTS {events} (
    event_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,     -- 'pending', 'delivered' or 'dead'
    payload      TEXT,              -- the RudderStack event (JSON); NULL if rejected at validation
    body         TEXT,              -- the body as received, kept only for rejected ones
    reason       TEXT,              -- dead: why; pending: the last delivery error
    accepted_at  REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_owner  TEXT,              -- the claim holding the row
    lease_until  REAL,
    delivered_at REAL,
    lease_holder TEXT,              -- the process of that claim, "<pid>:<start time>:<PID namespace>"
    event_name   TEXT,              -- the RudderStack event name, for operators' searches
    email        TEXT               -- the person's address, lower case, for operators' searches
);
CREATE TABLE IF NOT EXISTS {meta} (key TEXT PRIMARY KEY, value TEXT);
"""

_INDEXES = """
CREATE INDEX IF NOT EXISTS {events}_by_state ON {events} (state, accepted_at);
CREATE INDEX IF NOT EXISTS {events}_by_holder ON {events} (lease_holder) WHERE lease_holder IS NOT NULL;
CREATE INDEX IF NOT EXISTS {events}_by_email ON {events} (email) WHERE email IS NOT NULL;
CREATE INDEX IF NOT EXISTS {events}_delivered ON {events} (delivered_at) WHERE state = 'delivered';
"""

#: Columns added after the first release, with their type: old files get them on first use.
_ADDED_COLUMNS = {"lease_holder": "TEXT", "event_name": "TEXT", "email": "TEXT"}

#: The columns an outbox has had from the first release: a table without them is someone else's.
_FIRST_COLUMNS = {
    "event_id",
    "state",
    "payload",
    "body",
    "reason",
    "accepted_at",
    "attempts",
    "lease_owner",
    "lease_until",
    "delivered_at",
}

#: Fills the search columns of rows kept before they existed (SQLite's JSON functions): each only
#: from text, as search_columns() fills them for new rows.
_BACKFILL = (
    "UPDATE {events} SET "
    "event_name = CASE WHEN json_type(payload, '$.event') = 'text' "
    "THEN json_extract(payload, '$.event') END, "
    "email = CASE WHEN json_type(payload, '$.context.traits.email') = 'text' "
    "THEN NULLIF(lower(trim(json_extract(payload, '$.context.traits.email'))), '') END "
    "WHERE payload IS NOT NULL AND event_name IS NULL AND json_valid(payload)"
)


def sqlite_path(url: str, instance_path: str | None) -> str:
    """The file of an ``sqlite:///`` URL: three slashes, relative to ``instance_path``; four, absolute."""
    parts = urlsplit(url)
    if parts.netloc or not parts.path or parts.path == "/" or parts.query:
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_URL {redact_url(url)!r} is not an SQLite file URL: use "
            "sqlite:///relative/name.sqlite3 (in the instance folder) or sqlite:////absolute/path.sqlite3."
        )
    path = unquote(parts.path[1:])  # the first slash separates the (empty) host from the path
    if os.path.isabs(path):
        return path
    return os.path.join(instance_path or os.getcwd(), path)


class SQLiteStore(OutboxStore):
    """The outbox in an SQLite file; every process on the machine that opens ``path`` shares it.

    Safe to use from many threads: each thread (and each process after a fork)
    gets its own SQLite connection.
    """

    #: Bulk changes (requeue, purges) commit this many rows at a time, so that movers, senders and
    #: web requests waiting for the write lock get it between commits: 300,000 rows in one
    #: transaction held it for 1.9 s.
    BULK_ROWS = 5000

    def __init__(
        self,
        path: str,
        *,
        table: str = DEFAULT_TABLE,
        durability: str = "process-crash",
        clock: Clock = time.time,
        create: bool = True,
    ) -> None:
        self._synchronous = _SYNCHRONOUS[check_durability(durability)]
        self.path = path
        self.url = "sqlite:///" + os.path.abspath(path)
        self.table = check_table_name(table, schemas=False)
        # The side table of the first outboxes was plain "meta"; keep finding it there.
        self._meta = "meta" if table == DEFAULT_TABLE else f"{table}_meta"
        _check_table_names(self.table, self._meta)
        self._is_known_sql = f"SELECT 1 FROM {self.table} WHERE event_id = ? AND payload IS NOT NULL"
        self.clock = clock
        self._local = threading.local()
        self._opened: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._opened_lock = threading.Lock()
        self._ready = False
        self._creates = create  # False: reads another outbox, makes no file nor table
        #: The file (device, inode) the store opened first: every connection must be to it.
        self._file: tuple[int, int] | None = None
        _live_stores.add(self)
        if create:  # a local file: if it cannot be made, nothing can work, so say so at start-up
            self.create_tables()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        instance_path: str | None,
        table: str | None,
        durability: str,
        clock: Clock | None,
        create: bool,
    ) -> SQLiteStore:
        return cls(
            sqlite_path(url, instance_path),
            table=table or DEFAULT_TABLE,
            durability=durability,
            clock=clock or time.time,
            create=create,
        )

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r} table={self.table!r}>"

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def _connected(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held so that no fork happens while it is in use.

        SQLite's errors (and the lock file's) leave as :class:`StoreUnavailable`.
        """
        try:
            with _fork_guard.shared():
                db = self._db()
                if self._local.file != self._file or _file_id(self.path) != self._file:
                    raise StoreUnavailable(  # writing on would keep events in a file no one will read
                        f"the SQLite outbox {self.path} was removed or replaced while the app ran: restart "
                        "the app, which makes a new one (what was pending in the old one went with it)"
                    )
                if not self._ready and self._creates:
                    self._create(db)
                yield db
        except (sqlite3.Error, OSError) as error:
            raise StoreUnavailable(f"the SQLite outbox {self.path} cannot be used: {error}") from error

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use in this thread and process."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # after a fork that ran no fork hooks
            directory = os.path.dirname(os.path.abspath(self.path))
            if self._creates:
                os.makedirs(directory, mode=0o700, exist_ok=True)  # a new folder is private, as the file is
                if _create_private(self.path):
                    self.made_new = True
            elif not os.path.isfile(self.path):  # sqlite3.connect would make it
                raise FileNotFoundError(f"no file {self.path}")
            if self._creates and not self._ready and not self.made_new:
                self._refuse_others_tables()  # before anything is made beside the file, or in it
            lock_file = _open_lock_file(self.path, create=self._creates)
            # Before connecting: should the file be swapped meanwhile, the check in _connected fails safe
            # (a connection to a removed file is never taken for one to the store's).
            file = _file_id(self.path)
            if self._file is None:
                self._file = file
            db = None  # a connection inherited through a fork is left alone, never closed here
            try:
                db = sqlite3.connect(
                    self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
                )
                # Turning a new file to WAL needs an exclusive lock that SQLite's busy timeout does not
                # wait for: two workers starting at once would fail ("database is locked"). A file in WAL
                # already needs no lock, so a new thread's first request never waits for a writer.
                if self._creates and db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    with _locked(lock_file):
                        db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self._synchronous}")
                # SQLite's lower() lowers ASCII only: searches ignore every letter's case, as on PostgreSQL.
                db.create_function("lower", 1, _lower, deterministic=True)
            except BaseException:
                _close(db, lock_file)
                raise
            _close_ended(0)  # a new thread: perhaps one that ended left its connection
            connection = _ThreadConnection(db, lock_file)
            self._local.db, self._local.lock_file, self._local.pid = db, lock_file, os.getpid()
            self._local.file = file
            self._local.connection = connection  # closes them when this thread ends
            with self._opened_lock:
                self._opened.add(connection)
        return db

    def _refuse_others_tables(self) -> None:
        """Fail, naming the settings, where the file holds a table of the outbox's names that is not
        the outbox's: the app's own, in the database file the outbox was pointed at."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT)) as db:
            for table, needed in ((self.table, _FIRST_COLUMNS), (self._meta, {"key", "value"})):
                found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if found and not needed <= found:
                    raise RuntimeError(
                        f"The SQLite file {self.path} already has a table {table!r} that is not the outbox's "
                        f"(it has no {', '.join(sorted(needed - found))}): give the outbox a file of its own "
                        "in CIO_RUDDER_OUTBOX_URL, or other table names with CIO_RUDDER_OUTBOX_TABLE."
                    )

    def _create(self, db: sqlite3.Connection) -> None:
        """Create the tables, and add the columns an outbox made by an older release lacks."""
        with _locked(self._local.lock_file):
            db.executescript(_TABLES.format(events=self.table, meta=self._meta))
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({self.table})")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in columns:
                    db.execute(f"ALTER TABLE {self.table} ADD COLUMN {column} {kind}")
            if "event_name" not in columns:
                # An SQLite without JSON functions leaves old rows unsearchable by email.
                with contextlib.suppress(sqlite3.OperationalError):
                    db.execute(_BACKFILL.format(events=self.table))
            db.executescript(_INDEXES.format(events=self.table))
        self._ready = True

    @contextmanager
    def _writing(self, within: float | None = None) -> Iterator[sqlite3.Connection]:
        """This thread's connection, holding the outbox's write lock (waits, in any process, until free).

        The wait has no timeout, as a lock held only for one statement or transaction needs none;
        a web request's write gives up ``within`` seconds (``TimeoutError``, ``sqlite3.OperationalError``),
        as Customer.io gives up after 4 s: an ``sqlite3`` shell may hold it longer.
        """
        with self._connected() as db:
            if within is None:
                with _locked(self._local.lock_file):
                    yield db
                return
            db.execute(f"PRAGMA busy_timeout={int(within * 1000)}")
            try:
                with _locked(self._local.lock_file, within):
                    yield db
            finally:
                db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT * 1000)}")

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

    def close(self, within: float | None = None) -> None:
        """Close every connection of this process; each thread reopens its own on next use.

        Closing waits for the write lock (the last connection checkpoints the WAL): at most ``within``
        seconds, after which the connections stay queued for the next close, or the process's exit.
        """
        with _fork_guard.exclusive():
            with self._opened_lock:
                opened, self._opened = list(self._opened), weakref.WeakSet()
            self._local = threading.local()
            for connection in opened:
                connection.close()
            _close_ended(within)

    def after_fork(self) -> None:
        """Drop the parent's connections unclosed (the fork hook closed them already where it ran)."""
        with self._opened_lock:
            self._opened = weakref.WeakSet()
        self._local = threading.local()

    # -- the web request's side ----------------------------------------------------------------

    def is_known(self, event_id: str) -> bool:
        with self._connected() as db:
            return db.execute(self._is_known_sql, (storage_key(event_id),)).fetchone() is not None

    _ADD = (
        "INSERT INTO {t} (event_id, state, payload, accepted_at, event_name, email, "
        "lease_owner, lease_until, lease_holder) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (event_id) DO UPDATE SET state = 'pending', payload = excluded.payload, "
        "body = NULL, reason = NULL, accepted_at = excluded.accepted_at, "
        "event_name = excluded.event_name, email = excluded.email, lease_owner = excluded.lease_owner, "
        "lease_until = excluded.lease_until, lease_holder = excluded.lease_holder WHERE {t}.payload IS NULL"
    )

    def add(
        self, event_id: str, payload_json: str, *, event_name: str | None = None, email: str | None = None
    ) -> bool:
        event_name, email = search_columns(payload_json, event_name, email)
        with self._writing() as db:
            cursor = db.execute(
                self._ADD.format(t=self.table),
                (storage_key(event_id), payload_json, self.clock(), event_name, email, None, None, None),
            )
            return cursor.rowcount == 1

    def add_many(self, events: Iterable[Pending]) -> int:
        with self._transaction() as db:
            return len(self._add_all(db, events, None))

    def add_claimed(self, events: Sequence[Pending], lease: float, max_age: float) -> Claim:
        owner = uuid.uuid4().hex
        with self._transaction() as db:
            now = self.clock()
            paused = db.execute(f"SELECT 1 FROM {self._meta} WHERE key = 'paused'").fetchone()
            terms = None if paused else _Lease(owner, now + lease, this_process(), now - max_age)
            added = self._add_all(db, events, terms)
        return Claim(owner, [Claimed(key, payload_json) for key, payload_json, leased in added if leased])

    def _add_all(
        self, db: sqlite3.Connection, events: Iterable[Pending], lease: _Lease | None
    ) -> list[tuple[str, str, bool]]:
        """Insert ``events`` (those already accepted stay as they are); the new ones, each leased or not."""
        now = self.clock()
        statement = self._ADD.format(t=self.table)
        unleased = (None, None, None)
        held = unleased if lease is None else (lease.owner, lease.until, lease.holder)
        oldest = float("inf") if lease is None else lease.oldest
        added = []
        for event in events:
            accepted_at = now if event.accepted_at is None else event.accepted_at
            name, email = search_columns(event.payload_json, event.event_name, event.email)
            key = storage_key(event.event_id)
            leased = accepted_at >= oldest
            holder = held if leased else unleased
            if db.execute(statement, (key, event.payload_json, accepted_at, name, email, *holder)).rowcount:
                added.append((key, event.payload_json, leased))
        return added

    def add_rejected(
        self,
        event_id: str | None,
        body: bytes,
        reason: str,
        *,
        event_name: str | None = None,
        email: str | None = None,
    ) -> None:
        with self._writing(within=_REQUEST_WAIT) as db:  # in the webhook's request
            db.execute(
                f"INSERT INTO {self.table} (event_id, state, body, reason, accepted_at, event_name, email) "
                "VALUES (?, 'dead', ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                (
                    rejected_key(event_id, body),
                    body_text(body),
                    reason,
                    self.clock(),
                    None if event_name is None else clean_text(event_name),
                    search_email(email),
                ),
            )

    # -- the sender's side ---------------------------------------------------------------------

    def claim(self, limit: int, lease: float, max_age: float) -> Claim:
        now = self.clock()
        owner = uuid.uuid4().hex
        t = self.table
        with self._transaction() as db:
            if db.execute(f"SELECT 1 FROM {self._meta} WHERE key = 'paused'").fetchone():
                return Claim(owner, [], paused=True)
            expired: int = db.execute(
                f"UPDATE {t} SET state = 'dead', lease_owner = NULL, lease_until = NULL, "
                "lease_holder = NULL, "
                "reason = 'not delivered within CIO_RUDDER_OUTBOX_MAX_AGE (' || ? || ' s); last error: ' "
                "|| COALESCE(reason, 'none') WHERE state = 'pending' AND accepted_at < ? "
                "AND (lease_until IS NULL OR lease_until < ?)",  # not a batch a live sender is posting
                (int(max_age), now - max_age, now),
            ).rowcount
            self._free_dead_holders(db)
            rows = db.execute(
                f"SELECT event_id, payload FROM {t} WHERE state = 'pending' "
                "AND (lease_until IS NULL OR lease_until < ?) ORDER BY accepted_at LIMIT ?",
                (now, limit),
            ).fetchall()
            holder = this_process()
            db.executemany(
                f"UPDATE {t} SET lease_owner = ?, lease_until = ?, lease_holder = ? WHERE event_id = ?",
                [(owner, now + lease, holder, event_id) for event_id, _ in rows],
            )
        return Claim(
            owner, [Claimed(event_id, payload_json) for event_id, payload_json in rows], expired=expired
        )

    def _free_dead_holders(self, db: sqlite3.Connection) -> None:
        """Free the leases of processes that no longer exist (a worker SIGKILLed mid-batch)."""
        holders = db.execute(
            f"SELECT DISTINCT lease_holder FROM {self.table} WHERE lease_holder IS NOT NULL"
        ).fetchall()
        dead = [(holder,) for (holder,) in holders if not holder_alive(holder)]
        db.executemany(
            f"UPDATE {self.table} SET lease_owner = NULL, lease_until = NULL, lease_holder = NULL "
            "WHERE lease_holder = ?",
            dead,
        )

    _DONE = (
        "lease_owner = NULL, lease_until = NULL, lease_holder = NULL WHERE event_id = ? AND lease_owner = ?"
    )

    def mark_delivered(self, owner: str, event_ids: Sequence[str]) -> None:
        now = self.clock()
        self._finish(
            f"UPDATE {self.table} SET state = 'delivered', delivered_at = ?, reason = NULL, "
            f"attempts = attempts + 1, {self._DONE}",
            [(now, event_id, owner) for event_id in event_ids],
        )

    def release(self, owner: str, event_ids: Sequence[str], error: str) -> None:
        self._finish(
            f"UPDATE {self.table} SET reason = ?, attempts = attempts + 1, {self._DONE}",
            [(error, event_id, owner) for event_id in event_ids],
        )
        self._set_meta({"last_error": error, "last_error_at": str(self.clock())})

    def mark_dead(self, owner: str, event_ids: Sequence[str], reason: str) -> None:
        self._finish(
            f"UPDATE {self.table} SET state = 'dead', reason = ?, attempts = attempts + 1, {self._DONE}",
            [(reason, event_id, owner) for event_id in event_ids],
        )

    def _finish(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        with self._transaction() as db:
            db.executemany(statement, rows)

    def _set_meta(self, values: dict[str, str]) -> None:
        with self._transaction() as db:
            db.executemany(
                f"INSERT INTO {self._meta} (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    # -- operators -----------------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        t = self.table
        with self._connected() as db:
            # One snapshot (WAL) for every read: else a batch the spool's mover adds, leased, between
            # two reads counts more in flight than pending.
            db.execute("BEGIN")
            try:
                counts = dict(db.execute(f"SELECT state, COUNT(*) FROM {t} GROUP BY state").fetchall())
                now = self.clock()  # the snapshot began: no delivery it holds is later than this
                (oldest,) = db.execute(f"SELECT MIN(accepted_at) FROM {t} WHERE state = 'pending'").fetchone()
                (delivered_at,) = db.execute(  # without INDEXED BY, SQLite would read every delivered row
                    f"SELECT MAX(delivered_at) FROM {t} INDEXED BY {t}_delivered WHERE state = 'delivered'"
                ).fetchone()
                meta = dict(db.execute(f"SELECT key, value FROM {self._meta}").fetchall())
                held = db.execute(
                    f"SELECT lease_holder, COUNT(*) FROM {t} WHERE lease_holder IS NOT NULL "
                    "AND state = 'pending' AND lease_until >= ? GROUP BY lease_holder",
                    (now,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
        live = [(holder, count) for holder, count in held if holder_alive(holder)]
        return OutboxStatus(
            pending=counts.get("pending", 0),
            delivered=counts.get("delivered", 0),
            dead=counts.get("dead", 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            last_error=meta.get("last_error"),
            last_error_at=float(meta["last_error_at"]) if "last_error_at" in meta else None,
            in_flight=sum(count for _, count in live),
            holders=tuple(sorted("pid " + holder.partition(":")[0] for holder, _ in live)),
            paused="paused" in meta,
            last_delivered_at=newest_delivery(delivered_at, meta),
            read_at=now,
        )

    def set_paused(self, paused: bool) -> None:
        if paused:
            self._set_meta({"paused": str(self.clock())})
            return
        with self._transaction() as db:
            db.execute(f"DELETE FROM {self._meta} WHERE key = 'paused'")

    def dead_letters(
        self,
        limit: int = 100,
        *,
        match: Match | None = None,
        offset: int = 0,
        newest_first: bool = False,
        bodies: bool = True,
    ) -> list[DeadLetter]:
        narrow, params = match_conditions(match, "?", "instr")
        order = "DESC" if newest_first else "ASC"
        body = "body" if bodies else "NULL"
        with self._connected() as db:
            rows = db.execute(
                f"SELECT event_id, reason, accepted_at, attempts, payload IS NOT NULL, {body}, event_name, "
                f"email FROM {self.table} WHERE state = 'dead'{narrow} "
                f"ORDER BY accepted_at {order}, event_id {order} LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [
            DeadLetter(event_id, reason, accepted_at, attempts, bool(requeueable), body, name, email)
            for event_id, reason, accepted_at, attempts, requeueable, body, name, email in rows
        ]

    def count_dead_letters(self, match: Match | None = None) -> int:
        narrow, params = match_conditions(match, "?", "instr")
        with self._connected() as db:
            (count,) = db.execute(
                f"SELECT COUNT(*) FROM {self.table} WHERE state = 'dead'{narrow}", params
            ).fetchone()
        return int(count)

    def find(
        self, *, event_id: str | None = None, email: str | None = None, limit: int = 50
    ) -> list[EventRecord]:
        if event_id is not None:
            condition, value = "event_id = ?", storage_key(event_id)
        elif email is not None:
            condition, value = "email = ?", search_email(email) or ""
        else:
            return []
        with self._connected() as db:
            rows = db.execute(
                "SELECT event_id, state, accepted_at, delivered_at, reason, attempts, payload IS NULL, "
                f"event_name, email, payload, body FROM {self.table} WHERE {condition} "
                "ORDER BY accepted_at DESC LIMIT ?",
                (value, limit),
            ).fetchall()
        return [
            EventRecord(
                key, state, accepted, delivered, reason, attempts, bool(rejected), name, mail, payload, body
            )
            for key, state, accepted, delivered, reason, attempts, rejected, name, mail, payload, body in rows
        ]

    def activity(self, minutes: int = 60) -> Activity:
        start = minute_of(self.clock()) - (minutes - 1) * 60
        t = self.table
        with self._connected() as db:
            accepted = db.execute(
                f"SELECT CAST((accepted_at - ?) / 60 AS INTEGER), COUNT(*) FROM {t} "
                "WHERE state IN ('pending', 'delivered', 'dead') AND accepted_at >= ? GROUP BY 1",
                (start, start),
            ).fetchall()
            delivered = db.execute(
                f"SELECT CAST((delivered_at - ?) / 60 AS INTEGER), COUNT(*) FROM {t} "
                "WHERE state = 'delivered' AND delivered_at >= ? GROUP BY 1",
                (start, start),
            ).fetchall()
        return Activity(start, per_minute(accepted, minutes), per_minute(delivered, minutes))

    def pending(self, limit: int = 1000, after: str | None = None) -> list[Pending]:
        with self._connected() as db:
            rows = db.execute(
                f"SELECT event_id, payload, accepted_at FROM {self.table} "
                "WHERE state = 'pending' AND event_id > ? ORDER BY event_id LIMIT ?",
                ("" if after is None else after, limit),
            ).fetchall()
        return [Pending(event_id, payload, accepted_at) for event_id, payload, accepted_at in rows]

    def requeue(self, event_ids: Sequence[str] | None = None, *, match: Match | None = None) -> int:
        narrow, params = match_conditions(match, "?", "instr")
        requeue = f"UPDATE {self.table} SET state = 'pending', reason = NULL, attempts = 0, accepted_at = ?"
        where = f"state = 'dead' AND payload IS NOT NULL{narrow}"
        if event_ids is None:
            return self._in_chunks(requeue, (self.clock(),), where, params)
        with self._transaction() as db:
            return sum(
                db.execute(
                    f"{requeue} WHERE {where} AND event_id = ?",
                    (self.clock(), *params, storage_key(event_id)),
                ).rowcount
                for event_id in event_ids
            )

    def purge_dead(self, match: Match | None = None) -> int:
        narrow, params = match_conditions(match, "?", "instr")
        return self._in_chunks(f"DELETE FROM {self.table}", (), f"state = 'dead'{narrow}", params)

    def count_delivered(self, older_than: float) -> int:
        with self._connected() as db:
            (count,) = db.execute(
                f"SELECT COUNT(*) FROM {self.table} WHERE state = 'delivered' AND delivered_at < ?",
                (self.clock() - older_than,),
            ).fetchone()
        return int(count)

    def purge_delivered(self, older_than: float) -> int:
        cutoff = self.clock() - older_than
        t = self.table
        oldest = (  # the next chunk, oldest first: a purge that stops half-way leaves the newer rows
            f"SELECT rowid FROM {t} INDEXED BY {t}_delivered "
            "WHERE state = 'delivered' AND delivered_at < ? ORDER BY delivered_at LIMIT ?"
        )
        count = 0
        while True:
            with self._transaction() as db:
                (newest,) = db.execute(
                    f"SELECT MAX(delivered_at) FROM {t} WHERE rowid IN ({oldest})", (cutoff, self.BULK_ROWS)
                ).fetchone()
                deleted: int = db.execute(
                    f"DELETE FROM {t} WHERE rowid IN ({oldest})", (cutoff, self.BULK_ROWS)
                ).rowcount
                if deleted:  # status() still tells when the last delivery was
                    db.execute(
                        f"INSERT INTO {self._meta} (key, value) VALUES ('purged_delivered_at', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
                        "WHERE CAST(value AS REAL) < excluded.value",
                        (repr(newest),),
                    )
            count += deleted
            if deleted < self.BULK_ROWS:
                return count
            time.sleep(0.001)  # between chunks, a turn for the others: a gevent worker's requests, say

    def _in_chunks(
        self, change: str, change_params: Sequence[object], where: str, params: Sequence[object]
    ) -> int:
        """``{change} WHERE {where}``, committed ``BULK_ROWS`` rows at a time; returns how many rows changed.

        It changes the rows that match when it starts, each once (a requeued event that a sender makes
        a dead letter again meanwhile stays one), and each only if it still matches at its commit.
        What a commit changed stays if a later one fails.
        """
        with self._connected() as db:
            rowids = [
                rowid for (rowid,) in db.execute(f"SELECT rowid FROM {self.table} WHERE {where}", params)
            ]
        one = f"{change} WHERE rowid = ? AND {where}"
        count = 0
        for start in range(0, len(rowids), self.BULK_ROWS):
            with self._transaction() as db:
                changed = db.executemany(
                    one,
                    [(*change_params, rowid, *params) for rowid in rowids[start : start + self.BULK_ROWS]],
                )
                count += changed.rowcount
        return count

    def schema_sql(self) -> str:
        return (
            _TABLES.format(events=self.table, meta=self._meta).strip()
            + "\n"
            + _INDEXES.format(events=self.table).strip()
            + "\n"
        )

    def create_tables(self) -> None:
        with self._connected() as db:
            if not self._ready:
                self._create(db)

    def has_tables(self) -> bool:
        with self._connected() as db:
            found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (self.table,))
            return found.fetchone() is not None

    def drop_tables(self) -> None:
        with self._writing() as db:
            db.execute(f"DROP TABLE IF EXISTS {self.table}")
            db.execute(f"DROP TABLE IF EXISTS {self._meta}")
        self._ready = False
