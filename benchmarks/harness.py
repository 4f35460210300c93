"""The one harness every benchmark script uses.

- **Apps** served by gunicorn, configured by ``CIO_RUDDER_*`` environment variables:
  ``bare_app()`` (parse the JSON, answer), ``ext_app()`` (Flask-CIO-Rudder with its
  defaults and one trivial receiver per email signal), ``sdk_app()`` (the route a user
  writes instead: map the body by hand, ``rudder-sdk-python``'s ``track()``),
  ``floor_app()`` (bare Flask plus one SQLite commit per request) and ``bound_app()`` (only
  the work the extension's guarantees need, with its own spool and sender: its floor).
- **The outbox** chosen by URL, fresh for each run (a new SQLite file, or a new table in a
  PostgreSQL database): :func:`outbox_env`, :func:`open_store`, :func:`drop_outbox`;
  filled in bulk through the store's public ``add_many`` (:func:`add_events`).
- **A data plane** (``FakeDataPlane``) in its own process, counting what it stores, able to
  fail at random and to go down for a while: :class:`DataPlane`.
- **gunicorn** (:class:`Gunicorn`), **wrk** with ``webhook.lua`` (:func:`wrk`), interleaved
  rounds, the CPU other processes used meanwhile, medians, ratios and Markdown tables, and
  the header (command, commit, versions) printed above every table.

Everything listens on 127.0.0.1 only; every process is started in its own session and
stopped by the script that started it.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import requests
from flask import Flask

from flask_cio_rudder import CioRudder, get_outbox, signals
from flask_cio_rudder.event import CioEvent
from flask_cio_rudder.samples import email_sample
from flask_cio_rudder.signature import sign
from flask_cio_rudder.store import OutboxStore, Pending, searched_fields, store_from_url
from flask_cio_rudder.testing import FakeDataPlane, encode
from flask_cio_rudder.validation import Validation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WEBHOOK_PATH = "/webhooks/customerio"
SIGNING_KEY = "benchmark-signing-key"
WRITE_KEY = "benchmark-write-key"
METRICS = ("delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed")
R = TypeVar("R")


# -- the header above every table ---------------------------------------------------------------


def _git(*args: str) -> str:
    run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    return run.stdout.strip()


def header() -> str:
    """The command, the commit measured (and whether the library had uncommitted changes), versions."""
    from importlib.metadata import version

    changed = _git("status", "--porcelain", "flask_cio_rudder", "benchmarks")
    dirty = " + uncommitted changes in flask_cio_rudder/ or benchmarks/" if changed else ""
    versions = ", ".join(f"{name} {version(name)}" for name in ("flask", "gunicorn", "rudder-sdk-python"))
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    return (
        f"command: `{command}`"
        f"\ncommit {_git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}; {versions}; "
        f"Python {sys.version.split()[0]}; {os.cpu_count()} CPUs, shared: compare ratios, not absolutes; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


# -- bodies -------------------------------------------------------------------------------------


ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base 32


def new_tag() -> str:
    """Six random characters that keep one run's event ids apart from another's."""
    return "".join(random.choice(ULID_ALPHABET) for _ in range(6))


def event_id(tag: str, index: int) -> str:
    """A 26-character ULID, distinct for each (tag, index): ``01``, the tag, the index, random-looking rest.

    Ids of one tag sort as their indexes do, as a ULID's time part makes real ones sort.
    Not a zero-padded decimal index: a run of 19 digits is rare in a real ULID, and the
    webhook's JSON decoder checks a body that has one for integers beyond 64 bits.
    """
    digest = int.from_bytes(hashlib.blake2b(f"{tag}:{index}".encode(), digest_size=8).digest(), "big")
    return "01" + tag + _base32(index, 6) + _base32(digest, 12)


def _base32(number: int, width: int) -> str:
    """The ``width`` lowest base-32 digits of ``number``, most significant first."""
    return "".join(ULID_ALPHABET[number >> (5 * place) & 31] for place in reversed(range(width)))


def bodies(count: int, tag: str) -> list[dict[str, Any]]:
    """The six sample email events round robin, each with its own event_id, among 5,000 customers."""
    samples = [email_sample(metric) for metric in METRICS]
    out = []
    for index in range(count):
        body = copy.deepcopy(samples[index % len(samples)])
        customer = str(index % 5000 + 1)
        body["event_id"] = event_id(tag, index)
        body["data"].update(customer_id=customer, recipient=f"user{customer}@example.com")
        body["data"]["identifiers"].update(id=customer, email=f"user{customer}@example.com")
        out.append(body)
    return out


def write_signed_bodies(path: Path, count: int) -> None:
    """``count`` fresh bodies, one per line: ``timestamp<TAB>signature<TAB>body`` (for webhook.lua)."""
    timestamp = str(int(time.time()))
    with open(path, "wb") as out:
        for body in bodies(count, new_tag()):
            raw = encode(body)  # compact JSON: no newline or tab inside
            out.write(f"{timestamp}\t{sign(raw, timestamp, SIGNING_KEY)}\t".encode() + raw + b"\n")


def webhook_environ(raw: bytes, timestamp: str, signature: str) -> dict[str, Any]:
    """The WSGI environ of one signed webhook POST, as gunicorn passes it (``wsgi.input_terminated``)."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": WEBHOOK_PATH,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(raw),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(raw)),
        "HTTP_X_CIO_TIMESTAMP": timestamp,
        "HTTP_X_CIO_SIGNATURE": signature,
    }


