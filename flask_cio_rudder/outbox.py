"""The outbox: accepted events kept in a store until the sender has them at RudderStack.

:class:`OutboxForwarder` is the ``"outbox"`` forwarder: the webhook writes each
accepted event to the store (SQLite by default, PostgreSQL by URL) before it
answers (on SQLite, by way of a per-process spool file: see :mod:`flask_cio_rudder.spool`),
and a :class:`~flask_cio_rudder.sender.Sender` delivers the store, from a
thread of each web process or from ``flask cio-rudder worker``. :class:`Outbox` is
what operators steer (``get_outbox(app)``, ``flask cio-rudder ...``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup
from flask.helpers import get_debug_flag
from werkzeug.serving import is_running_from_reloader

from .event import CioEvent
from .forwarders import Forwarder, ForwardError
from .rudderstack import data_plane_settings, make_data_plane
from .sender import Delivery, Sender, check_lease
from .settings import check_seconds
from .spool import Spool, spool_for
from .state import state_of
from .store import (
    Activity,
    DeadLetter,
    EventRecord,
    Match,
    OutboxStatus,
    OutboxStore,
    StoreError,
    StoreUnavailable,
    searched_fields,
    store_from_url,
)
from .transform import describe_body

__all__ = ["DEFAULT_URL", "FlushReport", "Outbox", "OutboxForwarder", "get_outbox"]

logger = logging.getLogger("flask_cio_rudder")

#: ``CIO_RUDDER_OUTBOX_URL``'s default: a file in the app's instance folder.
DEFAULT_URL = "sqlite:///cio_rudder_outbox.sqlite3"

# Outside a web request the sender can wait longer than Customer.io would.
_OUTBOX_TIMEOUT = (3.0, 10.0)

#: A worker has no web request to wake it, so without notifications it looks this often (seconds).
_WORKER_POLL = 1.0


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``count`` and its noun, as people write them: ``1 event``, ``2 events``, ``0 events``."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


@dataclass(frozen=True)
class FlushReport:
    """What ``flush`` sent, and why what is left was not sent."""

    delivered: int
    dead: int  # made dead letters by this flush (RudderStack refused them)
    error: str | None  # why sending stopped early (RudderStack or the store failing)
    status: OutboxStatus | None  # the outbox after the flush; None if the store could not be read

    @property
    def complete(self) -> bool:
        """Nothing is pending any more."""
        return self.status is not None and self.status.pending == 0

    def explain(self) -> list[str]:
        """One line per reason that events are still pending or dead, for people."""
        status = self.status
        if status is None:
            return [f"the outbox cannot be read: {self.error}"]
        lines = []
        if status.in_flight:
            lines.append(
                f"{status.in_flight} held by a live sender ({', '.join(status.holders)}), "
                "which is sending them now"
            )
        waiting = status.pending - status.in_flight
        if waiting and status.paused:
            lines.append(f"{waiting} not sent: sending is paused; `flask cio-rudder resume` starts it again")
        elif waiting and self.error is not None:
            lines.append(f"{waiting} not sent: {self.error}; kept, and retried with backoff")
        elif waiting:
            lines.append(f"{waiting} not sent within the timeout; run flush again, or let the senders work")
        if status.dead:
            lines.append(f"{counted(status.dead, 'dead letter')}: see `flask cio-rudder dead-letters`")
        return lines


class Outbox:
    """One app's outbox, for operators: status, flush, dead letters, requeue, purge, worker.

    ``get_outbox(app)`` returns it; ``flask cio-rudder ...`` calls it.
    """

    def __init__(self, store: OutboxStore, sender: Sender, spool: Spool | None = None) -> None:
        self.store = store
        self.sender = sender
        #: Where this process appends accepted events before they are moved into ``store`` (SQLite only).
        self.spool = spool

    def _move_spooled(self) -> None:
        """Move what this process spooled, and what dead processes left, into the store."""
        if self.spool is not None:
            self.spool.move()

    @property
    def url(self) -> str:
        """Where the events are kept, password redacted: safe to show."""
        return self.store.url

    @property
    def path(self) -> str | None:
        """The SQLite file, or ``None`` when the outbox lives in a database server."""
        path: str | None = getattr(self.store, "path", None)
        return path

    @property
    def outbox(self) -> Outbox:
        """Deprecated: ``get_outbox()`` now returns the outbox itself."""
        warnings.warn(
            "get_outbox(app).outbox is deprecated: get_outbox(app) is the outbox now",
            DeprecationWarning,
            stacklevel=2,
        )
        return self

    def status(self) -> OutboxStatus:
        """Counts of pending, delivered and dead events, what senders hold, the last error.

        What this process and dead ones spooled is moved into the store first, so that the
        counts include it: a spooled event is pending too.
        """
        self._move_spooled()
        return self.store.status()

    def flush(self, timeout: float = 30.0) -> FlushReport:
        """Send what is due now, from this thread, for at most ``timeout`` seconds; says what is left.

        A store that does not answer is waited for within its own bounds, which ``timeout`` does not
        cut: PostgreSQL's statement timeouts (30 s for a claim, 10 s for the status), SQLite's 30 s
        for a lock another program (an ``sqlite3`` shell) holds.
        """
        try:
            self._move_spooled()
            outcome = self.sender.flush(timeout)
        except StoreError as error:
            outcome = Delivery(error=str(error))
        try:
            status: OutboxStatus | None = self.store.status()
        except StoreError as error:
            status, outcome.error = None, str(error)
        return FlushReport(outcome.delivered, outcome.dead, outcome.error, status)

    def pause(self) -> None:
        """Stop sending in every process that uses this outbox; events are still accepted and kept."""
        self.store.set_paused(True)

    def resume(self) -> None:
        """Start sending again everywhere (senders that poll notice within their poll interval)."""
        self.store.set_paused(False)
        self.sender.wake()

    def dead_letters(
        self,
        limit: int = 100,
        *,
        match: Match | None = None,
        offset: int = 0,
        newest_first: bool = False,
        bodies: bool = True,
    ) -> list[DeadLetter]:
        """Dead letters with their reasons, oldest first; those that ``match``, a page at a time (with
        the rejected bodies unless ``bodies=False``)."""
        return self.store.dead_letters(
            limit, match=match, offset=offset, newest_first=newest_first, bodies=bodies
        )

    def count_dead_letters(self, match: Match | None = None) -> int:
        """How many dead letters ``match`` (all by default)."""
        return self.store.count_dead_letters(match)

    def requeue(self, event_ids: Sequence[str] | None = None, *, match: Match | None = None) -> int:
        """Send dead letters again: all of them, those with these ids, or those that ``match``."""
        count = self.store.requeue(event_ids, match=match)
        self.sender.wake()
        return count

    def purge_dead(self, match: Match | None = None) -> int:
        """Delete the dead letters that ``match`` (all by default): they will never be sent."""
        return self.store.purge_dead(match)

    def find(self, query: str, limit: int = 50) -> list[EventRecord]:
        """What became of an event id, or (for a query with ``@``) of an email address's events."""
        query = query.strip()
        self._move_spooled()  # an event accepted a moment ago is found too
        if "@" in query:
            return self.store.find(email=query, limit=limit)
        return self.store.find(event_id=query, limit=limit) if query else []

    def event(self, event_id: str) -> EventRecord | None:
        """What became of the event with this id (``None`` if nothing is kept under it)."""
        self._move_spooled()  # an event accepted a moment ago is found too
        records = self.store.find(event_id=event_id, limit=1)
        return records[0] if records else None

    def activity(self, minutes: int = 60) -> Activity:
        """Events accepted and delivered per minute over the last ``minutes`` minutes."""
        return self.store.activity(minutes)

    def count_delivered(self, older_than: float) -> int:
        """How many delivered events are older than ``older_than`` seconds: what a purge would delete."""
        return self.store.count_delivered(older_than)

    def purge_delivered(self, older_than: float) -> int:
        """Delete delivered events older than ``older_than`` seconds."""
        return self.store.purge_delivered(older_than)

    def copy_pending_from(self, source: OutboxStore, page: int = 1000) -> tuple[int, int]:
        """Copy every pending event of ``source`` into this outbox; returns (copied, already here).

        Safe to run again (events already here are left alone); ``source`` is only read.
        """
        copied = seen = 0
        after: str | None = None
        while True:
            events = source.pending(page, after)
            if not events:
                break
            new = self.store.add_many(events)
            copied, seen = copied + new, seen + len(events) - new
            after = events[-1].event_id
        self.sender.wake()
        return copied, seen

    def run_worker(self, stopping: threading.Event) -> None:
        """Run this process's sender until ``stopping`` is set, then stop within the shutdown timeout."""
        if not self.store.notifies:
            self.sender.idle_wait = min(self.sender.idle_wait, _WORKER_POLL)
        if self.spool is not None:  # takes over the spools of web processes that died
            self.spool.ensure_running()
        self.sender.serve()
        self.sender.ensure_running()
        while not stopping.wait(1.0):  # a timeout, so that signal handlers run promptly
            pass
        self.close()  # at exit, closing again finds everything stopped and waits for nothing

    def close(self) -> None:
        """Move what is spooled, stop the sender (sending what it can within the shutdown timeout), close."""
        moved = self.spool is None or self.spool.stop(self.sender.shutdown_timeout)
        self.sender.stop()
        if moved:  # a post that outlived the stop keeps its lease; another process's lock is not waited out
            self.sender.close_after(lambda: self.store.close(within=self.sender.shutdown_timeout))
        # Else the spool's last move still waits for the store (another process's write lock):
        # closing the store would wait for it too. The process is exiting: its connections go with it.


