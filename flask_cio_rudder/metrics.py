"""Prometheus metrics of the pipeline (the `metrics` extra), on with ``CIO_RUDDER_METRICS = True``.

Counters and histograms are fed by the extension's own signals, so the pipeline knows
nothing of Prometheus. The outbox's state (pending events, the age of the oldest one,
dead letters, paused or not) is read from the outbox when Prometheus scrapes, so every
process reports the same numbers, whichever one answers the scrape.

Under gunicorn with several workers, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode) and expose :func:`metrics_response`: it collects every worker's counters.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
    )
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        'CIO_RUDDER_METRICS needs prometheus_client: pip install "Flask-CIO-Rudder[metrics]"'
    ) from error

from . import signals
from .outbox import OutboxForwarder, get_outbox
from .state import state_of
from .store import StoreError

__all__ = ["enable", "metrics_response"]

logger = logging.getLogger("flask_cio_rudder")

#: The RudderStack names of the six first-class email events; every other event counts as "other".
_EMAIL_EVENTS = frozenset(
    [
        "Email Delivered",
        "Email Opened",
        "Email Link Clicked",
        "Email Bounced",
        "Email Marked as Spam",
        "Email Unsubscribed",
    ]
)

WEBHOOKS = Counter(
    "cio_rudder_webhooks",
    "Customer.io webhook requests by how they were answered.",
    ["outcome"],
)
WEBHOOK_DURATION = Histogram(
    "cio_rudder_webhook_duration_seconds",
    "Time the webhook route took to answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS = Counter(
    "cio_rudder_events",
    "Accepted Customer.io events by RudderStack event name (the six email events; others as 'other').",
    ["event"],
)
DELIVERY_ATTEMPTS = Counter(
    "cio_rudder_delivery_attempts",
    "Requests to RudderStack's /v1/batch by result: delivered, failed (retried), refused (dead letters).",
    ["result"],
)
DELIVERED_EVENTS = Counter("cio_rudder_delivered_events", "Events RudderStack stored.")
BATCH_DURATION = Histogram(
    "cio_rudder_batch_duration_seconds",
    "Time one request to RudderStack's /v1/batch took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# The apps whose outbox is read at scrape time, by name (the label); the last one enabled under a
# name wins. Weak, so apps built and dropped are not kept alive.
_apps: weakref.WeakValueDictionary[str, Flask] = weakref.WeakValueDictionary()


def enable(app: Flask) -> None:
    """Count ``app``'s webhooks, events and deliveries, and report its outbox when scraped."""
    signals.webhook_answered.connect(_on_answered, sender=app)
    signals.event_forwarded.connect(_on_forwarded, sender=app)
    signals.forward_failed.connect(_on_failed, sender=app)
    _apps[app.name] = app


def metrics_response() -> Response:
    """Every metric in Prometheus' text format, for a route of the host app (protect it as any admin page).

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) it adds up every process's counters.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_OUTBOX)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _on_answered(sender: Flask, outcome: str, duration: float, event: Any = None, **extra: Any) -> None:
    WEBHOOKS.labels(outcome).inc()
    WEBHOOK_DURATION.observe(duration)
    if outcome == "accepted" and event is not None:  # kept: not a retry after a 500 or a 503
        EVENTS.labels(event.name if event.name in _EMAIL_EVENTS else "other").inc()


def _on_forwarded(sender: Flask, payloads: list[Any], **extra: Any) -> None:
    DELIVERY_ATTEMPTS.labels("delivered").inc()
    DELIVERED_EVENTS.inc(len(payloads))
    _observe_batch(extra)


def _on_failed(sender: Flask, payloads: list[Any], retry: bool, **extra: Any) -> None:
    DELIVERY_ATTEMPTS.labels("failed" if retry else "refused").inc()
    _observe_batch(extra)


def _observe_batch(extra: dict[str, Any]) -> None:
    duration = extra.get("duration")
    if duration is not None:
        BATCH_DURATION.observe(duration)


class _OutboxCollector(Collector):
    """The outbox's state, read when Prometheus scrapes; the oldest pending age is the one to alert on."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "cio_rudder_pending_events", "Accepted events not yet delivered.", labels=["app"]
        )
        oldest = GaugeMetricFamily(
            "cio_rudder_oldest_pending_age_seconds",
            "Age of the oldest event not yet delivered (0 when none): alert when it grows.",
            labels=["app"],
        )
        dead = GaugeMetricFamily("cio_rudder_dead_letters", "Events kept as dead letters.", labels=["app"])
        paused = GaugeMetricFamily(
            "cio_rudder_sending_paused",
            "1 while an operator has paused sending (flask cio-rudder pause), else 0.",
            labels=["app"],
        )
        up = GaugeMetricFamily(
            "cio_rudder_outbox_up",
            "1 when the outbox could be read for this scrape, 0 when not (its database is down or gone).",
            labels=["app"],
        )
        for name, app in sorted(_apps.items()):
            if not isinstance(state_of(app).forwarder, OutboxForwarder):
                continue  # another forwarder keeps nothing to report
            try:
                status = get_outbox(app).status()
            except Exception as error:  # the other gauges are left out: a 0 would read as "all delivered"
                # A StoreError says what is wrong; anything else (a bug, an unreadable spool file) needs
                # its traceback. Either way the counters are still scraped.
                unexpected = not isinstance(error, StoreError)
                logger.warning(
                    "Metrics: the outbox of app %r could not be read: %s", name, error, exc_info=unexpected
                )
                up.add_metric([name], 0.0)
                continue
            up.add_metric([name], 1.0)
            pending.add_metric([name], status.pending)
            oldest.add_metric([name], status.oldest_pending_age or 0.0)
            dead.add_metric([name], status.dead)
            paused.add_metric([name], 1.0 if status.paused else 0.0)
        yield from (up, pending, oldest, dead, paused)


_OUTBOX = _OutboxCollector()
REGISTRY.register(_OUTBOX)
