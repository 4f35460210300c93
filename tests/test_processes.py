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
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_cio_rudder.spool import spool_for
from flask_cio_rudder.store import OutboxStatus, Pending, store_from_url
from flask_cio_rudder.testing import FakeDataPlane, encode, signature_headers
from flask_cio_rudder.transform import message_id, transform

from .conftest import EMAIL_EVENTS, WEBHOOK, sample
from .helpers import free_port, wait_until
from .stores import unavailable

pytestmark = pytest.mark.slow  # real gunicorn and flask processes: seconds each

ROOT = Path(__file__).resolve().parents[1]
SIGNING_KEY = "process-test-signing-key"
WRITE_KEY = "process-test-write-key"
APP = "tests.process_app:create_app"  # as flask --app names it
BOOT_TIMEOUT = 20.0  # gunicorn importing Flask and the app on a busy 2-core machine
DELIVERY_TIMEOUT = 20.0
MAX_AGE = 7 * 24 * 3600.0  # CIO_RUDDER_OUTBOX_MAX_AGE's default
ANSWER_TIMEOUT = 10.0  # a webhook takes milliseconds; Customer.io itself gives up after 4 s

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


def assert_accepted(response: requests.Response, body: dict[str, Any]) -> None:
    """The webhook kept ``body``."""
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "accepted", "event_id": body["event_id"]}


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


def outbox_status(url: str, table: str | None = None) -> OutboxStatus:
    """The outbox as an operator sees it: what dead processes left in their spools is moved in first."""
    store = store_from_url(url, table=table)
    try:
        spool = spool_for(store, durability="process-crash")
        if spool is not None:
            spool.move()
        return store.status()
    finally:
        store.close()


# -- processes -----------------------------------------------------------------------------------


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

    def booted(self) -> int:
        """How many workers gunicorn has started so far (replaced ones included)."""
        return self._logged("Booting worker")

    def exited(self) -> int:
        """How many workers have stopped serving and exited so far."""
        return self._logged("Worker exiting")

    def _logged(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text) if self.log.exists() else 0

    def kill(self) -> None:
        """SIGKILL the master and its workers at once, then reap the master."""
        with contextlib.suppress(ProcessLookupError):  # all gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


class Deployment:
    """Starts gunicorn, always on the same outbox and forwarded-batches log, as often as a test wants."""

    def __init__(self, tmp_path: Path, outbox_url: str | None = None, table: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.outbox = outbox_url or f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
        self.table = table
        self.forwarded_log = tmp_path / "forwarded.log"
        self.servers: list[Server] = []

    def env(self, data_plane_url: str, **settings: object) -> dict[str, str]:
        """The environment of a process of this deployment; ``settings`` are ``CIO_RUDDER_*`` values."""
        env = {key: value for key, value in os.environ.items() if key != "GUNICORN_CMD_ARGS"}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            CIO_RUDDER_OUTBOX_URL=self.outbox,
            CIO_RUDDER_DATA_PLANE_URL=data_plane_url,
            CIO_RUDDER_WRITE_KEY=WRITE_KEY,
            CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
            PROCESS_APP_FORWARDED_LOG=str(self.forwarded_log),
        )
        if self.table:
            env["CIO_RUDDER_OUTBOX_TABLE"] = self.table
        env.update({f"CIO_RUDDER_{name.upper()}": str(value) for name, value in settings.items()})
        return env

    def status(self) -> OutboxStatus:
        return outbox_status(self.outbox, self.table)

    def start(
        self,
        data_plane_url: str,
        *,
        workers: int = 1,
        preload: bool = False,
        options: Sequence[str] = (),
        **settings: object,
    ) -> Server:
        """Start gunicorn and wait until it answers HTTP; ``options`` are more of gunicorn's (a worker
        class, ``--max-requests``), ``settings`` are ``CIO_RUDDER_*`` values."""
        port = free_port()
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
            *options,
            *_NO_CONTROL_SOCKET,
            "tests.process_app:create_app()",
        ]
        return self._serve("gunicorn", command, port, self.env(data_plane_url, **settings))

    def start_uwsgi(self, data_plane_url: str, *, options: Sequence[str] = (), **settings: object) -> Server:
        """Start uWSGI (a master, two workers, HTTP on a loopback port) and wait until it answers."""
        port = free_port()
        command = [
            uwsgi_binary(),
            "--http-socket",
            f"127.0.0.1:{port}",
            "--master",
            "--processes",
            "2",
            "--enable-threads",  # the README asks for it: without it, uWSGI runs no Python thread
            "--die-on-term",  # SIGTERM stops (uWSGI 2.0 reloads on it otherwise)
            "--need-app",
            "--eval",
            "from tests.process_app import create_app; application = create_app()",
            *options,
        ]
        return self._serve("uwsgi", command, port, self.env(data_plane_url, **settings))

    def start_flask_run(self, data_plane_url: str, **settings: object) -> Server:
        """Start Flask's development server (``flask run``) and wait until it answers HTTP."""
        port = free_port()
        command = [sys.executable, "-m", "flask", "--app", APP, "run", "--port", str(port)]
        return self._serve("flask-run", command, port, self.env(data_plane_url, **settings))

    def _serve(self, name: str, command: list[str], port: int, env: dict[str, str]) -> Server:
        log = self.tmp_path / f"{name}-{len(self.servers) + 1}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        self.servers.append(server)

        def answers() -> bool:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode} while starting\n{server.log_tail()}")
            try:
                requests.get(server.url + "/", timeout=1, headers={"Connection": "close"})
            except (requests.ConnectionError, requests.Timeout):
                return False
            return True

        wait_until(answers, BOOT_TIMEOUT, f"{name} answers HTTP", server.log_tail)
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
                f"outbox: {self.status()}\n{server.log_tail()}"
            )

        wait_until(
            lambda: self.forwarded_count() >= count, DELIVERY_TIMEOUT, f"{count} events are forwarded", detail
        )

    def stop_all(self) -> None:
        """Kill every process group started here, finished or not: a worker may outlive its master."""
        for server in self.servers:
            server.kill()