def _loaded_by_a_flask_command() -> bool:
    """Whether a ``flask`` command that does not serve the app is loading it (``flask cio-rudder
    status``, ``flask shell``, a migration): a short-lived process whose sender would race the app's
    real ones, fire their signals here and spend the shutdown timeout sending at its exit. There
    the sender starts with the first event the process accepts (a command that serves the app),
    and ``flask cio-rudder worker`` starts its own."""
    context = click.get_current_context(silent=True)
    if context is None:
        return False
    if context.info_name == "run":
        return _watches_for_the_reloader(context)
    return isinstance(context.find_root().command, FlaskGroup)


#: Seconds Customer.io retries a webhook for: a delivered event is kept at least that long, so a
#: retry of it is recognised (and not forwarded again).
CUSTOMERIO_RETRIES_FOR = 7 * 24 * 3600


def _keep_delivered(config: Mapping[str, Any]) -> float | None:
    """``CIO_RUDDER_OUTBOX_KEEP_DELIVERED``: ``None`` (kept until purged by hand), or seconds, at
    least as long as Customer.io retries."""
    key = "CIO_RUDDER_OUTBOX_KEEP_DELIVERED"
    if config[key] is None:
        return None
    seconds = check_seconds(config, key)
    if seconds < CUSTOMERIO_RETRIES_FOR:
        raise RuntimeError(
            f"{key} must be at least {CUSTOMERIO_RETRIES_FOR} seconds (7 days), not {seconds:g}: "
            "Customer.io retries a webhook for up to 7 days, and a retry of an event purged before "
            "then would be forwarded again. None keeps delivered events until you purge them."
        )
    return seconds


