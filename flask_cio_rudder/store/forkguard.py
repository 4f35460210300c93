"""A guard that lets many threads use SQLite at once and makes a fork wait until none does.

An SQLite connection must never be in use when the process forks (see
:mod:`flask_cio_rudder.store.sqlite`), so every use is *shared* and the fork (and
closing every connection) is *exclusive*. A plain ``RLock`` gives the same safety but
serialises every SQLite call of the process: a web request's duplicate lookup then
waits for the spool mover's or the sender's whole transaction, a WAL checkpoint's
``fsync`` included, which was a visible share of the webhook's tail latency.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ForkGuard", "fork_guard"]


class ForkGuard:
    """Shared use by any number of threads; exclusive use (re-entrant) by one thread when none uses it.

    ``with guard.shared():`` is a shared use. A thread already inside one may nest another
    without waiting. A thread must not ask for exclusive use while it holds a shared one
    (it would wait for itself). The shared side is a plain class, not a generator: every
    SQLite call of a web request passes through it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every holder: in a forked child, where the threads that held it do not exist."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the users or the owner changed
        self._users = 0  # threads inside a shared use
        self._waiting = 0  # threads waiting for exclusive use
        self._owner: int | None = None  # the thread that holds it exclusively
        self._depth = 0  # how often that thread took it
        self._local = threading.local()  # each thread's nesting of shared uses, and whether it counts

    def shared(self) -> ForkGuard:
        """Use SQLite (``with``); waits only while a fork (or a close of every connection) is under way."""
        return self

    def __enter__(self) -> None:
        local = self._local
        depth: int = getattr(local, "depth", 0)
        if depth or self._owner == threading.get_ident():
            if not depth:
                local.counted = False  # inside this thread's own exclusive use
            local.depth = depth + 1
            return
        with self._lock:
            while self._owner is not None:
                self._changed.wait()
            self._users += 1
        local.depth, local.counted = 1, True

    def __exit__(self, *exc_info: object) -> None:
        local = self._local
        local.depth -= 1
        if local.depth or not local.counted:
            return
        with self._lock:
            self._users -= 1
            if not self._users and self._waiting:
                self._changed.notify_all()

    def acquire(self) -> None:
        """Take it exclusively, once no other thread uses SQLite."""
        me = threading.get_ident()
        with self._lock:
            if self._owner == me:
                self._depth += 1
                return
            self._waiting += 1
            try:
                while self._owner is not None or self._users:
                    self._changed.wait()
            finally:
                self._waiting -= 1
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._lock:
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


#: The one guard of every SQLite store in the process (``flask_cio_rudder.store.sqlite``).
fork_guard = ForkGuard()

# A child starts with a fresh guard, before any other fork hook of this package runs: the
# senders' and spools' hooks start threads that use SQLite at once, and a thread waiting on
# the parent's guard would wait forever. Hooks run in the order they were registered, and
# this module is imported with ``flask_cio_rudder.store``, before those modules register theirs.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=fork_guard.reset)
