"""The outbox's promises, checked with real processes: SIGKILL, fork, SIGTERM, a dead sender.

The app served here is ``tests/process_app.py``, run by gunicorn (as users run it)
from the repository root. Each test gets its own outbox, forwarded-batches log and
data plane (a :class:`FakeDataPlane` on loopback, or a closed loopback port when the
data plane must be down). Nothing waits a fixed time: every wait polls a condition
until a deadline and fails saying what it waited for. Every process started here is
killed (its whole process group) when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from flask import Flask

from flask_cio_rudder.outbox import Outbox, OutboxStatus
from flask_cio_rudder.rudderstack import DataPlane
from flask_cio_rudder.sender import Sender
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers
from flask_cio_rudder.transform import message_id, transform

from .conftest import EMAIL_EVENTS, WEBHOOK, sample

ROOT = Path(__file__).resolve().parents[1]
SIGNING_KEY = "process-test-signing-key"
WRITE_KEY = "process-test-write-key"
POLL = 0.02  # seconds between two looks at a condition
BOOT_TIMEOUT = 20.0  # gunicorn importing Flask and the app on a busy 2-core machine
DELIVERY_TIMEOUT = 20.0
MAX_AGE = 7 * 24 * 3600.0  # CIO_RUDDER_OUTBOX_MAX_AGE's default
ANSWER_TIMEOUT = 10.0  # a webhook takes milliseconds; Customer.io itself gives up after 4 s

# -- waiting -------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, detail: Callable[[], str] = str
) -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}\n{detail()}")
        time.sleep(POLL)


# -- events --------------------------------------------------------------------------------------


def make_bodies(tag: str, count: int) -> list[dict[str, Any]]:
    """``count`` distinct webhook bodies: the six email samples in turn, each with its own event_id."""
    bodies = []
    for number in range(count):
        body = sample(EMAIL_EVENTS[number % len(EMAIL_EVENTS)])
        body["event_id"] = f"{tag}-{number:04d}"
        bodies.append(body)
    return bodies


def post_event(url: str, body: dict[str, Any]) -> requests.Response:
    """Post one body, signed as Customer.io signs it, on a fresh connection."""
    raw = encode(body)
    headers = {**signature_headers(raw, SIGNING_KEY), "Connection": "close"}
    return requests.post(url + WEBHOOK, data=raw, headers=headers, timeout=ANSWER_TIMEOUT)


def assert_accepted(response: requests.Response, body: dict[str, Any]) -> int:
    """The webhook kept ``body``; returns the pid of the process that answered."""
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "accepted", "event_id": body["event_id"]}
    return int(response.headers["X-Worker-Pid"])


def assert_delivered_exactly_once(stored: list[dict[str, Any]], event_ids: Collection[str]) -> None:
    """Each event reached the data plane once, under the messageId derived from its event_id."""
    by_message_id = Counter(event["messageId"] for event in stored)
    repeated = {mid: count for mid, count in by_message_id.items() if count > 1}
    assert not repeated, f"events stored more than once (messageId: times): {repeated}"
    by_event_id = Counter(event["properties"]["eventId"] for event in stored)
    repeated = {eid: count for eid, count in by_event_id.items() if count > 1}
    assert not repeated, f"events stored more than once under different messageIds: {repeated}"
    assert set(by_event_id) == set(event_ids), (
        f"missing: {sorted(set(event_ids) - set(by_event_id))}, "
        f"unexpected: {sorted(set(by_event_id) - set(event_ids))}"
    )
    assert all(event["messageId"] == message_id(event["properties"]["eventId"]) for event in stored)
    assert len(stored) == len(event_ids)


def outbox_status(path: Path) -> OutboxStatus:
    outbox = Outbox(str(path))
    try:
        return outbox.status()
    finally:
        outbox.close()


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on (a closed port, or one to serve on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """One gunicorn serving ``tests.process_app``, in its own process group."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    @property
    def pid(self) -> int:
        """The gunicorn master's pid (it serves no request with more than zero workers)."""
        return self.process.pid

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- last lines of {self.log.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the master and its workers at once, then reap the master."""
        with contextlib.suppress(ProcessLookupError):  # all gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


class Deployment:
    """Starts gunicorn, always on the same outbox and forwarded-batches log, as often as a test wants."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.outbox = tmp_path / "outbox.sqlite3"
        self.forwarded_log = tmp_path / "forwarded.log"
        self.servers: list[Server] = []

    def start(
        self, data_plane_url: str, *, workers: int = 1, preload: bool = False, **settings: float
    ) -> Server:
        """Start gunicorn and wait until it answers HTTP; ``settings`` are ``CIO_RUDDER_*`` seconds."""
        port = free_port()
        env = {key: value for key, value in os.environ.items() if key != "GUNICORN_CMD_ARGS"}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            CIO_RUDDER_OUTBOX_PATH=str(self.outbox),
            CIO_RUDDER_DATA_PLANE_URL=data_plane_url,
            CIO_RUDDER_WRITE_KEY=WRITE_KEY,
            CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
            PROCESS_APP_FORWARDED_LOG=str(self.forwarded_log),
        )
        env.update({f"CIO_RUDDER_{name.upper()}": str(value) for name, value in settings.items()})
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "60",  # so that a bounded shutdown is the library's doing, not gunicorn killing a worker
            "--log-level",
            "info",
            *(["--preload"] if preload else []),
            *_NO_CONTROL_SOCKET,
            "tests.process_app:create_app()",
        ]
        log = self.tmp_path / f"gunicorn-{len(self.servers) + 1}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        self.servers.append(server)

        def answers() -> bool:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode} while starting\n{server.log_tail()}")
            try:
                requests.get(server.url + "/", timeout=1, headers={"Connection": "close"})
            except (requests.ConnectionError, requests.Timeout):
                return False
            return True

        wait_until(answers, BOOT_TIMEOUT, "gunicorn answers HTTP", server.log_tail)
        return server

    def forwarded(self) -> list[tuple[int, int]]:
        """(pid, number of events) for each batch the data plane stored, in the order they were logged."""
        if not self.forwarded_log.exists():
            return []
        complete = self.forwarded_log.read_text().split("\n")[:-1]  # a line being written has no "\n" yet
        return [(int(pid), int(count)) for pid, count in (line.split() for line in complete)]

    def forwarded_count(self) -> int:
        return sum(count for _, count in self.forwarded())

    def wait_forwarded(self, count: int, plane: FakeDataPlane, server: Server) -> None:
        """Wait until the senders have reported ``count`` events forwarded (the last step of a delivery)."""

        def detail() -> str:
            return (
                f"forwarded so far: {self.forwarded_count()}, stored by the data plane: {len(plane.events)}, "
                f"outbox: {outbox_status(self.outbox)}\n{server.log_tail()}"
            )

        wait_until(
            lambda: self.forwarded_count() >= count, DELIVERY_TIMEOUT, f"{count} events are forwarded", detail
        )

    def stop_all(self) -> None:
        """Kill every process group started here, finished or not: a worker may outlive its master."""
        for server in self.servers:
            server.kill()


