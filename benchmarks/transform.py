"""Validation + transform (``Validation()(body)``) throughput in one process, against RudderStack's own.

    python benchmarks/transform.py            # 5 rounds of 2 s, then a profile
    python benchmarks/transform.py --quick    # a few hundred milliseconds

``Validation()(body)`` is everything the webhook does per event between parsing the body and
the outbox: validation, the RudderStack event (``transform``) and its JSON text. The six sample
email events round robin, each with its own ``event_id``. RudderStack's own transformer does
43,000 to 47,000 events/s in process on this kind of machine (about 22 µs per event).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import harness as h  # the scripts run from benchmarks/ or with it on sys.path

from flask_cio_rudder.validation import Validation

RUDDERSTACK_EVENTS_PER_SECOND = 45_000
load_event = Validation()  # the webhook's own: one decoded body in, a CioEvent out


def events_per_second(batch: list[dict[str, Any]], seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for body in batch:
            load_event(body)
        done += len(batch)
    return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 0.2 s, no profile")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 0.2
    batch = h.bodies(600, h.new_tag())
    events_per_second(batch, 0.2)  # warm up
    rates = [events_per_second(batch, args.seconds) for _ in range(args.rounds)]
    rate = h.median(rates)
    rows = [
        [
            "Validation()(body): validation + transform",
            f"{rate:,.0f}",
            f"{1e6 / rate:.1f}",
            " / ".join(f"{r:,.0f}" for r in rates),
        ],
        ["RudderStack's own transformer", f"~{RUDDERSTACK_EVENTS_PER_SECOND:,}", "~22", "-"],
        ["ratio", f"{rate / RUDDERSTACK_EVENTS_PER_SECOND:.2f}", "", ""],
    ]
    print(f"{h.header()}\n\n{h.table(['', 'events/s (median)', 'µs per event', 'each round'], rows)}")
    if not args.quick:
        profiler, bodies = cProfile.Profile(), h.bodies(6000, h.new_tag())
        profiler.runcall(lambda: [load_event(body) for body in bodies])
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print("\nwhere the time goes (cProfile, 6,000 events, by own time):\n" + out.getvalue())
    return 0


if __name__ == "__main__":
    h.main_guard(main)