def _loaded_before_uwsgi_forks() -> bool:
    """Whether uWSGI loads the app in the process it then forks its workers from (no ``lazy-apps``).

    uWSGI forks without Python's fork hooks: a thread started there, inside SQLite, a connection
    pool or a log call at that moment, would leave that lock held in every worker, and each would
    hang on its first webhook. So nothing starts there; each worker starts with its first request.
    """
    try:
        uwsgi: Any = importlib.import_module("uwsgi")  # only in a process uWSGI runs
    except ImportError:
        return False
    return bool(uwsgi.worker_id() == 0)  # else loaded in a worker (lazy-apps): no fork comes after


def _watches_for_the_reloader(run: click.Context) -> bool:
    """Whether this ``flask run`` process only watches files for the reloader, which serves the app
    in a child process: a sender here would go on sending, with the settings it read first, for the
    whole session, whatever the reloaded child reads."""
    reload = run.params.get("reload")
    if reload is None:  # flask run's own default: on with --debug
        reload = get_debug_flag()
    return bool(reload) and not is_running_from_reloader()


def _not_kept(action: str, error: Exception) -> ForwardError:
    """The error the webhook answers 503 for: the details (paths, hosts) go to the log, not into
    the answer, which Customer.io keeps in its delivery log."""
    logger.error("Could not %s: %s", action, error)
    return ForwardError(f"could not {action}")