# -- the apps (gunicorn factories: ``harness:ext_app()``) ---------------------------------------


def _configured(name: str) -> Flask:
    """A Flask app whose config holds every ``CIO_RUDDER_*`` variable (JSON values decoded)."""
    app = Flask(name)
    app.config.update(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_WRITE_KEY=WRITE_KEY)
    for key, value in os.environ.items():
        if key.startswith("CIO_RUDDER_"):
            try:
                app.config[key] = json.loads(value)
            except ValueError:
                app.config[key] = value
    return app


def bare_app() -> Flask:
    """The peer: parse the JSON body, answer 200 ``{"status": "accepted"}``."""
    from flask import jsonify, request

    app = Flask("bare")

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        request.get_json(force=True)
        return jsonify(status="accepted")

    return app


def ext_app(background: bool = True, **config: Any) -> Flask:
    """Flask-CIO-Rudder set up from the environment and ``config``, one trivial receiver per email signal.

    ``background=False``: no spool mover and no sender (``no_background``), the request path alone.
    """
    if not background:
        no_background()
    app = _configured("ext")
    app.config.update(config)
    seen: Counter[str] = Counter()

    def receiver(sender: Flask, event: Any, **extra: Any) -> None:
        seen[event.metric] += 1  # what a real receiver does at the least: look at the event

    for metric in METRICS:
        getattr(signals, f"email_{metric}").connect(receiver, sender=app, weak=False)
    CioRudder(app)
    return app


def fast_app(background: bool = True) -> Flask:
    """``ext_app`` with the opt-in fast path on (``CIO_RUDDER_FAST_PATH``)."""
    return ext_app(background, CIO_RUDDER_FAST_PATH=True)


def no_background() -> None:
    """Start no spool mover and no sender in this process: accepted events stay in the spool.

    A process that stops moves its spool into the outbox; the next start sends it.
    """
    from flask_cio_rudder.sender import Sender
    from flask_cio_rudder.spool import Spool

    def stay_idle(self: object) -> None:
        """Started by nothing."""

    Spool.ensure_running = stay_idle  # type: ignore[method-assign]
    Sender.ensure_running = stay_idle  # type: ignore[method-assign]


