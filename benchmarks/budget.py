"""Where each request's CPU goes, step by step, in one process: the budget behind the webhook targets.

    python benchmarks/budget.py                      # about a minute
    python benchmarks/budget.py --bare-cpu-us 355    # also print the budget for 0.85 of bare Flask

``webhook.py`` measures what a gunicorn worker spends per request (its "worker CPU
us/req" column). To reach a throughput ratio r against bare Flask on a CPU-bound
machine, everything the extension adds must fit in ``bare * (1/r - 1)``
microseconds per event, delivery included (the sender runs on the same cores).
This script measures, in this process and without gunicorn or the network, the
CPU each step costs, so the two can be put side by side: the same signed bodies as
webhook.py, each request driven straight through the WSGI app.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps  # after the path above, so the script runs from anywhere

from flask_cio_rudder import get_outbox
from flask_cio_rudder.outbox import Outbox
from flask_cio_rudder.signature import verify
from flask_cio_rudder.transform import load_event

Body = tuple[str, str, bytes]  # X-CIO-Timestamp, X-CIO-Signature, body

BARE = "bare Flask: one request (the peer's whole app)"
EXT_OUTBOX = "Flask-CIO-Rudder, outbox (sender off): one request"
SENDER = "sender: CPU per event delivered (batches of 100)"


def per_item_us(step: Callable[[Any], Any], items: Sequence[Any]) -> float:
    """Mean CPU microseconds of ``step`` over ``items`` (after a warm-up on the first tenth).

    CPU time, as webhook.py's worker CPU: waits for the disk (fsync) are not in it.
    """
    warm = max(1, len(items) // 10)
    for item in items[:warm]:
        step(item)
    started = time.process_time()
    for item in items[warm:]:
        step(item)
    return (time.process_time() - started) / (len(items) - warm) * 1e6


def environ(body: Body) -> dict[str, Any]:
    timestamp, signature, raw = body
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": apps.WEBHOOK_PATH,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(raw),
        "wsgi.errors": sys.stderr,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(raw)),
        "HTTP_X_CIO_TIMESTAMP": timestamp,
        "HTTP_X_CIO_SIGNATURE": signature,
    }


def wsgi_request_us(app: Any, bodies: Sequence[Body]) -> float:
    """Microseconds per request through the app's WSGI callable (each answered 200)."""

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        if not status.startswith("200"):
            raise RuntimeError(f"the app answered {status}")

    return per_item_us(lambda env: b"".join(app(env, start_response)), [environ(b) for b in bodies])


def ext_app(workdir: Path, name: str, **env: str) -> Any:
    settings = {
        "CIO_RUDDER_DATA_PLANE_URL": "http://127.0.0.1:9",  # never reached: no background sender here
        "CIO_RUDDER_OUTBOX_PATH": str(workdir / f"{name}.sqlite3"),
        "CIO_RUDDER_OUTBOX_SENDER": "false",
        "CIO_RUDDER_FORWARDER": "outbox",
    }
    os.environ.update({**settings, **env})
    return apps.create_ext_app()


def plain_commit_us(workdir: Path, bodies: Sequence[Body]) -> float:
    """One ``INSERT`` commit per body into a one-table SQLite WAL file, as the floor app does."""
    db = sqlite3.connect(workdir / "plain.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE events (event_id TEXT PRIMARY KEY, body TEXT)")
    rows = [(f"{n}-{body[1]}", body[2].decode()) for n, body in enumerate(bodies)]
    try:
        return per_item_us(lambda row: db.execute("INSERT OR IGNORE INTO events VALUES (?, ?)", row), rows)
    finally:
        db.close()


def sender_us_per_event(workdir: Path, bodies: Sequence[Body]) -> float:
    """CPU of this process per event to drain an outbox to a data plane in another process."""
    plane = apps.DataPlaneProcess()
    try:
        app = ext_app(workdir, "drain", CIO_RUDDER_DATA_PLANE_URL=plane.url)
        forwarder = get_outbox(app)
        for body in bodies:
            event = load_event(json.loads(body[2]))
            forwarder.outbox.add(event.event_id, event.payload_json)
        started = time.process_time()
        sent = forwarder.flush(timeout=600)
        cpu = time.process_time() - started
        forwarder.close()
    finally:
        plane.stop()
    if sent != len(bodies):
        raise RuntimeError(f"the sender sent {sent} of {len(bodies)} events")
    return cpu / sent * 1e6


def measure(count: int) -> list[tuple[str, float]]:
    bodies = list(apps.signed_bodies(count, apps.new_tag()))
    decoded = [json.loads(body[2]) for body in bodies]
    events = [load_event(body) for body in decoded]
    key = (apps.SIGNING_KEY,)
    with tempfile.TemporaryDirectory(prefix="cio-rudder-budget-") as tmp:
        workdir = Path(tmp)
        outbox = Outbox(str(workdir / "steps.sqlite3"))

        def keep(event: Any) -> None:
            outbox.is_known(event.event_id)
            outbox.add(event.event_id, event.payload_json)

        rows = [
            (BARE, wsgi_request_us(apps.create_bare_app(), bodies)),
            (
                "Flask-CIO-Rudder, forwarder none: one request",
                wsgi_request_us(ext_app(workdir, "none", CIO_RUDDER_FORWARDER="none"), bodies),
            ),
            (EXT_OUTBOX, wsgi_request_us(ext_app(workdir, "outbox"), bodies)),
            ("  step: verify the signature", per_item_us(lambda b: verify(b[2], b[0], b[1], key), bodies)),
            ("  step: parse the JSON (bare Flask does too)", per_item_us(lambda b: json.loads(b[2]), bodies)),
            ("  step: validate and transform (load_event)", per_item_us(load_event, decoded)),
            ("  step: keep it (duplicate lookup + outbox commit)", per_item_us(keep, events)),
            ("  for comparison: one plain SQLite commit", plain_commit_us(workdir, bodies)),
            (SENDER, sender_us_per_event(workdir, bodies)),
        ]
        outbox.close()
    return rows


def report(rows: list[tuple[str, float]], bare_cpu_us: float | None, ratio: float) -> str:
    cells = [[name, f"{us:.1f}"] for name, us in rows]
    lines = [apps.table(["what (one event, in this process)", "us"], cells)]
    figures = dict(rows)
    added = figures[EXT_OUTBOX] - figures[BARE] + figures[SENDER]
    lines.append(f"The extension adds {added:.0f} us per event over bare Flask here (request and sender).")
    if bare_cpu_us:
        budget = bare_cpu_us * (1 / ratio - 1)
        lines.append(
            f"With bare Flask at {bare_cpu_us:.0f} us of worker CPU per request under gunicorn, a throughput "
            f"ratio of {ratio} leaves {budget:.0f} us per event for everything the extension adds: "
            f"it adds {added / budget:.1f} times that. At {added:.0f} us added, the ratio to expect is about "
            f"{bare_cpu_us / (bare_cpu_us + added):.2f}."
        )
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="signed bodies to use (default 10000)")
    parser.add_argument(
        "--bare-cpu-us",
        type=float,
        help="bare Flask's worker CPU per request under gunicorn (webhook.py prints it): prints the budget",
    )
    parser.add_argument("--ratio", type=float, default=0.85, help="the throughput ratio to budget for")
    args = parser.parse_args(argv)
    print(report(measure(args.events), args.bare_cpu_us, args.ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
