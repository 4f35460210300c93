"""What only the PostgreSQL outbox has to get right: roles, schemas, channel names, its URL.

The contract both backends keep is in test_store_contract.py; servers that fail or restart
are in test_postgres_faults.py.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from flask import Flask

from flask_cio_rudder import get_outbox
from flask_cio_rudder.samples import email_sample
from flask_cio_rudder.store import OutboxStore, StoreUnavailable, store_from_url

from .helpers import Clock, FreezingProxy, free_port, wait_until
from .stores import Backend, postgres_fixture, postgres_url, unavailable, unique_table  # noqa: F401  (a fixture)

if TYPE_CHECKING:  # at run time, imported where psycopg is known to be there (it may not be)
    from flask_cio_rudder.store.postgres import PostgresStore

pytestmark = pytest.mark.service


def postgres_store(url: str, **options: Any) -> PostgresStore:
    """A PostgreSQL store on ``url`` (``postgres_url()`` has checked that psycopg is installed)."""
    from flask_cio_rudder.store.postgres import PostgresStore

    store = store_from_url(url, **options)
    assert isinstance(store, PostgresStore)
    return store


def admin(sql: str) -> None:
    """Run ``sql`` as the test server's user (who may create roles and schemas)."""
    url = postgres_url()  # first: skips, saying why, without psycopg or the server
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema of its own, with a long name, dropped afterwards."""
    name = f"cio_test_a_long_schema_name_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        admin(f'DROP SCHEMA "{name}" CASCADE')


@pytest.mark.parametrize("renamed_index", [False, True], ids=["as printed", "an index renamed"])
def test_a_role_that_may_only_read_and_write_rows_uses_tables_a_migrations_team_made(
    postgres: Backend, renamed_index: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """README: teams that run migrations create the tables (create-table --sql) and give the app a
    role without DDL rights; the outbox must then run no DDL of its own."""
    postgres.store().create_tables()  # the migrations team, as the tables' owner
    if renamed_index:  # as a migrations tool's naming convention does
        admin(f'ALTER INDEX "{postgres.table}_pending" RENAME TO "ix_{postgres.table}_pending"')
    role, password = f"cio_test_app_{uuid.uuid4().hex[:12]}", "app-pw"
    tables = ", ".join(f'"{postgres.table}{suffix}"' for suffix in ("", "_senders", "_meta"))
    admin(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        admin(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {role}")
        parts = urlsplit(postgres_url())
        url = urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port or 5432}"))
        with closing(store_from_url(url, table=postgres.table)) as app_store:
            assert app_store.add("e1", "{}") is True
            claim = app_store.claim(100, 60.0, 3600.0)
            app_store.mark_delivered(claim.owner, [event.event_id for event in claim.events])
            assert app_store.status().delivered == 1
        assert ("not all of its indexes" in caplog.text) is renamed_index
    finally:
        admin(f"DROP OWNED BY {role}")
        admin(f"DROP ROLE {role}")


def test_a_long_schema_qualified_table_keeps_events_and_wakes_senders(schema: str) -> None:
    """Its LISTEN/NOTIFY channel would be longer than the 63 bytes PostgreSQL allows a name."""
    table = f"{schema}.cio_rudder_outbox_production_{uuid.uuid4().hex[:8]}"
    store = store_from_url(postgres_url(), table=table)
    woken, stopping = threading.Event(), threading.Event()
    watcher = threading.Thread(target=store.watch, args=(woken.set, stopping), daemon=True)
    watcher.start()
    try:
        wait_until(woken.is_set, 10, "the watcher is listening (it wakes once on connecting)")
        woken.clear()
        assert store.add("e1", "{}") is True
        wait_until(woken.is_set, 10, "the add woke the watcher")
    finally:
        stopping.set()
        watcher.join(10)
        store.close()


def test_dropping_the_tables_then_closing_leaves_them_dropped(postgres: Backend) -> None:
    """Closing frees the process's batches; after a drop there are none, and no table to make again."""
    store = postgres.store()
    store.add("e1", "{}")
    assert store.claim(10, lease=60, max_age=3600).events  # the store now holds a batch
    store.drop_tables()
    store.close()
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        found = conn.execute("SELECT to_regclass(%s)", (postgres.table,)).fetchone()
    assert found == (None,)


