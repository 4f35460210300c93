"""The webhook path: Flask-CIO-Rudder against the route a user writes instead, and bare Flask.

    python benchmarks/webhook.py                  # peer + paced, 3 rounds: about 8 minutes
    python benchmarks/webhook.py --quick          # a smoke run: about a minute
    python benchmarks/webhook.py --scenario down --scenario floor
    python benchmarks/webhook.py --scenario postgres --scenario worker
    python benchmarks/webhook.py --scenario bound --scenario bound-paced   # the design's floor
    python benchmarks/webhook.py --scenario fast --scenario fast-paced     # the opt-in fast path
    python benchmarks/webhook.py --scenario quiet-paced   # the paced tail without moving and sending
    python benchmarks/webhook.py --scenario tail          # requests that background work overlapped
    python benchmarks/webhook.py --scenario relay-paced   # what forwarding from memory alone costs
    python benchmarks/webhook.py --outbox-url postgresql://127.0.0.1/test   # another outbox, same runs
    python benchmarks/webhook.py --scenario paced --against HEAD~3   # and the extension of 3 commits ago

Scenarios (the apps take turns, each round starting one later: A B C, B C A, C A B...; tables
report medians):

- ``peer``: bare Flask (parse the JSON, answer), the SDK route (verify the signature, map the
  body by hand, ``rudder-sdk-python``'s ``track()``, its consumer thread posting from memory)
  and the extension with its defaults (signature, validation, transform, one trivial receiver
  per email signal, the SQLite outbox, a sender in each worker), at full load: wrk -t2 -c8.
- ``paced``: the same three at a moderate load: each connection pauses ``--pace-ms`` before
  each request, so latency is mostly the request's own, not the queue's.
- ``bound`` and ``bound-paced``: the same three and the floor of the extension's design
  (``harness.bound_app``): only the work its guarantees need (signature, decode, the event,
  the duplicate lookup, the spool append, moving and sending in the worker), with the
  extension's own parts, and no schema check, signals or blueprint. Full load, and paced.
- ``down``: the extension with the data plane up, and down (a closed port): the outbox grows.
- ``floor``: bare Flask, bare Flask + one SQLite commit per request, the extension.
- ``postgres``: bare Flask, the extension on SQLite, and on PostgreSQL (``--postgres-url``), with
  its senders in the web workers and with one ``flask cio-rudder worker`` process, at full load.
- ``worker``: bare Flask, the SDK route, the extension's default set-up (a sender in each web
  worker) and the other one: web workers only writing (``CIO_RUDDER_OUTBOX_SENDER = False``),
  one ``flask cio-rudder worker`` process sending, at full load; ``worker-paced``: the same, paced.
- ``fast``: bare Flask, the SDK route, the extension, and the extension with its opt-in fast path
  (``CIO_RUDDER_FAST_PATH``: valid events answered before Flask's request machinery), at full
  load; ``fast-paced``: bare Flask, the SDK route, the fast path with a sender in each web worker
  and with one ``flask cio-rudder worker`` process, and the fast path with no background work at
  all (no spool mover, no sender: ``harness.fast_app(background=False)``), paced.
- ``tail``: where the paced tail comes from. Bare Flask, the extension, and the extension timing
  each request inside its worker (``harness.probed_app``), paced. A last table gives, per round,
  the share of requests that the mover's insert or the sender's post or mark overlapped, the p50
  and p99 inside the worker of those and of the others, and the share of the slowest 1 % that
  were overlapped, beside wrk's p99.
- ``quiet-paced``: what the request path alone costs the paced tail. Bare Flask, the extension,
  and with no spool mover and no sender (their events stay spooled): the extension on Flask's
  route, the floor of its design (``bound_app``) and the fast path, paced.
- ``relay-paced``: what forwarding itself costs the paced tail, nothing kept on disk. Bare
  Flask; the least forwarding receiver (``harness.relay_app``: bare Flask's work, the event
  made with ``transform.build`` and kept in a list that a thread in the worker posts every 0.1
  s with the extension's ``DataPlane``), and the same posting nothing; the SDK route; the
  extension; paced.

Each run: a fresh gunicorn (``-w 2``, sync workers) and a fresh outbox (a new SQLite file, or a
new table dropped after the run), a warm-up wrk run, then the measured one. "app CPU" counts the
gunicorn workers and the worker process, if any; "of it requests'" the workers' main threads,
which serve the requests (the rest is the spool movers' and senders', or the SDK's consumer
threads'); "db CPU" PostgreSQL's server processes that
serve the run's connections (``application_name=cio-rudder-bench``), kept out of "others'".
``--against REV`` adds, beside the extension in each scenario that has it, the extension as it
was at commit ``REV`` (a git worktree, served by its own ``benchmarks/harness.py``), and the
ratios between the two: a change measured side by side with the code before it.

Each body is sent at most once in a run (distinct ``event_id``), so the extension keeps every
request. The SDK route and the extension's senders post to the same data plane, in its own
process; "forwarded" is what it stored during the measured run.
"""

