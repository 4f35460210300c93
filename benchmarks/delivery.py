"""Delivery throughput against the official SDK (``rudder-sdk-python``).

The same events (the six sample email events of ``tests/samples``, each with its own
``event_id``, turned into RudderStack events by ``flask_cio_rudder``'s transform) are
sent to the same RudderStack-compatible server on loopback (``dataplane.py``, in its own
process so that its CPU is not charged to the sender), in interleaved rounds:

* **outbox**: the outbox is filled first (``Outbox.add`` with the event's JSON, as the
  webhook does), then the clock starts and ``Sender.flush`` drains it in batches of 100
  until the data plane has stored every event. Filling is timed apart.
* **sdk (defaults)**: ``rudderstack.analytics.track(...)`` for each event, then ``flush()``,
  with the SDK's defaults (queue of 10,000, batches of 100, gzip). The clock starts before
  the first ``track()`` and stops when the data plane has stored the last event that was
  queued; ``track()`` drops events when the queue is full, and they are counted.
* **sdk (queue fits)**: the same with ``max_queue_size`` = the number of events, so that
  nothing is dropped.

Rates are events stored by the data plane per second of wall time (medians over rounds).
Then what each loses: a process that exits, or is SIGKILLed, right after handing over its
events. Run from the repository root::

    python benchmarks/delivery.py            # 50,000 events, 3 rounds, a few minutes
    python benchmarks/delivery.py --quick    # a smoke run of a few seconds

Needs ``flask_cio_rudder`` importable (``pip install -e .``) and ``rudder-sdk-python``.
Sends traffic only to 127.0.0.1; cleans up its processes and temporary files.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import logging
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.append(str(ROOT))

from flask import Flask  # noqa: E402

from flask_cio_rudder.outbox import Outbox  # noqa: E402
from flask_cio_rudder.rudderstack import DataPlane  # noqa: E402
from flask_cio_rudder.sender import Sender  # noqa: E402
from flask_cio_rudder.transform import load_event  # noqa: E402

sys.path.insert(0, str(HERE))
from dataplane import DataPlaneProcess, repo_state, table  # noqa: E402

SAMPLES = ROOT / "tests" / "samples"
METRICS = ["delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed"]
SENDER_TIMEOUT = (3.0, 10.0)  # the outbox sender's default (connect, read) timeout
WAIT = 180.0  # seconds: the most any one round may wait for the data plane


# -- events --------------------------------------------------------------------------------------


def make_events(count: int, tag: str = "bench") -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` (event_id, payload JSON, payload) from the six samples, each with its own event_id."""
    samples = [json.loads((SAMPLES / f"email_{metric}.json").read_text()) for metric in METRICS]
    events = []
    for number in range(count):
        body = json.loads(json.dumps(samples[number % len(samples)]))
        body["event_id"] = f"{tag}-{number:07d}"
        event = load_event(body)
        events.append((event.event_id, event.payload_json, event.payload))
    return events