def test_no_password_reaches_an_error_or_the_url_shown(postgres: Backend) -> None:
    """libpq reads a password up to the first @, # and ? included; a URL parser stops at them."""
    store = store_from_url(f"postgresql://app:s3cret#pw?x@127.0.0.1:{free_port()}/test")
    try:
        assert "s3cret" not in store.url and store.url.startswith("postgresql://app:***@127.0.0.1:")
        with pytest.raises(StoreUnavailable) as raised:
            store.is_known("e1")
        assert "s3cret" not in str(raised.value)
    finally:
        store.close()
    with pytest.raises(RuntimeError, match="percent-encode") as refused:  # libpq would quote it
        store_from_url("postgresql://app:50%off-pw@127.0.0.1/test")
    assert "50%off" not in str(refused.value) and "CIO_RUDDER_OUTBOX_URL" in str(refused.value)
    for unreadable in ("[::1/test", "[]/test", "[::1]x/test", "h/test?x=1"):  # libpq's errors quote the URL
        with pytest.raises(RuntimeError, match="cannot be read") as refused:
            store_from_url(f"postgresql://app:s3cret@{unreadable}")
        assert "s3cret" not in str(refused.value) and "CIO_RUDDER_OUTBOX_URL" in str(refused.value)
    # Passwords libpq cannot read (one with spaces, only the newer ones), whose errors quoted them, or
    # that the URL's masking missed.
    for password in (
        "s3cret/x?Xq7",
        "s3cret w1th Xq7",
        "s3cret%00Xq7",
        's3c"ret w1th Xq7',
        "s3cret w1th\nXq7",
    ):
        try:
            readable = store_from_url(f"postgresql://app:{password}@db.internal:5432/app")
        except RuntimeError as refused:
            shown = str(refused)
            assert "cannot be read" in shown or "write @ as %40 and / as %2F" in shown
        else:
            shown = readable.url
            readable.close()
        assert "s3c" not in shown and "Xq7" not in shown


def test_a_store_started_afresh_after_a_fork_is_not_started_afresh_again(postgres: Backend) -> None:
    """Two fork hooks reset the store in a child (the senders', which also starts the sender, then the
    store module's): the second took a new holder name and heartbeat under the first claim's rows,
    and another server sent the batch while the child still posted it."""
    store = postgres.store()
    store.add("e1", "{}")
    assert store.claim(10, lease=60, max_age=3600).events
    holder = store.holder
    store.after_fork()  # in the process that claimed: as the second hook finds it
    assert store.holder == holder  # its batch keeps the holder its heartbeat beats for