def probed_app() -> Flask:
    """``ext_app()`` timing each request inside the worker, and whether background work overlapped it.

    Background work is the mover's insert and the sender's post and mark of a batch. At exit each
    worker writes ``[started, seconds, overlapped]`` per request (``started``: ``time.time()``) to
    ``$PROBE_DIR/<pid>.json``.
    """
    from flask_cio_rudder.rudderstack import DataPlane as Client
    from flask_cio_rudder.spool import Spool
    from flask_cio_rudder.store.sqlite import SQLiteStore

    stages = {"running": 0, "started": 0}  # background stages running now, and started so far
    samples: list[tuple[float, float, bool]] = []

    def staged(method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            stages["running"] += 1
            stages["started"] += 1
            try:
                return method(*args, **kwargs)
            finally:
                stages["running"] -= 1

        return run

    Spool._add = staged(Spool._add)  # type: ignore[method-assign]
    Client.post_batch = staged(Client.post_batch)  # type: ignore[method-assign]
    SQLiteStore.mark_delivered = staged(SQLiteStore.mark_delivered)  # type: ignore[method-assign]
    app = ext_app()
    inner = app.wsgi_app

    def timed(environ: Any, start_response: Any) -> Any:
        running, started, when, began = stages["running"], stages["started"], time.time(), time.perf_counter()
        try:
            return inner(environ, start_response)
        finally:
            overlapped = bool(running or stages["running"] or stages["started"] != started)
            samples.append((when, time.perf_counter() - began, overlapped))

    def write() -> None:
        with open(Path(os.environ["PROBE_DIR"]) / f"{os.getpid()}.json", "w") as out:
            json.dump(samples, out)

    atexit.register(write)
    app.wsgi_app = timed  # type: ignore[method-assign]
    return app


def probe_figures(directory: Path, since: float, until: float) -> dict[str, float]:
    """What ``probed_app``'s workers wrote of the requests started between ``since`` and ``until``
    (``time.time()``): the share that background work overlapped, the p99 (ms) of all, the p50 and
    p99 of the others and of those, and the share of the slowest 1 % they make."""
    samples = [
        (seconds, overlapped)
        for path in directory.glob("*.json")
        for started, seconds, overlapped in json.loads(path.read_text())
        if since <= started <= until
    ]

    def quantile(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else float("nan")

    overlapped = [seconds for seconds, hit in samples if hit]
    clean = [seconds for seconds, hit in samples if not hit]
    slowest = sorted(samples, reverse=True)[: max(1, len(samples) // 100)]
    return {
        "overlapped %": 100 * len(overlapped) / len(samples),
        "p99 ms": quantile([seconds for seconds, _ in samples], 0.99),
        "others' p50 ms": quantile(clean, 0.5),
        "others' p99 ms": quantile(clean, 0.99),
        "overlapped p50 ms": quantile(overlapped, 0.5),
        "overlapped p99 ms": quantile(overlapped, 0.99),
        "of the slowest 1 %, overlapped %": 100 * sum(hit for _, hit in slowest) / len(slowest),
    }


def sdk_app(send: bool = True) -> Flask:
    """The route a user writes instead: verify, map the body by hand, ``track()`` (memory only).

    The SDK's consumer thread posts to ``CIO_RUDDER_DATA_PLANE_URL``; its queue holds 10^6
    events so that nothing is dropped. Built in each gunicorn worker (no ``--preload``).
    ``send=False`` is the SDK's own switch: no consumer thread, nothing queued (instructions.py).
    """
    import hmac

    from flask import abort, jsonify, request
    from rudderstack.analytics import Client  # type: ignore[import-untyped]  # no type hints

    app = _configured("sdk")
    key = app.config["CIO_RUDDER_SIGNING_KEY"].encode()
    client = Client(
        app.config["CIO_RUDDER_WRITE_KEY"],
        host=app.config["CIO_RUDDER_DATA_PLANE_URL"],
        max_queue_size=10**6,
        send=send,
    )
    names = {metric: f"Email {metric.title()}" for metric in METRICS} | {"clicked": "Email Link Clicked"}

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        raw = request.get_data()
        message = b"v0:" + request.headers.get("X-CIO-Timestamp", "").encode() + b":" + raw
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-CIO-Signature", "")):
            abort(401)
        body = request.get_json(force=True)
        data = dict(body["data"])
        identifiers = data.pop("identifiers", {})
        client.track(
            user_id=data.pop("customer_id", None) or identifiers.get("id"),
            event=names.get(body["metric"], "Unknown Event"),
            properties={"eventId": body["event_id"], **data},
            context={"traits": {"email": identifiers.get("email") or data.get("recipient")}},
            timestamp=datetime.fromtimestamp(body["timestamp"], timezone.utc),
            message_id=body["event_id"],
        )
        return jsonify(status="accepted")

    return app


def relay_app(send: bool = True) -> Flask:
    """The least a forwarding receiver does: bare Flask's work, the event made, kept in memory, posted.

    Each request parses the body, makes the RudderStack event (``transform.build``) and puts
    it in a list; a thread in the worker posts the list, 0.1 s after the first event of a
    batch came in (as the spool's mover lingers), with the extension's ``DataPlane``. No
    signature, no duplicate lookup, nothing kept on disk: what forwarding itself costs
    beside the web workers. ``send=False``: nothing kept or posted, the request path alone.
    """
    from flask import jsonify, request

    from flask_cio_rudder.rudderstack import DataPlane
    from flask_cio_rudder.transform import build

    app = _configured("relay")
    config = app.config
    plane = DataPlane(config["CIO_RUDDER_DATA_PLANE_URL"], config["CIO_RUDDER_WRITE_KEY"], (3.0, 10.0))
    pending: list[str] = []
    lock, wake = threading.Lock(), threading.Event()

    def post_forever() -> None:
        while True:
            wake.wait()
            time.sleep(0.1)
            wake.clear()
            with lock:
                batch, pending[:] = pending[:], []
            for start in range(0, len(batch), 100):
                try:
                    plane.post_batch(batch[start : start + 100])
                except requests.RequestException:  # lost, as from any memory-only relay: "forwarded" shows it
                    continue  # a thread that died here would leave the relay less work to do than it should

    if send:
        threading.Thread(target=post_forever, name="relay", daemon=True).start()

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        payload_json = build(request.get_json(force=True))[1]
        if send:
            with lock:
                pending.append(payload_json)
            wake.set()
        return jsonify(status="accepted")

    return app


def bound_app(background: bool = True) -> Flask:
    """The floor of this design: only the work every guarantee needs, with the extension's own parts.

    Verify the signature, decode the body, make the RudderStack event (``transform.build``),
    look its ``event_id`` up in the outbox (duplicates), append it to this process's spool
    and answer; the extension's spool mover and sender, in each worker, move and deliver it.
    No schema check, no ``CioEvent``, no signals, no blueprint: what the extension adds on
    top of this is the gap between the two. Outbox: ``CIO_RUDDER_OUTBOX_URL`` (SQLite).
    ``background=False``: no spool mover and no sender (``no_background``), the request path alone.
    """
    from flask import Response, abort, request

    from flask_cio_rudder.rudderstack import DataPlane
    from flask_cio_rudder.sender import Sender
    from flask_cio_rudder.signature import SignatureError, verify
    from flask_cio_rudder.spool import spool_for
    from flask_cio_rudder.transform import build
    from flask_cio_rudder.webhook import parse_json

    if not background:
        no_background()
    app = _configured("bound")
    config = app.config
    store = store_from_url(config["CIO_RUDDER_OUTBOX_URL"], instance_path=app.instance_path)
    url, key = config["CIO_RUDDER_DATA_PLANE_URL"], config["CIO_RUDDER_WRITE_KEY"]
    sender = Sender(app, store, lambda: DataPlane(url, key, (3.0, 10.0)))
    spool = spool_for(store, durability="process-crash", sender=sender)
    assert spool is not None
    sender.ensure_running()
    spool.ensure_running()
    atexit.register(sender.stop)  # as the extension closes its outbox: the spool first
    atexit.register(spool.stop)  # (atexit runs the last registered first)
    keys = (config["CIO_RUDDER_SIGNING_KEY"],)

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        raw = request.get_data()
        try:
            verify(raw, request.headers.get("X-CIO-Timestamp"), request.headers.get("X-CIO-Signature"), keys)
        except SignatureError:
            abort(401)
        body = parse_json(raw)
        event_id, (payload, payload_json) = body["event_id"], build(body)
        if not (spool.holds(event_id) or store.is_known(event_id)):
            event_name, email = searched_fields(payload)  # as the extension does
            spool.append(event_id, payload_json, event_name=event_name, email=email)
        return Response(b'{"status":"accepted"}', content_type="application/json")

    return app


def floor_app() -> Flask:
    """The least a durable receiver does: bare Flask + one SQLite (WAL) commit per request.

    Writers queue on a lock file, as the outbox does. File: ``FLOOR_PATH``.
    """
    import fcntl
    import sqlite3

    from flask import jsonify, request

    app, path, local = Flask("floor"), os.environ["FLOOR_PATH"], threading.local()

    @app.post(WEBHOOK_PATH)
    def receive() -> Any:
        body = request.get_json(force=True)
        first = not hasattr(local, "db")
        if first:
            local.lock = open(path + ".lock", "ab")  # noqa: SIM115 - lives as long as the worker
            local.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        fcntl.flock(local.lock, fcntl.LOCK_EX)
        try:
            if first:  # under the lock: two workers may create the file at once
                local.db.execute("PRAGMA journal_mode=WAL")
                local.db.execute("PRAGMA synchronous=NORMAL")  # the outbox's default durability
                local.db.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, body TEXT)")
            row = (str(body.get("event_id")), request.get_data(as_text=True))
            local.db.execute("INSERT OR IGNORE INTO events VALUES (?, ?)", row)
        finally:
            fcntl.flock(local.lock, fcntl.LOCK_UN)
        return jsonify(status="accepted")

    return app


# -- the outbox, chosen by URL ------------------------------------------------------------------


def outbox_env(url: str | None, workdir: Path, run: str) -> dict[str, str]:
    """The settings of a fresh outbox for one run: a new SQLite file in ``workdir``, or a new table.

    With ``url`` (``CIO_RUDDER_OUTBOX_URL``, e.g. ``postgresql://127.0.0.1/test``) the run gets
    its own ``CIO_RUDDER_OUTBOX_TABLE``, unique to this process and ``run``: :func:`drop_outbox` it.
    A PostgreSQL URL gets ``application_name=cio-rudder-bench``, so :func:`db_pids` finds its backends.
    """
    if url is None:
        return {"CIO_RUDDER_OUTBOX_URL": f"sqlite:///{workdir / f'outbox-{run}.sqlite3'}"}
    if url.startswith("postgres") and "application_name=" not in url:
        url += ("&" if "?" in url else "?") + f"application_name={BENCH_APP}"
    return {"CIO_RUDDER_OUTBOX_URL": url, "CIO_RUDDER_OUTBOX_TABLE": f"bench_{_RUN_TAG}_{run}"}


BENCH_APP = "cio-rudder-bench"


_RUN_TAG = "".join(random.choice("abcdefghjkmnpqrstvwxyz0123456789") for _ in range(6))


@contextlib.contextmanager
def open_store(env: Mapping[str, str]) -> Iterator[OutboxStore]:
    """The outbox store that ``env`` names, opened directly (no app, no sender), closed after."""
    url, table = env["CIO_RUDDER_OUTBOX_URL"], env.get("CIO_RUDDER_OUTBOX_TABLE")
    store = store_from_url(url, table=table)
    try:
        yield store
    finally:
        store.close()


def drop_outbox(env: Mapping[str, str]) -> None:
    """Drop the run's outbox: its tables (``store.drop_tables()``), and an SQLite file's files."""
    with open_store(env) as store:
        store.drop_tables()
    path = sqlite_file(env)
    for name in [] if path is None else [path, Path(f"{path}-wal"), Path(f"{path}-shm")]:
        name.unlink(missing_ok=True)


def sqlite_file(env: Mapping[str, str]) -> Path | None:
    """The outbox's SQLite file, if it is one."""
    url = env["CIO_RUDDER_OUTBOX_URL"]
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def _psql(env: Mapping[str, str], query: str) -> str:
    run = subprocess.run(
        ["psql", env["CIO_RUDDER_OUTBOX_URL"], "-Atc", query], capture_output=True, text=True, timeout=60
    )
    if run.returncode:
        raise RuntimeError(f"psql failed: {run.stderr.strip()}")
    return run.stdout


def db_pids(env: Mapping[str, str]) -> list[int]:
    """The PostgreSQL server processes serving this benchmark's connections now (none for SQLite)."""
    if sqlite_file(env):
        return []
    query = "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND application_name = "
    query += f"'{BENCH_APP}'"
    return [int(pid) for pid in _psql(env, query).split()]


class CpuMeter:
    """CPU seconds used since it started by ``pids()`` (called again at the end: new ones count whole)."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self.pids = pids
        self.start = {pid: cpu_seconds([pid]) for pid in pids()}

    def used(self) -> tuple[float, list[int]]:
        """The CPU seconds used meanwhile, and every process counted."""
        pids = sorted(set(self.start) | set(self.pids()))
        return sum(cpu_seconds([pid]) - self.start.get(pid, 0.0) for pid in pids), pids


def outbox_bytes(env: Mapping[str, str]) -> int:
    """The outbox on disk: an SQLite file and its WAL, or ``pg_total_relation_size`` of its tables."""
    path = sqlite_file(env)
    if path is not None:
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    table = env["CIO_RUDDER_OUTBOX_TABLE"]  # a plain identifier (outbox_env): no quoting needed
    query = " + ".join(f"pg_total_relation_size('{table}{part}')" for part in ("", "_senders", "_meta"))
    return int(_psql(env, f"SELECT {query}"))


@contextlib.contextmanager
def app_here(env: Mapping[str, str]) -> Iterator[Flask]:
    """``ext_app()`` built in this process with ``env`` (its sender off unless ``env`` says otherwise)."""
    saved = dict(os.environ)
    os.environ.update(
        {"CIO_RUDDER_OUTBOX_SENDER": "false", "CIO_RUDDER_DATA_PLANE_URL": "http://127.0.0.1:9"}
    )
    os.environ.update(env)
    try:
        app = ext_app()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield app
    finally:
        if app.config["CIO_RUDDER_FORWARDER"] == "outbox":
            get_outbox(app).close()


def cio_events(count: int, tag: str) -> list[CioEvent]:
    """:func:`bodies` validated and transformed as the webhook does them (``Validation()``)."""
    validate = Validation()
    return [validate(body) for body in bodies(count, tag)]


def add_events(store: OutboxStore, events: Iterable[tuple[str, str]]) -> int:
    """Add ``(event_id, payload JSON)`` pending events in bulk: the store's public ``add_many``."""
    return store.add_many(Pending(event_id, payload) for event_id, payload in events)


# -- processes ----------------------------------------------------------------------------------


def start_worker(env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``flask --app 'harness:ext_app()' cio-rudder worker``: the sender in a process of its own."""
    command = [sys.executable, "-m", "flask", "--app", "harness:ext_app()", "cio-rudder", "worker"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            env={**os.environ, "PYTHONPATH": f"{HERE}:{ROOT}", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM the process's group (started in its own session), SIGKILL if it lingers."""
    for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    with contextlib.suppress(ProcessLookupError):  # a worker may outlive its master
        os.killpg(process.pid, signal.SIGKILL)


class Gunicorn:
    """``gunicorn -w N`` (sync workers) serving ``factory`` on a loopback port; restartable on that port."""

    def __init__(
        self, factory: str, env: Mapping[str, str], log: Path, workers: int = 2, root: Path = ROOT
    ) -> None:
        """``root``: the checkout whose ``benchmarks/harness.py`` and package are served
        (another commit's: :func:`checkout`)."""
        from gunicorn.config import Config  # type: ignore[import-untyped]  # no type hints

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"
        self.log, self.workers, self.env = log, workers, {**os.environ, **env}
        self.command = [sys.executable, "-m", "gunicorn", "--pythonpath", f"{root / 'benchmarks'},{root}"]
        self.command += [
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
        ]
        self.command += ["--log-level", "info", "--graceful-timeout", "10"]
        if "control_socket_disable" in Config().settings:  # gunicorn 25+ would write ~/.gunicorn
            self.command.append("--no-control-socket")
        self.command.append(factory)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 30.0) -> float:
        """Start (again); the seconds until every worker booted and the port answers HTTP."""
        started, offset = time.monotonic(), self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up:\n{self.log_tail()}")
            booted = self.log.read_bytes()[offset:].count(b"Booting worker")
            if booted >= self.workers and _answers_http(self.port):
                return time.monotonic() - started
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up within {timeout:g} s:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        with contextlib.suppress(OSError):
            return [
                int(pid)
                for pid in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
                .read_text()
                .split()
            ]
        return []

    def kill(self) -> None:
        """SIGKILL the master and its workers at once."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def checkout(rev: str, into: Path) -> Iterator[Path]:
    """This repository at ``rev`` (a commit, a tag, ``HEAD~1``), as a git worktree in ``into``:
    to serve the code before a change beside the code after it, in the same run."""
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(into), rev], check=True, timeout=60)
    try:
        yield into
    finally:
        subprocess.run([*git, "remove", "--force", str(into)], check=False, timeout=60)


def _answers_http(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {WEBHOOK_PATH} HTTP/1.0\r\n\r\n".encode())
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


# -- the data plane, in its own process -----------------------------------------------------------


class DataPlane:
    """A RudderStack-compatible data plane in a child process (``harness.py dataplane``).

    It counts requests, their outcomes, events stored and, per messageId, its eventId and how
    often it was stored. ``faults`` are probabilities per request: ``500``, ``429``, ``hang``
    (past the client's timeout, then the batch is stored: an answer lost) and ``reset``.
    Commands go over the child's stdin as JSON lines; it exits when its stdin closes.
    """

    def __init__(self, faults: Mapping[str, float] | None = None, hang: float = 2.0, seed: int = 1) -> None:
        config = json.dumps({"faults": dict(faults or {}), "hang": hang, "seed": seed})
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "dataplane", config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._lock = threading.Lock()
        self.url: str = self._reply()["url"]
        self.write_key = WRITE_KEY

    def _reply(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the data plane process exited ({self.process.poll()})")
        return json.loads(line)

    def call(self, op: str, **args: Any) -> Any:
        assert self.process.stdin is not None
        with self._lock:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
            return self._reply()

    def stats(self) -> dict[str, Any]:
        """requests, outcomes, stored, distinct, duplicates, first/last_store_at, outages, cpu_seconds."""
        return self.call("stats")  # type: ignore[no-any-return]

    def wait(self, distinct: int, timeout: float) -> dict[str, Any]:
        """The stats once ``distinct`` messageIds are stored, or after ``timeout`` seconds."""
        return self.call("wait", distinct=distinct, timeout=timeout)  # type: ignore[no-any-return]

    def between(self, start: float, end: float) -> float:
        """Seconds between the batches that stored the ``start`` and ``end`` shares of what was stored."""
        return float(self.call("between", start=start, end=end))

    def ids(self) -> list[list[Any]]:
        """``[messageId, eventId, times stored]`` for every messageId stored."""
        return self.call("ids")  # type: ignore[no-any-return]

    def reset(self) -> None:
        self.call("reset")

    def outage(self, seconds: float) -> None:
        """Stop listening now (connections refused, kept-alive ones reset), listen again after ``seconds``."""
        self.call("outage", seconds=seconds)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        stop_process(self.process, timeout=5)


class _Counts:
    def __init__(self, faults: Mapping[str, float], hang: float, seed: int) -> None:
        self.cond = threading.Condition()
        self.faults, self.hang, self.rng = faults, hang, random.Random(seed)
        self.down = False
        self.outages: list[dict[str, float]] = []
        self.reset()

    def reset(self) -> None:
        self.requests, self.stored = 0, 0
        self.outcomes: Counter[str] = Counter()
        self.by_id: dict[str, list[Any]] = {}  # messageId -> [eventId, times stored]
        self.first_store_at: float | None = None
        self.last_store_at: float | None = None
        self.timeline: list[tuple[float, int]] = []  # (when, events stored so far), one per batch

    def between(self, start: float, end: float) -> float:
        times = [
            next(when for when, stored in self.timeline if stored >= share * self.stored)
            for share in (start, end)
        ]
        return times[1] - times[0]

    def stats(self) -> dict[str, Any]:
        distinct = len(self.by_id)
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "stored": self.stored,
            "distinct": distinct,
            "duplicates": self.stored - distinct,
            "first_store_at": self.first_store_at,
            "last_store_at": self.last_store_at,
            "outages": self.outages,
            "now": time.monotonic(),
            "cpu_seconds": time.process_time(),
        }


class _CountingPlane(FakeDataPlane):
    def __init__(self, counts: _Counts, port: int = 0) -> None:
        super().__init__(write_key=WRITE_KEY, port=port)
        self.counts = counts

    def _next_misbehaviour(self) -> tuple[str, float, str | None] | None:
        """As ``FakeDataPlane``'s: (kind, status or seconds, ``Retry-After``), drawn at random."""
        counts = self.counts
        with counts.cond:
            counts.requests += 1
            if counts.down:  # a connection kept alive across the outage
                counts.outcomes["reset (outage)"] += 1
                return ("reset", 0.0, None)
            draw = counts.rng.random()
            answers = {
                "500": ("status", 500.0, None),
                "429": ("status", 429.0, None),
                "hang": ("hang", counts.hang, None),
                "reset": ("reset", 0.0, None),
            }
            for kind, answer in answers.items():
                draw -= counts.faults.get(kind, 0.0)
                if draw < 0:
                    counts.outcomes[kind] += 1
                    return answer
        return None

    def _store(self, batch: list[dict[str, Any]]) -> None:
        counts = self.counts
        with counts.cond:
            counts.outcomes["200 stored"] += 1
            counts.stored += len(batch)
            for event in batch:
                entry = counts.by_id.setdefault(event["messageId"], [event["properties"].get("eventId"), 0])
                entry[1] += 1
            counts.last_store_at = time.monotonic()
            counts.first_store_at = counts.first_store_at or counts.last_store_at
            counts.timeline.append((counts.last_store_at, counts.stored))
            counts.cond.notify_all()


def _serve_data_plane(config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    counts = _Counts(config["faults"], config["hang"], config["seed"])
    plane = _CountingPlane(counts).start()
    port = plane._server.server_port

    def come_back(seconds: float) -> None:
        nonlocal plane
        time.sleep(seconds)
        for _ in range(100):  # the port may refuse a bind for a moment after the close
            with contextlib.suppress(OSError):
                plane = _CountingPlane(counts, port).start()
                break
            time.sleep(0.05)
        with counts.cond:
            counts.down = False
            counts.outages[-1]["up_at"] = time.monotonic()

    print(json.dumps({"url": plane.url}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op, reply = command["op"], None  # type: tuple[str, Any]
        if op == "outage" and not counts.down:
            with counts.cond:
                counts.down = True
                counts.outages.append({"down_at": time.monotonic(), "seconds": command["seconds"]})
            plane.stop()
            threading.Thread(target=come_back, args=(command["seconds"],), daemon=True).start()
        with counts.cond:
            if op == "wait":
                distinct = command["distinct"]
                counts.cond.wait_for(lambda: len(counts.by_id) >= distinct, command["timeout"])  # noqa: B023
            if op == "reset":
                counts.reset()
            if op == "between":
                reply = counts.between(command["start"], command["end"])
            if op == "ids":
                reply = [[message_id, *entry] for message_id, entry in counts.by_id.items()]
            print(json.dumps(counts.stats() if reply is None else reply), flush=True)
    plane.stop()


# -- wrk ----------------------------------------------------------------------------------------


def wrk(
    url: str, bodies_file: Path, seconds: int, connections: int = 8, threads: int = 2, pace_ms: float = 0
) -> dict[str, float]:
    """One wrk run with ``webhook.lua``: each body sent at most once; latencies in microseconds."""
    env = {
        **os.environ,
        "BENCH_BODIES": str(bodies_file),
        "BENCH_THREADS": str(threads),
        "BENCH_PACE_MS": str(pace_ms),
    }
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    run = subprocess.run(
        [*command, "-s", str(HERE / "webhook.lua"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in run.stdout.splitlines():
        if line.startswith("BENCH "):
            numbers = {key: float(value) for key, value in (item.split("=") for item in line.split()[1:])}
            numbers["rps"] = numbers["requests"] / numbers["duration_us"] * 1e6
            numbers["errors"] = sum(
                numbers[f"errors_{kind}"] for kind in ("connect", "read", "write", "status", "timeout")
            )
            return numbers
    raise RuntimeError(f"wrk failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")


# -- noise: the machine is shared -----------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    return _stat_seconds([f"/proc/{pid}/stat" for pid in pids])


def main_thread_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes' main threads: a sync gunicorn worker's request thread.

    The rest of a worker's CPU is its other threads': the spool mover and the sender, or the SDK's consumer.
    """
    return _stat_seconds([f"/proc/{pid}/task/{pid}/stat" for pid in pids])


def _stat_seconds(paths: Sequence[str]) -> float:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Others:
    """Cores that processes other than ``pids`` and our waited-for children (wrk) used meanwhile.

    Processes that join during the window (a pool's new database connections) are added to ``pids``.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.started, self.busy, self.ours = time.monotonic(), _busy_seconds(), self._ours()

    def _ours(self) -> float:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cpu_seconds(self.pids) + children.ru_utime + children.ru_stime

    def cores(self) -> float:
        others = _busy_seconds() - self.busy - (self._ours() - self.ours)
        return max(0.0, others / max(time.monotonic() - self.started, 1e-9))


def wait_until_quiet(max_wait: float, threshold: float = 0.3) -> None:
    """Wait, at most ``max_wait`` s, for a second in which the machine uses under ``threshold`` cores."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = _busy_seconds()
        time.sleep(1.0)
        if _busy_seconds() - before < threshold:
            return


# -- rounds and tables ----------------------------------------------------------------------------


def interleave(labels: Sequence[str], rounds: int, measure: Callable[[str, int], R]) -> dict[str, list[R]]:
    """``measure(label, round)`` for each label in turn, ``rounds`` times, starting one later each round.

    A B C, B C A, C A B...: no app always runs first, or right after the same neighbour, so
    a machine that drifts within a round favours none of them in the medians.
    """
    results: dict[str, list[R]] = {label: [] for label in labels}
    order = list(labels)
    for round_ in range(1, rounds + 1):
        for label in order:
            results[label].append(measure(label, round_))
        order = order[1:] + order[:1]
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


def main_guard(main: Callable[[], int]) -> None:
    """Run ``main`` with SIGTERM handled as Ctrl-C, so that every ``finally`` stops its processes."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    if sys.argv[1:2] != ["dataplane"]:
        sys.exit('usage: python benchmarks/harness.py dataplane \'{"faults": {}, "hang": 2, "seed": 1}\'')
    _serve_data_plane(json.loads(sys.argv[2]))
