"""The sender: a background thread in each process that drains the outbox to RudderStack.

It claims batches (at most ``batch_size`` events, each at most 32 KB, so well under
RudderStack's request limit), posts them to ``/v1/batch`` and acts on the answer
as RudderStack's API describes: 200 delivered; 400 and 413 split the batch until
the bad events are alone and kept as dead letters; 401, 403 and 404 keep
everything and log one error naming the setting to check; anything else (429,
5xx, timeouts, refused or reset connections) gives the events back and backs off.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import requests
from flask import Flask

from . import signals
from .outbox import Claimed, Outbox
from .rudderstack import DataPlane, describe

__all__ = ["Sender"]

logger = logging.getLogger("flask_cio_rudder")

_CONFIGURATION_ERRORS = {
    401: "check CIO_RUDDER_WRITE_KEY: RudderStack does not know this write key",
    403: "check CIO_RUDDER_WRITE_KEY: RudderStack refused this write key",
    404: "check CIO_RUDDER_DATA_PLANE_URL and that the RudderStack source is enabled",
}


class Sender:
    """Sends what the outbox holds, from a daemon thread started in each process that uses it."""

    #: First and largest wait after a failed attempt, in seconds (the wait doubles, with jitter).
    RETRY_BASE = 1.0
    RETRY_CAP = 300.0
    #: How long an idle sender sleeps before looking for due events again.
    IDLE_WAIT = 5.0
    #: After being woken by a new event, how long the sender lets a batch build up before
    #: claiming it: posting each event on its own would cost the web workers' CPU.
    LINGER = 0.2

    def __init__(
        self,
        app: Flask,
        outbox: Outbox,
        make_data_plane: Callable[[], DataPlane],
        *,
        batch_size: int = 100,
        lease: float = 60.0,
        max_age: float = 7 * 24 * 3600,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.app = app
        self.outbox = outbox
        self.batch_size = batch_size
        self.lease = lease
        self.max_age = max_age
        self.shutdown_timeout = shutdown_timeout
        self._make_data_plane = make_data_plane
        self._fresh_process_state()
        _live_senders.add(self)

    def _fresh_process_state(self) -> None:
        """Everything that must not be shared across a fork: thread, locks, sockets."""
        self.data_plane = self._make_data_plane()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failures = 0
        self._reported_configuration_error = False

    # -- lifecycle -----------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start this process's sender thread unless it runs already (cheap; called per request)."""
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid != os.getpid():  # forked without our fork hook (uWSGI, for one)
                self._after_fork()
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="cio-rudder-sender", daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """Tell the sender there is something new to send."""
        self._wake.set()

    def stop(self) -> None:
        """Flush what can be sent within ``shutdown_timeout`` seconds, then stop. Never hangs."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            thread.join(self.shutdown_timeout + 1.0)
        self.data_plane.close()

    def _after_fork(self) -> None:
        self._fresh_process_state()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                claimed, error = self.send_batch()
            except Exception:  # a bug or a broken disk must not kill the thread silently
                logger.exception("The Customer.io event sender failed; retrying")
                claimed, error = 0, "sender error"
            if error is not None:
                self._stopping.wait(self._retry_delay())
            elif claimed < self.batch_size:
                if self._wake.wait(self.IDLE_WAIT):
                    self._stopping.wait(self.LINGER)
                self._wake.clear()
        self.flush(self.shutdown_timeout)

    def _retry_delay(self) -> float:
        ceiling = min(self.RETRY_CAP, self.RETRY_BASE * 2 ** min(self._failures - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    # -- sending -------------------------------------------------------------------------------

    def flush(self, timeout: float) -> int:
        """Send batches from this thread until nothing is due, a send fails, or ``timeout`` passes.

        Returns how many events were claimed. Each request's own timeout is cut to
        what is left, so this returns within about ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return total
            claimed, error = self.send_batch(timeout=remaining)
            total += claimed
            if error is not None or claimed == 0:
                return total

    def send_batch(self, timeout: float | None = None) -> tuple[int, str | None]:
        """Claim one batch and deliver it; returns how many were claimed and the error, if any."""
        owner, events = self.outbox.claim(self.batch_size, self.lease, self.max_age)
        if not events:
            return 0, None
        error = self._deliver(owner, events, timeout)
        if error is None:
            self._failures = 0
            self._reported_configuration_error = False
        else:
            self._failures += 1
        return len(events), error

    def _deliver(self, owner: str, events: Sequence[Claimed], timeout: float | None) -> str | None:
        """Post ``events``; returns ``None`` when each is delivered or dead, else the error (all released)."""
        ids = [event.event_id for event in events]
        started = time.perf_counter()
        try:
            response = self.data_plane.post_batch(
                [event.payload_json for event in events], timeout=_cut(self.data_plane.timeout, timeout)
            )
        except requests.RequestException as error:
            reason = f"could not reach RudderStack ({type(error).__name__})"
            return self._retry_later(owner, events, reason, time.perf_counter() - started)
        status = response.status_code
        if status == 200:
            self.outbox.delivered(owner, ids)
            self._signal(signals.event_forwarded, events, duration=time.perf_counter() - started)
            return None
        if status in (400, 413) and len(events) > 1:
            half = len(events) // 2
            first_error = self._deliver(owner, events[:half], timeout)
            if first_error is not None:
                self.outbox.release(owner, ids[half:], first_error)
                return first_error
            return self._deliver(owner, events[half:], timeout)
        if status in (400, 413):
            reason = describe(response)
            self.outbox.dead(owner, ids, reason)
            logger.warning(
                "RudderStack refused Customer.io event %s; kept as a dead letter: %s", ids[0], reason
            )
            duration = time.perf_counter() - started
            self._signal(signals.forward_failed, events, reason=reason, retry=False, duration=duration)
            return None
        reason = describe(response)
        if status in _CONFIGURATION_ERRORS:
            reason = f"{reason}; {_CONFIGURATION_ERRORS[status]}"
            if not self._reported_configuration_error:
                logger.error("Cannot deliver Customer.io events: %s. They are kept and retried.", reason)
                self._reported_configuration_error = True
        return self._retry_later(owner, events, reason, time.perf_counter() - started)

    def _retry_later(self, owner: str, events: Sequence[Claimed], reason: str, duration: float) -> str:
        self.outbox.release(owner, [event.event_id for event in events], reason)
        if not self._reported_configuration_error:
            logger.warning("Delivery to RudderStack failed, will retry: %s", reason)
        self._signal(signals.forward_failed, events, reason=reason, retry=True, duration=duration)
        return reason

    def _signal(self, signal: Any, events: Sequence[Claimed], **data: Any) -> None:
        """Send a delivery signal, ``payloads=`` the events, in an app context.

        The events are decoded only if someone listens; a raising receiver is logged, never fatal.
        """
        if not signal.receivers:
            return
        try:
            payloads = [json.loads(event.payload_json) for event in events]
            with self.app.app_context():
                signal.send(self.app, payloads=payloads, **data)
        except Exception:
            logger.exception("A receiver of %s raised", signal.name)


def _cut(timeout: Any, limit: float | None) -> Any:
    """``timeout`` (a number or a (connect, read) pair) with each part at most ``limit``."""
    if limit is None:
        return timeout
    if isinstance(timeout, (tuple, list)):
        return tuple(min(part, limit) for part in timeout)
    return min(timeout, limit)


# Senders alive in this process, so a fork can reset each of them in the child.
_live_senders: weakref.WeakSet[Sender] = weakref.WeakSet()


def _reset_senders_in_child() -> None:
    """After a fork (gunicorn, Celery prefork...): no thread survives it, so start afresh."""
    for sender in list(_live_senders):
        was_running = sender._thread is not None
        sender._after_fork()
        if was_running:
            sender.ensure_running()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_senders_in_child)