def test_status_counts_from_one_snapshot(postgres: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its reads were separate statements: an event added and claimed between the counts and the
    look at what is held showed more in flight than pending, and the CLI a negative 'not sent'."""
    store, another_server = postgres.store(), postgres.store()
    run = store._run  # type: ignore[attr-defined]

    def a_claim_between_the_reads(work: Any, timeout: float | None = None) -> Any:
        def between(conn: Any) -> Any:
            execute = conn.execute

            def execute_then_claim(query: Any, *args: Any) -> Any:
                result = execute(query, *args)
                if str(query).startswith("SELECT state, count(*)"):
                    another_server.add("e1", "{}")
                    assert another_server.claim(10, lease=60, max_age=3600).events
                return result

            conn.execute = execute_then_claim
            try:
                return work(conn)
            finally:
                del conn.execute

        return run(between, timeout)

    monkeypatch.setattr(store, "_run", a_claim_between_the_reads)
    status = store.status()
    assert (status.pending, status.in_flight) == (0, 0)  # as it was when the reading began
    monkeypatch.undo()
    assert (store.status().pending, store.status().in_flight) == (1, 1)


def test_a_holder_keeps_beating_while_its_web_requests_fill_the_pool(postgres: Backend) -> None:
    """Requests queued behind a lock hold every pooled connection; the heartbeat must still go out,
    or another server takes the live holder's batch and both send it at once."""
    clock = Clock()
    holder, other = postgres.store(clock=clock), postgres.store(clock=clock)
    for n in range(3):
        holder.add(f"e{n}", "{}")
    assert len(holder.claim(100, 600.0, 3600.0).events) == 3
    import psycopg

    with psycopg.connect(postgres_url()) as blocker:
        blocker.execute(f'LOCK TABLE "{postgres.table}" IN ACCESS EXCLUSIVE MODE')  # held until the end
        requests = [threading.Thread(target=_known, args=(holder,), daemon=True) for _ in range(6)]
        for request in requests:
            request.start()
        clock.now += 10  # well past the heartbeat timeout since the claim
        beaten = functools.partial(beaten_since, postgres, holder, clock.now, psycopg.connect)
        wait_until(beaten, 10, "the holder beats while its pool is taken")
        blocker.rollback()
    for request in requests:
        request.join(10)
    assert other.claim(100, 600.0, 3600.0).events == []  # the live holder keeps its batch


@pytest.mark.parametrize(
    "refusal",
    [
        "FATAL:  too many connections for role",
        "FATAL:  sorry, too many clients already",
        "FATAL:  zu viele Verbindungen für Rolle",  # a server whose lc_messages is German
        'FATAL:  database "app" is not currently accepting connections',
        'FATAL:  password authentication failed for user "app"',  # rotated: the pool's still work
    ],
)
def test_a_holder_refused_a_connection_of_its_own_beats_on_a_pooled_one(
    postgres: Backend, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """The server refuses new connections once the pool's were open (a rolling restart that took
    every slot, new connections barred, a rotated password): the heartbeat never connected, and
    another server sent the live holder's batch too."""
    import psycopg

    clock = Clock()
    holder, other = postgres.store(clock=clock), postgres.store(clock=clock)
    for n in range(3):
        holder.add(f"e{n}", "{}")
    connect = psycopg.connect

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError(refusal)

    monkeypatch.setattr(psycopg, "connect", refused)
    assert len(holder.claim(100, 600.0, 3600.0).events) == 3
    clock.now += 10  # well past the heartbeat timeout since the claim
    wait_until(
        functools.partial(beaten_since, postgres, holder, clock.now, connect),
        10,
        "the holder beats on a pooled connection",
    )
    monkeypatch.undo()
    assert other.claim(100, 600.0, 3600.0).events == []  # the live holder keeps its batch


def beaten_since(postgres: Backend, holder: OutboxStore, moment: float, connect: Callable[..., Any]) -> bool:
    """Whether ``holder``'s heartbeat row says it beat at ``moment`` or later (read with ``connect``)."""
    with connect(postgres.url, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT beat_at FROM "{postgres.table}_senders" WHERE holder = %s',
            (holder.holder,),
        ).fetchone()
    return row is not None and row[0] >= moment


def _known(store: OutboxStore) -> None:
    """A web request's duplicate lookup; it fails once the pool gives up waiting, as a 503 would."""
    with contextlib.suppress(StoreUnavailable):
        store.is_known("e0")


def with_options(url: str, options: str) -> str:
    """``url`` with libpq ``options`` (``-c setting=value``), as a database's own defaults would be."""
    return f"{url}{'&' if '?' in url else '?'}options={quote(options)}"


def add_at_once(stores: list[OutboxStore], event_id: str) -> list[object]:
    """What each store's ``add(event_id)`` gave (or raised), the adds started together in threads."""
    both_ready = threading.Barrier(len(stores))
    results: list[object] = []

    def add(store: OutboxStore) -> None:
        both_ready.wait()
        try:
            results.append(store.add(event_id, "{}"))
        except StoreUnavailable as error:
            results.append(error)

    threads = [threading.Thread(target=add, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_a_database_that_defaults_to_repeatable_read_takes_simultaneous_duplicates_once(
    postgres: Backend,
) -> None:
    """DBAs may set REPEATABLE READ for a whole database; the outbox relies on READ COMMITTED's re-check
    of changed rows, or one of two servers taking the same retry at once answers 503."""
    url = with_options(postgres.url, r"-c default_transaction_isolation=repeatable\ read")
    first, second = (store_from_url(url, table=postgres.table) for _ in range(2))
    with closing(first), closing(second):
        first.add("warm", "{}")
        second.is_known("warm")  # both pools open
        for n in range(10):
            results = add_at_once([first, second], f"e{n}")
            assert sorted(map(repr, results)) == ["False", "True"]  # one added it, one saw it known


def test_a_statement_cut_while_waiting_on_a_lock_ends_on_the_server_too(postgres: Backend) -> None:
    """The watchdog cuts a web request's statement after its bound (a 503); the server session must not
    wait on: each retry would leave another, until PostgreSQL's max_connections is reached."""
    store = postgres.store()
    store.add("warm", "{}")
    import psycopg

    def waiting() -> int:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f'%INSERT INTO "{postgres.table}"%',),
            ).fetchone()
        return int(row[0]) if row else 0

    with psycopg.connect(postgres.url) as blocker:
        blocker.execute(f'LOCK TABLE "{postgres.table}" IN SHARE MODE')  # as a plain CREATE INDEX takes
        for n in range(3):
            with pytest.raises(StoreUnavailable, match="did not answer"):
                store.add(f"e{n}", "{}")
        wait_until(lambda: waiting() == 0, 10, "the cut statements end on the server")
        blocker.rollback()
    assert not any(store.is_known(f"e{n}") for n in range(3))  # answered 503: Customer.io sends them again


def test_closing_deletes_its_heartbeat_row_and_those_of_holders_long_silent(postgres: Backend) -> None:
    """Workers recycled by gunicorn, or killed, would otherwise each leave a row in ``<table>_senders``."""
    import psycopg

    senders = f'"{postgres.table}_senders"'
    store = postgres.store()
    store.add("e0", "{}")
    assert len(store.claim(100, 60.0, 3600.0).events) == 1
    idle = postgres.store()
    assert idle.claim(100, 60.0, 3600.0).events == []  # it beats all the same
    now = "extract(epoch FROM now())"
    admin(f"INSERT INTO {senders} (holder, beat_at) VALUES ('killed:1:x', {now} - 7200), ('live:1:x', {now})")

    def holders() -> set[str]:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            return {row[0] for row in conn.execute(f"SELECT holder FROM {senders}")}

    assert holders() >= {store.holder, idle.holder, "killed:1:x"}
    idle.close()
    assert holders() == {store.holder, "live:1:x"}
    store.close()
    assert holders() == {"live:1:x"}
    assert postgres.store().claim(100, 60.0, 3600.0).events[0].event_id == "e0"  # freed at close


@pytest.fixture
def proxy() -> Iterator[FreezingProxy]:
    """A proxy in front of the test server, to freeze it without stopping it."""
    parts = urlsplit(postgres_url())
    made = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        yield made
    finally:
        made.close()


def through(proxy: FreezingProxy) -> str:
    """The test server's URL, through ``proxy``."""
    parts = urlsplit(postgres_url())
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))


