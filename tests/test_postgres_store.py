"""What only the PostgreSQL outbox has to get right: roles, schemas, channel names, its URL.

The contract both backends keep is in test_store_contract.py; servers that fail or restart
are in test_postgres_faults.py.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing
from urllib.parse import urlsplit, urlunsplit

import pytest

from flask_cio_rudder.store import OutboxStore, StoreUnavailable, store_from_url

from .helpers import Clock, free_port, wait_until
from .stores import Backend, postgres_fixture, postgres_url  # noqa: F401  (a fixture)

pytestmark = pytest.mark.service


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
        senders = f'"{postgres.table}_senders"'

        def beaten_since() -> bool:
            with psycopg.connect(postgres_url(), autocommit=True) as conn:
                row = conn.execute(
                    f"SELECT beat_at FROM {senders} WHERE holder = %s", (holder.holder,)
                ).fetchone()
            return row is not None and row[0] >= clock.now

        wait_until(beaten_since, 10, "the holder beats while its pool is taken")
        blocker.rollback()
    for request in requests:
        request.join(10)
    assert other.claim(100, 600.0, 3600.0).events == []  # the live holder keeps its batch


def _known(store: OutboxStore) -> None:
    """A web request's duplicate lookup; it fails once the pool gives up waiting, as a 503 would."""
    with contextlib.suppress(StoreUnavailable):
        store.is_known("e0")
