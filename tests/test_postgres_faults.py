"""PostgreSQL under faults, with real processes: the server killed and restarted, two app servers.

The outage test starts a throwaway PostgreSQL of its own (``initdb`` and ``pg_ctl`` in a
temporary folder, as the ``postgres`` user when run as root) so that it can kill it. The
two-server test shares the local server (``tests/stores.py``) on a table of its own.
Without PostgreSQL they skip with the reason (fail in CI). Every wait polls a condition.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_cio_rudder.store import store_from_url
from flask_cio_rudder.testing import FakeDataPlane

from .helpers import free_port, wait_until
from .stores import Backend, postgres_fixture, unavailable  # noqa: F401  (a fixture)
from .test_processes import WRITE_KEY, Deployment, Server, make_bodies, post_event

pytestmark = [pytest.mark.slow, pytest.mark.service]


class ThrowawayPostgres:
    """A PostgreSQL server of the test's own, on a free loopback port, that it may kill and restart."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401  (the app under test needs it to reach this server)
        except ImportError:
            unavailable('psycopg is not installed: pip install -e ".[postgres,test]"')
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or list(
            filter(None, [shutil.which("initdb")])
        )
        if not binaries:
            unavailable("initdb is not installed (Debian: apt-get install postgresql)")
        self.bin = Path(binaries[-1]).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.directory = Path(tempfile.mkdtemp(prefix="cio-rudder-pg-"))
        if self.as_user:
            shutil.chown(self.directory, "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{tool} failed:\n{result.stdout}\n{result.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c fsync=off"
        log = str(self.directory / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "60", "start")

    def kill(self) -> None:
        """Stop at once, as a crash does (no checkpoint; the WAL replays at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def restart(self) -> None:
        """A clean restart (a fast shutdown: every connection is told it is being terminated)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.start()

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def try_post(server: Server, body: dict[str, Any]) -> int | str:
    """The webhook's status code for ``body``, or ``"no answer"`` (server down, or too slow)."""
    try:
        response = post_event(server.url, body)
    except requests.RequestException:
        return "no answer"
    if response.status_code == 200:
        return str(response.json()["status"])
    return response.status_code


def test_after_a_clean_restart_the_next_request_is_served(throwaway_postgres: ThrowawayPostgres) -> None:
    """The pool's idle connection learns of the restart on its next use: that use is tried again."""
    store = store_from_url(throwaway_postgres.url)
    try:
        assert store.add("e1", "{}") is True  # the pool holds an open connection now
        throwaway_postgres.restart()
        assert store.is_known("e1")
        assert store.add("e2", "{}") is True
    finally:
        store.close()


def test_postgresql_killed_and_restarted_mid_run_loses_nothing_and_sending_resumes_by_itself(
    tmp_path: Path, throwaway_postgres: ThrowawayPostgres
) -> None:
    """Outage: the webhook answers 503 (Customer.io retries), the sender backs off; both recover alone."""
    pytest.importorskip("gunicorn", reason="gunicorn (a test dependency) is not installed")
    deployment = Deployment(tmp_path, throwaway_postgres.url)
    accepted: list[str] = []
    try:
        with FakeDataPlane(write_key=WRITE_KEY) as plane:
            server = deployment.start(plane.url, workers=2)
            before = make_bodies("before", 20)
            for body in before:
                assert try_post(server, body) == "accepted"
                accepted.append(body["event_id"])
            deployment.wait_forwarded(20, plane, server)

            throwaway_postgres.kill()
            during = make_bodies("during", 2)
            outage_answers = [try_post(server, body) for body in during]
            assert "accepted" not in outage_answers and "no answer" not in outage_answers, outage_answers

            throwaway_postgres.start()
            after = make_bodies("after", 20)
            # Customer.io sends the refused ones again until they are taken: so does this loop.
            retried: list[dict[str, Any]] = list(during)

            def retry_until_taken() -> bool:
                while retried and try_post(server, retried[0]) in ("accepted", "duplicate"):
                    accepted.append(retried.pop(0)["event_id"])
                return not retried

            wait_until(retry_until_taken, 30, "the webhook takes events again", server.log_tail)
            for body in after:
                assert try_post(server, body) == "accepted"
                accepted.append(body["event_id"])
            deployment.wait_forwarded(len(accepted), plane, server)
            delivered = {event["properties"]["eventId"] for event in plane.events}
            assert delivered == set(accepted)
            status = deployment.status()
            assert (status.pending, status.dead, status.delivered) == (0, 0, len(accepted))
    finally:
        deployment.stop_all()
    assert set(outage_answers) == {503}


def test_two_servers_share_one_outbox_through_a_sigkill_and_a_failing_data_plane(
    tmp_path: Path, postgres: Backend
) -> None:
    """Two gunicorn masters on one PostgreSQL table: every accepted event arrives, under one messageId."""
    pytest.importorskip("gunicorn", reason="gunicorn (a test dependency) is not installed")
    rng = random.Random(9)
    servers = {name: Deployment(tmp_path / name, postgres.url, postgres.table) for name in ("a", "b")}
    for name in servers:
        (tmp_path / name).mkdir()
    port = free_port()
    planes = [FakeDataPlane(write_key=WRITE_KEY, port=port).start()]
    accepted: set[str] = set()
    waiting: list[tuple[str, dict[str, Any]]] = []  # refused while a server was down: Customer.io retries
    running: dict[str, Server] = {}
    try:
        for name, deployment in servers.items():
            running[name] = deployment.start(planes[-1].url, workers=2, outbox_lease=30)
        bodies = make_bodies("two", 160)
        injected_at = -1  # the data plane's request count when a failure was last planned
        for number, body in enumerate(bodies):
            name = "ab"[number % 2]
            plane = planes[-1]
            # Now and then the next request fails, one failure at a time, between successes.
            if rng.random() < 0.15 and plane.requests > injected_at:
                injected_at = plane.requests
                if rng.random() < 0.5:
                    plane.fail_next(rng.choice([500, 502, 503, 429]))
                else:
                    plane.reset_next()
            if number == 50:  # server a's whole process group dies mid-run
                servers["a"].stop_all()
                running.pop("a")
            if number == 80:
                running["a"] = servers["a"].start(planes[-1].url, workers=2, outbox_lease=30)
            if number == 100:  # the data plane goes down until a sender has found it down
                planes[-1].stop()
            if number == 120:
                wait_until(
                    lambda: any(
                        "could not reach RudderStack" in server.log.read_text(errors="replace")
                        for server in running.values()
                    ),
                    30,
                    "a sender finds the data plane down",
                )
                planes.append(FakeDataPlane(write_key=WRITE_KEY, port=port).start())
            if name not in running:
                waiting.append((name, body))
                continue
            answer = try_post(running[name], body)
            if answer == "accepted":
                accepted.add(body["event_id"])
                if number % 10 == 0:  # Customer.io sends it again, and the other server gets it
                    other = "ba"[number % 2]
                    if other in running:
                        assert try_post(running[other], body) == "duplicate"
            else:
                waiting.append((name, body))
        for name, body in waiting:  # the retries, once both servers run
            assert try_post(running[name], body) in ("accepted", "duplicate")
            accepted.add(body["event_id"])
        assert len(accepted) == len(bodies)

        def message_ids() -> dict[str, set[str]]:
            found: dict[str, set[str]] = defaultdict(set)
            for plane in planes:
                for event in plane.events:
                    found[event["properties"]["eventId"]].add(event["messageId"])
            return found

        wait_until(
            lambda: set(message_ids()) >= accepted,
            60,
            "every accepted event reached the data plane",
            lambda: f"missing: {sorted(accepted - set(message_ids()))[:10]}, outbox: {servers['a'].status()}",
        )
        found = message_ids()
        assert set(found) == accepted
        assert all(len(ids) == 1 for ids in found.values()), "an event arrived under two messageIds"
        wait_until(lambda: servers["a"].status().pending == 0, 30, "nothing is pending")
        status = servers["a"].status()
        assert (status.dead, status.delivered) == (0, len(accepted))
    finally:
        for deployment in servers.values():
            deployment.stop_all()
        for plane in planes:
            plane.stop()