def outcome_of(call: Callable[[], Any], guard: float = 30.0) -> Any:
    """What ``call`` returned or raised, run in a thread; fails if it is still waiting after ``guard`` s."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(guard)
    assert outcome, f"still waiting for the server after {guard:g} s"
    return outcome[0]


@pytest.mark.parametrize("case", ["in use", "first use", "an operator's read", "pause", "resume"])
def test_a_server_that_stops_answering_fails_a_statement_instead_of_hanging(
    postgres: Backend, proxy: FreezingProxy, case: str
) -> None:
    """psycopg has no client-side timeout: without the watchdog, this lookup waits until TCP gives up.
    On first use, the tables are looked for (and made) within the same bound. Metrics, the dashboard
    and the CLI's listings read the status, and pause and resume the sending, with a bound of their own."""
    store = postgres_store(through(proxy), table=postgres.table)
    calls: dict[str, Callable[[], Any]] = {
        "an operator's read": store.status,
        "pause": lambda: store.set_paused(True),
        "resume": lambda: store.set_paused(False),
    }
    call = calls.get(case, lambda: store.is_known("e1"))
    try:
        if case == "first use":
            store._get_pool().wait(10)  # connected, the tables not looked at yet
        else:
            assert store.add("e1", "{}")
        store.REQUEST_STATEMENT_TIMEOUT = store.READ_STATEMENT_TIMEOUT = 0.2  # for the frozen call only
        proxy.freeze()
        failed = outcome_of(call)
        assert isinstance(failed, StoreUnavailable), failed
        assert "did not answer within 0.2 s" in str(failed) and "reachable" in str(failed)
        proxy.thaw()
        del store.REQUEST_STATEMENT_TIMEOUT, store.READ_STATEMENT_TIMEOUT  # the usual bounds again
        wait_until(lambda: not isinstance(outcome_of(call), Exception), 20, "the store works again")
        assert case in calls or store.is_known("e1") is (case == "in use")
        assert store.status().paused is (case == "pause")
    finally:
        proxy.thaw()
        store.close()