def uwsgi_binary() -> str:
    """The ``uwsgi`` beside this Python, or on PATH; skips (or, in CI, fails) when there is none."""
    beside = Path(sys.executable).parent / "uwsgi"
    found = str(beside) if beside.exists() else shutil.which("uwsgi")
    if found is None:
        unavailable("uWSGI is not installed: pip install uwsgi (it compiles; CI installs it)", "uWSGI")
    return str(found)


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


@pytest.mark.parametrize("fast_path", [0, 1], ids=["route", "fast path"])
def test_events_accepted_before_a_sigkill_are_delivered_once_after_the_restart(
    deployment: Deployment, fast_path: int
) -> None:
    """Accepted means kept: 2xx answers, then SIGKILL (no atexit, no flush), then a restart sends them all."""
    bodies = make_bodies("sigkill", 50)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send is refused
    # A short lease: were the kill to land in the few microseconds a failing send holds its lease,
    # the restart would wait for it to run out (60 s by default) before sending those events.
    first = deployment.start(down, outbox_lease=5, fast_path=fast_path)
    for body in bodies:
        response = post_event(first.url, body)
        assert_accepted(response, body)
        # process_app's after_request hook adds it; the fast path's answers skip that hook.
        assert ("X-Worker-Pid" in response.headers) is not bool(fast_path)

    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    assert deployment.forwarded() == []
    # The worker dies with its master's group but is reaped by it a moment later; its spool is
    # adopted once its lock is gone. Nothing of the 50 is lost meanwhile: they are only counted.
    wait_until(
        lambda: deployment.status().pending == 50,
        10,
        "the 50 accepted events are in the outbox",
        lambda: str(deployment.status()),
    )
    status = deployment.status()
    assert (status.pending, status.delivered, status.dead) == (50, 0, 0)

    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        second = deployment.start(plane.url, outbox_lease=5)
        deployment.wait_forwarded(50, plane, second)
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
    assert deployment.forwarded_count() == 50
    status = deployment.status()
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
                assert_accepted(response, body)
                pid = int(response.headers["X-Worker-Pid"])
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
        status = deployment.status()
        assert (status.pending, status.delivered, status.dead) == (0, len(accepted), 0)
        senders = {pid for pid, _ in forwarded}
        assert senders & workers, (
            f"only {senders} forwarded (master: {server.pid}, workers: {workers}): "
            "no worker's sender ran after the fork"
        )


