"""Instructions per webhook request, counted by valgrind: a measure that a busy machine does not move.

    python benchmarks/instructions.py                  # bare, SDK route, floor, extension, fast path: ~4 min
    python benchmarks/instructions.py --app ext_app    # one app

Each app's WSGI callable is called in one process with webhook.py's bodies (fixed ids and
timestamp, ``PYTHONHASHSEED=0``), as gunicorn calls it (``wsgi.input_terminated`` set), under
``valgrind --tool=callgrind``. A run serves ``--warmup`` requests and then ``--requests`` more;
a second run serves only the warm-up; the difference divided by ``--requests`` is one
request's instructions, the same to within one percent from run to run. Only the request's
own path is counted: the extension's spool mover and sender and the SDK's consumer thread
are off (``webhook.py`` measures them, in seconds). Instructions are not time: cache misses
and system calls cost more than their count, and valgrind's CPU has no SHA extensions, so
the signature's HMAC counts several times what it costs. Use it to see what a change to the
request path adds or removes; use ``webhook.py`` for throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path

from flask_cio_rudder.signature import sign
from flask_cio_rudder.testing import encode

APPS = ("bare_app", "sdk_app", "bound_app", "ext_app", "fast_app")
LABELS = {
    "bare_app": "bare Flask",
    "sdk_app": "SDK route",
    "bound_app": "guarantees only",
    "ext_app": "Flask-CIO-Rudder",
    "fast_app": "ext, fast path",
}
TIMESTAMP = "1764990000"
TAG = "FIXED0"


def serve(app_name: str, count: int, built: int) -> None:
    """Build the app with nothing in the background and ``built`` requests, then serve the first ``count``."""
    h.no_background()  # what a mover and a sender do depends on timing, which valgrind's slowness changes
    app = getattr(h, app_name)() if app_name != "sdk_app" else h.sdk_app(send=False)
    environs = []
    for body in h.bodies(built, TAG):
        raw = encode(body)
        environs.append(h.webhook_environ(raw, TIMESTAMP, sign(raw, TIMESTAMP, h.SIGNING_KEY)))

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if not status.startswith("200"):
            raise SystemExit(f"{app_name} answered {status}")
        return sys.stdout.buffer.write  # never called: the apps return their bodies

    for environ in environs[:count]:
        for _ in app(environ, start_response):
            pass
    sys.stdout.flush()
    os._exit(0)  # no atexit work (closing the outbox) in the count


def instructions(app_name: str, count: int, built: int, outbox: str) -> int:
    """valgrind's instruction total of one ``serve`` run: ``built`` requests made, ``count`` served."""
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{outbox}/{app_name}-{count}.sqlite3",
        "CIO_RUDDER_DATA_PLANE_URL": "http://127.0.0.1:9",  # never reached: nothing sends
        "CIO_RUDDER_OUTBOX_SENDER": "false",
    }
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    command += ["--serve", app_name, "--requests", str(count), "--built", str(built)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"valgrind failed for {app_name}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(app_name: str, count: int, warmup: int, outbox: str) -> float:
    """Instructions of ``count`` requests after ``warmup`` ones, per request (both runs build the same)."""
    built = warmup + count
    served = instructions(app_name, built, built, outbox) - instructions(app_name, warmup, built, outbox)
    return served / count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--app", action="append", choices=APPS, help="an app to count (default: all five)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--serve", choices=APPS, help=argparse.SUPPRESS)  # the process valgrind runs
    parser.add_argument("--built", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.requests, args.built)
    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind: apt-get install valgrind")
    apps = args.app or list(APPS)
    print(h.header())
    with tempfile.TemporaryDirectory() as outbox, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        counts = dict(
            zip(apps, pool.map(lambda name: per_request(name, args.requests, args.warmup, outbox), apps))
        )
    rows = []
    for name in apps:
        ratios = [
            f"{counts[name] / counts[peer]:.2f}" if peer in counts else "-"
            for peer in ("bare_app", "sdk_app")
        ]
        rows.append([LABELS[name], f"{counts[name]:,.0f}", *ratios])
    print(h.table(["app", "instructions per request", "vs bare Flask", "vs SDK route"], rows))
    return 0


if __name__ == "__main__":
    h.main_guard(main)
