"""Delivery: the outbox's sender against rudder-sdk-python, and what each loses.

    python benchmarks/delivery.py            # 50,000 events, 3 rounds: a minute or two
    python benchmarks/delivery.py --quick    # a smoke run: a few seconds
    python benchmarks/delivery.py --outbox-url postgresql://127.0.0.1/test

The same events (the six sample email events, each with its own ``event_id``, validated and
transformed as the webhook does), the same data plane in its own process, interleaved rounds:

- **outbox**: the outbox is filled first through the store's public ``add_many`` (timed apart), then the
  clock runs while ``get_outbox(app).flush()`` drains it, until the data plane stored the last.
- **sdk (defaults)**: ``Client.track()`` for each event, then ``flush()``; ``track()`` drops
  events when its queue (10,000) is full, and they are counted.
- **sdk (queue fits)**: the same with a queue big enough for every event.

Then what each loses when the process ends right after handing events over (a normal exit
without ``flush()``, SIGKILL), and while the data plane is down for a while.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path
from rudderstack.analytics import Client

from flask_cio_rudder import CioEvent, Outbox, get_outbox


def track(client: Client, event: CioEvent) -> bool:
    """``track()`` with the same event, ids and messageId the outbox sends; False if dropped."""
    p = event.payload
    ok, _ = client.track(
        user_id=p.get("userId"),
        event=p["event"],
        properties=p["properties"],
        context=dict(p["context"]),
        timestamp=event.timestamp,
        integrations=dict(p["integrations"]),
        message_id=p["messageId"],
    )
    return bool(ok)


def run_outbox(plane: h.DataPlane, events: list[CioEvent], outbox: Mapping[str, str]) -> dict[str, Any]:
    with h.app_here({**outbox, "CIO_RUDDER_DATA_PLANE_URL": plane.url}) as app:
        started = time.monotonic()
        h.add_events(get_outbox(app).store, ((e.event_id, e.payload_json) for e in events))
        fill = time.monotonic() - started
        plane.reset()
        started = time.monotonic()
        deadline = started + 180
        while get_outbox(app).status().pending and time.monotonic() < deadline:
            get_outbox(app).flush(deadline - time.monotonic())
        stats = plane.wait(len(events), 30)
    return {
        "stats": stats,
        "seconds": (stats["last_store_at"] or started) - started,
        "dropped": 0,
        "fill": fill,
    }


def run_sdk(plane: h.DataPlane, events: list[CioEvent], queue: int) -> dict[str, Any]:
    client = Client(plane.write_key, host=plane.url, max_queue_size=queue)
    plane.reset()
    started = time.monotonic()
    dropped = sum(not track(client, event) for event in events)
    client.flush()
    stats = plane.wait(len(events) - dropped, 30)
    client.join()
    return {"stats": stats, "seconds": (stats["last_store_at"] or started) - started, "dropped": dropped}


def child(kind: str, url: str, count: int, outbox: dict[str, str]) -> None:
    """``delivery.py _child``: hand ``count`` events over, then exit without flushing or SIGKILL."""
    events = h.cio_events(count, h.new_tag())
    if kind == "outbox":
        with h.open_store(outbox) as store:
            h.add_events(store, ((e.event_id, e.payload_json) for e in events))
            os.kill(os.getpid(), signal.SIGKILL)
    client = Client(h.WRITE_KEY, host=url)
    for event in events:
        track(client, event)
    if kind == "sdk-kill":
        os.kill(os.getpid(), signal.SIGKILL)  # else a normal exit: the SDK's atexit hook joins, no flush


def losses(plane: h.DataPlane, count: int, outbox: dict[str, str]) -> list[list[Any]]:
    rows = []
    for kind, what in (
        ("sdk", "sdk: track(), then a normal exit without flush()"),
        ("sdk-kill", "sdk: track(), then SIGKILL"),
        ("outbox", "outbox: add_many(), then SIGKILL; then a new process's sender"),
    ):
        plane.reset()
        argv = [sys.executable, __file__, "_child", kind, plane.url, str(count), json.dumps(outbox)]
        code = subprocess.run(argv, timeout=120, check=False).returncode
        if kind == "outbox":
            with h.app_here({**outbox, "CIO_RUDDER_DATA_PLANE_URL": plane.url}) as app:
                get_outbox(app).flush(60)
        stored = plane.wait(count, 2)["distinct"]
        rows.append([what, code, f"{count:,}", f"{stored:,}", f"{count - stored:,}"])
    return rows


def accept(outbox: Outbox, event: CioEvent) -> None:
    """What the webhook does with an accepted event: add it to the store, wake the sender."""
    outbox.store.add(event.event_id, event.payload_json)
    outbox.sender.wake()


def paced(items: list[CioEvent], per_second: float, hand_over: Callable[[CioEvent], object]) -> int:
    """``hand_over`` each item at ``per_second``, as web requests arrive; how many it refused (False)."""
    started, refused = time.monotonic(), 0
    for number, item in enumerate(items):
        time.sleep(max(0.0, started + number / per_second - time.monotonic()))
        refused += hand_over(item) is False
    return refused


def outage(plane: h.DataPlane, events: list[CioEvent], rate: float, seconds: float, outbox: Any) -> list[Any]:
    """Events handed over at ``rate`` while the data plane is down for ``seconds``, then back."""
    batch, rows = events[: int(rate * seconds)], []
    for name in ("sdk (defaults)", "outbox (background sender)"):
        plane.reset()
        plane.outage(seconds)
        if name.startswith("sdk"):
            client = Client(plane.write_key, host=plane.url)
            dropped = paced(batch, rate, functools.partial(track, client))
            client.flush()
            stats = plane.wait(len(batch), 10)
            client.join()
        else:
            env = {**outbox, "CIO_RUDDER_DATA_PLANE_URL": plane.url, "CIO_RUDDER_OUTBOX_SENDER": "true"}
            with h.app_here(env) as app:
                dropped = paced(batch, rate, functools.partial(accept, get_outbox(app)))
                stats = plane.wait(len(batch), 120)
        stored = stats["distinct"]
        back = stats["outages"][-1].get("up_at", stats["now"])
        lost = f"{len(batch) - stored:,}" + (f" ({dropped:,} dropped by track())" if dropped else "")
        last = (stats["last_store_at"] or back) - back
        rows.append([name, f"{len(batch):,}", f"{stored:,}", lost, f"{last:.1f}"])
    return rows


def main() -> int:
    if sys.argv[1:2] == ["_child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 events, 1 round, short checks")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--outbox-url", help="CIO_RUDDER_OUTBOX_URL, a fresh table each round; default: SQLite"
    )
    parser.add_argument("--loss-events", type=int, default=5_000, help="events per loss check")
    parser.add_argument("--outage-rate", type=float, default=2_000, help="events/s handed over meanwhile")
    parser.add_argument("--outage-seconds", type=float, default=8.0, help="how long the data plane is down")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.loss_events, args.outage_rate, args.outage_seconds = (
            2_000,
            1,
            300,
            500,
            2,
        )
    started = time.monotonic()
    print(h.header(), flush=True)
    # One "queue is full" warning per dropped event would time the terminal; track() says it dropped.
    logging.getLogger("rudderstack").disabled = True
    events = h.cio_events(args.events, h.new_tag())
    with tempfile.TemporaryDirectory(prefix="cio-rudder-delivery-") as tmp:
        workdir, plane, made = Path(tmp), h.DataPlane(), list[dict[str, str]]()

        def outbox() -> dict[str, str]:
            made.append(h.outbox_env(args.outbox_url, workdir, str(len(made))))
            return made[-1]

        variants: dict[str, Callable[[], dict[str, Any]]] = {
            "outbox": lambda: run_outbox(plane, events, outbox()),
            "sdk (defaults)": lambda: run_sdk(plane, events, 10_000),
            "sdk (queue fits)": lambda: run_sdk(plane, events, len(events) + 1),
        }
        try:
            run_outbox(plane, events[:1000], outbox())  # warm up
            results = h.interleave(list(variants), args.rounds, lambda name, _: variants[name]())
            loss_rows = losses(plane, args.loss_events, outbox())
            outage_rows = outage(plane, events, args.outage_rate, args.outage_seconds, outbox())
        finally:
            plane.stop()
            for env in made:
                h.drop_outbox(env)

    def rate(r: dict[str, Any]) -> float:
        return float(r["stats"]["distinct"]) / float(r["seconds"])

    outbox_rate = h.median([rate(r) for r in results["outbox"]])
    rows = [
        [
            name,
            f"{h.median([r['stats']['distinct'] for r in rs]):,.0f}",
            f"{h.median([r['dropped'] for r in rs]):,.0f}",
            f"{h.median([rate(r) for r in rs]):,.0f}",
            " / ".join(f"{rate(r):,.0f}" for r in rs),
            f"{outbox_rate / h.median([rate(r) for r in rs]):.2f}",
        ]
        for name, rs in results.items()
    ]
    fill = h.median([r["fill"] for r in results["outbox"]])
    print(f"\n{h.header()}\n\n### Throughput: {args.events:,} events, median of {args.rounds} rounds\n")
    print(h.table(["sender", "stored", "dropped", "events/s", "each round", "outbox / this"], rows))
    print(f"\n(filling the outbox, timed apart: {args.events / fill:,.0f} events/s, add_many)")
    print(f"\n### What arrives when the process ends right after handing {args.loss_events:,} events over\n")
    print(h.table(["what", "exit code", "handed over", "arrived", "lost"], loss_rows))
    print(
        f"\n### The data plane down {args.outage_seconds:g} s while {args.outage_rate:,.0f} events/s "
        "are handed over\n"
    )
    print(
        h.table(
            ["sender", "handed over", "arrived", "lost", "last arrival, s after it came back"], outage_rows
        )
    )
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    h.main_guard(main)