def test_retries_sent_to_both_workers_at_once_are_forwarded_once(deployment: Deployment) -> None:
    """Each event posted twice at the same moment: either worker may accept it; it is forwarded once.

    A copy that reaches the other worker before the first copy left that worker's spool is
    accepted again (its receivers run again, as documented); the store keeps one.
    """
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        server = deployment.start(plane.url, workers=2)
        bodies = make_bodies("retry", 60)

        def post_twice(body: dict[str, Any]) -> list[str]:
            with ThreadPoolExecutor(max_workers=2) as pair:
                answers = list(pair.map(lambda _: post_event(server.url, body), range(2)))
            assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
            return [answer.json()["status"] for answer in answers]

        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = [status for pair in pool.map(post_twice, bodies) for status in pair]
        assert set(statuses) <= {"accepted", "duplicate"} and statuses.count("accepted") >= len(bodies)
        deployment.wait_forwarded(len(bodies), plane, server)
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
        status = deployment.status()
        assert (status.pending, status.delivered) == (0, len(bodies))


def post_until_answered(url: str, body: dict[str, Any]) -> requests.Response:
    """Post ``body`` as Customer.io does: again while the connection drops without an answer (a
    gthread worker retiring under ``--max-requests`` drops the connections it had queued)."""
    for _ in range(5):
        try:
            return post_event(url, body)
        except requests.ConnectionError:
            continue
    return post_event(url, body)


def post_twice_at_once(url: str, body: dict[str, Any]) -> list[requests.Response]:
    """Post ``body`` twice at the same moment, as a retry that crosses the first attempt."""
    with ThreadPoolExecutor(max_workers=2) as pair:
        return list(pair.map(lambda _: post_until_answered(url, body), range(2)))


@pytest.mark.parametrize(
    "worker_class",
    [["--threads", "4"], ["--worker-class", "gevent"]],
    ids=["gthread", "gevent"],
)
def test_threaded_and_gevent_workers_keep_each_event_through_replaced_workers_and_a_sigkill(
    deployment: Deployment, worker_class: list[str]
) -> None:
    """gunicorn's other worker classes: several requests at once in one process (threads, or
    greenlets with the sender and the spool's mover among them), each event posted twice at the
    same moment, workers replaced every 40 requests (``--max-requests``), then SIGKILL: after a
    restart every accepted event is forwarded once."""
    if "gevent" in worker_class:
        pytest.importorskip("gevent", reason="gevent (a test dependency, installed in CI) is not installed")
    options = [*worker_class, "--max-requests", "40"]
    bodies = make_bodies(worker_class[-1], 150)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every event stays in the outbox
    first = deployment.start(down, workers=2, options=options, outbox_lease=5)
    answers: list[requests.Response] = []
    with ThreadPoolExecutor(max_workers=6) as pool:
        for half in (bodies[: len(bodies) // 2], bodies[len(bodies) // 2 :]):
            for pair in pool.map(lambda body: post_twice_at_once(first.url, body), half):
                answers.extend(pair)
            # A worker past --max-requests serves on for a moment (gevent's: up to a second, in which a
            # loaded machine served the whole second half): the second half waits for one to exit.
            wait_until(
                lambda: first.booted() > 2 and first.exited() > 0,
                BOOT_TIMEOUT,
                "a worker was replaced",
                first.log_tail,
            )
    assert all(answer.status_code == 200 for answer in answers), {a.status_code for a in answers}
    statuses = [answer.json()["status"] for answer in answers]
    assert set(statuses) <= {"accepted", "duplicate"} and statuses.count("accepted") >= len(bodies)
    workers = {answer.headers["X-Worker-Pid"] for answer in answers}
    assert len(workers) > 2, f"answers came from {workers} only: no worker was replaced\n{first.log_tail()}"

    first.kill()
    wait_until(
        lambda: deployment.status().pending == len(bodies),
        10,
        f"the {len(bodies)} accepted events are in the outbox",
        lambda: str(deployment.status()),
    )
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        second = deployment.start(plane.url, workers=2, options=options, outbox_lease=5)
        deployment.wait_forwarded(len(bodies), plane, second)
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
    status = deployment.status()
    assert (status.pending, status.delivered, status.dead) == (0, len(bodies), 0)


@pytest.mark.service  # uWSGI, which CI installs
@pytest.mark.parametrize("options", [[], ["--lazy-apps"]], ids=["app loaded before the fork", "lazy-apps"])
def test_uwsgi_workers_send_what_was_left_and_answer_and_send_every_webhook(
    deployment: Deployment, options: list[str]
) -> None:
    """uWSGI forks its workers without Python's fork hooks. Threads started where it loads the app
    (its master, without ``lazy-apps``) left their locks held in every worker, which hung on its
    first webhook; now each worker starts its own with its first request."""
    left = make_bodies("uwsgi-left", 5)  # pending from an earlier run: sent without waiting for a webhook
    add_events(deployment.outbox, left)
    bodies = make_bodies("uwsgi", 40)
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        server = deployment.start_uwsgi(plane.url, options=options)
        deployment.wait_forwarded(len(left), plane, server)
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda body: post_event(server.url, body), bodies))
        for answer, body in zip(answers, bodies):
            assert_accepted(answer, body)
        deployment.wait_forwarded(len(left) + len(bodies), plane, server)
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in left + bodies])
    workers = {int(answer.headers["X-Worker-Pid"]) for answer in answers}
    senders = {pid for pid, _ in deployment.forwarded()}
    assert server.pid not in workers | senders, "uWSGI's master served or sent: it must only fork"
    status = deployment.status()
    assert (status.pending, status.delivered, status.dead) == (0, len(left) + len(bodies), 0)


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
        # the default minute, so the request is cut by nothing else; the restart takes over the batch
        # that was in flight at once, as its holder's process is gone.
        server = deployment.start(hanging.url, shutdown_timeout=0.5, timeout=30)
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
    assert deployment.status().pending == 5
    with FakeDataPlane(write_key=WRITE_KEY) as healthy:
        restarted = deployment.start(healthy.url)
        deployment.wait_forwarded(5, healthy, restarted)
        assert_delivered_exactly_once(healthy.events, [body["event_id"] for body in bodies])
    assert deployment.forwarded_count() == 5