from __future__ import annotations

import argparse
import functools
import socket
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import harness as h  # the scripts run from benchmarks/ or with it on sys.path

BARE, SDK, EXT, DOWN, FLOOR = "bare Flask", "SDK route", "Flask-CIO-Rudder", "ext, data plane down", "floor"
WORKER, PG, PG_WORKER = "ext, sender in worker", "ext, PostgreSQL", "ext, PostgreSQL, worker"
BOUND, FAST, FAST_WORKER = "guarantees only", "ext, fast path", "fast path, sender in worker"
QUIET = "fast path, no mover or sender"
EXT_QUIET, BOUND_QUIET = "ext, no mover or sender", "guarantees only, no mover or sender"
PROBED = "ext, timed inside"
RELAY, RELAY_QUIET = "relay from memory", "relay, nothing sent"
#: The apps' gunicorn factories in harness.py; any other label is ext_app().
FACTORIES = {
    BARE: "bare_app()",
    SDK: "sdk_app()",
    FLOOR: "floor_app()",
    BOUND: "bound_app()",
    FAST: "fast_app()",
    FAST_WORKER: "fast_app()",
    QUIET: "fast_app(background=False)",
    EXT_QUIET: "ext_app(background=False)",
    BOUND_QUIET: "bound_app(background=False)",
    PROBED: "probed_app()",
    RELAY: "relay_app()",
    RELAY_QUIET: "relay_app(send=False)",
}
NO_OUTBOX = (BARE, SDK, FLOOR, RELAY, RELAY_QUIET)
WORKERS = (WORKER, PG_WORKER, FAST_WORKER)  # a `flask cio-rudder worker` process sends
#: scenario -> (apps, paced, [(figure, candidate, baseline, target)])
SCENARIOS = {
    "peer": (
        (BARE, SDK, EXT),
        False,
        [
            *[("req/s", EXT, SDK, ">= 1.0"), ("req/s", EXT, BARE, "0.75 wanted"), ("req/s", SDK, BARE, "")],
            *[("p99", EXT, SDK, ""), ("p99", EXT, BARE, "")],
        ],
    ),
    "paced": (
        (BARE, SDK, EXT),
        True,
        [("p99", EXT, BARE, "<= 1.5"), ("p99", EXT, SDK, ""), ("p99", SDK, BARE, "")],
    ),
    "down": ((EXT, DOWN), False, [("req/s", DOWN, EXT, ""), ("p99", DOWN, EXT, "")]),
    "floor": ((BARE, FLOOR, EXT), False, [("req/s", FLOOR, BARE, ""), ("req/s", EXT, BARE, "")]),
    "postgres": (
        (BARE, EXT, PG, PG_WORKER),
        False,
        [
            *[("req/s", PG, EXT, ""), ("req/s", PG, BARE, ""), ("req/s", EXT, BARE, "")],
            *[("req/s", PG_WORKER, PG, ""), ("p99", PG, EXT, ""), ("p99", PG_WORKER, PG, "")],
        ],
    ),
    "bound": (
        (BARE, SDK, BOUND, EXT),
        False,
        [
            *[("req/s", BOUND, SDK, ""), ("req/s", EXT, SDK, ">= 1.0"), ("req/s", EXT, BOUND, "")],
            *[("req/s", BOUND, BARE, ""), ("req/s", EXT, BARE, "0.75 wanted")],
        ],
    ),
    "bound-paced": (
        (BARE, SDK, BOUND, EXT),
        True,
        [("p99", BOUND, BARE, ""), ("p99", EXT, BARE, "<= 1.5"), ("p99", SDK, BARE, "")],
    ),
    "worker": (
        (BARE, SDK, EXT, WORKER),
        False,
        [
            *[("req/s", WORKER, SDK, ">= 1.0"), ("req/s", EXT, SDK, ">= 1.0"), ("req/s", WORKER, EXT, "")],
            *[("req/s", WORKER, BARE, "0.75 wanted"), ("p99", WORKER, EXT, ""), ("p99", WORKER, SDK, "")],
        ],
    ),
    "fast": (
        (BARE, SDK, EXT, FAST),
        False,
        [
            *[("req/s", FAST, SDK, ">= 1.0"), ("req/s", FAST, EXT, ""), ("req/s", FAST, BARE, "0.75 wanted")],
            *[("req/s", EXT, BARE, ""), ("p99", FAST, EXT, "")],
        ],
    ),
    "fast-paced": (
        (BARE, SDK, FAST, FAST_WORKER, QUIET),
        True,
        [
            *[("p99", FAST, BARE, "<= 1.5"), ("p99", FAST_WORKER, BARE, "<= 1.5"), ("p99", SDK, BARE, "")],
            ("p99", QUIET, BARE, ""),
        ],
    ),
    "quiet-paced": (
        (BARE, EXT, EXT_QUIET, BOUND_QUIET, QUIET),
        True,
        [("p99", EXT, BARE, "<= 1.5"), *[("p99", app, BARE, "") for app in (EXT_QUIET, BOUND_QUIET, QUIET)]],
    ),
    "tail": (
        (BARE, EXT, PROBED),
        True,
        [("p99", EXT, BARE, "<= 1.5"), ("p99", PROBED, BARE, ""), ("p99", PROBED, EXT, "")],
    ),
    "relay-paced": (
        (BARE, RELAY_QUIET, RELAY, SDK, EXT),
        True,
        [("p99", EXT, BARE, "<= 1.5"), *[("p99", app, BARE, "") for app in (RELAY, RELAY_QUIET, SDK)]],
    ),
    "worker-paced": (
        (BARE, SDK, EXT, WORKER),
        True,
        [("p99", EXT, BARE, "<= 1.5"), ("p99", WORKER, BARE, ""), ("p99", SDK, BARE, "")],
    ),
}


