"""Reliability: signed webhooks through gunicorn while the data plane fails and gunicorn is killed.

    python benchmarks/faults.py              # 20,000 events: one to three minutes
    python benchmarks/faults.py --quick      # a smoke run: 400 events
    python benchmarks/faults.py --no-faults  # baseline: a healthy data plane, no outage, no kill

The signed sample events, each with its own ``event_id``, are posted to the extension under
gunicorn (2 workers, the outbox, a sender in each) by threads that retry each event until
a 2xx, as Customer.io does (faster: 50 ms doubling to 1 s). Meanwhile the data plane (its
own process) answers 500 or 429, hangs past the sender's timeout (then stores the batch),
or resets the connection, at random; it goes down for ``--outage`` seconds; and gunicorn's
whole process group is SIGKILLed and started again on the same outbox and port. Then the
script waits (bounded) for the outbox to drain and counts: accepted, delivered, dead
letters, lost (must be 0), duplicates on the wire (allowed: at least once), and whether
every ``messageId`` is ``message_id(event_id)``. Exits 1 if an event was lost.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path
import requests

from flask_cio_rudder.testing import encode, signature_headers
from flask_cio_rudder.transform import message_id

#: The app's settings under test: a killed worker's batch is taken over after 3 s, each request
#: to the data plane times out after 1 s, SIGTERM gives the sender 2 s.
SETTINGS = {"CIO_RUDDER_OUTBOX_LEASE": "3", "CIO_RUDDER_TIMEOUT": "1", "CIO_RUDDER_SHUTDOWN_TIMEOUT": "2"}


class Load:
    """Threads that post every body, signed, until each gets a 2xx (like Customer.io, faster)."""

    def __init__(self, url: str, bodies: list[dict[str, Any]], threads: int, deadline: float) -> None:
        self.url, self.deadline, self.lock = url, deadline, threading.Lock()
        self.work: queue.Queue[dict[str, Any]] = queue.Queue()
        for body in bodies:
            self.work.put(body)
        self.answers: dict[str, str] = {}  # event_id -> the status of the 2xx that ended it
        self.attempts: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def run(self) -> None:
        with requests.Session() as session:
            while not self.work.empty():
                body = self.work.get()
                raw, delay = encode(body), 0.05
                while time.monotonic() < self.deadline:
                    outcome = self.post(session, raw)
                    with self.lock:
                        self.attempts[outcome] += 1
                        if outcome.startswith("2xx"):
                            self.answers[body["event_id"]] = outcome[4:]
                            break
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)

    def post(self, session: requests.Session, raw: bytes) -> str:
        headers = {**signature_headers(raw, h.SIGNING_KEY), "Connection": "close"}  # signed per attempt
        try:
            response = session.post(self.url, data=raw, headers=headers, timeout=4.0)  # Customer.io's timeout
        except requests.RequestException as error:
            return f"no answer ({type(error).__name__})"
        if response.ok:
            return f"2xx {response.json().get('status')}"
        return f"HTTP {response.status_code}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="400 events, a 2 s outage")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--outbox-url", help="CIO_RUDDER_OUTBOX_URL, a fresh table; default: a fresh SQLite file"
    )
    parser.add_argument("--threads", type=int, default=4, help="posting threads")
    parser.add_argument("--faults", default="500=0.06,429=0.04,hang=0.03,reset=0.04", help="per request")
    parser.add_argument("--outage", type=float, default=8.0, help="seconds the data plane is down")
    parser.add_argument("--outage-at", type=float, default=0.30, help="when, as a share of events answered")
    parser.add_argument("--kill-at", type=float, default=0.55, help="SIGKILL gunicorn at this share")
    parser.add_argument("--no-faults", action="store_true", help="a healthy data plane, no outage, no kill")
    parser.add_argument("--max-seconds", type=float, default=330.0, help="the whole run stops by then")
    args = parser.parse_args()
    if args.quick:
        args.events, args.outage, args.max_seconds = 400, 2.0, 90.0
    faults = {k: float(v) for k, v in (item.split("=") for item in args.faults.split(","))}
    if args.no_faults:
        faults, args.outage_at, args.kill_at = {}, 2.0, 2.0  # never
    started = time.monotonic()
    deadline = started + args.max_seconds
    print(h.header(), flush=True)

    def note(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {what}", flush=True)

    with tempfile.TemporaryDirectory(prefix="cio-rudder-faults-") as tmp:
        plane = h.DataPlane(faults, hang=1.5, seed=7)
        outbox = h.outbox_env(args.outbox_url, Path(tmp), "faults")
        env = {**SETTINGS, **outbox, "CIO_RUDDER_DATA_PLANE_URL": plane.url}
        server = None
        try:
            server = h.Gunicorn("harness:ext_app()", env, Path(tmp) / "gunicorn.log")
            bodies = h.bodies(args.events, h.new_tag())
            load = Load(server.url, bodies, args.threads, deadline - min(150.0, args.max_seconds / 2))
            note(f"gunicorn up; {args.events:,} events, faults per request {faults}")
            with h.open_store(outbox) as store:  # to read the outbox (no sender here)
                while load.running():
                    done = len(load.answers)
                    if args.outage_at <= 1 and done >= args.outage_at * args.events:
                        args.outage_at = 2.0
                        plane.outage(args.outage)
                        note(f"data plane down for {args.outage:g} s ({done:,} answered)")
                    if args.kill_at <= 1 and done >= args.kill_at * args.events:
                        args.kill_at = 2.0
                        server.kill()
                        note(f"gunicorn SIGKILLed ({done:,} answered); up again after {server.start():.1f} s")
                    time.sleep(0.05)
                note(f"load done: {len(load.answers):,} answered 2xx")
                while (pending := store.status().pending) and time.monotonic() < deadline:
                    time.sleep(0.25)
                note(f"{pending:,} pending in the outbox")
                server.stop()
                status, dead = store.status(), {d.event_id for d in store.dead_letters(10**7)}
            stats, stored = plane.stats(), plane.ids()
        finally:
            if server is not None:
                server.stop()
            plane.stop()
            h.drop_outbox(outbox)

    accepted, delivered = set(load.answers), {event_id for _, event_id, _ in stored}
    lost = sorted(accepted - delivered - dead)
    wrong = [mid for mid, eid, _ in stored if eid is None or mid != message_id(eid)]
    rows = [
        ["events (distinct event_ids)", f"{args.events:,}"],
        *[[f"attempts answered: {outcome}", f"{n:,}"] for outcome, n in sorted(load.attempts.items())],
        *[[f"data plane requests: {outcome}", f"{n:,}"] for outcome, n in sorted(stats["outcomes"].items())],
        ["accepted (event_ids answered 2xx)", f"{len(accepted):,}"],
        ["delivered (distinct messageIds stored)", f"{len(delivered):,}"],
        ["dead letters", f"{len(dead):,}"],
        ["**lost** (accepted, neither delivered nor dead)", f"**{len(lost):,}**"],
        ["duplicate copies on the wire (same messageId)", f"{stats['duplicates']:,}"],
        [
            "messageId == message_id(event_id) for every stored event",
            "yes" if not wrong else f"NO: {len(wrong)}",
        ],
        [
            "outbox at the end: pending / delivered / dead",
            f"{status.pending} / {status.delivered} / {status.dead}",
        ],
    ]
    print(f"\n{h.header()}\n\n{h.table(['what', 'count'], rows)}\n\n({time.monotonic() - started:.0f} s)")
    return 1 if lost or wrong or status.pending else 0


if __name__ == "__main__":
    h.main_guard(main)