class OutboxForwarder(Forwarder):
    """Keeps every accepted event in the outbox store before the webhook answers.

    Nothing about RudderStack is awaited in the request: a sender delivers the
    outbox (see :mod:`flask_cio_rudder.sender`). On SQLite an accepted event is
    appended to this process's spool, which a thread moves into the store in batches
    (see :mod:`flask_cio_rudder.spool`); on PostgreSQL it is written to the store.
    Duplicates are found in the store (and in this process's spool), so they collapse
    across processes, restarts and (on PostgreSQL) servers.
    """

    def __init__(self, app: Flask) -> None:
        super().__init__(app)
        config = app.config
        # Read once: after a fork the sender builds its data plane from these, not from app.config.
        data_plane_url, write_key, timeout = data_plane_settings(config, _OUTBOX_TIMEOUT)
        batch_size = config["CIO_RUDDER_OUTBOX_BATCH_SIZE"]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 100:
            raise RuntimeError("CIO_RUDDER_OUTBOX_BATCH_SIZE must be a whole number from 1 to 100.")
        lease = check_lease(check_seconds(config, "CIO_RUDDER_OUTBOX_LEASE"))
        max_age = check_seconds(config, "CIO_RUDDER_OUTBOX_MAX_AGE")
        keep_delivered = _keep_delivered(config)
        shutdown_timeout = check_seconds(config, "CIO_RUDDER_SHUTDOWN_TIMEOUT", zero=True)
        try:
            store = store_from_url(
                outbox_url(config),
                instance_path=app.instance_path,
                table=config.get("CIO_RUDDER_OUTBOX_TABLE"),
                durability=config["CIO_RUDDER_OUTBOX_DURABILITY"],
            )
        except StoreUnavailable as error:  # an SQLite file is made at start: say which setting names it
            raise RuntimeError(
                f"{error}. Check CIO_RUDDER_OUTBOX_URL: the app's user must be able to make and write "
                "that file and its folder."
            ) from error
        sender = Sender(
            app,
            store,
            lambda: make_data_plane(data_plane_url, write_key, timeout),
            batch_size=batch_size,
            lease=lease,
            max_age=max_age,
            keep_delivered=keep_delivered,
            shutdown_timeout=shutdown_timeout,
            max_requests_per_second=config["CIO_RUDDER_MAX_REQUESTS_PER_SECOND"],
        )
        self.spool = spool_for(store, durability=config["CIO_RUDDER_OUTBOX_DURABILITY"], sender=sender)
        self.outbox = Outbox(store, sender, self.spool)
        self.background = bool(config["CIO_RUDDER_OUTBOX_SENDER"])
        if self.background:
            app.before_request(self._serving)
        if self.background and not _loaded_by_a_flask_command() and not _loaded_before_uwsgi_forks():
            self._start()

    def _serving(self) -> None:
        """This process serves the app (any request, or a webhook the fast path answers): it sends,
        with its threads started if ``init_app`` did not start them (a ``flask`` command, a uWSGI
        worker forked from where the app was loaded). Cheap: called per request."""
        self._start()  # first: in a child forked without fork hooks (uWSGI) it resets the sender
        self.outbox.sender.serve()

    def _start(self) -> None:
        """Start this process's spool mover, which takes over at once what a predecessor left in its
        spool, and its sender thread, which sends once the process serves (:meth:`Sender.serve`)."""
        self.outbox.sender.ensure_running()
        if self.spool is not None:
            self.spool.ensure_running()

    def is_duplicate(self, event_id: str) -> bool:
        if self.background:  # the fast path's webhooks pass no before_request hook
            self._serving()
        if self.spool is not None and self.spool.holds(event_id):
            return True
        try:
            return self.outbox.store.is_known(event_id)
        except StoreError as error:
            raise _not_kept("read the outbox", error) from error

    def accept(self, event: CioEvent) -> None:
        event_name, email = searched_fields(event.payload)  # as a mover or a copy would read them
        if self.spool is not None:
            try:
                self.spool.append(event.event_id, event.payload_json, event_name=event_name, email=email)
            except OSError as error:
                raise _not_kept("write the outbox's spool", error) from error
            self.spool.ensure_running()  # the spool's mover wakes the sender once the event is in the store
            return  # the sender serves already: is_duplicate(), which the webhook asks first, saw to it
        try:
            self.outbox.store.add(event.event_id, event.payload_json, event_name=event_name, email=email)
        except StoreError as error:
            raise _not_kept("write the outbox", error) from error
        if self.background:
            self.outbox.sender.wake()

    def reject(self, body: bytes, event_id: str | None, reason: str, errors: Mapping[str, Any]) -> None:
        super().reject(body, event_id, reason, errors)
        try:
            decoded = json.loads(body)
        except (
            ValueError,
            RecursionError,
        ):  # not JSON, not UTF-8 (a body the webhook refused as malformed never gets here)
            decoded = None
        name, email = describe_body(decoded)
        try:
            self.outbox.store.add_rejected(event_id, body, reason, event_name=name, email=email)
        except StoreError as error:  # 503, as for an accepted event: Customer.io's retry keeps it later
            raise _not_kept("keep a rejected body as a dead letter", error) from error

    def close(self) -> None:
        self.outbox.close()


