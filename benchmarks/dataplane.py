"""A RudderStack-compatible data plane in its own process, for the delivery benchmarks.

It serves :class:`flask_cio_rudder.testing.FakeDataPlane` (``POST /v1/batch``, HTTP Basic
write key, gzip) on 127.0.0.1, so that its CPU is not charged to the sender being measured,
and it can fail at random: answer 500 or 429, hang past the client's timeout (and then
store the batch, as a gateway whose answer was lost does), or reset the connection.
It can also go down for a while (the port refuses connections, kept-alive connections are
reset) and come back on the same port.

It keeps counts, not events: how many requests and how each was answered, how many events
were stored, and for each ``messageId`` its ``properties.eventId`` and how often it was stored.

Run alone (prints one JSON line with its URLs, then a JSON line of counts when it stops)::

    python benchmarks/dataplane.py --p500 0.05 --p429 0.03 --phang 0.02 --preset 0.03

It stops at SIGINT or SIGTERM, when its standard input is closed (the parent that started it
went away) or after ``--max-seconds``. A control server on another loopback port answers:

=====================================  =========================================================
``GET /stats``                         the counts, as JSON
``GET /wait?distinct=N&timeout=S``     the counts, once N distinct messageIds are stored (or S)
``GET /ids``                           ``[[messageId, eventId, times stored], ...]``
``GET /log``                           ``[[monotonic time, outcome, events stored], ...]``
``POST /reset``                        forget every count
``POST /faults`` (JSON body)           change the failure probabilities
``POST /outage?seconds=S``             go down now, come back on the same port after S seconds
=====================================  =========================================================

The scripts use it through :class:`DataPlaneProcess`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from flask_cio_rudder.testing import FakeDataPlane

WRITE_KEY = "benchmark-write-key"
FAULT_KINDS = ("p500", "p429", "phang", "preset")


class Recorder:
    """What the data plane saw, shared by every server instance across outages."""

    def __init__(self, faults: dict[str, float], hang_seconds: float, seed: int) -> None:
        self.condition = threading.Condition()
        self.faults = dict(faults)
        self.hang_seconds = hang_seconds
        self.rng = random.Random(seed)
        self.down = False
        self.outages: list[dict[str, float]] = []
        self.reset()

    def reset(self) -> None:
        with self.condition:
            self.requests = 0
            self.outcomes: Counter[str] = Counter()
            self.stored = 0
            self.by_message_id: dict[str, list[Any]] = {}  # messageId -> [eventId, times stored]
            self.first_store_at: float | None = None
            self.last_store_at: float | None = None
            self.log: list[tuple[float, str, int]] = []  # (monotonic time, outcome, events stored)

    def misbehaviour(self) -> tuple[str, float] | None:
        """How to answer the request that just arrived: ``None`` for "normally"."""
        with self.condition:
            self.requests += 1
            if self.down:  # a kept-alive connection during an outage
                self.outcomes["reset (outage)"] += 1
                self.log.append((time.monotonic(), "reset (outage)", 0))
                return ("reset", 0.0)
            draw = self.rng.random()
            for kind, outcome, answer in (
                ("p500", "500", ("status", 500.0)),
                ("p429", "429", ("status", 429.0)),
                ("phang", "hang", ("hang", self.hang_seconds)),
                ("preset", "reset", ("reset", 0.0)),
            ):
                draw -= self.faults.get(kind, 0.0)
                if draw < 0:
                    self.outcomes[outcome] += 1
                    self.log.append((time.monotonic(), outcome, 0))
                    return answer
            return None

    def store(self, batch: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self.condition:
            self.outcomes["200 stored"] += 1
            self.log.append((now, "200 stored", len(batch)))
            self.stored += len(batch)
            for event in batch:
                message_id = event.get("messageId")
                entry = self.by_message_id.get(message_id)
                if entry is None:
                    self.by_message_id[message_id] = [(event.get("properties") or {}).get("eventId"), 1]
                else:
                    entry[1] += 1
            if self.first_store_at is None:
                self.first_store_at = now
            self.last_store_at = now
            self.condition.notify_all()

    def stats(self) -> dict[str, Any]:
        with self.condition:
            distinct = len(self.by_message_id)
            return {
                "requests": self.requests,
                "outcomes": dict(self.outcomes),
                "stored": self.stored,
                "distinct": distinct,
                "duplicates": self.stored - distinct,
                "message_ids_stored_twice_or_more": sum(1 for _, n in self.by_message_id.values() if n > 1),
                "first_store_at": self.first_store_at,
                "last_store_at": self.last_store_at,
                "down": self.down,
                "outages": list(self.outages),
                "faults": dict(self.faults),
                "now": time.monotonic(),
                "cpu_seconds": time.process_time(),  # this process's, all threads
            }

    def wait(self, distinct: int, timeout: float) -> dict[str, Any]:
        with self.condition:
            self.condition.wait_for(lambda: len(self.by_message_id) >= distinct, timeout)
        return self.stats()

    def ids(self) -> list[list[Any]]:
        with self.condition:
            return [[message_id, event_id, n] for message_id, (event_id, n) in self.by_message_id.items()]


class RecordingDataPlane(FakeDataPlane):
    """FakeDataPlane that asks the recorder how to misbehave and records counts instead of events."""

    def __init__(self, recorder: Recorder, port: int) -> None:
        super().__init__(write_key=WRITE_KEY, port=port)
        self.recorder = recorder

    def _next_misbehaviour(self) -> tuple[str, float] | None:
        planned = super()._next_misbehaviour()  # fail_next() and the like, if anybody used them
        return planned if planned is not None else self.recorder.misbehaviour()

    def _store(self, batch: list[dict[str, Any]]) -> None:
        self.recorder.store(batch)  # not the batch itself: 300,000 events would fill the memory


class Service:
    """The data plane (which can go down and come back on its port) and its control server."""

    def __init__(self, recorder: Recorder, port: int) -> None:
        self.recorder = recorder
        self.lock = threading.Lock()
        self.plane = RecordingDataPlane(recorder, port).start()
        self.port = self.plane._server.server_port
        self.control = ThreadingHTTPServer(("127.0.0.1", 0), _control_handler(self))
        self.control.daemon_threads = True
        self.control_thread = threading.Thread(target=self.control.serve_forever, args=(0.1,), daemon=True)
        self.control_thread.start()
        self.stopping = threading.Event()

    @property
    def urls(self) -> dict[str, str]:
        return {
            "url": f"http://127.0.0.1:{self.port}",
            "control": f"http://127.0.0.1:{self.control.server_port}",
            "write_key": WRITE_KEY,
        }

    def outage(self, seconds: float) -> None:
        """Stop listening now (connections are refused) and listen again after ``seconds``."""
        with self.lock:
            if self.recorder.down:
                return
            with self.recorder.condition:
                self.recorder.down = True
                self.recorder.outages.append({"down_at": time.monotonic(), "seconds": seconds})
            self.plane.stop()
        threading.Thread(target=self._come_back, args=(seconds,), daemon=True).start()

    def _come_back(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            return
        with self.lock:
            for _ in range(100):  # the port is ours; a bind may fail for a moment after the close
                try:
                    self.plane = RecordingDataPlane(self.recorder, self.port).start()
                    break
                except OSError:
                    time.sleep(0.05)
            with self.recorder.condition:
                self.recorder.down = False
                self.recorder.outages[-1]["up_at"] = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            if not self.recorder.down:
                self.plane.stop()
        self.control.shutdown()
        self.control.server_close()


def _control_handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            if parts.path == "/stats":
                return self._json(service.recorder.stats())
            if parts.path == "/wait":
                distinct = int(query.get("distinct", "0"))
                return self._json(service.recorder.wait(distinct, float(query.get("timeout", "10"))))
            if parts.path == "/ids":
                return self._json(service.recorder.ids())
            if parts.path == "/log":
                with service.recorder.condition:
                    log = list(service.recorder.log)
                return self._json(log)
            return self._json({"error": "not found"}, 404)

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if parts.path == "/reset":
                service.recorder.reset()
                return self._json({"ok": True})
            if parts.path == "/faults":
                faults = json.loads(raw or b"{}")
                with service.recorder.condition:
                    service.recorder.faults.update(
                        {k: float(v) for k, v in faults.items() if k in FAULT_KINDS}
                    )
                return self._json(service.recorder.stats()["faults"])
            if parts.path == "/outage":
                service.outage(float(query.get("seconds", "5")))
                return self._json({"ok": True})
            return self._json({"error": "not found"}, 404)

        def _json(self, value: Any, status: int = 200) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


# -- the parent's side -------------------------------------------------------------------------


class DataPlaneProcess:
    """Start ``dataplane.py`` in a child process; ``with DataPlaneProcess(...) as plane:``.

    The child dies with the ``with`` block (its stdin is closed, then it is killed if it
    lingers), and also by itself if this process dies (its stdin reaches end of file).
    """

    def __init__(
        self,
        *,
        faults: dict[str, float] | None = None,
        hang_seconds: float = 2.0,
        seed: int = 1,
        max_seconds: float = 900.0,
    ) -> None:
        faults = faults or {}
        self.command = [
            sys.executable,
            os.path.abspath(__file__),
            "--hang-seconds",
            str(hang_seconds),
            "--seed",
            str(seed),
            "--max-seconds",
            str(max_seconds),
            *[arg for kind in FAULT_KINDS for arg in (f"--{kind}", str(faults.get(kind, 0.0)))],
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = self.control = self.write_key = ""
        self.session = requests.Session()
        self.final_stats: dict[str, Any] | None = None

    def __enter__(self) -> DataPlaneProcess:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        try:
            line = _read_line(self.process, timeout=30.0)
            if not line:
                raise RuntimeError(f"the data plane process exited with {self.process.wait(5)}")
            urls = json.loads(line)
        except BaseException:
            self._kill()
            raise
        self.url, self.control, self.write_key = urls["url"], urls["control"], urls["write_key"]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()  # the child's signal to stop and print its counts
        try:
            line = _read_line(process, timeout=10.0)
            self.final_stats = json.loads(line) if line else None
        except (TimeoutError, ValueError):
            pass
        self._kill()

    def _kill(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _get(self, path: str, timeout: float = 10.0) -> Any:
        response = self.session.get(self.control + path, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, body: Any = None) -> Any:
        response = self.session.post(self.control + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return self._get("/stats")  # type: ignore[no-any-return]

    def wait(self, distinct: int, timeout: float) -> dict[str, Any]:
        """The counts once ``distinct`` messageIds are stored, or after ``timeout`` seconds."""
        return self._get(f"/wait?distinct={distinct}&timeout={timeout}", timeout=timeout + 10)  # type: ignore[no-any-return]

    def ids(self) -> list[list[Any]]:
        return self._get("/ids", timeout=60)  # type: ignore[no-any-return]

    def log(self) -> list[list[Any]]:
        """``[[monotonic time, outcome, events stored], ...]`` for every request, in order."""
        return self._get("/log", timeout=60)  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._post("/reset")

    def set_faults(self, **faults: float) -> None:
        self._post("/faults", faults)

    def outage(self, seconds: float) -> None:
        self._post(f"/outage?seconds={seconds}")


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of the child's stdout, waiting at most ``timeout`` seconds."""
    lines: queue.Queue[bytes] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"the data plane process said nothing within {timeout:g} s") from None
    return line.decode().strip()  # "" when the process closed its output (it exited)


