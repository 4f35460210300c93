"""Helpers shared by the test modules: waiting, ports, a hand-moved clock, signal recorders, dead letters."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
from blinker import Signal
from flask import Flask

from flask_cio_rudder import get_outbox, transform
from flask_cio_rudder.testing import FakeDataPlane

POLL = 0.02  # seconds between two looks at a condition


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "the condition holds",
    detail: Callable[[], str] = str,
) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}\n{detail()}")
        time.sleep(POLL)


def in_function(thread: threading.Thread, name: str) -> bool:
    """Whether ``thread`` is inside the function called ``name`` right now (it waits there)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and any(entry.name == name for entry in traceback.extract_stack(frame))


def free_port() -> int:
    """A loopback port nobody listens on (a closed port, or one to serve on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Clock:
    """A clock the test moves by hand, so leases and ages need no waiting."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextmanager
def record_signals(app: Flask, *signals: Signal) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Record ``(signal name, keyword arguments)`` for each of ``signals`` that ``app`` sends, in order."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Callable[..., None]:
        def record(sender: Flask, **kwargs: Any) -> None:
            assert sender is app
            calls.append((name, kwargs))

        return record

    with ExitStack() as stack:
        for signal in signals:
            stack.enter_context(signal.connected_to(recorder(signal.name), sender=app))
        yield calls


def refuse(app: Flask, data_plane: FakeDataPlane, *bodies: dict[str, Any]) -> None:
    """Accept ``bodies`` into ``app``'s outbox, then have RudderStack refuse each: dead letters to requeue."""
    before = get_outbox(app).count_dead_letters()
    for body in bodies:
        get_outbox(app).store.add(body["event_id"], json.dumps(transform(body)))
    data_plane.fail_next(400, times=2 * len(bodies) - 1)  # the batch is bisected down to single events
    get_outbox(app).flush()
    assert get_outbox(app).count_dead_letters() == before + len(bodies)


@contextmanager
def write_lock_held(database: object) -> Iterator[None]:
    """The SQLite outbox ``database``'s write lock (its ``.lock`` file), held as another process would
    hold it: one stopped inside a transaction, say."""
    import fcntl

    with open(f"{database}.lock", "ab") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(other, fcntl.LOCK_UN)


class FreezingProxy:
    """A loopback TCP proxy to ``target`` that can stop passing bytes on, as a frozen server does.

    While frozen, connections stay open and the kernel acknowledges what is sent, but no answer
    comes: what a server stopped by SIGSTOP, or cut off by the network without a reset, looks like.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        """Drop every connection and stop; shutting sockets down wakes the threads blocked on them."""
        self.thaw()
        for sock in [self._listener, *self._sockets]:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                self._threads.append(threading.Thread(target=self._pipe, args=(source, sink), daemon=True))
                self._threads[-1].start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # one side is gone: so is this direction
            pass


def send_answer(
    request: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer ``request`` with ``status`` and ``body`` (and a ``Content-Type`` and ``headers`` if given)."""
    request.send_response(status)
    if content_type is not None:
        request.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


@contextmanager
def odd_data_plane(answer: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """A loopback server whose every request ``answer`` answers, as a proxy or a misconfigured data
    plane might; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer(self)

        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
