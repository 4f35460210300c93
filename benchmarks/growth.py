"""Growth: the webhook path and the sender with 10k, 100k and 1M events waiting in the outbox.

    python benchmarks/growth.py            # the full run: about 3 to 5 minutes, writes benchmarks/growth.png
    python benchmarks/growth.py --quick    # a smoke run (1k and 10k): about half a minute

For each backlog the outbox is filled afresh, straight into its SQLite schema (the
library's own, created by ``flask_cio_rudder.outbox.Outbox``), with pending rows
whose payloads are the library's transform of the sample events. Then:

(a) the webhook path, with the background sender off so the backlog stays put:
    gunicorn (2 sync workers, as in ``webhook.py``) and wrk with ``webhook.lua``,
    distinct signed bodies; a paced run (each connection waits 20 ms between
    requests: the latency of one request at a modest rate) and a saturating run
    (as many requests as the workers take: throughput and queueing);
(b) the drain, once the rows (a) added are deleted again so that it starts from the
    backlog: ``Sender.flush()`` in a fresh process posting to a RudderStack-compatible
    data plane in another process, for a bounded window; events/s;
(c) the outbox on disk (the database and its ``-wal``), after the fill and after (a) and (b);
(d) the RSS of the draining process at the start and the end of the window (and its
    peak), read from /proc/self/status.

Prints a table and writes a plot (``--plot``, default benchmarks/growth.png).
Needs: wrk, gunicorn, matplotlib (for the plot only). Sends traffic only to
127.0.0.1, stops every process it starts (Ctrl-C included), writes to a
temporary directory (about 1 GB at the 1M step, removed at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # after the path above, so the script runs from anywhere
import webhook

DEFAULT_PLOT = apps.HERE / "growth.png"
FILL_CHUNK = 50_000  # rows per transaction while filling


# -- filling the outbox ---------------------------------------------------------------------------


def payload_templates() -> list[str]:
    """The library's RudderStack event for each sample, with the event id and messageId as placeholders."""
    from flask_cio_rudder.transform import load_event

    templates = []
    for index, sample in enumerate(apps.load_samples()):
        body = dict(sample, event_id=apps.event_id("TMPLTE", index))
        event = load_event(body)
        message_id = event.payload["messageId"]
        templates.append(event.payload_json.replace(body["event_id"], "\0E").replace(message_id, "\0M"))
    return templates


def fill(path: Path, count: int, tag: str) -> float:
    """Add ``count`` pending events to the outbox at ``path`` (the library's schema); seconds taken."""
    from flask_cio_rudder.outbox import Outbox
    from flask_cio_rudder.transform import MESSAGE_ID_NAMESPACE

    started = time.monotonic()
    Outbox(str(path)).close()  # the library's schema, WAL mode
    templates = payload_templates()
    now = time.time()

    def rows() -> Iterator[tuple[str, str, float]]:
        for index in range(count):
            event_id = apps.event_id(tag, index)
            message_id = str(uuid.uuid5(MESSAGE_ID_NAMESPACE, event_id))
            payload = templates[index % len(templates)].replace("\0E", event_id).replace("\0M", message_id)
            # Oldest first, all well inside CIO_RUDDER_OUTBOX_MAX_AGE (7 days).
            yield event_id, payload, now - 3600 - 1 + index * 3600 / count

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # a fill, not the measured path
        source = rows()
        while True:
            chunk = [row for _, row in zip(range(FILL_CHUNK), source)]
            if not chunk:
                break
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO events (event_id, state, payload, accepted_at) VALUES (?, 'pending', ?, ?)",
                chunk,
            )
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.monotonic() - started


# -- the drain, in its own process ----------------------------------------------------------------