@dataclass
class Run:
    rps: float
    p50: float  # ms
    p99: float  # ms
    cpu_us: float  # the gunicorn workers' (and the worker process's) CPU per request answered
    request_us: float  # of which the workers' request threads' (their main threads)
    db_us: float | None  # PostgreSQL's server processes' CPU per request answered (None: SQLite)
    others: float  # cores other processes used meanwhile
    forwarded: int  # events the data plane stored during the measured run
    pending: int | None  # in the outbox after gunicorn stopped (the extension only)
    trouble: str
    probe: dict[str, float] | None = None  # probed_app's own timing (harness.probe_figures)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
        self.args, self.workdir, self.runs = args, workdir, 0
        #: ``--against``: the label of the extension at that commit; the checkout each label is served from.
        self.against = f"{EXT} @ {args.against}" if args.against else None
        self.roots: dict[str, Path] = {}
        if self.against:
            self.roots[self.against] = stack.enter_context(h.checkout(args.against, workdir / "against"))
        self.plane = h.DataPlane()
        stack.callback(self.plane.stop)
        closed = stack.enter_context(socket.socket())
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        # A fresh outbox each run (a new SQLite file or table): the same bodies serve every run.
        self.bodies, self.warm_bodies = workdir / "bodies.txt", workdir / "warm.txt"
        h.write_signed_bodies(self.bodies, args.max_rate * args.duration)
        h.write_signed_bodies(self.warm_bodies, args.max_rate * args.warmup)

    def measure(self, label: str, round_: int, paced: bool) -> Run:
        args, self.runs = self.args, self.runs + 1
        env = {"CIO_RUDDER_DATA_PLANE_URL": self.closed_url if label == DOWN else self.plane.url}
        outbox: dict[str, str] = {}
        if label not in NO_OUTBOX:
            url = args.postgres_url if label in (PG, PG_WORKER) else args.outbox_url
            outbox = h.outbox_env(url, self.workdir, str(self.runs))
            env |= {**outbox, "CIO_RUDDER_SHUTDOWN_TIMEOUT": "2"}
        if label in WORKERS:  # web workers only write; one process sends
            env["CIO_RUDDER_OUTBOX_SENDER"] = "false"
        if label == FLOOR:
            env["FLOOR_PATH"] = str(self.workdir / f"floor-{self.runs}.sqlite3")
        probes = self.workdir / f"probe-{self.runs}"
        if label == PROBED:
            probes.mkdir()
            env["PROBE_DIR"] = str(probes)
        h.wait_until_quiet(args.quiet_wait)
        log = self.workdir / f"gunicorn-{self.runs}.log"
        root = self.roots.get(label, h.ROOT)
        server = h.Gunicorn(f"harness:{FACTORIES.get(label, 'ext_app()')}", env, log, root=root)
        sender = h.start_worker(env, log.with_suffix(".worker.log")) if label in WORKERS else None
        try:
            h.wrk(server.url, self.warm_bodies, args.warmup, args.connections)
            web = server.worker_pids()
            workers = web + ([sender.pid] if sender else [])
            assert server.process is not None
            db = h.CpuMeter(lambda: h.db_pids(outbox) if outbox else [])  # PostgreSQL's server processes
            cpu, request_cpu = h.cpu_seconds(workers), h.main_thread_seconds(web)
            others = h.Others([*workers, server.process.pid, self.plane.process.pid, *db.start])
            self.plane.reset()
            pace = args.pace_ms if paced else 0
            since = time.time()
            n = h.wrk(server.url, self.bodies, args.duration, args.connections, pace_ms=pace)
            until = time.time()
            db_cpu, db_pids = db.used()
            others.pids += [pid for pid in db_pids if pid not in db.start]
            cpu, cores, forwarded = h.cpu_seconds(workers) - cpu, others.cores(), self.plane.stats()["stored"]
            request_cpu = h.main_thread_seconds(web) - request_cpu
        finally:
            server.stop()
            if sender is not None:
                h.stop_process(sender)
        pending = None
        if outbox:
            with h.open_store(outbox) as store:
                pending = store.status().pending
            h.drop_outbox(outbox)
        trouble = (f"{n['errors']:.0f} errors " if n["errors"] else "") + (
            "bodies reused: raise --max-rate" if n["bodies_wrapped"] else ""
        )
        run = Run(
            n["rps"],
            n["p50_us"] / 1e3,
            n["p99_us"] / 1e3,
            cpu / n["requests"] * 1e6,
            request_cpu / n["requests"] * 1e6,
            db_cpu / n["requests"] * 1e6 if outbox and not h.sqlite_file(outbox) else None,
            cores,
            forwarded,
            pending,
            trouble,
            h.probe_figures(probes, since, until) if label == PROBED else None,
        )
        print(
            f"  {round_} {label:<23} {run.rps:7,.0f} req/s  p50 {run.p50:6.2f} ms  p99 {run.p99:6.2f} ms"
            f"  cpu {run.cpu_us:4.0f} us/req ({run.request_us:4.0f} requests)  forwarded {forwarded:7,}"
            f"  others {cores:.2f} cores  {trouble}",
            flush=True,
        )
        return run


