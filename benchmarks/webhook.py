"""Webhook path against bare Flask, with RudderStack down, and at a moderate paced load.

    python benchmarks/webhook.py            # the full run: about 7 minutes
    python benchmarks/webhook.py --scenario floor   # where the cost is: about 4 minutes
    python benchmarks/webhook.py --quick    # a smoke run: about half a minute

Both apps are served the same way (gunicorn, same workers and worker class, on
127.0.0.1) and loaded the same way (wrk with ``webhook.lua``, fixed connections,
bounded duration), with the same signed Customer.io bodies: pre-generated, each with
its own ``event_id``, and never sent twice in one run (each wrk thread takes its own
stride of the file), so the extension accepts and writes every one of them.

Scenario 1, "peer": the bare Flask peer (parse JSON, answer 200) against the
extension as a user runs it (signature, validation, transform, signals with a
receiver, the outbox, a background sender per worker posting to a RudderStack-
compatible data plane that runs in another process). Scenario 2, "down": the
extension with that data plane up against the extension with the data plane
refusing connections (a closed loopback port). Scenario 3, "paced": bare Flask,
the floor (below) and the extension at the same moderate load (each connection pauses ``--pace-ms``
before each request), for the latency a request gets when the server is not
saturated. Diagnostics: "split" (the extension with its sender off) and "floor"
(a receiver that only commits each body to SQLite, and the extension with the
"none" forwarder: what keeping each event costs on its own). Runs alternate (A, B, A, B...) and
the tables report medians, because a shared machine is noisy. Each run gets a
fresh gunicorn and a fresh outbox, a warm-up wrk run first, then the measured one.

Needs: wrk (``apt-get install wrk``), gunicorn, and for ``--profile`` py-spy.
Sends traffic only to 127.0.0.1; every process it starts is stopped on exit,
Ctrl-C included; everything it writes goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # after the path above, so the script runs from anywhere

LUA = apps.HERE / "webhook.lua"

#: The targets the issue sets for the extension against bare Flask.
TARGET_THROUGHPUT_RATIO = 0.85  # ext req/s / bare req/s, at least
TARGET_P99_RATIO = 1.25  # ext p99 / bare p99, at most


@dataclass
class Run:
    scenario: str
    label: str
    round: int
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0
    wrapped: int = 0
    cpu_us_per_request: float = 0.0  # user + system CPU of the gunicorn workers, per answered request
    outbox: dict[str, int] = field(default_factory=dict)  # rows per state when the run ended
    outbox_after_stop: dict[str, int] = field(default_factory=dict)
    others_cores: float = 0.0  # CPU used by processes not part of the run (machine noise), in cores
    plane_events: int = 0  # what the data plane stored during the measured run
    plane_requests: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parse_bench_line(output: str) -> dict[str, float]:
    for line in output.splitlines():
        if line.startswith("BENCH "):
            return {key: float(value) for key, value in (item.split("=") for item in line.split()[1:])}
    raise RuntimeError(f"wrk printed no BENCH line:\n{output}")


def run_wrk(
    url: str, bodies: Path, duration: int, connections: int, threads: int, pace_ms: float = 0
) -> dict[str, float]:
    env = {
        **os.environ,
        "BENCH_BODIES": str(bodies),
        "BENCH_THREADS": str(threads),
        "BENCH_PACE_MS": str(pace_ms),
    }
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
    ]
    result = subprocess.run(
        [*command, url], env=env, capture_output=True, text=True, timeout=duration + 120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return parse_bench_line(result.stdout)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.count = 0
        self.plane = apps.DataPlaneProcess()
        stack.callback(self.plane.stop)
        self.closed_port = stack.enter_context(apps.closed_port())
        # Distinct bodies for the fastest app at ``--max-rate`` requests/s, and a separate warm-up set.
        self.bodies = workdir / "bodies.txt"
        self.warmup_bodies = workdir / "warmup-bodies.txt"
        started = time.monotonic()
        apps.write_bodies_file(self.bodies, args.max_rate * args.duration, apps.new_tag())
        apps.write_bodies_file(self.warmup_bodies, args.max_rate * max(args.warmup, 1), apps.new_tag())
        print(
            f"Generated {args.max_rate * args.duration:,} + {args.max_rate * max(args.warmup, 1):,} signed "
            f"bodies in {time.monotonic() - started:.1f} s",
            flush=True,
        )

    def serve(self, label: str) -> tuple[apps.Gunicorn, Path | None]:
        self.count += 1
        outbox = None
        if label == BARE:
            factory, env = "apps:create_bare_app()", {}
        elif label == FLOOR:  # its SQLite file is not an outbox: no outbox counts for it
            floor_file = self.workdir / f"floor-{self.count}.sqlite3"
            factory, env = "apps:create_floor_app()", {"CIO_RUDDER_OUTBOX_PATH": str(floor_file)}
        else:
            outbox = self.workdir / f"outbox-{self.count}.sqlite3"
            url = f"http://127.0.0.1:{self.closed_port}" if label == EXT_DOWN else self.plane.url
            factory = "apps:create_ext_app()"
            env = {
                "CIO_RUDDER_SIGNING_KEY": apps.SIGNING_KEY,
                "CIO_RUDDER_WRITE_KEY": apps.WRITE_KEY,
                "CIO_RUDDER_DATA_PLANE_URL": url,
                "CIO_RUDDER_OUTBOX_PATH": str(outbox),
                "CIO_RUDDER_SHUTDOWN_TIMEOUT": "2",
                "CIO_RUDDER_OUTBOX_SENDER": "false" if label == EXT_NO_SENDER else "true",
                "CIO_RUDDER_FORWARDER": "none" if label == EXT_NONE else "outbox",
            }
        server = apps.Gunicorn(
            factory,
            env,
            self.workdir / f"gunicorn-{self.count}.log",
            workers=self.args.workers,
            worker_class=self.args.worker_class,
            threads=self.args.threads,
        )
        self.stack.callback(server.stop)  # in case of Ctrl-C; stop() twice is harmless
        return server, outbox

    def run(self, scenario: str, label: str, round_: int) -> Run:
        """One measured run; run again (up to ``--noise-retries`` times) if other processes were busy."""
        result = self._run_once_or_twice(scenario, label, round_)
        for _ in range(self.args.noise_retries):
            if result.others_cores <= self.args.noise_limit:
                break
            print(f"    (other processes used {result.others_cores:.2f} cores during that run: once more)")
            again = self._run_once_or_twice(scenario, label, round_)
            result = min(result, again, key=lambda run: run.others_cores)
        return result

    def _run_once_or_twice(self, scenario: str, label: str, round_: int) -> Run:
        """A run that failed (gunicorn gone, say: this machine is shared) is tried once more, and reported."""
        try:
            return self._run_once(scenario, label, round_)
        except RuntimeError as error:
            print(f"    (that run failed, trying once more with a fresh gunicorn: {error})", flush=True)
            return self._run_once(scenario, label, round_)

    def _run_once(self, scenario: str, label: str, round_: int) -> Run:
        args = self.args
        if args.quiet_wait:
            apps.wait_until_quiet(args.quiet_wait)
        server, outbox = self.serve(label)
        try:
            if args.warmup:
                run_wrk(server.url, self.warmup_bodies, args.warmup, args.connections, args.wrk_threads)
            workers = server.worker_pids()
            ours = [*workers, server.process.pid, self.plane.process.pid]
            cpu_before, meter = apps.cpu_seconds(workers), apps.OthersMeter(ours)
            plane_before = self.plane.count()
            pace = args.pace_ms if scenario == "paced" else 0
            try:
                numbers = run_wrk(
                    server.url, self.bodies, args.duration, args.connections, args.wrk_threads, pace
                )
            except RuntimeError as error:
                raise RuntimeError(f"{error}\nthe end of gunicorn's log:\n{server.log_tail()}") from None
            cpu = apps.cpu_seconds(workers) - cpu_before
            others_cores = meter.cores()
            plane_after = self.plane.count()
            result = Run(
                scenario,
                label,
                round_,
                requests=int(numbers["requests"]),
                seconds=numbers["duration_us"] / 1e6,
                p50_ms=numbers["p50_us"] / 1000,
                p90_ms=numbers["p90_us"] / 1000,
                p99_ms=numbers["p99_us"] / 1000,
                max_ms=numbers["max_us"] / 1000,
                errors=int(
                    sum(
                        numbers[f"errors_{kind}"]
                        for kind in ("connect", "read", "write", "status", "timeout")
                    )
                ),
                wrapped=int(numbers["bodies_wrapped"]),
                cpu_us_per_request=cpu / numbers["requests"] * 1e6 if numbers["requests"] else 0.0,
                others_cores=others_cores,
                plane_events=plane_after[0] - plane_before[0],
                plane_requests=plane_after[1] - plane_before[1],
            )
            if outbox is not None:
                result.outbox = apps.outbox_counts(outbox)
        finally:
            server.stop()
        if outbox is not None:
            result.outbox_after_stop = apps.outbox_counts(outbox)
        print(
            f"  {scenario:<5} round {round_}  {label:<38} {result.rps:8.0f} req/s"
            f"  p50 {result.p50_ms:6.2f} ms"
            f"  p99 {result.p99_ms:6.2f} ms  cpu {result.cpu_us_per_request:6.0f} us/req"
            f"  others {result.others_cores:.2f} cores"
            + (f"  outbox {dict(result.outbox)}" if result.outbox else "")
            + (
                f"  {result.plane_events / result.plane_requests:.1f} events/batch"
                if result.plane_requests
                else ""
            )
            + (f"  ERRORS {result.errors}" if result.errors else "")
            + (f"  BODIES WRAPPED {result.wrapped}x: raise --max-rate" if result.wrapped else ""),
            flush=True,
        )
        return result

    def interleave(self, scenario: str, labels: tuple[str, ...]) -> list[Run]:
        runs = []
        for round_ in range(1, self.args.rounds + 1):
            for label in labels:
                runs.append(self.run(scenario, label, round_))
        return runs

    def profile(self, label: str) -> str:
        """One more run of ``label`` with py-spy sampling one worker: where its time goes."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.access(py_spy, os.X_OK):
            return "py-spy is not installed (pip install py-spy): no profile."
        if self.args.quiet_wait:
            apps.wait_until_quiet(self.args.quiet_wait)
        server, _ = self.serve(label)
        raw = self.workdir / f"profile-{self.count}.txt"
        # Python frames only, without pausing the worker; or (--native) with C frames too (SQLite,
        # locks, sockets), which needs py-spy to pause the worker for each sample: a little slower.
        mode = ("--native",) if self.args.native else ("--nonblocking",)
        stderr = ""
        try:
            run_wrk(server.url, self.warmup_bodies, max(self.args.warmup, 1), self.args.connections, 1)
            worker = server.worker_pids()[0]
            spy = subprocess.Popen(
                [
                    *(py_spy, "record", *mode, "--format", "raw", "--rate", "200"),
                    *("--duration", str(self.args.duration), "--output", str(raw), "--pid", str(worker)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                numbers = run_wrk(
                    server.url, self.bodies, self.args.duration, self.args.connections, self.args.wrk_threads
                )
                _, stderr = spy.communicate(timeout=self.args.duration + 60)
            finally:
                apps.stop_process(spy)
        finally:
            server.stop()
        if not raw.exists():
            return f"py-spy wrote no profile: {stderr.strip()[-500:]}"
        rps = numbers["requests"] / numbers["duration_us"] * 1e6
        return f"{label}, {rps:,.0f} req/s while sampled. " + summarise_profile(raw.read_text())


def _frame_name(frame: str) -> str:
    """``function (path/to/file.py:123)`` -> ``function (package/file.py)``: lines of one function merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def _plumbing(frame: str) -> bool:
    """Frames every sample of a thread goes through (gunicorn's loop, thread start-up): not informative."""
    if "SyncWorker.handle_request" in frame or "ThreadWorker.handle_request" in frame:
        return False
    return any(part in frame for part in ("gunicorn/", "runpy", "threading.py", "<module>"))


#: C functions that tell where a worker waits or works inside SQLite (seen with ``--native``).
NATIVE_MARKERS = {
    "sqlite3InvokeBusyHandler": "sleeping in SQLite's busy handler: the write lock was taken",
    "sqlite3WalCheckpoint": "checkpointing the WAL into the database file",
    "sqlite3_step": "running SQL",
}


def summarise_profile(raw: str, top: int = 14) -> str:
    """Inclusive and self shares of the busiest functions in py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        for marker, meaning in NATIVE_MARKERS.items():
            if marker in stack:  # only with --native: C frames, attributed to the library's caller
                callers = [
                    f.split(" (")[0] for f in stack.split(marker)[0].split(";") if "flask_cio_rudder" in f
                ]
                native[f"{meaning} ({marker}) in {callers[-1] if callers else 'other code'}"] += count
        raw_frames = [frame for frame in stack.split(";") if not frame.startswith("0x")]  # unnamed C code
        frames = [_frame_name(frame) for frame in raw_frames]
        total += count
        for frame in {name for raw_frame, name in zip(raw_frames, frames) if not _plumbing(raw_frame)}:
            inclusive[frame] += count
        # The innermost frame and its two callers: "sock_sendall <- write <- handle_request" says more
        # than "sock_sendall" alone.
        own[" <- ".join(name.split(" (")[0] for name in reversed(frames[-3:]))] += count
        threads[
            "background sender thread" if any("sender.py" in f for f in frames) else "request thread"
        ] += count
    if not total:
        return "py-spy recorded no samples."

    def rows(counter: Counter[str]) -> list[tuple[str, str]]:
        return [(f"{100 * n / total:5.1f} %", name) for name, n in counter.most_common(top)]

    notable = ["C frames of note:\n\n" + apps.table(["share", "where"], rows(native))] if native else []
    return "\n\n".join(
        [
            f"{total} samples of one worker at 200 Hz.",
            apps.table(
                ["share", "thread"], [(f"{100 * n / total:5.1f} %", name) for name, n in threads.items()]
            ),
            "Inclusive (the function and what it calls):\n\n"
            + apps.table(["share", "function"], rows(inclusive)),
            "Innermost frames (and their two callers):\n\n" + apps.table(["share", "where"], rows(own)),
            *notable,
        ]
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summary_rows(runs: list[Run], labels: tuple[str, ...]) -> list[list[str]]:
    rows = []
    for label in labels:
        mine = [run for run in runs if run.label == label]
        rows.append(
            [
                label,
                str(len(mine)),
                f"{median([r.rps for r in mine]):,.0f}",
                f"{median([r.p50_ms for r in mine]):.2f}",
                f"{median([r.p99_ms for r in mine]):.2f}",
                f"{median([r.cpu_us_per_request for r in mine]):,.0f}",
                (
                    f"{median([r.plane_events / r.plane_requests for r in mine if r.plane_requests]):.1f}"
                    if any(r.plane_requests for r in mine)
                    else "-"
                ),
                " / ".join(f"{r.rps:,.0f}" for r in mine),
                " / ".join(f"{r.p99_ms:.1f}" for r in mine),
                " / ".join(f"{r.others_cores:.2f}" for r in mine),
            ]
        )
    return rows


SUMMARY_HEADERS = [
    "app",
    "runs",
    "req/s (median)",
    "p50 ms (median)",
    "p99 ms (median)",
    "worker CPU us/req",
    "events/batch sent",
    "req/s of each run",
    "p99 ms of each run",
    "other processes' CPU (cores)",
]


def ratios(runs: list[Run], baseline: str, candidate: str) -> tuple[float, float, list[float], list[float]]:
    """Ratio of the medians (throughput, p99) and the per-round ratios (each pair ran back to back)."""
    base = [run for run in runs if run.label == baseline]
    cand = [run for run in runs if run.label == candidate]
    throughput = median([r.rps for r in cand]) / median([r.rps for r in base])
    p99 = median([r.p99_ms for r in cand]) / median([r.p99_ms for r in base])
    paired_throughput = [c.rps / b.rps for b, c in zip(base, cand)]
    paired_p99 = [c.p99_ms / b.p99_ms for b, c in zip(base, cand)]
    return throughput, p99, paired_throughput, paired_p99


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"{'meets' if ok else 'MISSES'} the target ({'>=' if at_least else '<='} {target})"


BARE = "bare Flask"
EXT = "Flask-CIO-Rudder"
EXT_UP = "Flask-CIO-Rudder (data plane up)"
EXT_DOWN = "Flask-CIO-Rudder (data plane down)"
EXT_NO_SENDER = "Flask-CIO-Rudder (sender off)"
EXT_NONE = "Flask-CIO-Rudder (forwarder none)"
FLOOR = "floor: bare Flask + one SQLite commit"

#: name -> (title, the apps it alternates, the baseline the others are compared with)
SCENARIOS = {
    "peer": ("Scenario 1: the webhook path against bare Flask", (BARE, EXT)),
    "down": ("Scenario 2: RudderStack down", (EXT_UP, EXT_DOWN)),
    "split": (
        "Diagnostic: the request path alone (background sender off) against bare Flask and the default",
        (BARE, EXT_NO_SENDER, EXT),
    ),
    "floor": (
        "Diagnostic: what keeping each event costs (a bare receiver that commits each body to SQLite,\n"
        "and the extension keeping nothing) against bare Flask and the default",
        (BARE, FLOOR, EXT_NONE, EXT),
    ),
    "paced": (
        "Scenario 3: latency at the same moderate load (each connection pauses --pace-ms between requests)",
        (BARE, FLOOR, EXT),
    ),
}


def ratio_table(runs: list[Run], baseline: str, candidate: str, targets: Sequence[str]) -> str:
    throughput, p99, paired_t, paired_p = ratios(runs, baseline, candidate)
    name = f"{_short(candidate)} / {_short(baseline)}"
    rows = [
        ["throughput", f"{throughput:.2f}", " / ".join(f"{x:.2f}" for x in paired_t)],
        ["p99 latency", f"{p99:.2f}", " / ".join(f"{x:.2f}" for x in paired_p)],
    ]
    headers = [f"ratio ({name})", "of the medians", "per round"]
    if targets:
        headers.append("target")
        rows[0].append(verdict(throughput, TARGET_THROUGHPUT_RATIO, True) if "throughput" in targets else "-")
        rows[1].append(verdict(p99, TARGET_P99_RATIO, False) if "p99" in targets else "-")
    return apps.table(headers, rows)


def _short(label: str) -> str:
    return {
        BARE: "bare",
        EXT: "ext",
        EXT_UP: "up",
        EXT_DOWN: "down",
        EXT_NO_SENDER: "ext, sender off",
        EXT_NONE: "ext, forwarder none",
        FLOOR: "floor",
    }[label]


def outbox_table(runs: list[Run]) -> str:
    rows = [
        [
            run.label,
            str(run.round),
            f"{run.requests:,}",
            f"{run.outbox.get('pending', 0):,}",
            f"{run.outbox.get('delivered', 0):,}",
            f"{run.outbox_after_stop.get('pending', 0):,}",
            f"{run.outbox_after_stop.get('delivered', 0):,}",
        ]
        for run in runs
        if run.outbox
    ]
    headers = [
        "app",
        "round",
        "requests answered (measured run)",
        "pending at the end",
        "delivered at the end",
        "pending after shutdown",
        "delivered after shutdown",
    ]
    return (
        "The outbox of each run (each run starts with an empty one; it also holds the warm-up's events):\n\n"
        + apps.table(headers, rows)
    )


def report(args: argparse.Namespace, results: dict[str, list[Run]], profile: str | None) -> str:
    out = [
        f"Setup: gunicorn -w {args.workers} -k {args.worker_class}"
        + (f" --threads {args.threads}" if args.worker_class == "gthread" else "")
        + f"; wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s"
        + f" (after a {args.warmup} s warm-up)"
        + f"; {args.rounds} rounds, interleaved; {os.cpu_count()} CPUs"
        + f"; library at {args.revision}"
    ]
    for name, runs in results.items():
        title, labels = SCENARIOS[name]
        out.append(f"{title}\n\n" + apps.table(SUMMARY_HEADERS, summary_rows(runs, labels)))
        for candidate in labels[1:]:
            targets: tuple[str, ...] = ("throughput", "p99")
            if labels[0] != BARE:
                targets = ()
            elif name == "paced":  # each app gets about the same load: only latency compares
                targets = ("p99",)
            out.append(ratio_table(runs, labels[0], candidate, targets))
        if name == "down":
            out.append(outbox_table(runs))
    troubles = [r for runs in results.values() for r in runs if r.errors or r.wrapped]
    if troubles:
        out.append(
            "WARNING: runs with errors or reused bodies: "
            + ", ".join(f"{r.scenario} {r.label} round {r.round}" for r in troubles)
        )
    if profile:
        kind = "Python and C frames, waiting included" if args.native else "Python frames, idle time excluded"
        out.append(f"Where one worker's time goes (py-spy: {kind}; extra runs):\n\n" + profile)
    return "\n\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about half a minute")
    parser.add_argument(
        "--scenario",
        choices=["all", *SCENARIOS],
        action="append",
        help="peer (ext vs bare), down (data plane up vs down), paced (both at the same moderate load),\n"
        "split (diagnostic: sender off), floor (diagnostic: the cost of keeping each event);\n"
        "repeat to run several; default: all = peer, down and paced",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each app, interleaved (default 3)")
    parser.add_argument(
        "--duration", type=int, default=15, help="seconds of each measured wrk run (default 15)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="seconds of wrk warm-up before each run (default 3)"
    )
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=5.0,
        help="paced scenario: each connection pauses this long before each request (default 5)",
    )
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class (default sync)")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads per worker with -k gthread (default 4)"
    )
    parser.add_argument(
        "--max-rate", type=int, default=8000, help="requests/s to generate distinct bodies for (default 8000)"
    )
    parser.add_argument(
        "--noise-limit",
        type=float,
        default=0.5,
        help="a run during which other processes used more CPU than this (cores) is run\n"
        "again, and the quieter of the two kept (default 0.5)",
    )
    parser.add_argument("--noise-retries", type=int, default=1, help="how many times (default 1; 0: never)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="three more runs (the extension, the extension with its sender off, bare Flask)\n"
        "with py-spy sampling one worker",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="with --profile: sample C frames too (SQLite, locks, sockets; pauses the worker\n"
        "for each sample); waits count too",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many seconds for other processes to use\n"
        "under 0.25 cores (default 60; 0: do not wait)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.quiet_wait, args.noise_retries = 1, 2, 1, 0, 0
    names: list[str] = []
    for name in args.scenario or ["all"]:
        for expanded in ("peer", "down", "paced") if name == "all" else (name,):
            if expanded not in names:
                names.append(expanded)
    args.scenario = names
    if args.connections % args.wrk_threads:
        parser.error("--connections must be a multiple of --wrk-threads")
    return args


def check_tools() -> None:
    """Exit with the install command if wrk or gunicorn is missing."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (or build it from https://github.com/wg/wrk)")
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        sys.exit("gunicorn is not installed: pip install gunicorn")


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM runs the same clean-up as Ctrl-C."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    signal.signal(signal.SIGTERM, _interrupt)
    args.revision = apps.library_revision()
    started = time.monotonic()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cio-rudder-bench-")))
        bench = Bench(args, workdir, stack)
        results = {}
        for name in args.scenario:
            title, labels = SCENARIOS[name]
            print(title, flush=True)
            results[name] = bench.interleave(name, labels)
        profile = (
            "\n\n".join(bench.profile(label) for label in (EXT, EXT_NO_SENDER, BARE))
            if args.profile
            else None
        )
        print()
        at_end = apps.library_revision()
        if at_end != args.revision:
            args.revision = f"{args.revision} at the start, {at_end} at the end (it changed during the run)"
        print(report(args, results, profile))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