def drain_child(outbox: str, url: str, seconds: float) -> None:
    """``growth.py _drain``: flush the outbox to ``url`` for ``seconds``; print what happened as JSON."""
    os.environ.update(
        {
            "CIO_RUDDER_OUTBOX_PATH": outbox,
            "CIO_RUDDER_DATA_PLANE_URL": url,
            "CIO_RUDDER_OUTBOX_SENDER": "false",
        }
    )
    from flask_cio_rudder import get_outbox

    app = apps.create_ext_app()
    forwarder = get_outbox(app)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append(apps.vm_rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    rss_start = apps.vm_rss_kib()
    sampler.start()
    started = time.monotonic()
    claimed = forwarder.flush(seconds)
    elapsed = time.monotonic() - started
    rss_end = apps.vm_rss_kib()
    stop.set()
    sampler.join()
    status = forwarder.status()
    print(
        json.dumps(
            {
                "claimed": claimed,
                "elapsed": elapsed,
                "rss_start_kib": rss_start,
                "rss_end_kib": rss_end,
                "rss_max_kib": max([rss_start, rss_end, *samples]),
                "pending": status.pending,
                "delivered": status.delivered,
                "dead": status.dead,
                "last_error": status.last_error,
            }
        ),
        flush=True,
    )


def drain(outbox: Path, plane: apps.DataPlaneProcess, seconds: float) -> dict[str, Any]:
    before = plane.count()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_drain", str(outbox), plane.url, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=seconds + 120)
    finally:
        apps.stop_process(process)
    if process.returncode != 0:
        raise RuntimeError(f"the drain process failed ({process.returncode})")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    after = plane.count()
    result["plane_events"] = after[0] - before[0]
    result["plane_requests"] = after[1] - before[1]
    return result


def trim(outbox: Path, filled_at: float) -> None:
    """Delete the events the webhook runs added (all accepted after the fill): back to the backlog."""
    db = sqlite3.connect(outbox, isolation_level=None, timeout=30)
    try:
        db.execute("DELETE FROM events WHERE state = 'pending' AND accepted_at > ?", (filled_at,))
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def reset_delivered(outbox: Path) -> None:
    """Make delivered events pending again (before a second try of the drain)."""
    db = sqlite3.connect(outbox, isolation_level=None, timeout=30)
    try:
        db.execute(
            "UPDATE events SET state = 'pending', delivered_at = NULL, attempts = 0 WHERE state = 'delivered'"
        )
    finally:
        db.close()


def quietest(measure: Callable[[], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """``measure()``, run again (``--noise-retries`` times) while other processes used too much CPU."""
    numbers = measure()
    for _ in range(args.noise_retries):
        if numbers["others_cores"] <= args.noise_limit:
            break
        print(f"            (other processes used {numbers['others_cores']:.2f} cores: once more)")
        again = measure()
        numbers = min(numbers, again, key=lambda n: n["others_cores"])
    return numbers


# -- one backlog ----------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, workdir: Path, plane: apps.DataPlaneProcess, backlog: int
) -> dict[str, Any]:
    outbox = workdir / f"outbox-{backlog}.sqlite3"
    result: dict[str, Any] = {"backlog": backlog}
    result["fill_seconds"] = fill(outbox, backlog, apps.new_tag())
    result["filled_at"] = time.time()
    result["size_after_fill"] = apps.file_sizes(outbox)
    print(
        f"  {backlog:>9,} pending: filled in {result['fill_seconds']:.1f} s, "
        f"{sum(result['size_after_fill']) / 2**20:.0f} MiB",
        flush=True,
    )

    # (a) The webhook path with the sender off: one paced run, then saturating runs (median of
    # them). After each run the events it added are deleted, so every run starts at the backlog.
    env = {
        "CIO_RUDDER_DATA_PLANE_URL": plane.url,
        "CIO_RUDDER_OUTBOX_PATH": str(outbox),
        "CIO_RUDDER_OUTBOX_SENDER": "false",
    }
    bodies = workdir / f"bodies-{backlog}.txt"
    server = apps.Gunicorn(
        "apps:create_ext_app()", env, workdir / f"gunicorn-{backlog}.log", workers=args.workers
    )
    result["pending_during_requests"] = []
    saturated = []

    def webhook_run(paced: bool) -> dict[str, float]:
        """One wrk run on fresh bodies, measuring others' CPU meanwhile; the rows it added deleted after."""
        if paced:  # at most 4 connections x 50 requests/s
            apps.write_bodies_file(bodies, 250 * args.paced_seconds + 100, apps.new_tag())
        else:
            apps.write_bodies_file(bodies, args.max_rate * args.saturated_seconds, apps.new_tag())
        if args.quiet_wait:
            apps.wait_until_quiet(args.quiet_wait)
        meter = apps.OthersMeter([server.process.pid, *server.worker_pids(), plane.process.pid])
        if paced:
            numbers = webhook.run_wrk(server.url, bodies, args.paced_seconds, 4, 1, pace_ms=20)
        else:
            numbers = webhook.run_wrk(server.url, bodies, args.saturated_seconds, 8, 2)
        numbers["others_cores"] = meter.cores()
        result["pending_during_requests"].append(apps.outbox_counts(outbox).get("pending", 0))
        trim(outbox, result["filled_at"])
        print(
            f"            webhook {'paced' if paced else 'saturated':<9} "
            f"{numbers['requests']:>6.0f} requests, "
            f"{numbers['requests'] / numbers['duration_us'] * 1e6:6.0f} req/s, "
            f"p50 {numbers['p50_us'] / 1000:6.2f} ms, p99 {numbers['p99_us'] / 1000:6.2f} ms, "
            f"others {numbers['others_cores']:.2f} cores"
            + (f", {numbers['errors_status']:.0f} errors" if numbers["errors_status"] else ""),
            flush=True,
        )
        return numbers

    try:
        for run in range(1 + args.saturated_runs):
            numbers = quietest(functools.partial(webhook_run, paced=run == 0), args)
            if run == 0:
                result["paced"] = numbers
            else:
                saturated.append(numbers)
    finally:
        server.stop()
    result["saturated"] = {
        "rps": statistics.median(n["requests"] / n["duration_us"] * 1e6 for n in saturated),
        "p50_us": statistics.median(n["p50_us"] for n in saturated),
        "p99_us": statistics.median(n["p99_us"] for n in saturated),
        "rps_each": [n["requests"] / n["duration_us"] * 1e6 for n in saturated],
        "others_each": [n["others_cores"] for n in saturated],
        "p99_us_each": [n["p99_us"] for n in saturated],
    }
    trim(outbox, result["filled_at"])
    result["pending_before_drain"] = apps.outbox_counts(outbox).get("pending", 0)

    # (b) and (d): the drain, in a fresh process.
    def drain_run() -> dict[str, Any]:
        reset_delivered(outbox)  # a second try starts from the same backlog
        if args.quiet_wait:
            apps.wait_until_quiet(args.quiet_wait)
        meter = apps.OthersMeter([plane.process.pid])
        numbers = drain(outbox, plane, args.drain_seconds)
        numbers["others_cores"] = meter.cores()
        return numbers

    result["drain"] = quietest(drain_run, args)
    result["size_after_drain"] = apps.file_sizes(outbox)
    d = result["drain"]
    print(
        f"            drain {d['claimed']:,} events in {d['elapsed']:.1f} s "
        f"= {d['claimed'] / d['elapsed']:,.0f}/s "
        f"(data plane stored {d['plane_events']:,} in {d['plane_requests']:,} requests), "
        f"RSS {d['rss_start_kib'] / 1024:.0f} -> {d['rss_end_kib'] / 1024:.0f} MiB, "
        f"others {d['others_cores']:.2f} cores",
        flush=True,
    )
    for path in (outbox, Path(f"{outbox}-wal"), Path(f"{outbox}-shm"), bodies):
        path.unlink(missing_ok=True)
    return result


# -- report ---------------------------------------------------------------------------------------


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


def report(results: list[dict[str, Any]]) -> str:
    latency_rows, drain_rows, disk_rows = [], [], []
    for r in results:
        paced, saturated, d = r["paced"], r["saturated"], r["drain"]
        latency_rows.append(
            [
                f"{r['backlog']:,}",
                f"{max(r['pending_during_requests']):,}",
                f"{paced['requests']:,.0f}",
                f"{paced['p50_us'] / 1000:.2f}",
                f"{paced['p99_us'] / 1000:.2f}",
                f"{saturated['rps']:,.0f}",
                f"{saturated['p50_us'] / 1000:.2f}",
                f"{saturated['p99_us'] / 1000:.2f}",
                " / ".join(f"{x:,.0f}" for x in saturated["rps_each"]),
                " / ".join(f"{x / 1000:.1f}" for x in saturated["p99_us_each"]),
                " / ".join(f"{x:.2f}" for x in [paced["others_cores"], *saturated["others_each"]]),
            ]
        )
        rate = d["claimed"] / d["elapsed"] if d["elapsed"] else 0.0
        drain_rows.append(
            [
                f"{r['pending_before_drain']:,}",
                f"{d['claimed']:,}",
                f"{d['elapsed']:.1f}",
                f"{rate:,.0f}",
                f"{d['plane_events'] / d['plane_requests']:.0f}" if d["plane_requests"] else "-",
                f"{d['pending']:,}",
                f"{d['rss_start_kib'] / 1024:.1f}",
                f"{d['rss_end_kib'] / 1024:.1f}",
                f"{d['rss_max_kib'] / 1024:.1f}",
                f"{d['others_cores']:.2f}",
            ]
        )
        db, wal = r["size_after_fill"]
        db2, wal2 = r["size_after_drain"]
        disk_rows.append(
            [
                f"{r['backlog']:,}",
                f"{r['fill_seconds']:.1f}",
                mib(db),
                mib(wal),
                f"{db / r['backlog']:,.0f}",
                mib(db2),
                mib(wal2),
            ]
        )
    return "\n\n".join(
        [
            "(a) The webhook path, background sender off (gunicorn -w 2 sync; paced: wrk -t1 -c4, 20 ms "
            "between requests on each connection; saturated: wrk -t2 -c8, the median of several runs; "
            "the events each run adds are deleted after it)\n\n"
            + apps.table(
                [
                    "backlog",
                    "most pending during (a)",
                    "paced requests",
                    "paced p50 ms",
                    "paced p99 ms",
                    "saturated req/s (median)",
                    "saturated p50 ms (median)",
                    "saturated p99 ms (median)",
                    "saturated req/s of each run",
                    "saturated p99 ms of each run",
                    "other processes' CPU, cores (paced / saturated runs)",
                ],
                latency_rows,
            ),
            "(b) The drain, Sender.flush() in a fresh process to a data plane in another process; "
            "(d) that process's RSS\n\n"
            + apps.table(
                [
                    "pending at start",
                    "sent",
                    "seconds",
                    "events/s",
                    "events/batch",
                    "pending after",
                    "RSS start MiB",
                    "RSS end MiB",
                    "RSS peak MiB",
                    "other processes' CPU (cores)",
                ],
                drain_rows,
            ),
            "(c) The outbox on disk\n\n"
            + apps.table(
                [
                    "backlog",
                    "fill s",
                    "db MiB after fill",
                    "wal MiB after fill",
                    "bytes/event",
                    "db MiB after (a)+(b)",
                    "wal MiB after (a)+(b)",
                ],
                disk_rows,
            ),
        ]
    )


def plot(results: list[dict[str, Any]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot."
    x = [r["backlog"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(x, [r["paced"]["p50_us"] / 1000 for r in results], "o-", label="paced p50")
    ax.plot(x, [r["paced"]["p99_us"] / 1000 for r in results], "o-", label="paced p99")
    ax.plot(x, [r["saturated"]["p50_us"] / 1000 for r in results], "s--", label="saturated p50 (median)")
    ax.plot(x, [r["saturated"]["p99_us"] / 1000 for r in results], "s--", label="saturated p99 (median)")
    ax.set(title="(a) webhook latency, sender off", ylabel="ms")
    ax = axes[0][1]
    ax.plot(x, [r["drain"]["claimed"] / r["drain"]["elapsed"] for r in results], "o-", label="drain")
    ax.plot(
        x,
        [r["saturated"]["rps"] for r in results],
        "s--",
        label="webhook, saturated (req/s)",
    )
    ax.set(title="(b) drain rate (Sender.flush) and webhook throughput", ylabel="events/s")
    ax = axes[1][0]
    ax.plot(x, [r["size_after_fill"][0] / 2**20 for r in results], "o-", label="db after fill")
    ax.plot(x, [sum(r["size_after_drain"]) / 2**20 for r in results], "s--", label="db + wal after (a)+(b)")
    ax.set(title="(c) outbox on disk", ylabel="MiB", yscale="log")
    ax = axes[1][1]
    for key, label in (("rss_start_kib", "start"), ("rss_end_kib", "end"), ("rss_max_kib", "peak")):
        ax.plot(x, [r["drain"][key] / 1024 for r in results], "o-", label=f"RSS at {label}")
    ax.set(title="(d) draining process RSS", ylabel="MiB")
    ax.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xlabel("pending events in the outbox")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Flask-CIO-Rudder: outbox growth (benchmarks/growth.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"Plot: {path}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (1k and 10k, short windows)")
    parser.add_argument(
        "--backlogs",
        default="10000,100000,1000000",
        help="pending events, comma-separated (default 10k,100k,1M)",
    )
    parser.add_argument(
        "--paced-seconds", type=int, default=10, help="seconds of the paced wrk run (default 10)"
    )
    parser.add_argument(
        "--saturated-seconds", type=int, default=4, help="seconds of each saturating run (default 4)"
    )
    parser.add_argument("--saturated-runs", type=int, default=3, help="saturating runs (default 3)")
    parser.add_argument("--drain-seconds", type=float, default=10, help="the drain window (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--max-rate", type=int, default=6000, help="requests/s to generate bodies for")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each measurement, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.5,
        help="a measurement during which other processes used more cores than this is made again",
    )
    parser.add_argument("--noise-retries", type=int, default=1, help="how many times (default 1; 0: never)")
    parser.add_argument(
        "--plot", type=Path, default=None, help=f"where to write the plot (default {DEFAULT_PLOT})"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.backlogs = "1000,10000"
        args.paced_seconds, args.saturated_seconds, args.drain_seconds, args.quiet_wait = 2, 2, 2, 0
        args.saturated_runs, args.noise_retries = 1, 0
    args.backlogs = [int(value) for value in args.backlogs.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_drain"]:
        drain_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return 0
    args = parse_args(argv)
    webhook.check_tools()
    signal.signal(signal.SIGTERM, webhook._interrupt)
    started = time.monotonic()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cio-rudder-growth-")))
        plane = apps.DataPlaneProcess()
        stack.callback(plane.stop)
        print(
            "Growth: the outbox filled to " + ", ".join(f"{n:,}" for n in args.backlogs) + " pending events"
        )
        revision = apps.library_revision()
        print(f"Library at {revision}; {os.cpu_count()} CPUs", flush=True)
        results = [measure(args, workdir, plane, backlog) for backlog in args.backlogs]
        print()
        if apps.library_revision() != revision:
            print(f"NOTE: the library changed during the run (now {apps.library_revision()})\n")
        print(report(results))
        if args.quick and args.plot is None:
            message = plot(results, workdir / "growth.png")
            print("\n" + message + (" (a --quick run: not kept)" if message.startswith("Plot:") else ""))
        else:
            print("\n" + plot(results, args.plot or DEFAULT_PLOT))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