def _no_control_socket() -> list[str]:
    """gunicorn 27 opens a control socket in ~/.gunicorn unless told not to: stay out of $HOME."""
    try:
        from gunicorn.config import Config
    except ImportError:  # the deployment fixture skips
        return []
    return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []


_NO_CONTROL_SOCKET = _no_control_socket()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    pytest.importorskip("gunicorn", reason="gunicorn (a test dependency, installed in CI) is not installed")
    deployed = Deployment(tmp_path)
    try:
        yield deployed
    finally:
        deployed.stop_all()


# -- 1. SIGKILL ----------------------------------------------------------------------------------


def test_events_accepted_before_a_sigkill_are_delivered_once_after_the_restart(
    deployment: Deployment,
) -> None:
    """Accepted means kept: 2xx answers, then SIGKILL (no atexit, no flush), then a restart sends them all."""
    bodies = make_bodies("sigkill", 50)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send is refused
    # A short lease: were the kill to land in the few microseconds a failing send holds its lease,
    # the restart would wait for it to run out (60 s by default) before sending those events.
    first = deployment.start(down, outbox_lease=5)
    for body in bodies:
        assert_accepted(post_event(first.url, body), body)

    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    assert deployment.forwarded() == []
    status = outbox_status(deployment.outbox)
    assert (status.pending, status.delivered, status.dead) == (50, 0, 0)

    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        second = deployment.start(plane.url, outbox_lease=5)
        deployment.wait_forwarded(50, plane, second)
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
    assert deployment.forwarded_count() == 50
    status = outbox_status(deployment.outbox)
    assert (status.pending, status.delivered, status.dead) == (0, 50, 0)


# -- 2. several workers, forked from a preloaded master ------------------------------------------