def sdk_calls(events: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ``track()`` arguments that carry each RudderStack event, built fresh (the SDK edits them)."""
    calls = []
    for _, _, payload in events:
        calls.append(
            {
                "user_id": payload.get("userId"),
                "anonymous_id": payload.get("anonymousId"),
                "event": payload["event"],
                "properties": payload.get("properties", {}),
                "context": dict(payload["context"]),
                "timestamp": datetime.fromisoformat(payload["originalTimestamp"].replace("Z", "+00:00")),
                "integrations": dict(payload["integrations"]),
                "message_id": payload["messageId"],  # the same ids on both sides: counted alike
            }
        )
    return calls


# -- the SDK -------------------------------------------------------------------------------------


class _DropCounter(logging.Handler):
    """Counts the SDK's "queue is full" warnings: one per event ``track()`` dropped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.dropped = 0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "queue is full" in message:
            self.dropped += 1
        elif len(self.errors) < 5:
            self.errors.append(message[:200])


def sdk_module(plane_url: str, write_key: str, max_queue_size: int | None) -> Any:
    """``rudderstack.analytics`` set up as its docs say, with a fresh default client."""
    import rudderstack.analytics as rudder_analytics

    rudder_analytics.write_key = write_key
    rudder_analytics.dataPlaneUrl = plane_url
    rudder_analytics.max_queue_size = max_queue_size or rudder_analytics.Client.DefaultConfig.max_queue_size
    rudder_analytics.default_client = None
    return rudder_analytics


def _in_thread(function: Callable[[], object], timeout: float) -> bool:
    """Run ``function`` in a daemon thread; whether it returned within ``timeout`` (SDK flush can hang)."""
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def run_sdk(plane: DataPlaneProcess, events: list[Any], max_queue_size: int | None) -> dict[str, Any]:
    analytics = sdk_module(plane.url, plane.write_key, max_queue_size)
    drops = _DropCounter()
    logger = logging.getLogger("rudderstack")
    logger.addHandler(drops)
    logger.propagate = False  # 40,000 "queue is full" lines on the terminal would measure the terminal
    calls = sdk_calls(events)
    plane.reset()
    gc.collect()
    try:
        cpu0, started = time.process_time(), time.monotonic()
        for call in calls:
            analytics.track(**call)
        enqueued = time.monotonic()
        flushed = _in_thread(analytics.flush, WAIT)
        cpu = time.process_time() - cpu0
        expected = len(events) - drops.dropped
        stats = plane.wait(expected, 30.0)
        stopped = _in_thread(analytics.join, 10.0)  # pauses the consumer thread
    finally:
        logger.removeHandler(drops)
        logger.propagate = True
        analytics.default_client = None
    last = stats["last_store_at"] or time.monotonic()
    return {
        "stored": stats["distinct"],
        "sent": len(events),
        "dropped": drops.dropped,
        "complete": stats["distinct"] >= expected and flushed,
        "seconds": last - started,
        "enqueue_seconds": enqueued - started,
        "cpu": cpu,
        "requests": stats["requests"],
        "duplicates": stats["duplicates"],
        "notes": ("" if flushed else "flush() did not return; ")
        + ("" if stopped else "join() hung; ")
        + "; ".join(drops.errors),
    }


# -- the outbox ----------------------------------------------------------------------------------


class _Timed:
    """Wall time spent in some methods of the sender's collaborators (two clock reads per call)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, name: str, label: str) -> None:
        method = getattr(obj, name)
        self.seconds.setdefault(label, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        setattr(obj, name, timed)


@contextlib.contextmanager
def filled_outbox(events: list[Any]) -> Iterator[tuple[Outbox, float, str]]:
    """A fresh outbox in a temporary directory holding ``events``; yields it and the seconds filling took."""
    directory = tempfile.mkdtemp(prefix="cio-rudder-delivery-")
    path = os.path.join(directory, "outbox.sqlite3")
    outbox = Outbox(path)
    try:
        started = time.monotonic()
        for event_id, payload_json, _ in events:
            outbox.add(event_id, payload_json)
        yield outbox, time.monotonic() - started, path
    finally:
        outbox.close()
        shutil.rmtree(directory, ignore_errors=True)


def drain(plane: DataPlaneProcess, outbox: Outbox, timed: _Timed | None = None) -> tuple[Sender, int, float]:
    """A sender like the app's, flushing ``outbox``; returns it, what it claimed and its wall time."""
    data_plane = DataPlane(plane.url, plane.write_key, SENDER_TIMEOUT)
    sender = Sender(Flask("benchmark"), outbox, lambda: data_plane, batch_size=100)
    if timed is not None:
        timed.wrap(outbox, "claim", "claim (SQLite)")
        timed.wrap(data_plane, "post_batch", "POST /v1/batch (encode, gzip, HTTP)")
        timed.wrap(outbox, "delivered", "mark delivered (SQLite)")
    deadline = time.monotonic() + WAIT
    claimed = 0
    started = time.monotonic()
    while time.monotonic() < deadline:
        sent = sender.flush(deadline - time.monotonic())
        claimed += sent
        if sent == 0 and outbox.status().pending == 0:
            break
    return sender, claimed, time.monotonic() - started


def run_outbox(plane: DataPlaneProcess, events: list[Any]) -> dict[str, Any]:
    with filled_outbox(events) as (outbox, fill_seconds, _):
        plane.reset()
        gc.collect()
        timed = _Timed()
        cpu0, started = time.process_time(), time.monotonic()
        sender, _, _ = drain(plane, outbox, timed)
        cpu = time.process_time() - cpu0
        stats = plane.wait(len(events), 30.0)
        sender.stop()
        status = outbox.status()
    last = stats["last_store_at"] or time.monotonic()
    return {
        "stored": stats["distinct"],
        "sent": len(events),
        "dropped": 0,
        "complete": stats["distinct"] >= len(events) and status.pending == 0,
        "seconds": last - started,
        "fill_seconds": fill_seconds,
        "cpu": cpu,
        "requests": stats["requests"],
        "duplicates": stats["duplicates"],
        "breakdown": timed.seconds,
        "notes": "" if status.delivered == len(events) else f"outbox: {status}",
    }


def profile_outbox(plane: DataPlaneProcess, events: list[Any], top: int) -> str:
    """cProfile of one outbox drain: where the sender's time goes."""
    with filled_outbox(events) as (outbox, _, _):
        plane.reset()
        profiler = cProfile.Profile()
        profiler.enable()
        sender, _, seconds = drain(plane, outbox)
        profiler.disable()
        sender.stop()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in raw.values())

    def where(key: tuple[str, int, str]) -> str:
        filename, line, function = key
        if filename == "~":
            return function
        parts = Path(filename).parts
        for anchor in ("flask_cio_rudder", "requests", "urllib3", "http", "gzip.py", "json", "sqlite3"):
            if anchor in parts:
                return "/".join(parts[parts.index(anchor) :]) + f":{line} {function}"
        return f"{Path(filename).name}:{line} {function}"

    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [
        f"cProfile of one outbox drain of {len(events):,} events: {seconds:.2f} s under the profiler, "
        f"{total:.2f} s of profiled time in this thread and others it saw",
        table(
            ["own time (s)", "share", "cumulative (s)", "calls", "function"],
            [
                [f"{tt:.3f}", f"{100 * tt / total:.1f}%", f"{ct:.3f}", f"{nc:,}", where(key)]
                for key, (_, nc, tt, ct, _) in rows
            ],
        ),
    ]
    return "\n".join(lines)


