"""Cuts a database connection whose server has not answered a statement in time.

psycopg has no client-side timeout for a statement, and a server that has stopped answering
(frozen, or cut off by the network without a reset) answers no cancel either: the caller
would wait until TCP gives up, many minutes later, and the webhook far past Customer.io's
4 s. Shutting the connection's socket down from another thread ends that wait at once, with
a broken connection that the pool then replaces.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Watch", "Watchdog"]


@dataclass
class Watch:
    """One statement watched: its deadline, its socket, and whether it was cut."""

    deadline: float  # time.monotonic()
    fd: int
    socket_id: tuple[int, int]  # the socket's (st_dev, st_ino): its fd may be closed and reused meanwhile
    cut: bool = False


class Watchdog:
    """One thread that shuts down the sockets of statements past their deadline.

    It sleeps until the earliest deadline and is woken only when a new one comes sooner, so a
    statement watched costs a lock and a dict entry, not a thread switch.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._watches: dict[int, Watch] = {}
        self._sleeping_until = float("inf")
        self._thread: threading.Thread | None = None
        self._closing = False

    @contextmanager
    def watch(self, fd: int, seconds: float) -> Iterator[Watch]:
        """Run the block, shutting ``fd``'s socket down if it has not ended within ``seconds``.

        The watch it yields says whether that happened (``cut``): the block then fails with
        the driver's error for a closed connection.
        """
        stat = os.fstat(fd)
        entry = Watch(time.monotonic() + seconds, fd, (stat.st_dev, stat.st_ino))
        key = id(entry)
        with self._changed:
            self._start()
            self._watches[key] = entry
            if entry.deadline < self._sleeping_until:
                self._changed.notify()
        try:
            yield entry
        finally:
            with self._changed:  # under the lock: a socket is never shut down once its block is over
                self._watches.pop(key, None)

    def forget(self, watch: Watch) -> None:
        """Stop watching ``watch`` before its block ends: what follows may take as long as it needs."""
        with self._changed:
            self._watches.pop(id(watch), None)

    def close(self) -> None:
        """Let the thread end once the watches still open are over (ended, or cut at their deadline)."""
        with self._changed:
            self._closing = True
            self._changed.notify()

    def _start(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._run, name="cio-rudder-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._changed:
            while not (self._closing and not self._watches):
                now = time.monotonic()
                for key, entry in list(self._watches.items()):
                    if entry.deadline <= now:
                        del self._watches[key]
                        entry.cut = True
                        _shut_down(entry.fd, entry.socket_id)
                self._sleeping_until = min(
                    (entry.deadline for entry in self._watches.values()), default=float("inf")
                )
                self._changed.wait(
                    None if self._sleeping_until == float("inf") else self._sleeping_until - now
                )
            self._sleeping_until = float("inf")
            self._thread = None


def _shut_down(fd: int, socket_id: tuple[int, int]) -> None:
    """Shut the socket ``fd`` down for both directions, leaving the descriptor to its owner; unless
    ``fd`` now names another socket (the driver closed the watched one, and the number was reused)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:  # closed meanwhile: nothing is waiting on it any more
        return
    try:
        stat = os.fstat(sock.fileno())
        if (stat.st_dev, stat.st_ino) == socket_id:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()