def test_the_webhook_answers_503_while_postgresql_hangs_and_keeps_the_event_once_it_answers(
    postgres: Backend,
    proxy: FreezingProxy,
    make_app: Callable[..., Flask],
    post: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Customer.io gives up after 4 s: a hung outbox must get a 503 it retries, not a request it abandons."""
    from flask_cio_rudder.store.postgres import PostgresStore

    usual = PostgresStore.REQUEST_STATEMENT_TIMEOUT
    app = make_app(
        CIO_RUDDER_FORWARDER="outbox",
        CIO_RUDDER_OUTBOX_URL=through(proxy),
        CIO_RUDDER_OUTBOX_TABLE=postgres.table,
        CIO_RUDDER_OUTBOX_SENDER=False,
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
    )
    client = app.test_client()
    first, second = email_sample("delivered"), email_sample("opened")
    assert post(client, first).status_code == 200
    monkeypatch.setattr(PostgresStore, "REQUEST_STATEMENT_TIMEOUT", 0.2)  # for the frozen request only
    proxy.freeze()
    try:
        answer = outcome_of(lambda: post(client, second))
        assert answer.status_code == 503, answer.get_data(as_text=True)
    finally:
        proxy.thaw()
        monkeypatch.setattr(PostgresStore, "REQUEST_STATEMENT_TIMEOUT", usual)
    wait_until(lambda: post(client, second).status_code == 200, 20, "the retry is accepted")
    assert post(client, second).status_code == 200  # a duplicate now
    pending = get_outbox(app).store.pending()
    assert sorted(event.event_id for event in pending) == sorted([first["event_id"], second["event_id"]])


@pytest.fixture
def holder_and_other(
    postgres: Backend, proxy: FreezingProxy
) -> Iterator[tuple[PostgresStore, PostgresStore, Clock]]:
    """A holder (through ``proxy``, so that it can be cut off) holding e0-e2, another server that has
    claimed (so that it beats), and the clock both read."""
    clock = Clock()
    holder = postgres_store(through(proxy), table=postgres.table, clock=clock)
    other = postgres.store(clock=clock)
    assert isinstance(other, type(holder))
    other.HEARTBEAT = 0.05  # type: ignore[attr-defined]  # beat_again waits for a beat: no need to wait a second
    try:
        for n in range(3):
            holder.add(f"e{n}", "{}")
        assert len(holder.claim(100, 600.0, 3600.0).events) == 3
        assert other.claim(100, 600.0, 3600.0).events == []  # starts its heartbeat
        yield holder, other, clock
    finally:
        proxy.thaw()
        holder.close()


def beat_again(store: PostgresStore, clock: Clock, seconds: float, what: str) -> None:
    """Move ``clock`` on by ``seconds`` and wait until ``store``'s heartbeat has beaten since."""
    clock.now += seconds
    senders = f'"{store.table}_senders"'
    import psycopg

    def beaten() -> bool:
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            row = conn.execute(f"SELECT beat_at FROM {senders} WHERE holder = %s", (store.holder,)).fetchone()
        return row is not None and row[0] >= clock.now

    wait_until(beaten, 10, what)


def test_after_an_outage_a_live_holders_batch_waits_until_others_have_reached_the_server_for_a_while(
    holder_and_other: tuple[PostgresStore, PostgresStore, Clock], proxy: FreezingProxy
) -> None:
    """Every heartbeat is stale after an outage: the first server back must not take a live holder's
    batch (both would send it) before the holder has had the time to beat. One that has reached the
    database for the heartbeat timeout since, while the holder has not, takes it."""
    holder, other, clock = holder_and_other
    beat_again(other, clock, 1, "the other server's heartbeat beats")  # its heartbeat's, not its claim's
    proxy.freeze()  # the holder is alive but cannot reach the database yet
    # The outage: the database drops every connection, and ten seconds pass before it is back.
    admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE pid <> pg_backend_pid() AND query LIKE '%{holder.table}_senders%'"
    )
    beat_again(other, clock, 10, "the other server beats again")
    assert other.claim(100, 600.0, 3600.0).events == []  # the live holder keeps its batch

    # The holder stays unreachable while the other keeps reaching the database: it is taken.
    for _ in range(3):
        beat_again(other, clock, 2, "the other server keeps beating")
    taken = other.claim(100, 600.0, 3600.0).events
    assert sorted(event.event_id for event in taken) == ["e0", "e1", "e2"]


