"""The sender: drains the outbox store to RudderStack, from a thread of each process or a worker.

It claims batches (at most ``batch_size`` events, each at most 32 KB, so well under
RudderStack's request limit), posts them to ``/v1/batch`` and acts on the answer
as RudderStack's API describes: 200 delivered; 400 and 413 split the batch until
the bad events are alone and kept as dead letters; 401, 403 and 404 keep
everything and log one error naming the setting to check; anything else (429,
5xx, timeouts, refused or reset connections) gives the events back and backs off.
A store that cannot be reached (PostgreSQL down, a locked disk) is backed off the same way.
A ``Retry-After`` on a 429 or 503 sets the wait instead (at most ``RETRY_AFTER_CAP``), and an
optional :class:`Pacer` spaces requests (``CIO_RUDDER_MAX_REQUESTS_PER_SECOND``).
While an operator has paused sending, nothing is claimed and the sender only polls; what the
spool's mover handed it before the pause waits too (it learns of a pause at its next claim from
the store, within ``STORE_EVERY``).

No request is meant to outlive the claim's lease: its connect and read timeouts are each
cut to what is left of it, so a live sender's batch is not taken over (and sent twice at
once) while it waits. requests has no limit on a whole request: a server that takes most
of that time to accept the connection, or trickles its answer, can still run past it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import requests
from flask import Flask

from . import signals
from .rudderstack import DataPlane, configuration_hint, retry_after
from .store import Claim, Claimed, OutboxStore, StoreError

__all__ = ["Delivery", "Pacer", "Sender", "check_lease"]

logger = logging.getLogger("flask_cio_rudder")


#: Seconds of a lease kept back from a request's timeout, for marking the batch afterwards.
_LEASE_MARGIN = 2.0
#: The shortest time a request to RudderStack is given (seconds).
_SHORTEST_REQUEST = 0.1
#: The shortest lease (``CIO_RUDDER_OUTBOX_LEASE``): the margin, and a second for each request.
_SHORTEST_LEASE = _LEASE_MARGIN + 1.0


def check_lease(lease: float) -> float:
    """``lease`` if it leaves each request to RudderStack a second once the margin is kept, else fail
    naming the key: each post would time out before RudderStack answered, and be sent again."""
    if lease < _SHORTEST_LEASE:
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_LEASE must be at least {_SHORTEST_LEASE:g} seconds, not {lease:g}: each "
            f"request to RudderStack gets the lease less {_LEASE_MARGIN:g} s (kept for marking the "
            "batch), and needs a second at least."
        )
    return lease


@dataclass
class Delivery:
    """What one or more batches came to: events claimed, delivered, made dead letters; the last error."""

    claimed: int = 0
    delivered: int = 0
    dead: int = 0
    error: str | None = None
    paused: bool = False  # nothing was claimed: an operator paused sending

    def add(self, other: Delivery) -> None:
        self.claimed += other.claimed
        self.delivered += other.delivered
        self.dead += other.dead
        self.error = other.error or self.error
        self.paused = other.paused


class Pacer:
    """Spaces this process's requests to RudderStack at least ``1 / rate`` seconds apart.

    ``rate`` is ``CIO_RUDDER_MAX_REQUESTS_PER_SECOND`` (``None``: no cap). Each sending process
    keeps its own pace, so N senders together send at most N times the rate.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
            raise RuntimeError(
                f"CIO_RUDDER_MAX_REQUESTS_PER_SECOND must be a positive number or None, not {rate!r}."
            )
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def reserve(self, within: float) -> float | None:
        """Take the next slot if it comes within ``within`` seconds: the seconds to wait before
        sending in it (0 when it is due). ``None`` if it comes later; the slot stays free then."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            if slot - now >= within:
                return None
            self._next = slot + self.interval
            return slot - now


class Sender:
    """Sends what the outbox store holds, from a daemon thread started in each process that uses it."""

    #: First and largest wait after a failed attempt, in seconds (the wait doubles, with jitter).
    #: The largest is short: a data plane that is back after an outage gets the events within a
    #: minute, not five, while the senders' tries every minute cost it next to nothing.
    RETRY_BASE = 1.0
    RETRY_CAP = 60.0
    #: The longest wait a ``Retry-After`` sets, in seconds.
    RETRY_AFTER_CAP = 300.0
    #: How long an idle sender sleeps before looking for due events again.
    IDLE_WAIT = 5.0
    #: Seconds between two purges of old delivered events (``keep_delivered``) by one process.
    PURGE_EVERY = 3600.0
    #: After being woken by a new event, how long the sender lets a batch build up before
    #: claiming it: posting each event on its own would cost the web workers' CPU.
    LINGER = 0.2
    #: While the spool's mover keeps handing events over, how often (seconds) the sender also
    #: claims from the store, which alone holds events adopted from dead processes, accepted
    #: while sending failed, requeued, or freed from a dead sender: busy traffic must not hold
    #: them back. While such claims come back full, it claims again at once.
    STORE_EVERY = 1.0

    def __init__(
        self,
        app: Flask,
        store: OutboxStore,
        make_data_plane: Callable[[], DataPlane],
        *,
        batch_size: int = 100,
        lease: float = 60.0,
        max_age: float = 7 * 24 * 3600,
        keep_delivered: float | None = None,
        shutdown_timeout: float = 2.0,
        max_requests_per_second: float | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.batch_size = batch_size
        self.lease = lease
        self.max_age = max_age
        self.keep_delivered = keep_delivered
        self.shutdown_timeout = shutdown_timeout
        self.idle_wait = self.IDLE_WAIT  # the worker polls more often where the store cannot wake it
        self.pacer = Pacer(max_requests_per_second)
        #: Wall-clock time, for ``Retry-After`` dates (tests give a hand-moved one).
        self.clock: Callable[[], float] = time.time
        self._make_data_plane = make_data_plane
        self._fresh_process_state()
        _live_senders.add(self)

    def _fresh_process_state(self) -> None:
        """Everything that must not be shared across a fork: threads, locks, sockets."""
        self.data_plane = self._make_data_plane()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        #: Claims the spool's mover made for this sender, with when their leases end (monotonic).
        self._offers: deque[tuple[float, Claim]] = deque()
        self._store_due = 0.0  # when (time.monotonic()) the store is to be claimed from, offers or not
        self._paused = False  # the last claim from the store found sending paused: offers wait too
        #: Whether this process serves the app (see :meth:`serve`): until then the thread sends nothing.
        self._serving = False
        self._purge_due = 0.0  # when (time.monotonic()) to purge old delivered events next: at once
        self._failures = 0
        self._retry_after: float | None = None  # seconds RudderStack last asked us to wait
        #: How the sender waits after a failure; returns early when stopping.
        self.sleep: Callable[[float], object] = self._stopping.wait
        #: How it waits its turn under the request rate cap; ``False`` if a stop cut the wait short.
        self.wait_turn: Callable[[float], bool] = self._wait_turn
        self._reported_configuration_error = False
        self._reported_store_error = False
        self._final_flush = True
        self._exit_lock = threading.Lock()
        self._ended = False  # the thread has returned
        self._at_exit: list[Callable[[], object]] = []  # what it closes when it outlived stop()

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
                if self.store.notifies:
                    self._watcher = threading.Thread(
                        target=self.store.watch,
                        args=(self.wake, self._stopping),
                        name="cio-rudder-wakeups",
                        daemon=True,
                    )
                    self._watcher.start()

    @property
    def running(self) -> bool:
        """Whether this process's sender thread is alive."""
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def wake(self) -> None:
        """Tell the sender there is something new to send."""
        self._wake.set()

    def serve(self) -> None:
        """This process serves the app (it got a request, accepted an event, or is ``flask cio-rudder
        worker``): from now on its thread sends (cheap; called per request).

        Until then it sends nothing, nor at exit: a process that only loads the app (an RQ job, a
        Celery worker, a script) would claim a batch and often die mid-post (RQ ends each job with
        ``os._exit``), and the next one would post the same batch again.
        """
        if not self._serving:
            self._serving = True
            self._wake.set()

    @property
    def takes_offers(self) -> bool:
        """Whether the spool's mover should lease what it moves to this sender: it runs and sends well."""
        return self.running and not self._stopping.is_set() and self._failures == 0

    def offer(self, claim: Claim) -> None:
        """Send ``claim`` next, in batches: events the spool's mover leased to this process as it moved them.

        It saves a claim that would rewrite every row just written. An offer whose lease
        runs out before it is sent is dropped: its events are claimed again from the store.
        """
        deadline = time.monotonic() + self.lease - _LEASE_MARGIN
        for start in range(0, len(claim.events), self.batch_size):
            self._offers.append((deadline, Claim(claim.owner, claim.events[start : start + self.batch_size])))
        self.wake()

    def stop(self, *, flush: bool = True) -> None:
        """Flush what can be sent within ``shutdown_timeout`` seconds (unless told not to), then stop.

        Never hangs: the threads get ``shutdown_timeout`` seconds in all (and one more to mark what
        they sent), a post still running then goes on in the background (see :meth:`close_after`).
        """
        self._final_flush = flush
        stopped_before = self._stopping.is_set()  # then it was waited for already
        self._stopping.set()
        self._wake.set()
        if self._pid == os.getpid() and not stopped_before:
            deadline = time.monotonic() + self.shutdown_timeout + 1.0
            for thread in (self._thread, self._watcher):
                if thread is not None and thread.is_alive():
                    thread.join(max(0.0, deadline - time.monotonic()))
        self.close_after(self.data_plane.close)

    def close_after(self, close: Callable[[], object]) -> None:
        """Call ``close`` once this process's sender thread has ended: now, unless a post outlived
        :meth:`stop`. The batch it posts then stays leased (on PostgreSQL, heartbeating) until it
        ends, so nobody else sends it meanwhile, and nothing it uses is reopened behind a close."""
        with self._exit_lock:
            thread = self._thread
            if thread is not None and thread.is_alive() and not self._ended and self._pid == os.getpid():
                self._at_exit.append(close)
                return
        close()

    def _after_fork(self) -> None:
        stopped = self._stopping.is_set()
        self._fresh_process_state()
        if stopped:  # stopped (its outbox closed) before the fork: it stays stopped in the child
            self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._serving:
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            try:
                self._purge_delivered_when_due()
                outcome = self.send_batch()
            except StoreError as error:  # the database is down: back off as from RudderStack
                self._failures += 1
                self._retry_after = None  # what RudderStack once asked is not the database's wait
                if not self._reported_store_error:
                    logger.warning("The outbox cannot be read, will retry: %s", error)
                    self._reported_store_error = True
                outcome = Delivery(error=str(error))
            except Exception:  # a bug must not kill the thread silently
                logger.exception("The Customer.io event sender failed; retrying")
                self._failures += 1
                outcome = Delivery(error="sender error")
            if outcome.error is not None:
                self.sleep(self.retry_delay())
            elif outcome.paused:
                self._wake.wait(self.idle_wait)  # resuming wakes senders that listen; the others poll
                self._wake.clear()
            elif outcome.claimed < self.batch_size and not self._offers:
                if self._wake.wait(self.idle_wait):
                    self._stopping.wait(self.LINGER)
                self._wake.clear()
        try:
            if self._final_flush and self._serving:
                self.flush(self.shutdown_timeout)
        except StoreError as error:
            logger.warning("Could not send the outbox's last events at shutdown: %s", error)
        finally:
            with self._exit_lock:
                self._ended = True
                closes, self._at_exit = self._at_exit, []
            for close in closes:
                close()

    def _purge_delivered_when_due(self) -> None:
        """Delete the events delivered more than ``keep_delivered`` seconds ago, at most every
        ``PURGE_EVERY`` seconds: kept for ever, they fill the disk (about a kilobyte each)."""
        if self.keep_delivered is None or time.monotonic() < self._purge_due:
            return
        self._purge_due = time.monotonic() + self.PURGE_EVERY
        try:
            purged = self.store.purge_delivered(self.keep_delivered)
        except StoreError as error:
            logger.warning("Could not purge old delivered events, will try again in an hour: %s", error)
            return
        if purged:
            logger.info(
                "Purged %d events delivered more than %s days ago (CIO_RUDDER_OUTBOX_KEEP_DELIVERED)",
                purged,
                f"{self.keep_delivered / 86400:g}",
            )

    def retry_delay(self) -> float:
        """Seconds to wait after a failed attempt: what RudderStack asked for, else jittered backoff.

        They are capped at ``RETRY_AFTER_CAP`` and ``RETRY_CAP``. A wait asked for that is shorter
        than ``RETRY_BASE`` (``Retry-After: 0``, a date passed) gets the backoff instead: on every
        answer, it would make the sender ask again and again at once.
        """
        if self._retry_after is not None and self._retry_after >= self.RETRY_BASE:
            return min(self.RETRY_AFTER_CAP, self._retry_after)
        ceiling = min(self.RETRY_CAP, self.RETRY_BASE * 2 ** min(max(self._failures, 1) - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    # -- sending -------------------------------------------------------------------------------

    def flush(self, timeout: float) -> Delivery:
        """Send batches from this thread until nothing is due, a send fails, or ``timeout`` passes.

        Each request's own timeout is cut to what is left, so this returns within about
        ``timeout`` seconds, and the store's own bounds on a claim or a mark that it does not answer.
        Raises :class:`~flask_cio_rudder.store.StoreError` if the store is down.
        """
        deadline = time.monotonic() + timeout
        self._purge_delivered_when_due()  # also where no thread sends: a flush from cron
        total = Delivery()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return total
            outcome = self.send_batch(timeout=remaining)
            total.add(outcome)
            if outcome.error is not None or outcome.claimed == 0:
                return total

    def send_batch(self, timeout: float | None = None) -> Delivery:
        """Claim one batch and deliver it; says how many were claimed, delivered, dead, and the error."""
        claim, lease_end = self._next_claim()
        if not claim.events:
            return Delivery(paused=claim.paused)
        # No request may outlast the lease: after it, another sender may take the batch.
        now = time.monotonic()
        deadline = lease_end if timeout is None else min(lease_end, now + timeout)
        deadline = max(deadline, now + _SHORTEST_REQUEST)
        outcome = Delivery(claimed=len(claim.events))
        self._deliver(claim.owner, claim.events, deadline, outcome)
        if outcome.error is None:
            self._failures = 0
            self._retry_after = None
            self._reported_configuration_error = False
            self._reported_store_error = False
        else:
            self._failures += 1
        if outcome.delivered:
            n = outcome.delivered
            logger.info("Delivered %d Customer.io event%s to RudderStack", n, "" if n == 1 else "s")
        return outcome

    def _next_claim(self) -> tuple[Claim, float]:
        """The next batch, and when the requests for it must be done (``time.monotonic()``: the
        lease's end less the margin): a claim from the store when one is due (``STORE_EVERY``)
        and finds events, else the next offer with time left on its lease, else a claim.

        While the store says sending is paused, offers wait as the store's events do: they are
        sent after a resume if their lease has not run out, else claimed again from the store.
        """
        if not self._offers or self._paused or time.monotonic() >= self._store_due:
            claim, deadline = self._claim_from_store()
            if claim.events or claim.paused or not self._offers:
                return claim, deadline
        while True:
            try:
                deadline, claim = self._offers.popleft()
            except IndexError:  # every offer's lease ran out: their events are claimed from the store
                return self._claim_from_store()
            if deadline - time.monotonic() > _SHORTEST_REQUEST:
                return claim, deadline

    def _claim_from_store(self) -> tuple[Claim, float]:
        started = time.monotonic()  # the lease runs from the claim, however long the claim takes
        claim = self.store.claim(self.batch_size, self.lease, self.max_age)
        self._paused = claim.paused
        if claim.expired:
            logger.warning(
                "%d Customer.io event%s not delivered within CIO_RUDDER_OUTBOX_MAX_AGE (%g s) became dead "
                "letters: see flask cio-rudder dead-letters, and requeue what should still go",
                claim.expired,
                "" if claim.expired == 1 else "s",
                self.max_age,
            )
        self._store_due = started + (0.0 if len(claim.events) >= self.batch_size else self.STORE_EVERY)
        return claim, started + self.lease - _LEASE_MARGIN

    def _deliver(self, owner: str, events: Sequence[Claimed], deadline: float, outcome: Delivery) -> None:
        """Post ``events`` before ``deadline`` (``time.monotonic()``: the lease's end less its margin,
        or sooner for a flush with a timeout); each ends delivered, dead, or released with
        ``outcome.error`` set. A batch RudderStack refuses is split and its halves posted in turn,
        all within that one deadline."""
        ids = [event.event_id for event in events]
        # No request after the deadline: past the lease (less its margin) another sender may claim them.
        wait = self.pacer.reserve(within=deadline - time.monotonic())
        if wait is None:
            reason = "their turn under CIO_RUDDER_MAX_REQUESTS_PER_SECOND comes after"
            self._give_back(owner, events, f"{reason} the claim's lease, or the flush's timeout", outcome)
            return
        if wait > 0 and not self.wait_turn(wait):  # stopping: the final flush sends them in its turn
            self._give_back(owner, events, "the sender is stopping", outcome)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "no time was left to post these events (the claim's lease, or the flush's timeout)"
            self._give_back(owner, events, reason, outcome)
            return
        started = time.perf_counter()
        try:
            response = self.data_plane.post_batch(
                [event.payload_json for event in events],
                timeout=_cut(self.data_plane.timeout, max(left, _SHORTEST_REQUEST)),
            )
        except requests.RequestException as error:
            self._retry_after = None
            reason = self.data_plane.unreachable(error)
            self._retry_later(owner, events, reason, outcome, time.perf_counter() - started)
            return
        duration = time.perf_counter() - started
        status = response.status_code
        if response.stored:
            self.store.mark_delivered(owner, ids)
            outcome.delivered += len(ids)
            self._signal(signals.event_forwarded, events, duration=duration)
            return
        if status in (400, 413) and len(events) > 1:
            half = len(events) // 2
            self._deliver(owner, events[:half], deadline, outcome)
            if outcome.error is not None:
                self.store.release(owner, ids[half:], outcome.error)
                return
            self._deliver(owner, events[half:], deadline, outcome)
            return
        if status in (400, 413):
            reason = self.data_plane.describe(response)
            self.store.mark_dead(owner, ids, reason)
            outcome.dead += len(ids)
            logger.warning(
                "RudderStack refused Customer.io event %s; kept as a dead letter: %s", ids[0], reason
            )
            self._signal(signals.forward_failed, events, reason=reason, retry=False, duration=duration)
            return
        reason = self.data_plane.describe(response)
        self._retry_after = retry_after(response, self.clock())
        if self._retry_after is not None:
            reason = f"{reason}; it asked to wait {self._retry_after:.0f} s (Retry-After)"
        hint = configuration_hint(status)
        if hint is not None:
            reason = f"{reason}; {hint}"
            if not self._reported_configuration_error:
                logger.error("Cannot deliver Customer.io events: %s. They are kept and retried.", reason)
                self._reported_configuration_error = True
        self._retry_later(owner, events, reason, outcome, duration)

    def _wait_turn(self, seconds: float) -> bool:
        """Wait ``seconds`` for a turn under the rate cap; ``False`` if a stop came meanwhile.

        Once stopping (the final flush, ``flask cio-rudder flush``), nothing cuts the wait: those
        flushes keep the cap too, and their own timeout bounds it (a later turn is not waited for).
        """
        if self._stopping.is_set():
            time.sleep(seconds)
            return True
        return not self._stopping.wait(seconds)

    def _give_back(self, owner: str, events: Sequence[Claimed], reason: str, outcome: Delivery) -> None:
        """Release ``events`` unsent, for a later claim; no request was made, so no attempt failed."""
        self.store.release(owner, [event.event_id for event in events], reason)
        outcome.error = reason

    def _retry_later(
        self, owner: str, events: Sequence[Claimed], reason: str, outcome: Delivery, duration: float
    ) -> None:
        """Release ``events`` after a request that failed: logged, and ``forward_failed`` sent."""
        self._give_back(owner, events, reason, outcome)
        if not self._reported_configuration_error:
            logger.warning("Delivery to RudderStack failed, will retry: %s", reason)
        self._signal(signals.forward_failed, events, reason=reason, retry=True, duration=duration)

    def _signal(self, signal: Any, events: Sequence[Claimed], **data: Any) -> None:
        """Send a delivery signal, ``payloads=`` the events, in an app context.

        The events are decoded only if someone listens; a raising receiver is logged, never fatal.
        """
        if not signal.receivers:
            return
        payloads = [json.loads(event.payload_json) for event in events]
        with self.app.app_context():
            signals.send_logged(signal, self.app, payloads=payloads, **data)


def _cut(timeout: Any, limit: float) -> Any:
    """``timeout`` (a number or a (connect, read) pair) with each part at most ``limit``."""
    if isinstance(timeout, (tuple, list)):
        return tuple(min(part, limit) for part in timeout)
    return min(timeout, limit)


# Senders alive in this process, so a fork can reset each of them in the child.
_live_senders: weakref.WeakSet[Sender] = weakref.WeakSet()


def _reset_senders_in_child() -> None:
    """After a fork (gunicorn, Celery prefork...): no thread survives it, so start afresh."""
    for sender in list(_live_senders):
        was_running = sender._thread is not None
        sender.store.after_fork()
        sender._after_fork()
        if was_running:
            sender.ensure_running()  # unless it was stopped


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_senders_in_child)