# -- 4. a claimer SIGKILLed mid-batch, and `flask cio-rudder flush` -----------------------------

CLAIM_AND_HOLD = """
import json, sys
from flask_cio_rudder.store import store_from_url

store = store_from_url(sys.argv[1])
claim = store.claim(int(sys.argv[2]), 600.0, 7 * 24 * 3600)  # a lease of 10 minutes
print(json.dumps([event.event_id for event in claim.events]), flush=True)
sys.stdin.read()  # hold the batch, as a sender stuck mid-batch does, until killed
"""


def flask_cli(
    deployment: Deployment, data_plane_url: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``flask --app tests.process_app:create_app cio-rudder ARGS`` as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", APP, "cio-rudder", *args],
        cwd=ROOT,
        env=deployment.env(data_plane_url, outbox_sender=0),  # counts only what the command itself sends
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def add_events(url: str, bodies: list[dict[str, Any]], table: str | None = None) -> None:
    """Put accepted events into the outbox as the webhook does, through the store's public API."""
    store = store_from_url(url, table=table)
    try:
        store.add_many(Pending(body["event_id"], json.dumps(transform(body))) for body in bodies)
    finally:
        store.close()


def test_flush_sends_at_once_the_batch_of_a_claimer_killed_mid_batch_and_says_who_holds_one(
    deployment: Deployment,
) -> None:
    """Issue 8: a live holder's batch is left alone (and named); a dead one's is sent by the next flush."""
    bodies = make_bodies("claimer", 8)
    add_events(deployment.outbox, bodies)
    claimer = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HOLD, deployment.outbox, "5"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        try:
            assert claimer.stdout is not None
            held = json.loads(claimer.stdout.readline() or "null")
            assert held is not None, claimer.communicate(timeout=30)[1]
            alive = flask_cli(deployment, plane.url, "flush")
            assert alive.returncode == 1, alive.stdout + alive.stderr
            assert "sent 3 events; 5 still pending" in alive.stdout
            assert f"5 held by a live sender (pid {claimer.pid})" in alive.stdout
        finally:
            claimer.kill()
            claimer.communicate(timeout=30)
        assert claimer.returncode == -signal.SIGKILL  # died holding the batch: nothing released it

        # The lease has ten minutes to run and flush gives up after 20 s: only a flush that sees
        # the holder is gone can send the batch.
        dead = flask_cli(deployment, plane.url, "flush", "--timeout", "20")
        assert dead.returncode == 0, dead.stdout + dead.stderr
        assert "sent 5 events; 0 still pending" in dead.stdout
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])