def test_preloaded_workers_send_after_the_fork_and_nothing_is_forwarded_twice(deployment: Deployment) -> None:
    """``gunicorn -w 3 --preload``: the app (and its sender) is built in the master, then forked."""
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        server = deployment.start(plane.url, workers=3, preload=True)
        bodies = iter(make_bodies("preload", 600))
        accepted: dict[str, int] = {}  # event_id -> pid of the worker that answered
        unanswered: list[str] = []  # event_ids whose webhook got no answer within ANSWER_TIMEOUT
        lock = threading.Lock()
        deadline = time.monotonic() + 30

        def send_until_every_worker_answered() -> None:
            while time.monotonic() < deadline:
                with lock:
                    if len(set(accepted.values())) >= 3 or unanswered:
                        return
                    body = next(bodies, None)
                if body is None:
                    return
                try:
                    response = post_event(server.url, body)
                except requests.Timeout:
                    with lock:
                        unanswered.append(body["event_id"])
                    return
                pid = assert_accepted(response, body)
                with lock:
                    accepted[body["event_id"]] = pid

        with ThreadPoolExecutor(max_workers=6) as pool:
            for future in [pool.submit(send_until_every_worker_answered) for _ in range(6)]:
                future.result()  # re-raises what failed in a sending thread
        assert not unanswered, f"no answer within {ANSWER_TIMEOUT:g} s to {unanswered}\n{server.log_tail()}"

        workers = set(accepted.values())
        assert len(workers) == 3, f"answers came from {workers} only, after {len(accepted)} events"
        assert server.pid not in workers

        deployment.wait_forwarded(len(accepted), plane, server)
        assert_delivered_exactly_once(plane.events, list(accepted))
        forwarded = deployment.forwarded()
        assert sum(count for _, count in forwarded) == len(accepted)  # event_forwarded once per event
        status = outbox_status(deployment.outbox)
        assert (status.pending, status.delivered, status.dead) == (0, len(accepted), 0)
        senders = {pid for pid, _ in forwarded}
        assert senders & workers, (
            f"only {senders} forwarded (master: {server.pid}, workers: {workers}): "
            "no worker's sender ran after the fork"
        )


def outbox_write_lock_is_free(path: Path) -> bool:
    """Whether a new connection in another process (this one) gets the outbox's write lock within 2 s."""
    db = sqlite3.connect(str(path), timeout=2, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()
    return True


# -- 2b. a fork in the middle of a transaction ---------------------------------------------------


def test_workers_forked_while_the_preloaded_sender_is_in_a_transaction_can_write_the_outbox(
    deployment: Deployment,
) -> None:
    """The master's sender is in a long transaction while gunicorn forks: every worker must still write.

    An SQLite connection (or SQLite's lock bookkeeping inside a transaction) carried across a
    fork leaves the child waiting forever for a lock nobody holds; the outbox closes its
    connections before any fork, so this must pass every time.

    The outbox holds 400,000 events older than CIO_RUDDER_OUTBOX_MAX_AGE (left from a long
    outage): the first claim of the master's sender turns them into dead letters in one
    write transaction of a second or so, and gunicorn forks its three workers meanwhile.
    """
    Outbox(str(deployment.outbox)).close()  # creates the tables
    expired_at = time.time() - 7200
    with contextlib.closing(sqlite3.connect(str(deployment.outbox))) as db, db:
        db.executemany(
            "INSERT INTO events (event_id, state, payload, accepted_at) VALUES (?, 'pending', '{}', ?)",
            ((f"expired-{number}", expired_at) for number in range(400_000)),
        )
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        server = deployment.start(plane.url, workers=3, preload=True, outbox_max_age=3600)
        bodies = make_bodies("forked", 6)  # one per sending thread: a hung worker costs one timeout

        def answer(body: dict[str, Any]) -> requests.Response | None:
            try:
                return post_event(server.url, body)
            except requests.Timeout:
                return None

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(answer, bodies))
        unanswered = [body["event_id"] for body, response in zip(bodies, answers) if response is None]
        assert not unanswered, (
            f"no answer within {ANSWER_TIMEOUT:g} s to {unanswered}; "
            f"outbox write lock free: {outbox_write_lock_is_free(deployment.outbox)}"
        )
        for body, response in zip(bodies, answers):
            assert response is not None
            assert_accepted(response, body)


# -- 3. SIGTERM while the data plane hangs -------------------------------------------------------


