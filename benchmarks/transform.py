"""Transform throughput: validation plus transform of the six email events, in one process.

    python benchmarks/transform.py            # 5 rounds of 2 s each, then a profile
    python benchmarks/transform.py --quick    # a few hundred milliseconds, for smoke runs

Measures ``flask_cio_rudder.transform.load_event`` (marshmallow validation, the
RudderStack event and its JSON text: everything the webhook does per event between
parsing the body and the outbox) on a round-robin mix of the six sample email
events, each with a distinct ``event_id``. Reported as events per second (median of
the rounds) and as a ratio to RudderStack's own transformer, which does about
43,000 to 47,000 events per second in process on this machine kind (about 22 us
per event; see ../../shared/docs/rudderstack.md and the issue that set the target).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from flask_cio_rudder.transform import load_event

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "samples"
METRICS = ["delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed"]
RUDDERSTACK_EVENTS_PER_SECOND = 45_000  # the middle of 43,000-47,000, measured by the author


def bodies(count: int) -> list[dict[str, Any]]:
    """``count`` webhook bodies cycling through the six samples, each with its own event_id."""
    samples = [json.loads((SAMPLES / f"email_{metric}.json").read_text()) for metric in METRICS]
    return [dict(samples[n % 6], event_id=f"01BENCH{n:019d}") for n in range(count)]


def events_per_second(batch: list[dict[str, Any]], seconds: float) -> float:
    """Run ``load_event`` over ``batch`` again and again for about ``seconds``; events per second."""
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for body in batch:
            load_event(body)
        done += len(batch)
    return done / elapsed


def profile(batch: list[dict[str, Any]], top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for body in batch:
        load_event(body)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    args = parser.parse_args()
    rounds, seconds = (2, 0.2) if args.quick else (args.rounds, args.seconds)

    batch = bodies(600)
    events_per_second(batch, 0.2)  # warm up
    rates = [events_per_second(batch, seconds) for _ in range(rounds)]
    median = statistics.median(rates)
    print("transform + validation (load_event), six email events round-robin")
    print(f"  rounds:              {', '.join(f'{rate:,.0f}' for rate in rates)} events/s")
    print(f"  median:              {median:,.0f} events/s  ({1e6 / median:.1f} us per event)")
    print(f"  RudderStack's own:   ~{RUDDERSTACK_EVENTS_PER_SECOND:,} events/s  (about 22 us per event)")
    print(f"  ratio:               {median / RUDDERSTACK_EVENTS_PER_SECOND:.2f}  (target now: >= 0.50)")
    if not args.quick:
        print("\nwhere the time goes (cProfile, 6,000 events, by own time):")
        print(profile(bodies(6000), 15))


if __name__ == "__main__":
    main()
