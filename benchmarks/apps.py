"""Shared pieces of the webhook benchmarks: the two apps, signed bodies, the data plane, processes.

The apps are WSGI factories for gunicorn, configured only through environment variables
(gunicorn ``--pythonpath benchmarks 'apps:create_bare_app()'``):

``create_bare_app()``
    The peer: a bare Flask route at the same path that parses the JSON body and answers
    200 ``{"status": "accepted"}``. No signature check, no validation, nothing kept.
``create_ext_app()``
    Flask-CIO-Rudder as a user runs it: signature verification, validation, transform,
    signals (one trivial receiver on each email signal) and the default forwarder, the
    outbox, whose background sender posts to ``CIO_RUDDER_DATA_PLANE_URL``. Reads
    ``CIO_RUDDER_SIGNING_KEY``, ``CIO_RUDDER_WRITE_KEY``, ``CIO_RUDDER_DATA_PLANE_URL``,
    ``CIO_RUDDER_OUTBOX_PATH`` and, optionally, ``CIO_RUDDER_OUTBOX_SENDER`` (``0``/``false``
    to keep the sender off), ``CIO_RUDDER_OUTBOX_DURABILITY`` and ``CIO_RUDDER_SHUTDOWN_TIMEOUT``.

``python benchmarks/apps.py dataplane`` runs a RudderStack-compatible data plane
(:class:`flask_cio_rudder.testing.FakeDataPlane`, counting events instead of keeping them)
in its own process, so its CPU is not spent inside the app's processes. It prints
``PORT <n>`` and answers ``count`` on stdin with ``COUNT <events> <requests>``; it
exits at end of input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLES_DIR = ROOT / "tests" / "samples"
WEBHOOK_PATH = "/webhooks/customerio"
SIGNING_KEY = "benchmark-signing-key"
WRITE_KEY = "benchmark-write-key"

_FALSE = {"0", "false", "no", "off", ""}


# -- the two apps -------------------------------------------------------------------------------


def create_bare_app() -> Any:
    """The peer: parse the JSON body, answer 200 ``{"status": "accepted"}``."""
    from flask import Flask, jsonify, request

    app = Flask("bare_peer")

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        body = request.get_json(force=True)
        if not isinstance(body, dict):
            return jsonify(error="the body must be a JSON object"), 400
        return jsonify(status="accepted")

    return app


def create_floor_app() -> Any:
    """The least a durable receiver does: commit each body to SQLite (WAL) by ``event_id``, answer 200.

    No signature, no validation, no transform, no signals, no delivery: what remains
    is the price of "answered only once kept" (one connection per process, one commit
    per request, writers queued on a lock file as the outbox does, so that SQLite's
    sleeping busy handler does not slow it down). The extension cannot be faster.
    """
    import fcntl
    import sqlite3
    import threading

    from flask import Flask, jsonify, request

    app = Flask("durable_floor")
    path = os.environ["CIO_RUDDER_OUTBOX_PATH"]
    local = threading.local()

    def write(statement: str, parameters: tuple[str, ...] = ()) -> None:
        first = getattr(local, "db", None) is None  # the first request of this worker
        if first:
            local.lock = open(path + ".lock", "ab")  # noqa: SIM115 - lives as long as the worker
            local.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        fcntl.flock(local.lock, fcntl.LOCK_EX)
        try:
            if first:  # under the lock: two workers may create the file at once
                local.db.execute("PRAGMA journal_mode=WAL")
                local.db.execute("PRAGMA synchronous=NORMAL")
                local.db.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, body TEXT)")
            local.db.execute(statement, parameters)
        finally:
            fcntl.flock(local.lock, fcntl.LOCK_UN)

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        body = request.get_json(force=True)
        if not isinstance(body, dict):
            return jsonify(error="the body must be a JSON object"), 400
        write(
            "INSERT OR IGNORE INTO events VALUES (?, ?)",
            (str(body.get("event_id")), request.get_data(as_text=True)),
        )
        return jsonify(status="accepted")

    return app


def create_ext_app() -> Any:
    """Flask-CIO-Rudder with its defaults (outbox + background sender) and one receiver per email signal."""
    from flask import Flask

    from flask_cio_rudder import CioRudder, signals

    app = Flask("cio_rudder_benchmark")
    env = os.environ
    app.config["CIO_RUDDER_SIGNING_KEY"] = env.get("CIO_RUDDER_SIGNING_KEY", SIGNING_KEY)
    app.config["CIO_RUDDER_WRITE_KEY"] = env.get("CIO_RUDDER_WRITE_KEY", WRITE_KEY)
    app.config["CIO_RUDDER_DATA_PLANE_URL"] = env["CIO_RUDDER_DATA_PLANE_URL"]
    app.config["CIO_RUDDER_OUTBOX_PATH"] = env["CIO_RUDDER_OUTBOX_PATH"]
    if "CIO_RUDDER_OUTBOX_SENDER" in env:
        app.config["CIO_RUDDER_OUTBOX_SENDER"] = env["CIO_RUDDER_OUTBOX_SENDER"].strip().lower() not in _FALSE
    if "CIO_RUDDER_OUTBOX_DURABILITY" in env:
        app.config["CIO_RUDDER_OUTBOX_DURABILITY"] = env["CIO_RUDDER_OUTBOX_DURABILITY"]
    if "CIO_RUDDER_FORWARDER" in env:  # "none": the request path without keeping anything
        app.config["CIO_RUDDER_FORWARDER"] = env["CIO_RUDDER_FORWARDER"]
    if "CIO_RUDDER_SHUTDOWN_TIMEOUT" in env:
        app.config["CIO_RUDDER_SHUTDOWN_TIMEOUT"] = float(env["CIO_RUDDER_SHUTDOWN_TIMEOUT"])

    counts: dict[str, int] = {}

    def count(sender: Any, event: Any, **extra: Any) -> None:
        # What a real receiver does at the least: look at the event.
        counts[event.metric] = counts.get(event.metric, 0) + 1

    for name in ("delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed"):
        getattr(signals, f"email_{name}").connect(count, sender=app, weak=False)

    CioRudder(app)
    return app


# -- signed bodies ------------------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


def new_tag(rng: random.Random | None = None) -> str:
    """Six random Crockford base32 characters: keeps one batch of event ids apart from another."""
    rng = rng or random.Random()
    return "".join(rng.choice(_CROCKFORD) for _ in range(6))


def event_id(tag: str, index: int) -> str:
    """A 26-character ULID-shaped id, distinct for each (tag, index) and increasing with index."""
    return "01" + tag + _base32(index, 18)


def load_samples() -> list[dict[str, Any]]:
    """The six sample Customer.io email events of ``tests/samples``."""
    return [json.loads(path.read_text()) for path in sorted(SAMPLES_DIR.glob("*.json"))]


def make_body(samples: Sequence[Mapping[str, Any]], tag: str, index: int) -> dict[str, Any]:
    """One sample (round robin) with a distinct ``event_id`` and one of 5,000 customers."""
    body = json.loads(json.dumps(samples[index % len(samples)]))
    body["event_id"] = event_id(tag, index)
    customer = str(index % 5000 + 1)
    data = body["data"]
    data["customer_id"] = customer
    identifiers = data.get("identifiers")
    if isinstance(identifiers, dict):
        identifiers["id"] = customer
        identifiers["email"] = f"user{customer}@example.com"
    if "recipient" in data:
        data["recipient"] = f"user{customer}@example.com"
    return body


def signed_bodies(count: int, tag: str, key: str = SIGNING_KEY) -> Iterator[tuple[str, str, bytes]]:
    """``count`` distinct bodies as ``(X-CIO-Timestamp, X-CIO-Signature, body)``, signed like Customer.io."""
    from flask_cio_rudder.signature import sign
    from flask_cio_rudder.testing import encode

    samples = load_samples()
    timestamp = str(int(time.time()))
    for index in range(count):
        body = encode(make_body(samples, tag, index))
        yield timestamp, sign(body, timestamp, key), body


def write_bodies_file(path: str | os.PathLike[str], count: int, tag: str, key: str = SIGNING_KEY) -> int:
    """Write ``count`` signed bodies, one per line: ``timestamp<TAB>signature<TAB>body`` (for webhook.lua)."""
    with open(path, "wb") as out:
        for timestamp, signature, body in signed_bodies(count, tag, key):
            assert b"\n" not in body and b"\t" not in body  # compact JSON escapes both
            out.write(timestamp.encode() + b"\t" + signature.encode() + b"\t" + body + b"\n")
    return count


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM the process's group (it was started in its own session), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class DataPlaneProcess:
    """A :class:`FakeDataPlane` in a child process (``apps.py dataplane``)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "dataplane"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            stop_process(self.process)
            raise RuntimeError(f"the data plane process did not start (said {line!r})")
        self.url = f"http://127.0.0.1:{line[1]}"
        self.write_key = WRITE_KEY

    def count(self) -> tuple[int, int]:
        """Events stored and requests received so far."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        _, events, requests = self.process.stdout.readline().split()
        return int(events), int(requests)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(self.process)


@functools.cache
def _has_control_socket() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return "--no-control-socket" in result.stdout


def gunicorn_command(
    factory: str, port: int, workers: int, worker_class: str, threads: int, extra: Sequence[str] = ()
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--pythonpath",
        f"{HERE},{ROOT}",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--log-level",
        "info",  # lifecycle lines only (the access log stays off): "Booting worker" tells when it is up
        "--graceful-timeout",
        "10",
    ]
    if worker_class == "gthread":
        command += ["--threads", str(threads)]
    if _has_control_socket():
        command.append("--no-control-socket")  # gunicorn 25+ would otherwise make ~/.gunicorn/gunicorn.ctl
    return [*command, *extra, factory]


class Gunicorn:
    """gunicorn serving ``factory`` on a free loopback port, in its own session; ``stop()`` ends it."""

    def __init__(
        self,
        factory: str,
        env: Mapping[str, str],
        log_path: str | os.PathLike[str],
        *,
        workers: int = 2,
        worker_class: str = "sync",
        threads: int = 4,
        boot_timeout: float = 30.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"
        self.log_path = Path(log_path)
        self.workers = workers
        command = gunicorn_command(factory, self.port, workers, worker_class, threads)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(ROOT),
        )
        try:
            self._wait_until_up(boot_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up; see {self.log_path}:\n{self.log_tail()}")
            if self.log_path.read_text(errors="replace").count("Booting worker") >= self.workers and _answers(
                self.port
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not come up within {timeout} s; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        """The worker processes (children of the master)."""
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def _answers(port: int) -> bool:
    """Whether something answers HTTP on the port (a GET on the POST-only route gets 405)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {WEBHOOK_PATH} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def outbox_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Rows per state in an outbox file (read-only; safe while the app runs)."""
    import sqlite3

    if not os.path.exists(path):
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM events GROUP BY state").fetchall())
    finally:
        db.close()


def file_sizes(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Bytes of an SQLite file and of its ``-wal``."""

    def size(name: str) -> int:
        try:
            return os.path.getsize(name)
        except OSError:
            return 0

    return size(str(path)), size(f"{path}-wal")