def get_outbox(app: Flask | None = None) -> Outbox:
    """The outbox of ``app`` (default: the current app), for status, flush, dead letters...

    Raises ``RuntimeError`` if the app does not use ``CIO_RUDDER_FORWARDER = "outbox"``.
    """
    forwarder = state_of(app or current_app._get_current_object()).forwarder  # type: ignore[attr-defined]
    if not isinstance(forwarder, OutboxForwarder):
        raise RuntimeError("This app does not use the outbox: set CIO_RUDDER_FORWARDER = 'outbox'.")
    return forwarder.outbox


def outbox_url(config: Mapping[str, Any]) -> str:
    """``CIO_RUDDER_OUTBOX_URL``, or the deprecated ``CIO_RUDDER_OUTBOX_PATH`` turned into one."""
    url: str = config.get("CIO_RUDDER_OUTBOX_URL", DEFAULT_URL)
    path = config.get("CIO_RUDDER_OUTBOX_PATH")
    if path is None:
        if not url:  # an unset variable, most likely: the default would keep events on this server's disk
            raise RuntimeError(
                f"CIO_RUDDER_OUTBOX_URL is empty ({url!r}): set it to where the outbox keeps events "
                "(postgresql://user:password@host/database, sqlite:////absolute/path.sqlite3), or leave "
                "it out for the default, a file in the instance folder."
            )
        return url
    url = url or DEFAULT_URL  # the deprecated path names the file
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_PATH must be a file path, not {path!r}; better, set CIO_RUDDER_OUTBOX_URL."
        )
    if url != DEFAULT_URL:
        raise RuntimeError(
            "Both CIO_RUDDER_OUTBOX_URL and CIO_RUDDER_OUTBOX_PATH are set: keep CIO_RUDDER_OUTBOX_URL only."
        )
    warnings.warn(
        "CIO_RUDDER_OUTBOX_PATH is deprecated: set CIO_RUDDER_OUTBOX_URL = "
        "'sqlite:////absolute/path.sqlite3' (or sqlite:///name.sqlite3 for a file in the instance folder)",
        DeprecationWarning,
        stacklevel=2,
    )
    return "sqlite:///" + os.path.abspath(str(path))
