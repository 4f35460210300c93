"""Reliability figures: signed webhooks through gunicorn while the data plane misbehaves.

At least 10,000 signed Customer.io events (the six sample email events, each with its own
``event_id``) are posted over HTTP to an app served by gunicorn (2 workers, the outbox
forwarder, its background sender in each worker) while the loopback data plane
(``dataplane.py``, its own process) fails at random: 500, 429, hangs past the sender's
timeout (the batch is stored but the answer comes too late), connection resets, plus one
outage window when its port refuses connections. Mid-run the whole gunicorn process group
is SIGKILLed and started again on the same outbox and port. The load generator retries
every event until it gets a 2xx, as Customer.io does (faster: 50 ms doubling to 1 s).

Then it waits (bounded) until the outbox has nothing pending and reports accepted,
delivered, dead letters, lost (must be 0), duplicates on the wire (allowed: at least once)
and whether every ``messageId`` is ``flask_cio_rudder.transform.message_id(event_id)``.
Run from the repository root::

    python benchmarks/faults.py            # 20,000 events, about 1 to 3 minutes
    python benchmarks/faults.py --quick    # a smoke run, well under a minute
    python benchmarks/faults.py --no-faults               # baseline: healthy data plane, no kill
    python benchmarks/faults.py --no-faults --no-sender   # ... with no sender in gunicorn's workers

Needs ``flask_cio_rudder`` importable and gunicorn. Sends traffic only to 127.0.0.1; kills
every process it started and removes its temporary directory, also on errors and Ctrl-C.
Exits 1 if an accepted event was lost or a messageId is wrong, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from flask import Flask

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # run from a checkout, and imported by gunicorn as "faults"
    if _path not in sys.path:
        sys.path.append(_path)

from flask_cio_rudder import CioRudder  # noqa: E402
from flask_cio_rudder.testing import encode, signature_headers  # noqa: E402
from flask_cio_rudder.transform import message_id  # noqa: E402

SIGNING_KEY = "benchmark-signing-key"
WEBHOOK = "/webhooks/customerio"
SAMPLES = ROOT / "tests" / "samples"
METRICS = ["delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed"]
ANSWER_TIMEOUT = 4.0  # Customer.io's own timeout for a webhook answer

# The app's settings under test (seconds), passed to gunicorn's workers as CIO_RUDDER_* variables.
APP_SETTINGS = {
    "CIO_RUDDER_OUTBOX_LEASE": 3.0,  # a killed worker's batch is taken over after 3 s (default 60)
    "CIO_RUDDER_TIMEOUT": 1.0,  # each request to the data plane, connect and read (default (3, 10))
    "CIO_RUDDER_SHUTDOWN_TIMEOUT": 2.0,  # SIGTERM at the end (default 5)
}


# -- the app gunicorn serves ---------------------------------------------------------------------


def create_app() -> Flask:
    """The app under test: ``gunicorn 'faults:create_app()'``, configured from the environment."""
    app = Flask("faults")
    app.config["CIO_RUDDER_FORWARDER"] = "outbox"
    for key in ("CIO_RUDDER_OUTBOX_PATH", "CIO_RUDDER_DATA_PLANE_URL", "CIO_RUDDER_WRITE_KEY"):
        app.config[key] = os.environ[key]
    app.config["CIO_RUDDER_SIGNING_KEY"] = SIGNING_KEY
    for key in APP_SETTINGS:
        if key in os.environ:
            app.config[key] = float(os.environ[key])
    app.config["CIO_RUDDER_OUTBOX_SENDER"] = os.environ.get("CIO_RUDDER_OUTBOX_SENDER", "1") == "1"
    CioRudder(app)
    return app


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _no_control_socket() -> list[str]:
    """gunicorn 27 opens a control socket in ~/.gunicorn unless told not to: stay out of $HOME."""
    try:
        from gunicorn.config import Config
    except ImportError:
        return []
    return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []


class Gunicorn:
    """gunicorn serving ``faults:create_app()`` on one port, in its own process group; restartable."""

    def __init__(self, workdir: Path, port: int, env: dict[str, str], workers: int) -> None:
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.workers = workers
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.processes[-1]

    def start(self, timeout: float = 30.0) -> float:
        """Start gunicorn; returns the seconds until it answered HTTP."""
        log = self.workdir / f"gunicorn-{len(self.processes) + 1}.log"
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(self.workers),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--pythonpath",
            f"{HERE},{ROOT}",
            "--graceful-timeout",
            "10",
            "--log-level",
            "warning",
            *_no_control_socket(),
            "faults:create_app()",
        ]
        started = time.monotonic()
        with open(log, "wb") as output:
            self.processes.append(
                subprocess.Popen(
                    command,
                    cwd=self.workdir,
                    env=self.env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                requests.get(self.url + "/", timeout=1, headers={"Connection": "close"})
                return time.monotonic() - started
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer within {timeout:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the master and its workers at once (the whole process group), then reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), SIGKILL if it lingers; every group ever started, to be sure."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=timeout)
            with contextlib.suppress(ProcessLookupError):  # a worker may outlive its master
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the running master and its workers (Linux /proc), else None."""
        master = self.process.pid
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = 0
        try:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                    if int(entry) == master or int(fields[1]) == master:  # fields[1] is the ppid
                        total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            return None
        return total / ticks

    def log_tail(self, lines: int = 30) -> str:
        logs = sorted(self.workdir.glob("gunicorn-*.log"))
        text = logs[-1].read_text(errors="replace") if logs else ""
        return "\n".join(text.splitlines()[-lines:])

    def errors_logged(self) -> Counter[str]:
        """The library's warnings and errors in every gunicorn log, by their first words."""
        found: Counter[str] = Counter()
        for log in self.workdir.glob("gunicorn-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "Delivery to RudderStack failed" in line:
                    found["warning: delivery failed, will retry"] += 1
                elif "Traceback" in line:
                    found["traceback"] += 1
                elif "[ERROR]" in line or "ERROR" in line.split(":", 1)[0]:
                    found["error: " + line[-80:]] += 1
        return found


# -- the load generator (Customer.io) ------------------------------------------------------------


class Load:
    """Threads that post every body, signed, until each gets a 2xx (like Customer.io, faster)."""

    def __init__(self, url: str, bodies: list[dict[str, Any]], concurrency: int, deadline: float) -> None:
        self.url = url + WEBHOOK
        self.work: queue.Queue[dict[str, Any]] = queue.Queue()
        for body in bodies:
            self.work.put(body)
        self.deadline = deadline
        self.lock = threading.Lock()
        self.answers: dict[str, str] = {}  # event_id -> "accepted" or "duplicate" (the 2xx that ended it)
        self.attempts: Counter[str] = Counter()
        self.latencies: list[float] = []  # seconds, of 2xx answers
        self.gave_up: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def done(self) -> int:
        with self.lock:
            return len(self.answers)

    def _run(self) -> None:
        with requests.Session() as session:
            while True:
                try:
                    body = self.work.get_nowait()
                except queue.Empty:
                    return
                self._deliver(session, body)

    def _deliver(self, session: requests.Session, body: dict[str, Any]) -> None:
        raw = encode(body)
        delay = 0.05
        while time.monotonic() < self.deadline:
            headers = {**signature_headers(raw, SIGNING_KEY), "Connection": "close"}  # signed per attempt
            started = time.monotonic()
            try:
                response = session.post(self.url, data=raw, headers=headers, timeout=ANSWER_TIMEOUT)
            except requests.Timeout:
                outcome = f"no answer within {ANSWER_TIMEOUT:g} s"
            except requests.ConnectionError:
                outcome = "connection refused or reset"
            except requests.RequestException as error:  # an answer cut short by the SIGKILL, for one
                outcome = f"broken answer ({type(error).__name__})"
            else:
                try:
                    status = str(response.json().get("status")) if response.ok else ""
                except ValueError:
                    status = "not JSON"
                if 200 <= response.status_code < 300:
                    with self.lock:
                        self.attempts[f"2xx {status}"] += 1
                        self.answers[body["event_id"]] = status
                        self.latencies.append(time.monotonic() - started)
                    return
                outcome = f"HTTP {response.status_code}"
            with self.lock:
                self.attempts[outcome] += 1
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        with self.lock:
            self.gave_up.append(body["event_id"])


def make_bodies(count: int, tag: str) -> list[dict[str, Any]]:
    samples = [json.loads((SAMPLES / f"email_{metric}.json").read_text()) for metric in METRICS]
    bodies = []
    for number in range(count):
        body = json.loads(json.dumps(samples[number % len(samples)]))
        body["event_id"] = f"{tag}-{number:06d}"
        bodies.append(body)
    return bodies


def outbox_rows(path: Path) -> dict[str, list[str]]:
    """event_ids by state, read straight from the SQLite file (a reader never blocks the writers)."""
    rows: dict[str, list[str]] = {"pending": [], "delivered": [], "dead": []}
    if not path.exists():
        return rows
    db = sqlite3.connect(str(path), timeout=30)
    try:
        for event_id, state in db.execute("SELECT event_id, state FROM events"):
            rows.setdefault(state, []).append(event_id)
    finally:
        db.close()
    return rows


def pending_count(path: Path) -> int:
    db = sqlite3.connect(str(path), timeout=30)
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM events WHERE state = 'pending'").fetchone()
        return int(count)
    finally:
        db.close()


def sender_timeline(
    requests_log: list[list[Any]], samples: list[tuple[float, int]], origin: float, table: Any
) -> str:
    """Per 5-second slice: requests the data plane got, failed, events stored, backlog; and the idle gaps."""
    slices: dict[int, list[int]] = {}
    for at, outcome, count in requests_log:
        row = slices.setdefault(int((at - origin) // 5), [0, 0, 0])
        row[0] += 1
        row[1] += outcome != "200 stored"
        row[2] += count
    backlog: dict[int, int] = {}
    for at, pending in samples:
        backlog[int((at - origin) // 5)] = pending  # the last sample of the slice
    last = max([*slices, *backlog, 0])
    rows = []
    for index in range(last + 1):
        requests_made, failed, stored = slices.get(index, [0, 0, 0])
        pending = backlog.get(index)
        rows.append(
            [
                f"{5 * index:>3}-{5 * index + 5:<3}",
                f"{requests_made:,}",
                f"{failed:,}",
                f"{stored:,}",
                "-" if pending is None else f"{pending:,}",
            ]
        )
    times = [at for at, _, _ in requests_log]
    gaps = sorted(((b - a, a - origin) for a, b in zip(times, times[1:]) if b - a > 1.0), reverse=True)
    text = table(["seconds", "requests", "failed", "events stored", "pending at end of slice"], rows)
    if gaps:
        text += (
            f"\n\n{len(gaps)} gaps of more than 1 s with no request reaching the data plane, "
            f"{sum(g for g, _ in gaps):.1f} s in all; the longest: "
            + ", ".join(f"{g:.1f} s from {t:.1f} s" for g, t in gaps[:6])
        )
    return text


def flush_outbox(path: Path, plane: Any, deadline: float) -> None:
    """Send what the outbox holds from this process until nothing is pending or ``deadline``."""
    from flask_cio_rudder.outbox import Outbox
    from flask_cio_rudder.rudderstack import DataPlane
    from flask_cio_rudder.sender import Sender

    outbox = Outbox(str(path))
    data_plane = DataPlane(plane.url, plane.write_key, APP_SETTINGS["CIO_RUDDER_TIMEOUT"])
    sender = Sender(Flask("flush"), outbox, lambda: data_plane, lease=APP_SETTINGS["CIO_RUDDER_OUTBOX_LEASE"])
    try:
        while time.monotonic() < deadline and outbox.status().pending:
            sender.flush(deadline - time.monotonic())  # returns at the first failure, or when done
            time.sleep(0.2)  # a failure, or rows leased by a killed process: look again shortly
    finally:
        sender.stop()
        outbox.close()


# -- the run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from dataplane import FAULT_KINDS, DataPlaneProcess, repo_state, table

    parser = argparse.ArgumentParser(description="Reliability figures under faults, SIGKILL and an outage.")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--concurrency", type=int, default=4, help="load generator threads")
    parser.add_argument("--p500", type=float, default=0.06, help="share of data plane requests answered 500")
    parser.add_argument("--p429", type=float, default=0.04, help="... answered 429")
    parser.add_argument("--phang", type=float, default=0.03, help="... hanging past the sender's timeout")
    parser.add_argument("--preset", type=float, default=0.04, help="... whose connection is reset")
    parser.add_argument("--hang-seconds", type=float, default=1.5, help="a hang (CIO_RUDDER_TIMEOUT is 1 s)")
    parser.add_argument("--outage", type=float, default=8.0, help="seconds the data plane is down")
    parser.add_argument("--outage-at", type=float, default=0.30, help="when, as a share of events answered")
    parser.add_argument("--kill-at", type=float, default=0.55, help="SIGKILL gunicorn at this share")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=330.0, help="the whole run stops by then")
    parser.add_argument("--no-faults", action="store_true", help="a healthy data plane, no outage, no kill")
    parser.add_argument(
        "--no-sender",
        action="store_true",
        help="CIO_RUDDER_OUTBOX_SENDER=False in gunicorn; this script drains the outbox after the load",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 events, 2 s outage")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.outage, args.max_seconds = 400, 2.0, 90.0
    if args.no_faults:
        args.p500 = args.p429 = args.phang = args.preset = 0.0
        args.outage_at = args.kill_at = 2.0  # never
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that cleanup runs

    run_started = time.monotonic()
    deadline = run_started + args.max_seconds
    drain_reserve = min(150.0, args.max_seconds / 2)
    faults = {kind: getattr(args, kind) for kind in FAULT_KINDS}
    print(f"flask_cio_rudder at {repo_state()}; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    print(
        f"{args.events:,} events, gunicorn x {args.workers} workers, {args.concurrency} posting threads; "
        f"data plane faults per request: {faults}, hangs {args.hang_seconds:g} s; "
        + (f"outage {args.outage:g} s at {args.outage_at:.0%}; " if args.outage_at <= 1 else "no outage; ")
        + (f"SIGKILL at {args.kill_at:.0%}; " if args.kill_at <= 1 else "no SIGKILL; ")
        + f"app: {APP_SETTINGS}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="cio-rudder-faults-"))
    timeline: list[tuple[float, str]] = []

    def note(what: str) -> None:
        timeline.append((time.monotonic() - run_started, what))
        print(f"[{time.monotonic() - run_started:6.1f} s] {what}", flush=True)

    server: Gunicorn | None = None
    try:
        with DataPlaneProcess(
            faults=faults, hang_seconds=args.hang_seconds, seed=args.seed, max_seconds=args.max_seconds + 60
        ) as plane:
            outbox = workdir / "outbox.sqlite3"
            env = {key: value for key, value in os.environ.items() if key != "GUNICORN_CMD_ARGS"}
            env.update(
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                CIO_RUDDER_OUTBOX_PATH=str(outbox),
                CIO_RUDDER_DATA_PLANE_URL=plane.url,
                CIO_RUDDER_WRITE_KEY=plane.write_key,
                **{key: str(value) for key, value in APP_SETTINGS.items()},
                CIO_RUDDER_OUTBOX_SENDER="0" if args.no_sender else "1",
            )
            server = Gunicorn(workdir, free_port(), env, args.workers)
            note(f"gunicorn answers after {server.start():.1f} s")

            bodies = make_bodies(args.events, f"faults{int(time.time())}")
            load = Load(server.url, bodies, args.concurrency, deadline - drain_reserve)
            sent_started = time.monotonic()
            load.start()
            note("load started")
            outage_done = kill_done = False
            samples: list[tuple[float, int]] = []  # (monotonic time, events pending in the outbox)
            while load.running():
                if not samples or time.monotonic() - samples[-1][0] >= 0.5:
                    samples.append((time.monotonic(), pending_count(outbox)))
                done = load.done()
                if not outage_done and done >= args.outage_at * args.events:
                    plane.outage(args.outage)
                    outage_done = True
                    note(f"data plane down for {args.outage:g} s ({done:,} events answered)")
                if not kill_done and done >= args.kill_at * args.events:
                    server.kill()
                    kill_done = True
                    note(f"gunicorn process group SIGKILLed ({done:,} events answered), restarting")
                    note(f"gunicorn answers again after {server.start():.1f} s")
                time.sleep(0.05)
            send_seconds = time.monotonic() - sent_started
            note(f"load done: {load.done():,} events answered 2xx, {len(load.gave_up):,} given up")

            drain_deadline = min(deadline, time.monotonic() + drain_reserve)
            last_print = 0.0
            if args.no_sender:  # nobody sends: drain from here, as `flask cio-rudder flush` would
                note("draining the outbox from this process")
                flusher = threading.Thread(
                    target=flush_outbox, args=(outbox, plane, drain_deadline), daemon=True
                )
                flusher.start()
            pending = pending_count(outbox)
            while pending and time.monotonic() < drain_deadline:
                if time.monotonic() - last_print > 10:
                    note(f"waiting: {pending:,} pending in the outbox")
                    last_print = time.monotonic()
                time.sleep(0.25)
                pending = pending_count(outbox)
                samples.append((time.monotonic(), pending))
            note(f"outbox pending: {pending:,}" + ("" if not pending else " (gave up waiting)"))
            drain_seconds = time.monotonic() - sent_started - send_seconds

            gunicorn_cpu = server.cpu_seconds()
            server.stop()
            note("gunicorn stopped (SIGTERM)")
            stats = plane.stats()
            stored = plane.ids()
            requests_log = plane.log()
            rows = outbox_rows(outbox)
            logged = server.errors_logged()
    finally:
        if server is not None:
            server.stop(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)

    # -- figures -------------------------------------------------------------------------------
    accepted = set(load.answers)
    event_ids = {body["event_id"] for body in bodies}
    delivered_ids = {event_id for _, event_id, _ in stored}
    dead = set(rows.get("dead", []))
    lost = sorted(accepted - delivered_ids - dead)
    wrong_ids = [(mid, eid) for mid, eid, _ in stored if eid is None or mid != message_id(eid)]
    copies = Counter(n for _, _, n in stored)
    extra_copies = sum(n - 1 for _, _, n in stored)
    latencies = sorted(load.latencies)

    def pct(p: float) -> str:
        return (
            f"{1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]:.0f}" if latencies else "-"
        )

    print("\n## Webhook side (the load generator, like Customer.io)\n")
    print(
        table(
            ["what", "count"],
            [
                ["events (distinct event_ids)", f"{len(event_ids):,}"],
                ["ended by a 2xx: accepted", f"{sum(1 for s in load.answers.values() if s == 'accepted'):,}"],
                [
                    "ended by a 2xx: duplicate (accepted before, answer lost)",
                    f"{sum(1 for s in load.answers.values() if s == 'duplicate'):,}",
                ],
                [
                    "ended by a 2xx: other",
                    f"{sum(1 for s in load.answers.values() if s not in ('accepted', 'duplicate')):,}",
                ],
                ["given up (deadline)", f"{len(load.gave_up):,}"],
                ["requests made", f"{sum(load.attempts.values()):,}"],
                *[[f"  answered: {outcome}", f"{n:,}"] for outcome, n in sorted(load.attempts.items())],
                ["2xx answer time p50 / p99 / max (ms)", f"{pct(0.5)} / {pct(0.99)} / {pct(1.0)}"],
                ["sending took (s)", f"{send_seconds:.1f} ({len(event_ids) / send_seconds:,.0f} events/s)"],
            ],
        )
    )
    print("\n## Data plane side (requests from the senders, and how they were answered)\n")
    outages = stats["outages"]
    print(
        table(
            ["what", "count"],
            [
                ["requests reaching the data plane", f"{stats['requests']:,}"],
                *[[f"  {outcome}", f"{n:,}"] for outcome, n in sorted(stats["outcomes"].items())],
                [
                    "outage: port closed (connections refused), seconds",
                    ", ".join(f"{o.get('up_at', o['down_at']) - o['down_at']:.1f}" for o in outages) or "-",
                ],
                ["events stored (with duplicates)", f"{stats['stored']:,}"],
                [
                    "CPU seconds: the data plane process / gunicorn (its last start, master + workers)",
                    f"{stats['cpu_seconds']:.1f} / "
                    + ("-" if gunicorn_cpu is None else f"{gunicorn_cpu:.1f}"),
                ],
                [
                    "events per stored batch (mean)",
                    f"{stats['stored'] / max(1, stats['outcomes'].get('200 stored', 0)):.1f}",
                ],
            ],
        )
    )
    print(f"\n## Result after the outbox drained ({drain_seconds:.1f} s after the last answer)\n")
    result_rows = [
        ["accepted (distinct event_ids answered 2xx)", f"{len(accepted):,}"],
        ["delivered (distinct messageIds stored by the data plane)", f"{len(delivered_ids):,}"],
        ["dead letters", f"{len(dead):,}"],
        ["LOST (accepted - delivered - dead)", f"{len(lost):,}"],
        ["duplicates on the wire (extra stored copies of a messageId)", f"{extra_copies:,}"],
        ["messageIds stored more than once", f"{sum(v for k, v in copies.items() if k > 1):,}"],
        [
            "messageId == message_id(event_id) for every stored event",
            "yes" if not wrong_ids else f"NO: {len(wrong_ids)} wrong",
        ],
        ["delivered but never answered 2xx", f"{len(delivered_ids - accepted):,}"],
        [
            "outbox at the end: pending / delivered / dead",
            f"{len(rows.get('pending', [])):,} / {len(rows.get('delivered', [])):,} / {len(dead):,}",
        ],
        [
            "outbox says delivered, data plane never stored it",
            f"{len(set(rows.get('delivered', [])) - delivered_ids):,}",
        ],
    ]
    print(table(["what", "count"], result_rows))
    if lost:
        print(f"lost event_ids (first 10): {lost[:10]}")
    if logged:
        print("\nlogged by the app: " + "; ".join(f"{what} x {n}" for what, n in logged.most_common(6)))
    print("\n## The senders over time (data plane requests, outbox backlog)\n")
    print(sender_timeline(requests_log, samples, run_started, table))
    print("\nTimeline:\n" + "\n".join(f"  {t:6.1f} s  {what}" for t, what in timeline))
    print(f"\nwhole run: {time.monotonic() - run_started:.0f} s")
    failed = bool(lost) or bool(wrong_ids) or bool(rows.get("pending"))
    if failed:
        print(
            "FAILED: "
            + ", ".join(
                what
                for what, bad in (
                    ("events lost", lost),
                    ("wrong messageIds", wrong_ids),
                    ("events still pending", rows.get("pending")),
                )
                if bad
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
