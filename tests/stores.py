"""Outbox stores for tests: one per backend, each on its own table, dropped afterwards.

PostgreSQL tests use the server at ``CIO_RUDDER_TEST_POSTGRES_URL`` (by default the
local one, ``postgresql://postgres@127.0.0.1:5432/test``). Without it they skip,
saying why, unless ``CIO_RUDDER_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_cio_rudder.store import OutboxStore, store_from_url

POSTGRES_URL = os.environ.get("CIO_RUDDER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRED = os.environ.get("CIO_RUDDER_REQUIRE_SERVICES") == "1"


def postgres_url() -> str:
    """The test server's URL; skips (or, in CI, fails) with the reason when it cannot be used."""
    try:
        import psycopg
    except ImportError:
        unavailable('psycopg is not installed: pip install -e ".[postgres,test]"')
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as error:
        unavailable(f"PostgreSQL at {POSTGRES_URL} is not reachable: {str(error).strip()}")
    return POSTGRES_URL


def unavailable(reason: str, what: str = "PostgreSQL") -> Any:
    """Skip the test saying why, or fail it in CI (``CIO_RUDDER_REQUIRE_SERVICES=1``)."""
    if REQUIRED:
        pytest.fail(f"{reason} (CIO_RUDDER_REQUIRE_SERVICES=1 makes {what} required)")
    pytest.skip(reason)


def unique_table() -> str:
    return f"cio_test_{uuid.uuid4().hex[:12]}"


class Backend:
    """Makes stores of one backend on one table (as many as a test wants) and drops the table after."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.table = unique_table()
        if name == "sqlite":
            self.url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
        else:
            self.url = postgres_url()
        self.opened: list[OutboxStore] = []

    def store(self, **options: Any) -> OutboxStore:
        store = store_from_url(self.url, table=self.table, **options)
        self.opened.append(store)
        return store

    def app_config(self) -> dict[str, Any]:
        """The config keys that point an app at this backend's table."""
        return {"CIO_RUDDER_OUTBOX_URL": self.url, "CIO_RUDDER_OUTBOX_TABLE": self.table}

    def cleanup(self) -> None:
        for store in self.opened:
            store.close()
        if self.name != "sqlite":
            store = store_from_url(self.url, table=self.table)
            try:
                store.drop_tables()
            finally:
                store.close()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.service)]


@pytest.fixture(name="backend", params=BACKENDS)
def backend_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn, on a table of its own."""
    made = Backend(request.param, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(name="postgres")
def postgres_fixture(tmp_path: Path) -> Iterator[Backend]:
    """PostgreSQL only, on a table of its own."""
    made = Backend("postgresql", tmp_path)
    try:
        yield made
    finally:
        made.cleanup()