def report(name: str, runs: dict[str, list[Run]], comparisons: list[tuple[str, str, str, str]]) -> str:
    def each(values: list[float], form: str) -> str:
        return " / ".join(format(value, form) for value in values)

    apps = h.table(
        [
            "app",
            "req/s",
            "each round",
            "p50 ms",
            "p99 ms",
            "each round",
            "app CPU µs/req",
            "of it requests'",
            "db CPU µs/req",
            "forwarded",
            "pending after",
            "others' cores",
        ],
        [
            [
                label,
                f"{h.median([r.rps for r in rs]):,.0f}",
                each([r.rps for r in rs], ",.0f"),
                f"{h.median([r.p50 for r in rs]):.2f}",
                f"{h.median([r.p99 for r in rs]):.2f}",
                each([r.p99 for r in rs], ".1f"),
                f"{h.median([r.cpu_us for r in rs]):.0f}",
                f"{h.median([r.request_us for r in rs]):.0f}",
                "-" if rs[0].db_us is None else f"{h.median([r.db_us or 0 for r in rs]):.0f}",
                f"{h.median([r.forwarded for r in rs]):,.0f}",
                "-" if rs[0].pending is None else f"{h.median([r.pending or 0 for r in rs]):,.0f}",
                each([r.others for r in rs], ".2f"),
            ]
            for label, rs in runs.items()
        ],
    )
    rows = []
    for figure, candidate, baseline, target in comparisons:
        attr = "rps" if figure == "req/s" else "p99"
        cand, base = ([getattr(r, attr) for r in runs[label]] for label in (candidate, baseline))
        per_round = each([c / b for c, b in zip(cand, base)], ".2f")
        rows.append(
            [
                f"{figure}: {candidate} / {baseline}",
                f"{h.median(cand) / h.median(base):.2f}",
                per_round,
                target,
            ]
        )
    inside = [  # probed_app's own timing, a row per round, beside wrk's p99
        (label, i + 1, r.p99, r.probe) for label, rs in runs.items() for i, r in enumerate(rs) if r.probe
    ]
    probes = []
    if inside:
        names = [f"inside: {name}" for name in inside[0][3]]
        cells = [
            [label, str(i), f"{p99:.2f}", *(f"{v:.2f}" for v in probe.values())]
            for label, i, p99, probe in inside
        ]
        probes.append(h.table(["app", "round", "wrk's p99 ms", *names], cells))
    troubles = [
        f"{label} round {i + 1}: {r.trouble}"
        for label, rs in runs.items()
        for i, r in enumerate(rs)
        if r.trouble
    ]
    return "\n\n".join(
        [
            f"### {name}",
            apps,
            h.table(["ratio", "of the medians", "per round", "target"], rows),
            *probes,
            *troubles,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s each, no waiting for quiet")
    parser.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="default: peer and paced"
    )
    outbox_help = "the extension's outbox (CIO_RUDDER_OUTBOX_URL), a fresh table each run"
    parser.add_argument("--outbox-url", help=outbox_help + "; default: a fresh SQLite file each run")
    pg_help = "the PostgreSQL outbox of the postgres scenario (a fresh table each run)"
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1/test", help=pg_help)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=15, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of wrk before each measured run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (2 threads)")
    parser.add_argument("--pace-ms", type=float, default=5.0, help="paced: each connection's pause")
    parser.add_argument("--max-rate", type=int, default=8000, help="req/s to generate distinct bodies for")
    against_help = "also serve the extension as it was at this commit, beside it (a git worktree)"
    parser.add_argument("--against", metavar="REV", help=against_help)
    quiet_help = "before each run, wait at most this long for a second with others under 0.3 cores"
    parser.add_argument("--quiet-wait", type=float, default=30, help=quiet_help)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup, args.quiet_wait = 1, 2, 1, 0
    started = time.monotonic()
    print(h.header(), flush=True)
    out = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cio-rudder-webhook-")))
        bench = Bench(args, workdir, stack)
        for name in args.scenario or ["peer", "paced"]:
            labels, paced, comparisons = SCENARIOS[name]
            if bench.against and EXT in labels:
                labels = (*labels, bench.against)
                figures = ("p99",) if paced else ("req/s", "p99")
                comparisons = [*comparisons, *[(figure, EXT, bench.against, "") for figure in figures]]
            print(f"{name}:", flush=True)
            runs = h.interleave(labels, args.rounds, functools.partial(bench.measure, paced=paced))
            out.append(report(name, runs, comparisons))
    print("\n" + h.header() + "\n\n" + "\n\n".join(out) + f"\n\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    h.main_guard(main)
