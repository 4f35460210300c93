"""Where each request's CPU goes, step by step, in one process (no gunicorn, no network).

    python benchmarks/budget.py            # 10,000 signed bodies, 5 rounds: about four minutes
    python benchmarks/budget.py --quick    # 1,000 bodies, 1 round

Each request goes straight through the app's WSGI callable with the bodies webhook.py
sends; the steps are timed alone on the same bodies, and the sender's CPU per event
delivered to a data plane in another process. Each round builds its apps and outboxes
afresh; the table gives the median and each round's figure, since the rows that keep
events also count the spool's mover, whose batches fall in one timed stretch or the next.
Put beside webhook.py's "app CPU µs/req": to reach a throughput ratio r against bare
Flask, everything the extension adds, sending included, must fit in ``bare * (1/r - 1)``
µs per event.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path

from flask_cio_rudder import CioEvent, get_outbox
from flask_cio_rudder.signature import verify
from flask_cio_rudder.state import state_of
from flask_cio_rudder.validation import Validation
from flask_cio_rudder.webhook import parse_json

load_event = Validation()  # the webhook's validation + transform of one decoded body


def cpu_us(step: Callable[[Any], object], items: Sequence[Any]) -> float:
    """Mean CPU µs of ``step`` per item, after a warm-up on the first tenth (disk waits not counted)."""
    warm = len(items) // 10
    for item in items[:warm]:
        step(item)
    started = time.process_time()
    for item in items[warm:]:
        step(item)
    return (time.process_time() - started) / (len(items) - warm) * 1e6


def per_request_us(app: Any, lines: Sequence[bytes]) -> float:
    def environ(line: bytes) -> dict[str, Any]:
        timestamp, signature, raw = line.split(b"\t", 2)
        return h.webhook_environ(raw, timestamp.decode(), signature.decode())

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        assert status.startswith("200"), status

    return cpu_us(lambda env: b"".join(app(env, start_response)), [environ(line) for line in lines])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 bodies, 1 round")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    count, rounds = (1_000, 1) if args.quick else (args.events, args.rounds)
    measured: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cio-rudder-budget-") as tmp:
        workdir, plane = Path(tmp), h.DataPlane()
        h.write_signed_bodies(workdir / "bodies.txt", 3 * count)
        lines = (workdir / "bodies.txt").read_bytes().splitlines()
        try:
            for number in range(rounds):
                for name, us in one_round(workdir / f"round-{number}", lines, count, plane.url):
                    measured.setdefault(name, []).append(us)
        finally:
            plane.stop()
    cells = [
        [name, f"{statistics.median(values):.1f}", " / ".join(f"{us:.1f}" for us in values)]
        for name, values in measured.items()
    ]
    headers = ["what (one event, in this process)", "CPU µs (median)", "each round"]
    print(f"{h.header()}\n\n{h.table(headers, cells)}")
    return 0


def one_round(workdir: Path, lines: Sequence[bytes], count: int, plane_url: str) -> list[tuple[str, float]]:
    """Each row's CPU µs per event, with apps and outboxes of their own in ``workdir``."""
    workdir.mkdir()
    parts = [line.split(b"\t", 2) for line in lines[:count]]
    decoded = [json.loads(raw) for _, _, raw in parts]

    def app(n: int, **env: str) -> Any:
        return h.app_here({**h.outbox_env(None, workdir, str(n)), **env})

    def verified(p: list[bytes]) -> None:
        verify(p[2], p[0].decode(), p[1].decode(), [h.SIGNING_KEY])

    with app(1, CIO_RUDDER_FORWARDER="none") as none, app(2) as ext, app(3) as steps:
        forwarder = state_of(steps).forwarder

        def keep(event: CioEvent) -> None:  # what the webhook asks of the outbox forwarder
            if not forwarder.is_duplicate(event.event_id):
                forwarder.accept(event)  # an append to this process's spool

        rows = [
            ("bare Flask: one request", per_request_us(h.bare_app(), lines[:count])),
            ("extension, forwarder none: one request", per_request_us(none, lines[count : 2 * count])),
            ("extension, outbox, sender off: one request", per_request_us(ext, lines[2 * count :])),
            ("  step: verify the signature", cpu_us(verified, parts)),
            ("  step: parse the JSON (the webhook's parse_json)", cpu_us(parse_json, [p[2] for p in parts])),
            ("  step: validate and transform (Validation())", cpu_us(load_event, decoded)),
            ("  step: duplicate lookup + spool append", cpu_us(keep, [load_event(b) for b in decoded])),
        ]
    with app(4, CIO_RUDDER_DATA_PLANE_URL=plane_url) as sender:
        events = ((e.event_id, e.payload_json) for e in map(load_event, decoded))
        h.add_events(get_outbox(sender).store, events)
        started = time.process_time()
        sent = get_outbox(sender).flush(300).delivered
        rows.append(("sender: CPU per event delivered", (time.process_time() - started) / sent * 1e6))
    return rows


if __name__ == "__main__":
    h.main_guard(main)