def test_sigterm_exits_in_bounded_time_while_the_data_plane_hangs_and_the_restart_sends(
    deployment: Deployment,
) -> None:
    """``CIO_RUDDER_SHUTDOWN_TIMEOUT`` bounds the exit; what was not sent is sent after the next start."""
    bodies = make_bodies("sigterm", 5)
    with FakeDataPlane(write_key=WRITE_KEY) as hanging:
        hanging.hang_next(60, times=1000)
        # The request timeout (30 s) is longer than the bound checked below (20 s): only a shutdown
        # that gives up on the hanging request after CIO_RUDDER_SHUTDOWN_TIMEOUT passes. The lease is
        # short so that the restart need not wait a minute for the batch that was in flight.
        server = deployment.start(hanging.url, shutdown_timeout=2, timeout=30, outbox_lease=2)
        for body in bodies:
            assert_accepted(post_event(server.url, body), body)
        wait_until(
            lambda: hanging.requests >= 1,
            10,
            "the sender is waiting on the hanging data plane",
            server.log_tail,
        )

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            returncode = server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gunicorn still runs 20 s after SIGTERM\n{server.log_tail()}")
        elapsed = time.monotonic() - started
        assert returncode == 0, server.log_tail()
        assert hanging.events == []  # nothing was stored: the data plane never answered
    print(f"gunicorn exited {elapsed:.2f} s after SIGTERM")  # shown with -s; the bound is what matters

    assert deployment.forwarded() == []
    assert outbox_status(deployment.outbox).pending == 5
    with FakeDataPlane(write_key=WRITE_KEY) as healthy:
        restarted = deployment.start(healthy.url, outbox_lease=2)
        deployment.wait_forwarded(5, healthy, restarted)
        assert_delivered_exactly_once(healthy.events, [body["event_id"] for body in bodies])
    assert deployment.forwarded_count() == 5


# -- 4. a sender that dies holding a lease -------------------------------------------------------

CLAIM_THEN_BLOCK = """
import json, sys
from flask_cio_rudder.outbox import Outbox

path, now, limit, lease = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
outbox = Outbox(path, clock=lambda: now)
owner, claimed = outbox.claim(limit, lease, 7 * 24 * 3600)
print(json.dumps([event.event_id for event in claimed]), flush=True)
sys.stdin.read()  # hold the lease, as a sender stuck mid-batch does, until killed
"""


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_batch_claimed_by_a_process_killed_mid_batch_is_sent_by_another_only_after_the_lease(
    tmp_path: Path,
) -> None:
    """Another process's sender takes over a dead sender's batch, but not before its lease runs out."""
    path = tmp_path / "outbox.sqlite3"
    lease = 60.0
    claimed_at = time.time()
    clock = FakeClock(claimed_at - 1)
    outbox = Outbox(str(path), clock=clock)
    bodies = make_bodies("lease", 8)
    for body in bodies:
        assert outbox.add(body["event_id"], json.dumps(transform(body)))

    claimer = subprocess.Popen(
        [sys.executable, "-c", CLAIM_THEN_BLOCK, str(path), repr(claimed_at), "5", repr(lease)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        leased = read_claimed(claimer)
    finally:
        claimer.kill()
        claimer.communicate(timeout=10)
    assert claimer.returncode == -signal.SIGKILL  # died holding the lease: nothing released it
    assert len(leased) == 5
    unleased = {body["event_id"] for body in bodies} - set(leased)

    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        sender = Sender(
            Flask(__name__), outbox, lambda: DataPlane(plane.url, WRITE_KEY, (2.0, 5.0)), lease=lease
        )
        try:
            clock.now = claimed_at + lease - 0.1  # the dead process's lease has not run out yet
            assert sender.flush(10) == 3
            assert {event["properties"]["eventId"] for event in plane.events} == unleased
            assert outbox.claim(100, lease, MAX_AGE)[1] == []  # the leased five are not claimable

            clock.now = claimed_at + lease + 0.1  # now it has run out
            assert sender.flush(10) == 5
            assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
        finally:
            sender.stop()
            outbox.close()
    status = outbox_status(path)
    assert (status.pending, status.delivered, status.dead) == (0, 8, 0)


def read_claimed(claimer: subprocess.Popen[bytes]) -> list[str]:
    """The event ids the claiming process printed, waiting at most ``BOOT_TIMEOUT`` seconds."""
    stdout, stderr = claimer.stdout, claimer.stderr
    assert stdout is not None and stderr is not None
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=BOOT_TIMEOUT)
    except queue.Empty:
        pytest.fail(f"the claiming process printed nothing within {BOOT_TIMEOUT:g} s")
    if not line:  # it exited: say why
        claimer.wait(timeout=10)
        pytest.fail(f"the claiming process failed:\n{stderr.read().decode(errors='replace')}")
    claimed: list[str] = json.loads(line)
    return claimed
