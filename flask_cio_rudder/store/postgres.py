"""The PostgreSQL store: one outbox shared by every app server, done as PostgreSQL queues are.

- Dedup holds across servers: ``event_id`` is the primary key and events are added
  with ``INSERT ... ON CONFLICT``, never a check then an insert.
- A claim is one ``UPDATE`` of rows picked ``FOR UPDATE SKIP LOCKED``, so senders on
  any number of machines never claim the same row; no transaction stays open while
  the batch is posted.
- Each process that claims keeps a heartbeat row in ``<table>_senders``. A batch
  whose holder's heartbeat stopped (SIGKILL, a machine gone) is free after
  ``HEARTBEAT_TIMEOUT`` seconds; a live, slow holder keeps it until its lease ends.
- Adding an event sends ``NOTIFY``; senders ``LISTEN`` to wake up, and poll anyway,
  since a notification can be lost.
- One connection pool per process (psycopg_pool), opened on first use. After a
  fork the child opens its own and leaves the parent's untouched: psycopg never
  closes a connection from a process that did not open it.

Times are seconds since the epoch: the database server's clock, or the ``clock``
given (tests), so leases and heartbeats never depend on app servers' clocks agreeing.
Every driver error leaves as :class:`StoreUnavailable`, with no password in it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable

import psycopg
import psycopg_pool
from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict

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
    bare_in_password,
    body_text,
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
from .watchdog import Watch, Watchdog

__all__ = ["DEFAULT_TABLE", "PostgresStore"]

logger = logging.getLogger("flask_cio_rudder")

DEFAULT_TABLE = "cio_rudder_outbox"

#: What libpq quotes in a parse error, from the first double quote to the last: a password may hold
#: a quote, or a line break.
_QUOTED = re.compile(r'".*"', re.DOTALL)

#: What psycopg's prepared statements meet behind a pooler that gives each transaction any server
#: session (PgBouncer in transaction mode without ``max_prepared_statements``, Supavisor): the
#: statement it prepared missing there, or its name taken by another client's.
_SESSION_NOT_OURS = (psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName)

#: The time of a statement: the given clock's, else the server's.
_NOW = "COALESCE(%(now)s::float8, extract(epoch FROM statement_timestamp())::float8)"

#: Fills the search columns of rows an older release kept: each only from text, as search_columns()
#: fills them for new rows (a number where an address goes is no address to search by).
_BACKFILL = (
    "UPDATE {events} SET "
    "event_name = CASE WHEN json_typeof(payload::json -> 'event') = 'string' "
    "THEN payload::json ->> 'event' END, "
    "email = CASE WHEN json_typeof(payload::json -> 'context' -> 'traits' -> 'email') = 'string' "
    "THEN NULLIF(lower(btrim(payload::json -> 'context' -> 'traits' ->> 'email')), '') END "
    "WHERE payload IS NOT NULL"
)

_SCHEMA = """\
CREATE TABLE IF NOT EXISTS {events} (
    event_id     text PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    payload      text,              -- the RudderStack event (JSON); NULL if rejected at validation
    body         text,              -- the body as received, kept only for rejected ones
    reason       text,              -- dead: why; pending: the last delivery error
    accepted_at  double precision NOT NULL,   -- seconds since the epoch
    attempts     integer NOT NULL DEFAULT 0,
    lease_owner  text,              -- the claim holding the row
    lease_holder text,              -- the sender process of that claim (see {senders})
    leased_at    double precision,
    lease_until  double precision,
    delivered_at double precision,
    event_name   text,              -- the RudderStack event name, for operators' searches
    email        text               -- the person's address, lower case, for operators' searches
);
-- Tables made by releases before event_name and email existed get them here.
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS event_name text;
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS email text;
CREATE INDEX IF NOT EXISTS "{prefix}_pending" ON {events} (accepted_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS "{prefix}_dead" ON {events} (accepted_at) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS "{prefix}_delivered" ON {events} (delivered_at) WHERE state = 'delivered';
CREATE INDEX IF NOT EXISTS "{prefix}_email" ON {events} (email) WHERE email IS NOT NULL;
CREATE TABLE IF NOT EXISTS {senders} (
    holder  text PRIMARY KEY,       -- host:pid:random, one per sending process
    beat_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {meta} (key text PRIMARY KEY, value text);
"""

_live_stores: weakref.WeakSet[PostgresStore] = weakref.WeakSet()


def _forget_pools_in_child() -> None:
    for store in list(_live_stores):
        store.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)

# Pools and connections of a parent process, kept referenced in the child so that
# nothing there ever runs their clean-up (psycopg would not close them anyway).
_abandoned: list[Any] = []


class _Unanswered(StoreUnavailable):
    """The server did not answer a statement in time, and its connection was cut."""


def _quote(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


class PostgresStore(OutboxStore):
    """The outbox in a PostgreSQL table, shared by every process on every server that uses the URL."""

    notifies = True

    #: Seconds between two heartbeats of a process that claims.
    HEARTBEAT = 1.0
    #: A holder whose heartbeat is older than this (seconds) is dead: its batch is free.
    HEARTBEAT_TIMEOUT = 5.0
    #: Seconds a caller waits for a pooled connection (the webhook answers 503 after it).
    POOL_TIMEOUT = 2.0
    #: Seconds to connect before giving up (libpq's connect_timeout; whole seconds).
    CONNECT_TIMEOUT = 2
    #: Seconds the server has to answer a web request's statements before their connection is cut
    #: (psycopg has no timeout of its own, see :mod:`.watchdog`): when the server hangs, the
    #: webhook answers 503 in a second or two (Customer.io waits 4 s), not minutes.
    REQUEST_STATEMENT_TIMEOUT = 1.0
    #: The same for the sender's statements: nobody waits on them, but a hung sender sends nothing.
    SENDER_STATEMENT_TIMEOUT = 30.0
    #: The same for operators' reads (metrics, the dashboard, the CLI's listings) and pause/resume:
    #: under a Prometheus scrape's 10 s. Bulk changes (purge, requeue, copy-pending) have no bound.
    READ_STATEMENT_TIMEOUT = 10.0
    #: Heartbeat rows silent this long (seconds) are deleted when any process closes: a killed
    #: process leaves its row, and recycled workers would otherwise add one each, without end.
    FORGET_SILENT_AFTER = 3600.0
    #: Events per statement in :meth:`add_many`.
    CHUNK = 5000

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        clock: Clock | None = None,
        pool_size: int = 4,
        create: bool = True,
    ) -> None:
        rest = url.split("://", 1)[1]
        if _BAD_PERCENT.search(rest):  # libpq's error would quote the text around it: the password
            raise RuntimeError(
                "CIO_RUDDER_OUTBOX_URL has a % not followed by two hex digits: percent-encode it "
                "(a % in a password is written %25)."
            )
        if bare_in_password(rest):  # libpq would take the rest of the password for the host
            raise RuntimeError(
                "CIO_RUDDER_OUTBOX_URL's password holds an @ or / that is not percent-encoded (or its "
                "database name an @): write @ as %40 and / as %2F (urllib.parse.quote(password, safe=''))."
            )
        self.conninfo = "postgresql://" + rest
        self.url = redact_url(url)
        try:  # here, not at the first connection: libpq's parse errors quote the whole URL
            conninfo_to_dict(self.conninfo)
        except psycopg.Error as error:
            # Neither the URL nor what libpq quotes of it (in double quotes): either may hold the password,
            # which a URL libpq cannot read is no safe place to find and mask.
            reason = _QUOTED.sub("(not shown)", str(error)).split("\n")[0].partition(" in URI")[0]
            raise RuntimeError(f"CIO_RUDDER_OUTBOX_URL cannot be read: {reason}.") from None
        except UnicodeDecodeError:  # a %XX that decodes to no UTF-8; the error would quote those bytes
            raise RuntimeError(
                "CIO_RUDDER_OUTBOX_URL cannot be read: a percent-escape in it is no UTF-8 text "
                "(a % in a password is written %25)."
            ) from None
        except UnicodeEncodeError:  # a lone surrogate: bytes os.environ could not decode
            raise RuntimeError(
                "CIO_RUDDER_OUTBOX_URL cannot be read: it holds a character that is no UTF-8 text "
                "(an environment variable in another encoding?)."
            ) from None
        self.table = check_table_name(table or DEFAULT_TABLE, schemas=True)
        self.clock = clock
        self.pool_size = pool_size
        self._creates = create  # False: reads another outbox, makes no table
        name = self.table.rpartition(".")[2]
        self._events = _quote(self.table)
        self._senders = _quote(self.table + "_senders")
        self._meta = _quote(self.table + "_meta")
        self._schema_sql = _SCHEMA.format(
            events=self._events, senders=self._senders, meta=self._meta, prefix=name
        )
        schema = self.table.rpartition(".")[0]  # indexes live in their table's schema
        self._indexes = [
            _quote(f"{schema}.{name}_{index}" if schema else f"{name}_{index}")
            for index in ("pending", "dead", "delivered", "email")
        ]
        self.channel = _channel_name(self.table)
        self._lock_key = f"flask_cio_rudder:{self.table}"
        #: Whether the pool's connections let psycopg prepare the statements they run often; off for
        #: good once the server sessions show they are shared (:data:`_SESSION_NOT_OURS`).
        self._prepares = True
        _live_stores.add(self)
        self._fresh_process_state()

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
    ) -> PostgresStore:
        """The URL as it is. Durability is the server's: a commit lasts as its settings make it."""
        return cls(url, table=table, clock=clock, create=create)

    def __repr__(self) -> str:
        return f"<PostgresStore {self.url} table={self.table!r}>"

    def _fresh_process_state(self) -> None:
        """What one process owns: its pool, its holder name, its heartbeat thread."""
        self._pid = os.getpid()
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._pool_lock = threading.Lock()
        self._ready = False
        self.holder = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:8]}"
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        self._has_claimed = False  # whether this process has a heartbeat row and batches to free at close
        #: Since when this process's heartbeats reach the server without a break (``_local_now``):
        #: always, as far as it knows, until one fails; ``None`` from a failure to the next beat.
        self._reaching_since: float | None = float("-inf")
        self._last_beat: float | None = None
        #: Owners of claims cut by the watchdog, with when their leases end (``_local_now``): the
        #: server may have run them all the same, leasing rows to a claim nobody will send.
        self._lost_claims: dict[str, float] = {}
        self._watchdog = Watchdog()

    # -- connections ---------------------------------------------------------------------------

    def _now(self) -> float | None:
        return None if self.clock is None else self.clock()

    def _get_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        if self._pid != os.getpid():  # forked without the fork hook having run
            self.after_fork()
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                pool = self._pool
                if pool is None:
                    pool = psycopg_pool.ConnectionPool(
                        self.conninfo,
                        min_size=1,
                        max_size=self.pool_size,
                        open=False,
                        timeout=self.POOL_TIMEOUT,
                        # Short, so that a pool that lost the server retries soon once it is back.
                        reconnect_timeout=5.0,
                        kwargs={"autocommit": True, "connect_timeout": self.CONNECT_TIMEOUT},
                        configure=self._configure,
                        name=f"cio-rudder-{self.table}",
                    )
                    pool.open(wait=False)
                    self._pool = pool
        return pool

    def _connect_options(self) -> dict[str, Any]:
        """psycopg's options for a connection of the heartbeat or the wake-ups: autocommit (the
        store's transactions are explicit) and, as they run one statement, no prepared statements
        (see :data:`_SESSION_NOT_OURS`). The pool's connections prepare until that error is seen."""
        return {"autocommit": True, "connect_timeout": self.CONNECT_TIMEOUT, "prepare_threshold": None}

    def _configure(self, conn: Connection[Any]) -> None:
        """Settings every connection of the store needs, whatever the database's defaults (within
        ``CONNECT_TIMEOUT``, as connecting: a server that does not answer gets the connection cut).

        READ COMMITTED: claims and the duplicate check rely on its re-check of rows changed meanwhile;
        under REPEATABLE READ concurrent duplicates and claims fail with serialization errors.
        ``client_connection_check_interval`` (PostgreSQL 14+): a statement whose connection the
        watchdog cut, waiting on a lock, ends within a second instead of holding its server session
        until the lock is gone; else each retry would add one, up to ``max_connections``.
        """
        with self._watchdog.watch(conn.pgconn.socket, self.CONNECT_TIMEOUT):
            conn.execute("SET default_transaction_isolation = 'read committed'")
            try:
                conn.execute("SET client_connection_check_interval = 1000")
            except psycopg.Error:  # an older server, or a platform without the check: left as it was
                if conn.closed:
                    raise
                logger.debug("PostgreSQL has no client_connection_check_interval; cut statements run on")

    @contextmanager
    def _connection(self, timeout: float | None = None) -> Iterator[Connection[Any]]:
        """A pooled connection (tables created on first use); driver errors become StoreUnavailable.

        With a ``timeout`` (seconds), a server that has not answered within it (the look for the
        tables on first use included, not their creation or upgrade) has the connection cut (see
        :mod:`.watchdog`), and the error says so.
        """
        try:
            with self._get_pool().connection() as conn, self._watched(conn, timeout) as watch:
                if not self._prepares:
                    conn.prepare_threshold = None
                try:
                    if not self._ready and self._creates:
                        self._create(conn, watch)
                    yield conn
                except psycopg.OperationalError as error:
                    if watch is not None and watch.cut:
                        raise _Unanswered(
                            f"the PostgreSQL outbox {self.url} did not answer within {timeout:g} s: "
                            "check that the server is up and reachable"
                        ) from error
                    raise
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as error:
            if isinstance(error, _SESSION_NOT_OURS) and self._prepares:
                self._prepares = False
                logger.warning(
                    "The PostgreSQL outbox %s is reached through a pooler that shares server sessions "
                    "between transactions (PgBouncer in transaction mode, say): prepared statements "
                    "are off from now on (%s).",
                    self.url,
                    _first_line(error),
                )
            raise StoreUnavailable(
                f"the PostgreSQL outbox {self.url} cannot be used: {_first_line(error)}"
            ) from error

    def _watched(self, conn: Connection[Any], timeout: float | None) -> AbstractContextManager[Watch | None]:
        """The watchdog's watch on ``conn`` for ``timeout`` seconds; nothing when there is no bound."""
        return nullcontext() if timeout is None else self._watchdog.watch(conn.pgconn.socket, timeout)

    def _run(self, work: Callable[[Connection[Any]], Any], timeout: float | None = None) -> Any:
        """Run ``work`` on a pooled connection; again on another while the one it got was dead.

        After the server restarted, the pool's idle connections are broken: the first use of
        each fails without anything having been done, and the pool drops it, so trying again
        is safe, at most once per connection the pool holds. With a ``timeout`` (seconds), a
        server that has not answered by then has the connection cut, and there is no other
        try: it would wait on the same unanswering server.

        A statement psycopg prepared that a pooler's shared server session refused
        (:data:`_SESSION_NOT_OURS`) is tried again too, unprepared from then on: it failed before
        it ran, and each ``work`` runs its other statements in the same transaction, or ones that
        may run twice.
        """
        tries = self.pool_size + 1
        while True:
            tries -= 1
            try:
                with self._connection(timeout) as conn:
                    return work(conn)
            except _Unanswered:
                raise
            except StoreUnavailable as error:
                cause = error.__cause__
                if tries and isinstance(cause, _SESSION_NOT_OURS):
                    continue
                if not tries or not isinstance(cause, psycopg.OperationalError) or not _was_broken(cause):
                    raise  # a statement that failed, or no connection at all (PoolTimeout)

    def _create(self, conn: Connection[Any], watch: Watch | None = None) -> None:
        """Create the tables (or add what an older release's lack); an advisory lock keeps processes
        starting together from racing. Rows kept before ``event_name`` existed get it filled in once.
        Nothing runs when all is there already: DDL waits for every lock on the table, and a role
        that may only read and write rows (tables a migrations team made) may not run it at all.
        Such a role carries on, with a warning, where only indexes are missing (renamed, say).
        The look at what is there keeps the caller's ``watch``; the changes are not watched: on a
        large table they may rightly take minutes, and a cut would roll them back, every time.
        """
        tables_are_current = self._tables_are_current(conn)
        if tables_are_current and self._has_relations(conn, self._indexes):
            self._ready = True
            return
        if watch is not None:
            self._watchdog.forget(watch)
        try:
            self._run_schema(conn)
        except psycopg.errors.InsufficientPrivilege as error:
            if not tables_are_current:
                raise
            logger.warning(
                "The outbox's tables are there but not all of its indexes, and this role may not create "
                "them (%s): it works, more slowly on large tables. Create them from create-table --sql.",
                _first_line(error),
            )
        self._ready = True

    def _run_schema(self, conn: Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._events,)).fetchone()
            had_names = exists is not None and exists[0] and self._has_column(conn, "event_name")
            conn.execute(self._schema_sql.encode())
            if exists is not None and exists[0] and not had_names:
                self._backfill(conn)

    def _backfill(self, conn: Connection[Any]) -> None:
        """Fill the search columns of the rows an older release kept, in one ``UPDATE``. An event
        PostgreSQL's json functions cannot read (a ``\\u0000``, a lone surrogate escape) fails that
        statement whole: then a thousand rows at a time, a failing thousand halved until the rows it
        cannot read are alone, so that only they stay unsearchable."""
        fill = _BACKFILL.format(events=self._events)
        try:
            with conn.transaction():  # a savepoint
                conn.execute(fill)
            return
        except psycopg.DataError:
            pass
        keys = [
            key for (key,) in conn.execute(f"SELECT event_id FROM {self._events} WHERE payload IS NOT NULL")
        ]
        unreadable = 0
        batches = [keys[start : start + 1000] for start in range(0, len(keys), 1000)]
        while batches:
            batch = batches.pop()
            try:
                with conn.transaction():
                    conn.execute(fill + " AND event_id = ANY(%s)", (batch,))
            except psycopg.DataError:
                if len(batch) == 1:
                    unreadable += 1
                else:
                    half = len(batch) // 2
                    batches += [batch[:half], batch[half:]]
        logger.warning(
            "%d old outbox rows stay unsearchable by email: PostgreSQL cannot read their events "
            "(a \\u0000 or a lone surrogate escape)",
            unreadable,
        )

    def _tables_are_current(self, conn: Connection[Any]) -> bool:
        """Whether every table and column the schema makes is there."""
        if not self._has_relations(conn, [self._events, self._senders, self._meta]):
            return False
        return self._has_column(conn, "event_name") and self._has_column(conn, "email")

    def _has_relations(self, conn: Connection[Any], names: Sequence[str]) -> bool:
        query = "SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest(%s::text[]) AS name"
        row = conn.execute(query, (list(names),)).fetchone()
        return bool(row and row[0])

    def _has_column(self, conn: Connection[Any], column: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s AND NOT attisdropped",
            (self._events, column),
        ).fetchone()
        return row is not None

    def close(self, within: float | None = None) -> None:
        """Stop the heartbeat (freeing this process's batches at once) and close the pool.

        Every wait here is bounded already (``POOL_TIMEOUT``, the statement timeouts), so ``within``
        changes nothing: no other process's lock holds up a close.
        """
        if self._pid != os.getpid():
            self.after_fork()
            return
        self._closing.set()
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.join(self.POOL_TIMEOUT + 1)
        pool = self._pool
        if pool is not None:
            reaching = self._reaching_since is not None and (heartbeat is None or not heartbeat.is_alive())
            if self._has_claimed and reaching:  # no farewell to a server out of reach: it would wait on it
                # If this fails, the heartbeat stops all the same: the batches are free seconds later.
                with contextlib.suppress(StoreUnavailable):
                    self._forget_holder()
            pool.close(timeout=1.0)
        self._watchdog.close()
        self._fresh_process_state()

    def after_fork(self) -> None:
        """Leave the parent's pool alone (kept referenced, never closed) and start afresh, once per process.

        The senders' fork hook calls it, then starts the child's sender; this module's own hook
        calls it again. Starting afresh a second time would take a new holder name under the
        child's first claim, whose rows would then lose their heartbeat while it posts them.
        """
        if self._pid == os.getpid():
            return
        if self._pool is not None:
            _abandoned.append(self._pool)
        self._fresh_process_state()

    # -- heartbeat -----------------------------------------------------------------------------

    def _beat_sql(self) -> str:
        return (
            f"INSERT INTO {self._senders} (holder, beat_at) VALUES (%(holder)s, {_NOW}) "
            "ON CONFLICT (holder) DO UPDATE SET beat_at = excluded.beat_at"
        )

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None:
            with self._pool_lock:
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(
                        target=self._beat_forever, name="cio-rudder-heartbeat", daemon=True
                    )
                    self._heartbeat.start()

    def _beat_forever(self) -> None:
        """Beat every ``HEARTBEAT`` seconds on a connection of its own: web requests that take every
        pooled connection (queued behind a lock, say) must not make a live holder look dead."""
        closing = self._closing
        conn: Connection[Any] | None = None
        try:
            while not closing.wait(self.HEARTBEAT):
                params = {"holder": self.holder, "now": self._now()}
                try:
                    if conn is None or conn.closed:
                        conn = self._heartbeat_connection()
                    if conn is None:  # refused a connection of its own: a pooled one beats, as best it can
                        if closing.is_set():  # the pool is closed: a new one would stay open
                            break
                        self._run(functools.partial(self._beat, params=params), self.HEARTBEAT_TIMEOUT)
                    else:
                        with self._watchdog.watch(conn.pgconn.socket, self.HEARTBEAT_TIMEOUT):  # late is dead
                            self._beat(conn, params)
                    if not closing.is_set():  # after close() this is another state's
                        self._reached_server()
                except (psycopg.Error, StoreUnavailable) as error:
                    logger.debug("Outbox heartbeat failed: %s", _first_line(error))
                    if not closing.is_set():
                        self._reaching_since = None
                    if conn is not None:
                        conn.close()  # a fresh one next time: this one may be broken
                        conn = None
        finally:
            if conn is not None:
                conn.close()

    def _beat(self, conn: Connection[Any], params: dict[str, Any]) -> None:
        """Tell the server this process's holder is alive, now."""
        conn.execute(self._beat_sql(), params)

    def _heartbeat_connection(self) -> Connection[Any] | None:
        """A connection for the heartbeat alone, or ``None`` when the server refuses a new one: a
        pooled connection, opened before, then beats (were the beat to stop, another server would
        take a live holder's batch while it still posts it). Refused whatever the reason, in
        whatever language: no connection slot left for the role or anyone (a rolling restart),
        new connections barred, the password changed. When the server is down, the pooled beat
        fails too, as a failed beat."""
        try:
            conn = psycopg.connect(self.conninfo, **self._connect_options())
        except psycopg.OperationalError as error:
            logger.debug(
                "Outbox heartbeat has no connection of its own (%s): it uses the pool's", _first_line(error)
            )
            return None
        self._configure(conn)
        return conn

    def _local_now(self) -> float:
        return time.monotonic() if self.clock is None else self.clock()

    def _streak_broken(self, now: float) -> bool:
        """Whether this process's heartbeats stopped reaching the server: one failed, or the last
        is older than others take a live holder's to be."""
        last = self._last_beat
        return self._reaching_since is None or (last is not None and now - last > self.HEARTBEAT_TIMEOUT)

    def _reached_server(self) -> None:
        now = self._local_now()
        if self._streak_broken(now):
            self._reaching_since = now
        self._last_beat = now

    def _may_judge_holders(self) -> bool:
        """Whether this process may take the batch of a holder that has not beaten for ``HEARTBEAT_TIMEOUT``:
        not while it has not reached the server itself for that long, without a break.

        After an outage every holder's heartbeat is stale: the first process to reach the server again
        must not take the batches of live holders that have not yet had the time to beat.
        """
        now, since = self._local_now(), self._reaching_since
        return since is not None and not self._streak_broken(now) and now - since >= self.HEARTBEAT_TIMEOUT

    def _forget_holder(self) -> None:
        """Free this process's leases and drop its heartbeat row, and the rows of holders silent
        for ``FORGET_SILENT_AFTER``: a clean exit leaves nothing held, and the table stays small."""

        def forget(conn: Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    f"UPDATE {self._events} SET lease_owner = NULL, lease_holder = NULL, lease_until = NULL "
                    "WHERE lease_holder = %s AND state = 'pending'",
                    (self.holder,),
                )
                conn.execute(
                    f"DELETE FROM {self._senders} WHERE holder = %(holder)s OR beat_at < {_NOW} - %(silent)s",
                    {"holder": self.holder, "now": self._now(), "silent": self.FORGET_SILENT_AFTER},
                )

        self._run(forget, self.HEARTBEAT_TIMEOUT)  # past it, the heartbeat's silence frees them all the same

    # -- the web request's side ----------------------------------------------------------------

    def is_known(self, event_id: str) -> bool:
        query = f"SELECT 1 FROM {self._events} WHERE event_id = %s AND payload IS NOT NULL"
        key = storage_key(event_id)
        return bool(
            self._run(lambda conn: conn.execute(query, (key,)).fetchone(), self.REQUEST_STATEMENT_TIMEOUT)
        )

    def _upsert(self, source: str) -> str:
        return (
            f"INSERT INTO {self._events} AS e (event_id, state, payload, accepted_at, event_name, email) "
            f"{source} ON CONFLICT (event_id) DO UPDATE SET state = 'pending', payload = excluded.payload, "
            "body = NULL, reason = NULL, accepted_at = excluded.accepted_at, "
            "event_name = excluded.event_name, email = excluded.email WHERE e.payload IS NULL"
        )

    def add(
        self, event_id: str, payload_json: str, *, event_name: str | None = None, email: str | None = None
    ) -> bool:
        event_name, email = search_columns(payload_json, event_name, email)
        added = self._upsert(f"VALUES (%(id)s, 'pending', %(payload)s, {_NOW}, %(name)s, %(email)s)")
        query = f"WITH added AS ({added} RETURNING 1) SELECT pg_notify(%(channel)s, '') FROM added"
        params = {
            "id": storage_key(event_id),
            "payload": payload_json,
            "now": self._now(),
            "channel": self.channel,
            "name": event_name,
            "email": email,
        }
        added = self._run(lambda conn: conn.execute(query, params).fetchall(), self.REQUEST_STATEMENT_TIMEOUT)
        return len(added) == 1

    def add_many(self, events: Iterable[Pending]) -> int:
        statement = self._upsert(
            f"SELECT id, 'pending', payload, COALESCE(at, {_NOW}), name, email "
            "FROM unnest(%(ids)s::text[], %(payloads)s::text[], %(ats)s::float8[], %(names)s::text[], "
            "%(emails)s::text[]) AS new (id, payload, at, name, email)"
        )
        batch: list[Pending] = []
        added = 0

        def flush(conn: Connection[Any]) -> int:
            summaries = [search_columns(event.payload_json, event.event_name, event.email) for event in batch]
            params = {
                "ids": [storage_key(event.event_id) for event in batch],
                "payloads": [event.payload_json for event in batch],
                "ats": [event.accepted_at for event in batch],
                "names": [name for name, _ in summaries],
                "emails": [email for _, email in summaries],
                "now": self._now(),
            }
            with conn.transaction():  # one change: tried again whole (see _run), never half
                count = conn.execute(statement, params).rowcount
                conn.execute("SELECT pg_notify(%s, '')", (self.channel,))
            return count

        for event in events:
            batch.append(event)
            if len(batch) >= self.CHUNK:
                added += self._run(flush)
                batch = []
        if batch:
            added += self._run(flush)
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
        query = (
            f"INSERT INTO {self._events} (event_id, state, body, reason, accepted_at, event_name, email) "
            f"VALUES (%(id)s, 'dead', %(body)s, %(reason)s, {_NOW}, %(name)s, %(email)s) "
            "ON CONFLICT (event_id) DO NOTHING"
        )
        params = {
            "id": rejected_key(event_id, body),
            "body": body_text(body),
            "reason": clean_text(reason),
            "now": self._now(),
            "name": None if event_name is None else clean_text(event_name),
            "email": search_email(email),
        }
        self._run(lambda conn: conn.execute(query, params), self.REQUEST_STATEMENT_TIMEOUT)

    # -- the sender's side ---------------------------------------------------------------------

    def claim(self, limit: int, lease: float, max_age: float) -> Claim:
        self._ensure_heartbeat()
        self._has_claimed = True
        owner = uuid.uuid4().hex
        # Free: never leased, lease over, or a holder that has had time to beat and has not.
        # (A claim younger than the heartbeat timeout is trusted: a statement's snapshot may
        # predate its holder's first heartbeat, and must not read that as a dead holder. Nor
        # does a process judge holders before it has reached the server for that long itself,
        # nor when its own last beat is old: a claim sent before an outage, run after it.)
        judge = (
            f"%(judge)s AND NOT EXISTS (SELECT 1 FROM {self._senders} me WHERE me.holder = %(holder)s "
            f"AND me.beat_at < {_NOW} - %(own_beat)s)"
        )
        free = (
            f"(c.lease_until IS NULL OR c.lease_until < {_NOW} "
            f"OR ({judge} AND c.leased_at < {_NOW} - %(stale)s "
            f"AND NOT EXISTS (SELECT 1 FROM {self._senders} s WHERE s.holder = c.lease_holder "
            f"AND s.beat_at >= {_NOW} - %(stale)s)))"
        )
        expire = (
            f"UPDATE {self._events} SET state = 'dead', lease_owner = NULL, lease_holder = NULL, "
            "lease_until = NULL, reason = 'not delivered within CIO_RUDDER_OUTBOX_MAX_AGE (' "
            "|| %(max_age)s::bigint || ' s); last error: ' || COALESCE(reason, 'none') "
            f"WHERE event_id IN (SELECT event_id FROM {self._events} c WHERE c.state = 'pending' "
            f"AND c.accepted_at < {_NOW} - %(max_age)s AND {free} LIMIT 10000 FOR UPDATE OF c SKIP LOCKED)"
        )
        take = (
            f"WITH beat AS ({self._beat_sql()} RETURNING 1) "
            f"UPDATE {self._events} e SET lease_owner = %(owner)s, lease_holder = %(holder)s, "
            f"leased_at = {_NOW}, lease_until = {_NOW} + %(lease)s "
            # Rows this very claim holds already are taken again: when the connection broke after
            # its commit, the claim is run once more (see _run), and must not leave them held.
            # So are rows of this process's lost claims: nobody is sending them.
            f"FROM (SELECT event_id FROM {self._events} c WHERE c.state = 'pending' "
            f"AND ({free} OR c.lease_owner = %(owner)s OR c.lease_owner = ANY(%(lost)s)) "
            "ORDER BY c.accepted_at LIMIT %(limit)s FOR UPDATE OF c SKIP LOCKED) picked "
            "WHERE e.event_id = picked.event_id AND EXISTS (SELECT 1 FROM beat) "
            "RETURNING e.event_id, e.payload, e.accepted_at"
        )
        started = self._local_now()
        for lost, until in list(self._lost_claims.items()):  # in place: another thread may add one
            if until <= started:
                self._lost_claims.pop(lost, None)
        params = {
            "now": self._now(),
            "stale": self.HEARTBEAT_TIMEOUT,
            "judge": self._may_judge_holders(),
            "lost": list(self._lost_claims),
            "own_beat": 2 * self.HEARTBEAT,
            "max_age": max_age,
            "owner": owner,
            "holder": self.holder,
            "lease": lease,
            "limit": limit,
        }

        expired = 0  # outside: kept when _run tries the claim again after its expiry ran

        def claim(conn: Connection[Any]) -> list[Any] | None:
            nonlocal expired
            if conn.execute(f"SELECT 1 FROM {self._meta} WHERE key = 'paused'").fetchone():
                return None
            expired += conn.execute(expire, params).rowcount
            return conn.execute(take, params).fetchall()

        try:
            claimed = self._run(claim, self.SENDER_STATEMENT_TIMEOUT)
        except _Unanswered:
            self._lost_claims[owner] = started + lease
            raise
        if claimed is None:
            return Claim(owner, [], paused=True)
        rows = sorted(claimed, key=lambda row: row[2])
        return Claim(owner, [Claimed(event_id, payload) for event_id, payload, _ in rows], expired=expired)

    _DONE = "lease_owner = NULL, lease_holder = NULL, leased_at = NULL, lease_until = NULL"

    def _finish(self, assignments: str, owner: str, event_ids: Sequence[str], **values: Any) -> None:
        query = (
            f"UPDATE {self._events} SET {assignments}, attempts = attempts + 1, {self._DONE} "
            "WHERE event_id = ANY(%(ids)s) AND lease_owner = %(owner)s"
        )
        params = {"ids": list(event_ids), "owner": owner, "now": self._now(), **values}
        self._run(lambda conn: conn.execute(query, params), self.SENDER_STATEMENT_TIMEOUT)

    def mark_delivered(self, owner: str, event_ids: Sequence[str]) -> None:
        self._finish(f"state = 'delivered', delivered_at = {_NOW}, reason = NULL", owner, event_ids)

    def release(self, owner: str, event_ids: Sequence[str], error: str) -> None:
        self._finish("reason = %(error)s", owner, event_ids, error=error)
        meta = (
            f"INSERT INTO {self._meta} (key, value) VALUES ('last_error', %(error)s), "
            f"('last_error_at', ({_NOW})::text) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        params = {"error": error, "now": self._now()}
        self._run(lambda conn: conn.execute(meta, params), self.SENDER_STATEMENT_TIMEOUT)

    def mark_dead(self, owner: str, event_ids: Sequence[str], reason: str) -> None:
        self._finish("state = 'dead', reason = %(reason)s", owner, event_ids, reason=reason)

    def watch(self, on_new: Callable[[], None], stopping: threading.Event) -> None:
        """LISTEN on a connection of its own, outside the pool, and reconnect after a failure."""
        delay = 1.0
        while not stopping.is_set():
            try:
                with psycopg.connect(self.conninfo, **self._connect_options()) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    delay = 1.0
                    on_new()  # something may have come while nobody listened
                    while not stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            on_new()
            except psycopg.Error as error:
                logger.debug("Outbox wake-ups lost (%s); senders poll meanwhile", _first_line(error))
                stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    # -- operators -----------------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        def read(conn: Connection[Any]) -> tuple[Any, ...]:
            with (
                conn.transaction()
            ):  # one snapshot: else a claim between two reads counts more in flight than pending
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return read_all(conn)

        def read_all(conn: Connection[Any]) -> tuple[Any, ...]:
            params = {"now": self._now(), "stale": self.HEARTBEAT_TIMEOUT}
            counts = dict(
                conn.execute(f"SELECT state, count(*) FROM {self._events} GROUP BY state").fetchall()
            )
            oldest, now = conn.execute(
                f"SELECT min(accepted_at), {_NOW} FROM {self._events} WHERE state = 'pending'", params
            ).fetchone() or (None, 0.0)
            meta = dict(conn.execute(f"SELECT key, value FROM {self._meta}").fetchall())
            (delivered_at,) = conn.execute(
                f"SELECT max(delivered_at) FROM {self._events} WHERE state = 'delivered'"
            ).fetchone() or (None,)
            held = conn.execute(
                f"SELECT c.lease_holder, count(*) FROM {self._events} c JOIN {self._senders} s "
                f"ON s.holder = c.lease_holder AND s.beat_at >= {_NOW} - %(stale)s "
                f"WHERE c.state = 'pending' AND c.lease_until >= {_NOW} GROUP BY c.lease_holder",
                params,
            ).fetchall()
            return counts, oldest, now, meta, held, delivered_at

        counts, oldest, now, meta, held, delivered_at = self._run(read, self.READ_STATEMENT_TIMEOUT)
        return OutboxStatus(
            pending=counts.get("pending", 0),
            delivered=counts.get("delivered", 0),
            dead=counts.get("dead", 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            last_error=meta.get("last_error"),
            last_error_at=float(meta["last_error_at"]) if "last_error_at" in meta else None,
            in_flight=sum(count for _, count in held),
            holders=tuple(sorted(_describe_holder(holder) for holder, _ in held)),
            paused="paused" in meta,
            last_delivered_at=newest_delivery(delivered_at, meta),
            read_at=now,
        )

    def set_paused(self, paused: bool) -> None:
        if paused:
            query = (
                f"INSERT INTO {self._meta} (key, value) VALUES ('paused', ({_NOW})::text) "
                "ON CONFLICT (key) DO NOTHING"
            )
            params: dict[str, Any] = {"now": self._now()}
            self._run(lambda conn: conn.execute(query, params), self.READ_STATEMENT_TIMEOUT)
            return
        self._run(
            lambda conn: conn.execute(f"DELETE FROM {self._meta} WHERE key = 'paused'"),
            self.READ_STATEMENT_TIMEOUT,
        )
        self._notify()

    def _notify(self) -> None:
        """Wake the senders listening on this table's channel."""
        self._run(
            lambda conn: conn.execute("SELECT pg_notify(%s, '')", (self.channel,)),
            self.READ_STATEMENT_TIMEOUT,
        )

    def dead_letters(
        self,
        limit: int = 100,
        *,
        match: Match | None = None,
        offset: int = 0,
        newest_first: bool = False,
        bodies: bool = True,
    ) -> list[DeadLetter]:
        narrow, params = match_conditions(match, "%s", "strpos")
        order = "DESC" if newest_first else "ASC"
        body = "body" if bodies else "NULL"
        query = (
            f"SELECT event_id, reason, accepted_at, attempts, payload IS NOT NULL, {body}, event_name, email "
            f"FROM {self._events} WHERE state = 'dead'{narrow} "
            f"ORDER BY accepted_at {order}, event_id {order} LIMIT %s OFFSET %s"
        )
        rows = self._run(
            lambda conn: conn.execute(query, (*params, limit, offset)).fetchall(), self.READ_STATEMENT_TIMEOUT
        )
        return [DeadLetter(*row) for row in rows]

    def count_dead_letters(self, match: Match | None = None) -> int:
        narrow, params = match_conditions(match, "%s", "strpos")
        query = f"SELECT count(*) FROM {self._events} WHERE state = 'dead'{narrow}"
        row = self._run(lambda conn: conn.execute(query, params).fetchone(), self.READ_STATEMENT_TIMEOUT)
        return int(row[0])

    def find(
        self, *, event_id: str | None = None, email: str | None = None, limit: int = 50
    ) -> list[EventRecord]:
        if event_id is not None:
            condition, value = "event_id = %s", storage_key(event_id)
        elif email is not None:
            condition, value = "email = %s", search_email(email) or ""
        else:
            return []
        query = (
            "SELECT event_id, state, accepted_at, delivered_at, reason, attempts, payload IS NULL, "
            f"event_name, email, payload, body FROM {self._events} WHERE {condition} "
            "ORDER BY accepted_at DESC LIMIT %s"
        )
        rows = self._run(
            lambda conn: conn.execute(query, (value, limit)).fetchall(), self.READ_STATEMENT_TIMEOUT
        )
        return [EventRecord(*row) for row in rows]

    def activity(self, minutes: int = 60) -> Activity:
        def read(conn: Connection[Any]) -> tuple[float, list[Any], list[Any]]:
            row = conn.execute(f"SELECT {_NOW}", {"now": self._now()}).fetchone()
            start = minute_of(row[0] if row else 0.0) - (minutes - 1) * 60
            # One branch per state, so each uses its partial index (accepted_at <= delivered_at).
            recent = f"SELECT accepted_at AS at FROM {self._events} WHERE accepted_at >= %(start)s AND state"
            accepted = conn.execute(
                f"SELECT floor((at - %(start)s) / 60)::int, count(*) FROM ({recent} = 'pending' UNION ALL "
                f"{recent} = 'dead' UNION ALL {recent} = 'delivered' AND delivered_at >= %(start)s) AS r "
                "GROUP BY 1",
                {"start": start},
            ).fetchall()
            delivered = conn.execute(
                f"SELECT floor((delivered_at - %(start)s) / 60)::int, count(*) FROM {self._events} "
                "WHERE state = 'delivered' AND delivered_at >= %(start)s GROUP BY 1",
                {"start": start},
            ).fetchall()
            return start, accepted, delivered

        start, accepted, delivered = self._run(read, self.READ_STATEMENT_TIMEOUT)
        return Activity(start, per_minute(accepted, minutes), per_minute(delivered, minutes))

    def pending(self, limit: int = 1000, after: str | None = None) -> list[Pending]:
        query = (
            f"SELECT event_id, payload, accepted_at FROM {self._events} "
            "WHERE state = 'pending' AND event_id > %s ORDER BY event_id LIMIT %s"
        )
        rows = self._run(
            lambda conn: conn.execute(query, ("" if after is None else after, limit)).fetchall(),
            self.READ_STATEMENT_TIMEOUT,
        )
        return [Pending(*row) for row in rows]

    def requeue(self, event_ids: Sequence[str] | None = None, *, match: Match | None = None) -> int:
        narrow, values = match_conditions(match, "%s", "strpos")
        now = self._now()
        query = (
            f"UPDATE {self._events} SET state = 'pending', reason = NULL, attempts = 0, "
            "accepted_at = COALESCE(%s::float8, extract(epoch FROM statement_timestamp())::float8) "
            f"WHERE state = 'dead' AND payload IS NOT NULL{narrow}"
        )
        params: list[Any] = [now, *values]
        if event_ids is not None:
            query += " AND event_id = ANY(%s)"
            params.append([storage_key(event_id) for event_id in event_ids])
        count: int = self._run(lambda conn: conn.execute(query, params).rowcount)
        if count:
            self._notify()
        return count

    def purge_dead(self, match: Match | None = None) -> int:
        narrow, params = match_conditions(match, "%s", "strpos")
        query = f"DELETE FROM {self._events} WHERE state = 'dead'{narrow}"
        count: int = self._run(lambda conn: conn.execute(query, params).rowcount)
        return count

    _OLD_DELIVERED = f"WHERE state = 'delivered' AND delivered_at < {_NOW} - %(age)s"

    def count_delivered(self, older_than: float) -> int:
        query = f"SELECT count(*) FROM {self._events} {self._OLD_DELIVERED}"
        params = {"now": self._now(), "age": older_than}
        return int(
            self._run(lambda conn: conn.execute(query, params).fetchone(), self.READ_STATEMENT_TIMEOUT)[0]
        )

    def purge_delivered(self, older_than: float) -> int:
        query = (  # remembering the newest delivery it deletes, which status() still tells
            f"WITH gone AS (DELETE FROM {self._events} {self._OLD_DELIVERED} RETURNING delivered_at), "
            f"kept AS (INSERT INTO {self._meta} AS m (key, value) "
            "SELECT 'purged_delivered_at', max(delivered_at)::text FROM gone HAVING count(*) > 0 "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
            "WHERE m.value::float8 < excluded.value::float8) "
            "SELECT count(*) FROM gone"
        )
        params = {"now": self._now(), "age": older_than}
        row = self._run(lambda conn: conn.execute(query, params).fetchone())
        return int(row[0])

    def schema_sql(self) -> str:
        return self._schema_sql

    def create_tables(self) -> None:
        def create(conn: Connection[Any]) -> None:
            if not self._ready:
                self._create(conn, None)

        self._run(create)

    def has_tables(self) -> bool:
        def look(conn: Connection[Any]) -> bool:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (self._events,)).fetchone()
            return bool(row and row[0])

        return bool(self._run(look, self.READ_STATEMENT_TIMEOUT))

    def drop_tables(self) -> None:
        def drop(conn: Connection[Any]) -> None:
            for table in (self._events, self._senders, self._meta):
                conn.execute(f"DROP TABLE IF EXISTS {table}")

        self._run(drop)
        self._ready = False
        self._has_claimed = False  # nothing is held in tables that are gone: close() must not make them again


def _channel_name(table: str) -> str:
    """The LISTEN/NOTIFY channel of a table: PostgreSQL refuses names over 63 bytes, so a longer
    one (a schema-qualified table of 53 characters or more) is made from a hash of the table's name."""
    name = f"cio_rudder_{table.replace('.', '_')}"
    return name if len(name) <= 63 else "cio_rudder_" + hashlib.sha256(table.encode()).hexdigest()[:40]


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _was_broken(error: psycopg.OperationalError) -> bool:
    """Whether the error is a connection that was already dead (server restarted), not a failed statement.

    Also the server's notice that it shut the connection down (class 57P: a fast restart or a
    switchover), which aborts whatever the connection was doing. A pool timeout (no connection
    could be had at all) is not: trying again would double the wait.
    """
    if isinstance(error, psycopg_pool.PoolTimeout):
        return False
    return error.sqlstate is None or error.sqlstate.startswith("57P")


def _describe_holder(holder: str) -> str:
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on {host}"
