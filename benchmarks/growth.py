"""Growth: the webhook path and the sender with 10k, 100k and 1M events waiting in the outbox.

    python benchmarks/growth.py            # SQLite, 10k, 100k, 1M: about 5 minutes; writes growth.png
    python benchmarks/growth.py --quick    # 1k and 10k, short windows: about half a minute
    python benchmarks/growth.py --outbox-url sqlite --outbox-url postgresql://127.0.0.1/test  # both

For each backlog a fresh outbox is filled through the store's public ``add_many`` with pending events
(the library's transform of the sample events). Then (a) the webhook path with the sender
off, so the backlog stays: gunicorn -w 2 and wrk, one paced run (4 connections, 20 ms
between requests: one request's latency at a modest rate) and one saturating run (-c8);
(b) the drain: ``get_outbox(app).flush()`` in a fresh process for ``--drain-seconds``,
to the data plane in its own process, with that process's RSS at start, end and peak;
(c) the outbox on disk (SQLite: the file and its ``-wal``; PostgreSQL: ``pg_total_relation_size``
of its tables, read with psql). With several ``--outbox-url`` the outboxes take turns at each
backlog; each is a fresh SQLite file or a fresh table, dropped after. Prints a table, writes a plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path

from flask_cio_rudder import get_outbox
from flask_cio_rudder.transform import message_id


def payloads(count: int, tag: str) -> Iterator[tuple[str, str]]:
    """``count`` (event_id, payload JSON), from templates: the transform of each sample, ids swapped."""
    templates = []
    for event in h.cio_events(6, "TMPLTE"):
        templates.append(
            event.payload_json.replace(event.event_id, "\0E").replace(message_id(event.event_id), "\0M")
        )
    for index in range(count):
        event_id = h.event_id(tag, index)
        yield event_id, templates[index % 6].replace("\0E", event_id).replace("\0M", message_id(event_id))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def drain_child(env: Mapping[str, str], seconds: float) -> None:
    """``growth.py _drain``: flush for ``seconds`` from a fresh process; print what happened as JSON."""
    with h.app_here(env) as app:
        samples, stop = [rss_kib()], threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                samples.append(rss_kib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        sent = get_outbox(app).flush(seconds).delivered
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        end = rss_kib()
        result = {"sent": sent, "elapsed": elapsed, "rss": [samples[0], end, max(*samples, end)]}
        print(json.dumps(result | {"pending": get_outbox(app).status().pending}), flush=True)


def measure(
    args: argparse.Namespace, workdir: Path, plane: h.DataPlane, url: str | None, backlog: int
) -> dict[str, Any]:
    outbox = h.outbox_env(url, workdir, str(backlog))
    name = "SQLite" if h.sqlite_file(outbox) else "PostgreSQL"
    outbox["CIO_RUDDER_DATA_PLANE_URL"] = plane.url
    r: dict[str, Any] = {"backlog": backlog, "outbox": name}
    started = time.monotonic()
    with h.open_store(outbox) as store:
        h.add_events(store, payloads(backlog, h.new_tag()))
    r["fill"], r["bytes_filled"] = time.monotonic() - started, h.outbox_bytes(outbox)
    print(
        f"  {name} {backlog:>9,} pending: filled in {r['fill']:.1f} s ({r['bytes_filled'] / 2**20:,.1f} MiB)",
        flush=True,
    )

    server = h.Gunicorn(
        "harness:ext_app()", {**outbox, "CIO_RUDDER_OUTBOX_SENDER": "false"}, workdir / "g.log"
    )
    try:
        for kind, seconds, connections, threads, pace in (
            ("paced", args.paced_seconds, 4, 1, 20),
            ("saturated", args.saturated_seconds, 8, 2, 0),
        ):
            bodies = workdir / "bodies.txt"
            h.write_signed_bodies(bodies, (250 if pace else args.max_rate) * seconds + 100)
            h.wait_until_quiet(args.quiet_wait)
            assert server.process is not None
            db = h.CpuMeter(lambda: h.db_pids(outbox))  # PostgreSQL's server processes: ours
            others = h.Others([server.process.pid, *server.worker_pids(), plane.process.pid, *db.start])
            r[kind] = h.wrk(server.url, bodies, seconds, connections, threads, pace)
            others.pids += [pid for pid in db.used()[1] if pid not in db.start]
            r[kind]["others"] = others.cores()
            print(
                f"            {kind}: {r[kind]['rps']:,.0f} req/s, p99 {r[kind]['p99_us'] / 1e3:.2f} ms",
                flush=True,
            )
    finally:
        server.stop()

    h.wait_until_quiet(args.quiet_wait)
    plane.reset()
    argv = [sys.executable, __file__, "_drain", json.dumps(outbox), str(args.drain_seconds)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=args.drain_seconds + 300, check=True)
    r["drain"] = json.loads(run.stdout.strip().splitlines()[-1])
    r["bytes_after"] = h.outbox_bytes(outbox)
    d = r["drain"]
    print(
        f"            drain: {d['sent'] / d['elapsed']:,.0f} events/s, RSS {d['rss'][0] // 1024} MiB",
        flush=True,
    )
    h.drop_outbox(outbox)
    return r


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in (("SQLite", "tab:blue"), ("PostgreSQL", "tab:orange")):
        rs = [r for r in results if r["outbox"] == name]
        if not rs:
            continue
        x = [r["backlog"] for r in rs]
        for kind, style in (("paced", "o-"), ("saturated", "s--")):
            y = [r[kind]["p99_us"] / 1e3 for r in rs]
            axes[0].plot(x, y, style, color=color, label=f"{name}, {kind}")
        drain = [r["drain"]["sent"] / r["drain"]["elapsed"] for r in rs]
        axes[1].plot(x, drain, "o-", color=color, label=f"{name}: drain, events/s")
        axes[1].plot(
            x, [r["saturated"]["rps"] for r in rs], "s--", color=color, label=f"{name}: webhook req/s"
        )
        per_event = [r["bytes_filled"] / r["backlog"] for r in rs]
        axes[2].plot(x, per_event, "o-", color=color, label=name)
    axes[0].set(title="webhook p99 latency, sender off", ylabel="ms", ylim=(0, None))
    axes[1].set(title="drain (one sender) and webhook (saturated)", ylabel="per second", ylim=(0, None))
    axes[2].set(title="outbox on disk per pending event", ylabel="bytes", ylim=(0, None))
    for ax in axes:
        ax.set(xscale="log", xlabel="pending events in the outbox")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Flask-CIO-Rudder: outbox growth (benchmarks/growth.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    if sys.argv[1:2] == ["_drain"]:
        drain_child(json.loads(sys.argv[2]), float(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1k and 10k, 2 s windows, no plot")
    parser.add_argument("--backlogs", default="10000,100000,1000000", help="pending events, comma-separated")
    url_help = "CIO_RUDDER_OUTBOX_URL (a fresh table per backlog), or sqlite (a fresh file); repeatable"
    parser.add_argument("--outbox-url", action="append", help=url_help + "; default: sqlite")
    parser.add_argument("--paced-seconds", type=int, default=10)
    parser.add_argument("--saturated-seconds", type=int, default=5)
    parser.add_argument("--drain-seconds", type=float, default=10)
    parser.add_argument("--max-rate", type=int, default=6000, help="req/s to generate distinct bodies for")
    parser.add_argument("--quiet-wait", type=float, default=30, help="at most this long, wait for quiet")
    parser.add_argument("--plot", type=Path, default=h.HERE / "growth.png")
    args = parser.parse_args()
    if args.quick:
        args.backlogs, args.plot = "1000,10000", None
        args.paced_seconds = args.saturated_seconds = args.drain_seconds = 2
        args.quiet_wait = 0
    urls = [None if url in (None, "sqlite") else url for url in args.outbox_url or [None]]
    started = time.monotonic()
    print(h.header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cio-rudder-growth-") as tmp:
        plane = h.DataPlane()
        try:
            results = [
                measure(args, Path(tmp), plane, url, int(n)) for n in args.backlogs.split(",") for url in urls
            ]
        finally:
            plane.stop()
    results.sort(key=lambda r: (r["outbox"] != "SQLite", r["backlog"]))
    rows = [
        [
            r["outbox"],
            f"{r['backlog']:,}",
            f"{r['paced']['requests'] + r['saturated']['requests']:,.0f}",
            f"{r['paced']['p50_us'] / 1e3:.2f}",
            f"{r['paced']['p99_us'] / 1e3:.2f}",
            f"{r['saturated']['rps']:,.0f}",
            f"{r['saturated']['p99_us'] / 1e3:.2f}",
            f"{r['drain']['sent'] / r['drain']['elapsed']:,.0f}",
            " → ".join(f"{kib / 1024:.0f}" for kib in r["drain"]["rss"][:2])
            + f" (peak {r['drain']['rss'][2] / 1024:.0f})",
            f"{r['fill']:.1f}",
            f"{r['bytes_filled'] / 2**20:,.1f}",
            f"{r['bytes_filled'] / r['backlog']:,.0f}",
            f"{r['bytes_after'] / 2**20:,.1f}",
            f"{r['paced']['others']:.2f} / {r['saturated']['others']:.2f}",
        ]
        for r in results
    ]
    headers = ["outbox", "backlog", "added by (a)", "paced p50 ms", "paced p99 ms", "saturated req/s"]
    headers += ["saturated p99 ms", "drain events/s", "drain RSS MiB", "fill s", "disk MiB filled"]
    headers += ["bytes/event", "disk MiB after", "others' cores (paced / saturated)"]
    print(f"\n{h.header()}\n\n{h.table(headers, rows)}")
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    h.main_guard(main)