def test_a_claim_that_reaches_the_database_late_does_not_judge_holders(
    holder_and_other: tuple[PostgresStore, PostgresStore, Clock], proxy: FreezingProxy
) -> None:
    """A claim sent just before this process lost the database may run long after: by then its own
    heartbeat is old too, and a stale holder may only be cut off as it was. It takes nothing."""
    _, other, clock = holder_and_other
    proxy.freeze()  # the holder beats no more
    for _ in range(4):  # the other reaches the database for 8 s without a break
        beat_again(other, clock, 2, "the other server beats")
    # Its heartbeat stalls (as when the process lost the database) while a claim is on its way.
    heartbeat = other._heartbeat
    assert heartbeat is not None
    other._closing.set()
    heartbeat.join(10)
    clock.now += 3
    assert other.claim(100, 600.0, 3600.0).events == []


def test_a_claim_cut_while_the_server_runs_it_leaves_no_batch_stranded(postgres: Backend) -> None:
    """Cutting the connection does not stop the statement on the server: a claim kept waiting by a lock
    may still lease its rows, to a claim nobody sends. The next claim of the process takes them back."""
    store = postgres.store()
    for n in range(3):
        store.add(f"e{n}", "{}")
    first = store.claim(100, 600.0, 3600.0)  # a first claim, given back: the events are free again
    store.release(first.owner, [event.event_id for event in first.events], "given back")
    import psycopg

    with psycopg.connect(postgres_url()) as blocker:
        # Beats (and a claim's own beat) wait; reading who beat does not.
        blocker.execute(f'LOCK TABLE "{postgres.table}_senders" IN EXCLUSIVE MODE')
        store.SENDER_STATEMENT_TIMEOUT = 0.3  # type: ignore[attr-defined]  (a PostgresStore; this claim only)
        failed = outcome_of(lambda: store.claim(100, 600.0, 3600.0))
        del store.SENDER_STATEMENT_TIMEOUT  # type: ignore[attr-defined]
        assert isinstance(failed, StoreUnavailable) and "did not answer" in str(failed), failed
        blocker.rollback()  # the cut claim now runs on the server, leasing the three events

    def leased() -> int:
        with psycopg.connect(postgres_url(), autocommit=True) as conn:
            row = conn.execute(
                f'SELECT count(*) FROM "{postgres.table}" WHERE lease_owner IS NOT NULL'
            ).fetchone()
        return int(row[0]) if row else 0

    wait_until(lambda: leased() == 3, 10, "the cut claim has run on the server")
    assert sorted(event.event_id for event in store.claim(100, 600.0, 3600.0).events) == ["e0", "e1", "e2"]