# -- shared by the scripts ---------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: numbers right-aligned, everything else left-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(values: list[str], raw: list[Any]) -> str:
        out = []
        for value, width, original in zip(values, widths, raw):
            numeric = (
                isinstance(original, (int, float)) or value.replace(".", "", 1).replace(",", "").isdigit()
            )
            out.append(value.rjust(width) if numeric else value.ljust(width))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(list(headers), list(headers)), rule, *(line(c, r) for c, r in zip(cells, rows))])


def repo_state() -> str:
    """The commit measured, and whether the library had uncommitted changes (the lead works on it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "flask_cio_rudder"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{commit or 'unknown'}" + (" + uncommitted changes in flask_cio_rudder/" if dirty else "")


# -- the child's side --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free loopback port")
    for kind, what in zip(FAULT_KINDS, ("answer 500", "answer 429", "hang", "reset the connection")):
        parser.add_argument(f"--{kind}", type=float, default=0.0, help=f"probability to {what}")
    parser.add_argument("--hang-seconds", type=float, default=2.0, help="how long a hang lasts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop after this long anyway")
    args = parser.parse_args(argv)

    faults = {kind: getattr(args, kind) for kind in FAULT_KINDS}
    service = Service(Recorder(faults, args.hang_seconds, args.seed), args.port)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())

    def stdin_closed() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(4096):
                pass
        done.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    print(json.dumps(service.urls), flush=True)
    try:
        done.wait(args.max_seconds)
    finally:
        service.stop()
        stats = service.recorder.stats()
        with contextlib.suppress(OSError):
            print(json.dumps(stats), flush=True)
        if sys.stdout.isatty() or os.environ.get("DATAPLANE_SUMMARY"):
            print(f"requests: {stats['requests']}, stored: {stats['stored']}, distinct: {stats['distinct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