# -- what each loses -----------------------------------------------------------------------------

CHILD_SDK = """
import os, signal, sys
sys.path[:0] = [{root!r}, {here!r}]
from delivery import make_events, sdk_calls, sdk_module
analytics = sdk_module({url!r}, {write_key!r}, None)
calls = sdk_calls(make_events({count}, "loss"))
for call in calls:
    analytics.track(**call)
print("queued", flush=True)
if {kill!r}:
    os.kill(os.getpid(), signal.SIGKILL)
# else: a normal exit, without flush(): the SDK's atexit hook joins its thread, it does not flush
"""

CHILD_OUTBOX = """
import os, signal, sys
sys.path[:0] = [{root!r}, {here!r}]
from delivery import make_events
from flask_cio_rudder.outbox import Outbox
outbox = Outbox({path!r})
for event_id, payload_json, _ in make_events({count}, "loss"):
    outbox.add(event_id, payload_json)
print("kept", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_child(code: str) -> int:
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        return process.wait(timeout=120)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def loss_checks(plane: DataPlaneProcess, count: int) -> list[list[Any]]:
    """What arrives when the process ends right after handing ``count`` events over."""
    rows = []
    common = {"root": str(ROOT), "here": str(HERE), "url": plane.url, "write_key": plane.write_key}
    for kill, what in ((False, "normal exit, no flush()"), (True, "SIGKILL")):
        plane.reset()
        code = _run_child(CHILD_SDK.format(count=count, kill=kill, **common))
        stored = plane.wait(count, 1.5)["distinct"]  # the child is gone: what was on its way has landed
        rows.append([f"sdk: track() x {count:,}, then {what}", code, f"{stored:,}", f"{count - stored:,}"])

    directory = tempfile.mkdtemp(prefix="cio-rudder-delivery-")
    try:
        path = os.path.join(directory, "outbox.sqlite3")
        code = _run_child(CHILD_OUTBOX.format(count=count, path=path, **common))
        outbox = Outbox(path)
        try:
            pending = outbox.status().pending
            plane.reset()
            sender, _, _ = drain(plane, outbox)
            sender.stop()
            stored = plane.wait(count, 10.0)["distinct"]
        finally:
            outbox.close()
        rows.append(
            [
                f"outbox: add() x {count:,}, then SIGKILL "
                f"({pending:,} pending on disk, sent by the next sender)",
                code,
                f"{stored:,}",
                f"{count - stored:,}",
            ]
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _paced(items: list[Any], per_second: float, handle: Callable[[Any], object]) -> None:
    """``handle`` each item at ``per_second`` (like web requests arriving), not as fast as possible."""
    started = time.monotonic()
    for number, item in enumerate(items):
        ahead = started + number / per_second - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        handle(item)


def _back_up(stats: dict[str, Any], default: float) -> float:
    """When the data plane listened again after its last outage (monotonic time)."""
    outages = stats.get("outages") or [{}]
    return float(outages[-1].get("up_at", default))


def outage_checks(
    plane: DataPlaneProcess, events: list[Any], per_second: float, seconds: float
) -> list[list[Any]]:
    """Events handed over at a modest rate while the data plane is down, then it comes back."""
    count = min(len(events), int(per_second * seconds))
    batch = events[:count]
    rows = []

    analytics = sdk_module(plane.url, plane.write_key, None)
    drops = _DropCounter()
    logger = logging.getLogger("rudderstack")
    logger.addHandler(drops)
    logger.propagate = False
    calls = sdk_calls(batch)
    plane.reset()
    try:
        plane.outage(seconds)
        _paced(calls, per_second, lambda call: analytics.track(**call))
        back = time.monotonic()
        flushed = _in_thread(analytics.flush, WAIT)
        stats = plane.wait(count - drops.dropped, 10.0)
        _in_thread(analytics.join, 10.0)
    finally:
        logger.removeHandler(drops)
        logger.propagate = True
        analytics.default_client = None
    rows.append(
        [
            "sdk (defaults)",
            f"{count:,}",
            f"{stats['distinct']:,}",
            f"{count - stats['distinct']:,}"
            + (f" ({drops.dropped:,} dropped by track())" if drops.dropped else ""),
            f"{(stats['last_store_at'] or back) - _back_up(stats, back):.1f}"
            + ("" if flushed else " (flush() never returned)"),
        ]
    )

    directory = tempfile.mkdtemp(prefix="cio-rudder-delivery-")
    outbox = Outbox(os.path.join(directory, "outbox.sqlite3"))
    data_plane = DataPlane(plane.url, plane.write_key, SENDER_TIMEOUT)
    sender = Sender(Flask("benchmark"), outbox, lambda: data_plane, batch_size=100)
    try:
        sender.ensure_running()  # the background sender, as in the app: woken by each accepted event
        plane.reset()
        plane.outage(seconds)

        def accept(event: Any) -> None:
            outbox.add(event[0], event[1])
            sender.wake()

        _paced(batch, per_second, accept)
        back = time.monotonic()
        stats = plane.wait(count, WAIT)
    finally:
        sender.stop()
        outbox.close()
        shutil.rmtree(directory, ignore_errors=True)
    rows.append(
        [
            "outbox (background sender)",
            f"{count:,}",
            f"{stats['distinct']:,}",
            f"{count - stats['distinct']:,}",
            f"{(stats['last_store_at'] or back) - _back_up(stats, back):.1f}",
        ]
    )
    return rows


# -- the report ----------------------------------------------------------------------------------


def rate(result: dict[str, Any]) -> float:
    return float(result["stored"]) / result["seconds"] if result["seconds"] > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Delivery throughput: the outbox against rudder-sdk-python.")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loss-events", type=int, default=5_000, help="events per 'what is lost' check")
    parser.add_argument("--outage-rate", type=float, default=2_000, help="events/s handed over meanwhile")
    parser.add_argument("--outage-seconds", type=float, default=8.0, help="how long the data plane is down")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile of one outbox drain")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 events, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.loss_events = 2_000, 1, 300
        args.outage_rate, args.outage_seconds = 500, 2.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that cleanup runs

    import rudderstack.analytics as rudder_analytics

    print(
        f"flask_cio_rudder at {repo_state()}; rudder-sdk-python {rudder_analytics.VERSION}; "
        f"Python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
    )
    started = time.monotonic()
    events = make_events(args.events)
    print(f"built {len(events):,} events with load_event() in {time.monotonic() - started:.1f} s")

    variants: list[tuple[str, Callable[[DataPlaneProcess], dict[str, Any]]]] = [
        ("outbox", lambda plane: run_outbox(plane, events)),
        ("sdk (defaults)", lambda plane: run_sdk(plane, events, None)),
        ("sdk (queue fits)", lambda plane: run_sdk(plane, events, len(events) + 1)),
    ]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    with DataPlaneProcess() as plane:
        warm = events[: min(1_000, len(events))]
        run_outbox(plane, warm)
        run_sdk(plane, warm, None)
        for number in range(1, args.rounds + 1):
            for name, run in variants:
                result = run(plane)
                results[name].append(result)
                print(
                    f"round {number} {name:<17} {result['stored']:>7,} stored in {result['seconds']:6.2f} s "
                    f"= {rate(result):8,.0f} events/s"
                    + (f", {result['dropped']:,} dropped by track()" if result["dropped"] else "")
                    + ("" if result["complete"] else "  INCOMPLETE")
                    + (f"  [{result['notes']}]" if result["notes"] else ""),
                    flush=True,
                )
        profile = None if args.no_profile else profile_outbox(plane, events[: min(20_000, len(events))], 18)
        losses = loss_checks(plane, args.loss_events)
        outages = outage_checks(plane, events, args.outage_rate, args.outage_seconds)

    print()
    print(f"## Throughput: {args.events:,} events, median of {args.rounds} interleaved round(s)\n")
    rows = []
    outbox_rate = statistics.median(rate(r) for r in results["outbox"])
    for name, _ in variants:
        runs = results[name]
        median_rate = statistics.median(rate(r) for r in runs)
        rows.append(
            [
                name,
                f"{statistics.median(r['stored'] for r in runs):,.0f}",
                f"{statistics.median(r['dropped'] for r in runs):,.0f}",
                f"{statistics.median(r['seconds'] for r in runs):.2f}",
                f"{median_rate:,.0f}",
                " / ".join(f"{rate(r):,.0f}" for r in runs),
                f"{1e6 * statistics.median(r['cpu'] / max(1, r['stored']) for r in runs):.0f}",
                f"{statistics.median(r['requests'] for r in runs):,.0f}",
                f"{outbox_rate / median_rate:.2f}" if median_rate else "-",
            ]
        )
    print(
        table(
            [
                "sender",
                "stored",
                "dropped",
                "seconds",
                "events/s (median)",
                "each round",
                "CPU µs/event",
                "requests",
                "outbox ÷ this",
            ],
            rows,
        )
    )
    fills = [r["fill_seconds"] for r in results["outbox"]]
    fill = statistics.median(fills)
    drain_seconds = statistics.median(r["seconds"] for r in results["outbox"])
    sdk_fit = results["sdk (queue fits)"]
    sdk_total = statistics.median(r["seconds"] for r in sdk_fit)
    print(
        f"\noutbox fill (Outbox.add per event, one commit each, timed apart): median {fill:.2f} s "
        f"= {args.events / fill:,.0f} events/s; fill + drain {fill + drain_seconds:.2f} s "
        f"= {args.events / (fill + drain_seconds):,.0f} events/s against sdk (queue fits) track() + flush() "
        f"{sdk_total:.2f} s = {args.events / sdk_total:,.0f} events/s "
        f"(ratio {sdk_total / (fill + drain_seconds):.2f})"
    )
    print(
        "sdk track() loop alone (enqueue, before flush): median "
        + ", ".join(
            f"{name} {statistics.median(r['enqueue_seconds'] for r in results[name]):.2f} s"
            for name in ("sdk (defaults)", "sdk (queue fits)")
        )
    )
    outbox_runs = results["outbox"]
    labels = list(outbox_runs[0]["breakdown"])
    print("\nWhere the outbox drain's wall time goes (median round, timed around the calls, not profiled):\n")
    print(
        table(
            ["step", "seconds", "share of drain"],
            [
                [
                    label,
                    f"{statistics.median(r['breakdown'][label] for r in outbox_runs):.2f}",
                    f"{statistics.median(r['breakdown'][label] / r['seconds'] for r in outbox_runs):.0%}",
                ]
                for label in labels
            ],
        )
    )
    print(f"\n## What is lost when the process ends right after handing {args.loss_events:,} events over\n")
    default_runs = results["sdk (defaults)"]
    losses.insert(
        0,
        [
            f"sdk (defaults): track() x {args.events:,} as fast as it returns, then flush()",
            "-",
            f"{statistics.median(r['stored'] for r in default_runs):,.0f}",
            f"{statistics.median(r['dropped'] for r in default_runs):,.0f}"
            + (" (dropped by track(): queue full)" if any(r["dropped"] for r in default_runs) else ""),
        ],
    )
    print(table(["scenario", "exit code", "arrived", "lost"], losses))
    print(
        f"\n## The data plane down for {args.outage_seconds:g} s while {args.outage_rate:,.0f} events/s "
        "are handed over, then back\n"
    )
    print(table(["sender", "handed over", "arrived", "lost", "last arrival, s after the outage"], outages))
    if profile is not None:
        print("\n## " + profile)
    print(f"\nwhole run: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