def test_upgrading_an_older_releases_table_is_not_cut_at_the_web_requests_bound(postgres: Backend) -> None:
    """The upgrade on first use may rightly take minutes on a large table (here: waiting for another
    process's). Cut at a web request's bound, it would roll back, and start again at every request."""
    from .test_store_contract import OLD_TABLE

    admin(OLD_TABLE.format(table=f'"{postgres.table}"'))
    store = postgres.store()
    # Below the second the upgrade waits (below), above what the lookup after it takes on a busy machine.
    store.REQUEST_STATEMENT_TIMEOUT = 0.5  # type: ignore[attr-defined]  (a PostgresStore)
    import psycopg

    with psycopg.connect(postgres_url()) as blocker:  # another process upgrading, or starting to
        blocker.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"flask_cio_rudder:{postgres.table}",))
        outcome: list[Any] = []
        request = threading.Thread(target=lambda: outcome.append(outcome_of(lambda: store.is_known("e1"))))
        request.start()

        def upgrade_waited_past_the_bound() -> bool:
            with psycopg.connect(postgres_url(), autocommit=True) as conn:
                return bool(
                    conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND wait_event = 'advisory' AND now() - query_start > interval '1 second'"
                    ).fetchone()
                )

        wait_until(upgrade_waited_past_the_bound, 10, "the upgrade has waited longer than the bound")
        blocker.rollback()
    request.join(30)
    assert outcome == [False]
    assert store.find(email="nobody@example.com") == []  # the search columns are there now


# -- behind PgBouncer -----------------------------------------------------------------------------


class ThrowawayPgBouncer:
    """PgBouncer pooling transactions, on a free loopback port, in front of the test server: each
    transaction gets any of its few server sessions, as on many hosted PostgreSQL offers."""

    def __init__(self) -> None:
        url = postgres_url()  # first: skips (or fails in CI) without psycopg or the server
        binary = shutil.which("pgbouncer") or next(iter(glob.glob("/usr/sbin/pgbouncer")), None)
        if binary is None:
            unavailable("PgBouncer is not installed (Debian: apt-get install pgbouncer)", "PgBouncer")
        from psycopg.conninfo import conninfo_to_dict

        server = conninfo_to_dict(url)
        user = str(server.get("user", "postgres"))
        self.port = free_port()
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/bounced"
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses root
        # Not pytest's tmp_path: a folder only root may enter, when the server runs as postgres.
        self.directory = directory = Path(tempfile.mkdtemp(prefix="cio-rudder-pgbouncer-"))
        if as_user:
            shutil.chown(directory, "postgres")
        (directory / "users.txt").write_text(f'"{user}" ""\n')
        target = " ".join(
            f"{key}={server[key]}" for key in ("host", "port", "dbname", "user") if key in server
        )
        (directory / "pgbouncer.ini").write_text(
            f"[databases]\nbounced = {target}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {directory / 'users.txt'}\n"
            "pool_mode = transaction\ndefault_pool_size = 3\nignore_startup_parameters = options\n"
        )
        self.log = directory / "pgbouncer.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*as_user, binary, str(directory / "pgbouncer.ini")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._answers, 10, "PgBouncer answers", lambda: self.log.read_text(errors="replace"))

    def _answers(self) -> bool:
        import psycopg

        if self.process.poll() is not None:
            pytest.fail(f"PgBouncer exited:\n{self.log.read_text(errors='replace')}")
        try:
            psycopg.connect(self.url, connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def pgbouncer() -> Iterator[ThrowawayPgBouncer]:
    bouncer = ThrowawayPgBouncer()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_a_store_behind_a_pgbouncer_pooling_transactions_keeps_claims_and_marks_every_event(
    pgbouncer: ThrowawayPgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg prepares a statement it runs often, on the session it runs in. Behind such a pooler
    the next transaction's session lacks it, or has that name taken by another client's
    ("prepared statement "_pg3_0" already exists"): uses of the store failed from then on."""
    store = store_from_url(pgbouncer.url, table=unique_table())
    try:
        for n in range(60):
            assert not store.is_known(f"e{n}")
            assert store.add(f"e{n}", "{}")
        delivered = 0
        while True:
            claim = store.claim(7, 60.0, 3600.0)
            if not claim.events:
                break
            store.mark_delivered(claim.owner, [event.event_id for event in claim.events])
            delivered += len(claim.events)
        assert delivered == 60
        status = store.status()
        assert (status.pending, status.delivered) == (0, 60)
        assert "prepared statements are off" in caplog.text
    finally:
        store.drop_tables()
        store.close()