def vm_rss_kib(pid: int | str = "self") -> int:
    """VmRSS of a process in KiB, from /proc (0 where /proc has no such line)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores; steal counts as busy)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (from /proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have been waited for (wrk runs, drain processes)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class OthersMeter:
    """How busy the machine was with processes that are not ours, while a measurement ran.

    Ours: ``pids`` (still running) and the children waited for in between (wrk...).
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = cpu_seconds(self.pids) + children_cpu_seconds()

    def cores(self) -> float:
        """Cores used by other processes on average since this meter was made."""
        ours = cpu_seconds(self.pids) + children_cpu_seconds() - self.ours
        others = machine_busy_seconds() - self.busy - ours
        return max(0.0, others / max(time.monotonic() - self.started, 1e-9))


def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) for a second in which other processes use under ``threshold`` cores.

    Call it while none of the benchmark's own processes is busy. Returns the seconds waited; the
    machine this runs on is shared, and a run that starts under someone else's load measures them.
    """
    started = time.monotonic()
    told = False
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        load = machine_busy_seconds() - before
        waited = time.monotonic() - started
        if load < threshold or waited >= max_wait:
            if told:
                print(f"    (waited {waited:.0f} s for other processes to go quiet; now {load:.2f} cores)")
            return waited
        if not told:
            print(
                f"    (other processes use {load:.2f} cores: waiting up to {max_wait:.0f} s for quiet)",
                flush=True,
            )
            told = True


def library_revision() -> str:
    """The commit of the library being measured, and whether its files had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "flask_cio_rudder")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in flask_cio_rudder/" if dirty else "")