# -- 5. a sender of its own: `flask cio-rudder worker` -------------------------------------------


def test_the_worker_sends_what_web_workers_only_write_and_stops_cleanly_on_sigterm(
    deployment: Deployment,
) -> None:
    """Web workers only write (CIO_RUDDER_OUTBOX_SENDER = False); the worker sends, logs, stops on SIGTERM."""
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        web = deployment.start(plane.url, outbox_sender=0)
        bodies = make_bodies("worker", 12)
        for body in bodies[:6]:
            assert_accepted(post_event(web.url, body), body)
        log = deployment.tmp_path / "worker.log"
        with open(log, "wb") as output:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flask",
                    "--app",
                    APP,
                    "cio-rudder",
                    "worker",
                ],
                cwd=ROOT,
                env=deployment.env(plane.url, shutdown_timeout=0.5, timeout=30),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:

            def worker_log() -> str:
                return log.read_text(errors="replace")

            deployment.wait_forwarded(6, plane, web)
            for body in bodies[6:]:  # while the worker idles: it looks again without being told
                assert_accepted(post_event(web.url, body), body)
            deployment.wait_forwarded(12, plane, web)
            assert_delivered_exactly_once(plane.events, [body["event_id"] for body in bodies])
            assert {pid for pid, _ in deployment.forwarded()} == {worker.pid}  # the web workers sent nothing
            wait_until(lambda: "Delivered" in worker_log(), 10, "the worker logs its deliveries", worker_log)

            sent = plane.requests
            plane.hang_next(60, times=1000)  # the next send hangs: SIGTERM must still end the worker
            hanging = make_bodies("worker-late", 2)
            for body in hanging:
                assert_accepted(post_event(web.url, body), body)
            wait_until(
                lambda: plane.requests > sent, 20, "the worker waits on the hanging data plane", worker_log
            )
            worker.send_signal(signal.SIGTERM)
            try:
                returncode = worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker still runs 20 s after SIGTERM\n{worker_log()}")
            assert returncode == 0, worker_log()
            assert "Received SIGTERM" in worker_log() and "Stopped" in worker_log()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
    assert deployment.status().pending == 2  # kept for the next sender


def test_flask_run_sends_and_a_flask_command_sends_nothing(deployment: Deployment) -> None:
    """Under the ``flask`` command only ``flask run`` (and ``cio-rudder worker``) start a sender: an
    operator's command, a shell or a migration is a short-lived process that must not join sending."""
    with FakeDataPlane(write_key=WRITE_KEY) as plane:
        dev = deployment.start_flask_run(plane.url)
        served = make_bodies("dev", 2)
        for body in served:
            assert_accepted(post_event(dev.url, body), body)
        deployment.wait_forwarded(2, plane, dev)
        dev.kill()

        store = store_from_url(deployment.outbox)
        try:
            left = make_bodies("left", 3)
            store.add_many(Pending(body["event_id"], json.dumps(transform(body))) for body in left)
        finally:
            store.close()
        closed = f"http://127.0.0.1:{free_port()}{WEBHOOK}"  # nothing listens: every post fails at once
        command = subprocess.run(
            [sys.executable, "-m", "flask", "--app", APP, "cio-rudder", "send-test", closed],
            cwd=ROOT,
            env=deployment.env(plane.url),  # the sender setting as deployed: on
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert command.returncode == 1, command.stdout + command.stderr
        assert_delivered_exactly_once(plane.events, [body["event_id"] for body in served])
    assert deployment.status().pending == 3  # left for the app's own senders
