"""Delivery: the outbox's sender against rudder-sdk-python, and what each loses.

    python benchmarks/delivery.py            # 50,000 events, 3 rounds: about five minutes
    python benchmarks/delivery.py --quick    # a smoke run: under a minute
    python benchmarks/delivery.py --section senders --postgres-url postgresql://127.0.0.1/test
    python benchmarks/delivery.py --outbox-url postgresql://127.0.0.1/test   # the first three on it

The same events (the six sample email events, each with its own ``event_id``, validated and
transformed as the webhook does), the same data plane in its own process, interleaved rounds:

- **outbox**: the outbox is filled first through the store's public ``add_many`` (timed apart),
  then the clock runs while ``get_outbox(app).flush()`` drains it, until the data plane stored the last.
- **sdk (defaults)**: ``Client.track()`` for each event, then ``flush()``; ``track()`` drops
  events when its queue (10,000) is full, and they are counted.
- **sdk (queue fits)**: the same with a queue big enough for every event.

Then what each loses when the process ends right after handing events over (a normal exit
without ``flush()``, SIGKILL), and while the data plane is down for a while.

**senders**: the drain rate with 1, 2 and 4 ``flask cio-rudder worker`` processes started at
once on a filled outbox, SQLite and PostgreSQL (``--postgres-url``) interleaved: events stored
per second from 10 % to 90 % of them stored, each worker's CPU from its first log line, and
PostgreSQL's server processes' CPU apart (``application_name=cio-rudder-bench``).
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
from rudderstack.analytics import Client  # type: ignore[import-untyped]  # no type hints

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


def run_senders(
    plane: h.DataPlane, events: list[CioEvent], env: dict[str, str], senders: int, logdir: Path
) -> dict[str, Any]:
    """Fill a fresh outbox, start ``senders`` ``flask cio-rudder worker`` processes, time the drain.

    Each worker's CPU is counted from its "Sending the outbox" line; the rate is the steady one,
    from 10 % to 90 % of the events stored, so the workers' start-up and the last batches are not timed.
    """
    with h.open_store(env) as store:
        h.add_events(store, ((e.event_id, e.payload_json) for e in events))
    plane.reset()
    env = {**env, "CIO_RUDDER_DATA_PLANE_URL": plane.url, "CIO_RUDDER_SHUTDOWN_TIMEOUT": "2"}
    logs = [logdir / f"worker-{i}.log" for i in range(senders)]
    db = h.CpuMeter(lambda: h.db_pids(env))
    workers = [h.start_worker(env, log) for log in logs]
    others = h.Others([plane.process.pid, *db.start, *(worker.pid for worker in workers)])
    ready: dict[int, tuple[float, float]] = {}  # pid -> (when, CPU seconds) at its first log line
    try:
        deadline = time.monotonic() + 180
        while (stats := plane.stats())["distinct"] < len(events) and time.monotonic() < deadline:
            for worker, log in zip(workers, logs):
                if worker.pid not in ready and log.exists() and b"Sending the outbox" in log.read_bytes():
                    ready[worker.pid] = (time.monotonic(), h.cpu_seconds([worker.pid]))
            time.sleep(0.01)
        cpu = sum(h.cpu_seconds([pid]) - spent for pid, (_, spent) in ready.items())
        db_cpu, db_pids = db.used()
        others.pids += [pid for pid in db_pids if pid not in db.start]
        cores = others.cores()
    finally:
        for worker in workers:
            h.stop_process(worker)
        for log in logs:
            log.unlink(missing_ok=True)
    starts = [when for when, _ in ready.values()]
    seconds = plane.between(0.1, 0.9) if stats["distinct"] else 0.0
    return {
        "stored": stats["distinct"],
        "rate": 0.8 * stats["distinct"] / seconds if seconds > 0 else float("nan"),
        "cpu_us": cpu / max(stats["distinct"], 1) * 1e6,
        "db_us": db_cpu / max(stats["distinct"], 1) * 1e6,
        "spread": max(starts) - min(starts) if len(starts) == senders else float("nan"),
        "duplicates": stats["duplicates"],
        "others": cores,
    }


def senders_table(results: dict[str, list[dict[str, Any]]]) -> str:
    def med(rs: list[dict[str, Any]], key: str, form: str) -> str:
        return format(h.median([r[key] for r in rs]), form)

    first: dict[str, float] = {}  # each outbox's median rate with the fewest senders
    for label, rs in results.items():
        first.setdefault(label.split(",")[0], h.median([r["rate"] for r in rs]))
    rows = [
        [
            label,
            med(rs, "stored", ",.0f"),
            med(rs, "rate", ",.0f"),
            " / ".join(f"{r['rate']:,.0f}" for r in rs),
            f"{h.median([r['rate'] for r in rs]) / first[label.split(',')[0]]:.2f}",
            med(rs, "cpu_us", ".0f"),
            "-" if label.startswith("SQLite") else med(rs, "db_us", ".0f"),
            med(rs, "duplicates", ",.0f"),
            med(rs, "spread", ".2f"),
            " / ".join(f"{r['others']:.2f}" for r in rs),
        ]
        for label, rs in results.items()
    ]
    headers = ["outbox, senders", "stored", "events/s", "each round", "vs fewest", "sender CPU µs/event"]
    headers += ["db CPU µs/event", "sent twice", "start spread s", "others' cores"]
    return h.table(headers, rows)


SECTIONS = ("throughput", "losses", "outage", "senders")


def main() -> int:
    if sys.argv[1:2] == ["_child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 events, 1 round, short checks")
    parser.add_argument("--section", action="append", choices=SECTIONS, help="default: all of them")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outbox-url", help="CIO_RUDDER_OUTBOX_URL (a fresh table each round)")
    parser.add_argument("--loss-events", type=int, default=5_000, help="events per loss check")
    parser.add_argument("--outage-rate", type=float, default=2_000, help="events/s handed over meanwhile")
    parser.add_argument("--outage-seconds", type=float, default=8.0, help="how long the data plane is down")
    parser.add_argument("--senders", default="1,2,4", help="senders: worker processes draining at once")
    pg_help = "senders: the PostgreSQL outbox beside SQLite (a fresh table each run); '' for none"
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1/test", help=pg_help)
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.loss_events, args.outage_rate, args.outage_seconds = (
            2_000,
            1,
            300,
            500,
            2,
        )
    sections = args.section or SECTIONS
    started = time.monotonic()
    print(h.header(), flush=True)
    # One "queue is full" warning per dropped event would time the terminal; track() says it dropped.
    logging.getLogger("rudderstack").disabled = True
    events = h.cio_events(args.events, h.new_tag())
    out = []
    with tempfile.TemporaryDirectory(prefix="cio-rudder-delivery-") as tmp:
        workdir, plane, made = Path(tmp), h.DataPlane(), list[dict[str, str]]()

        def outbox(url: str | None = args.outbox_url) -> dict[str, str]:
            made.append(h.outbox_env(url, workdir, str(len(made))))
            return made[-1]

        try:
            if "throughput" in sections:
                out.append(throughput(args, plane, events, outbox))
            if "losses" in sections:
                out.append(
                    f"### What arrives when the process ends right after handing {args.loss_events:,} "
                    "events over\n\n"
                    + h.table(
                        ["what", "exit code", "handed over", "arrived", "lost"],
                        losses(plane, args.loss_events, outbox()),
                    )
                )
            if "outage" in sections:
                rows = outage(plane, events, args.outage_rate, args.outage_seconds, outbox())
                headers = ["sender", "handed over", "arrived", "lost", "last arrival, s after it came back"]
                out.append(
                    f"### The data plane down {args.outage_seconds:g} s while {args.outage_rate:,.0f} "
                    f"events/s are handed over\n\n{h.table(headers, rows)}"
                )
            if "senders" in sections:
                urls = {"SQLite": None, **({"PostgreSQL": args.postgres_url} if args.postgres_url else {})}
                counts = [int(n) for n in args.senders.split(",")]
                labels = {f"{name}, {n} senders": (url, n) for name, url in urls.items() for n in counts}

                def drain(label: str, round_: int) -> dict[str, Any]:
                    url, n = labels[label]
                    r = run_senders(plane, events, outbox(url), n, workdir)
                    h.drop_outbox(made.pop())
                    print(
                        f"  {round_} {label:<24} {r['rate']:8,.0f} events/s  others {r['others']:.2f}",
                        flush=True,
                    )
                    return r

                results = h.interleave(list(labels), args.rounds, drain)
                out.append(
                    f"### Drain rate: {args.events:,} pending events, 1, 2 and 4 `flask cio-rudder worker` "
                    f"processes at once, median of {args.rounds} rounds\n\n{senders_table(results)}"
                )
        finally:
            plane.stop()
            for env in made:
                h.drop_outbox(env)
    print(f"\n{h.header()}\n\n" + "\n\n".join(out) + f"\n\n({time.monotonic() - started:.0f} s)")
    return 0


def throughput(
    args: argparse.Namespace, plane: h.DataPlane, events: list[CioEvent], outbox: Callable[[], dict[str, str]]
) -> str:
    variants: dict[str, Callable[[], dict[str, Any]]] = {
        "outbox": lambda: run_outbox(plane, events, outbox()),
        "sdk (defaults)": lambda: run_sdk(plane, events, 10_000),
        "sdk (queue fits)": lambda: run_sdk(plane, events, len(events) + 1),
    }
    run_outbox(plane, events[:1000], outbox())  # warm up
    results = h.interleave(list(variants), args.rounds, lambda name, _: variants[name]())

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
    return (
        f"### Throughput: {args.events:,} events, median of {args.rounds} rounds\n\n"
        + h.table(["sender", "stored", "dropped", "events/s", "each round", "outbox / this"], rows)
        + f"\n\n(filling the outbox, timed apart: {args.events / fill:,.0f} events/s, add_many)"
    )


if __name__ == "__main__":
    h.main_guard(main)