# -- tables -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as printed, and pasteable into the results file)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.rjust(widths[i]) for i, value in enumerate(values)) + " |"

    separator = "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|"
    return "\n".join([line(list(headers)), separator, *(line(row) for row in cells)])


# -- the data plane process -----------------------------------------------------------------------


def _serve_data_plane() -> None:
    """``apps.py dataplane``: a FakeDataPlane that counts events instead of keeping them."""
    sys.path.insert(0, str(ROOT))
    from flask_cio_rudder.testing import FakeDataPlane

    class CountingDataPlane(FakeDataPlane):
        """Checks every batch as RudderStack does, but keeps only counts (flat memory for millions)."""

        stored = 0

        def _store(self, batch: list[dict[str, Any]]) -> None:
            with self._lock:
                self.stored += len(batch)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    plane = CountingDataPlane(write_key=WRITE_KEY).start()
    print("PORT", plane.url.rsplit(":", 1)[1], flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                with plane._lock:
                    print("COUNT", plane.stored, plane.requests, flush=True)
    finally:
        plane.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["dataplane"]:
        _serve_data_plane()
    else:
        sys.exit("usage: python benchmarks/apps.py dataplane")


__all__ = [
    "DataPlaneProcess",
    "Gunicorn",
    "closed_port",
    "create_bare_app",
    "create_ext_app",
    "file_sizes",
    "outbox_counts",
    "signed_bodies",
    "table",
    "vm_rss_kib",
    "write_bodies_file",
]
