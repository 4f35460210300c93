"""Helpers for testing a host app that uses Flask-CIO-Rudder.

>>> headers = signature_headers(body, key="my-signing-key")
>>> with record_events(app) as events:
...     client.post("/webhooks/customerio", data=body, headers=headers)
>>> events[0].name
'Email Bounced'
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flask import Flask

from . import signals
from .event import CioEvent
from .rudderstack import identifiable
from .signature import sign

__all__ = ["FakeDataPlane", "encode", "record_events", "signature_headers"]


def encode(body: Mapping[str, Any]) -> bytes:
    """Serialise a webhook body the way Customer.io does: compact JSON, UTF-8."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def signature_headers(
    body: bytes | str | Mapping[str, Any], key: str | Sequence[str], timestamp: int | None = None
) -> dict[str, str]:
    """The headers Customer.io sends with ``body``, signed with ``key``.

    ``key`` may be ``CIO_RUDDER_SIGNING_KEY`` as configured: a list of keys (a rotation) signs
    with the first, the new one. Post exactly the bytes that were signed: pass ``bytes`` (or
    ``str``), or a mapping, which is signed as :func:`encode` serialises it.
    """
    if not isinstance(key, str):
        key = key[0]
    if isinstance(body, Mapping):
        body = encode(body)
    elif isinstance(body, str):
        body = body.encode("utf-8")
    sent_at = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-CIO-Timestamp": sent_at,
        "X-CIO-Signature": sign(body, sent_at, key),
    }


@contextmanager
def record_events(app: Flask) -> Iterator[list[CioEvent]]:
    """Collect the events ``app`` accepts inside the ``with`` block, in order."""
    events: list[CioEvent] = []

    def record(sender: Flask, event: CioEvent, **extra: Any) -> None:
        events.append(event)

    with signals.event_received.connected_to(record, sender=app):
        yield events


class FakeDataPlane:
    """A RudderStack-compatible data plane on loopback, for tests and demos.

    A real HTTP server in a background thread that answers ``POST /v1/batch`` as
    RudderStack's gateway does (HTTP Basic write key, gzip bodies, 400 for a batch
    holding an event without ``userId`` or ``anonymousId``, 413 above 4,000 KB) and
    records every stored event. It can be told to misbehave for the next requests:
    ``fail_next(500, times=3)``, ``fail_next(429, retry_after="30")``, ``hang_next(seconds)``,
    ``reset_next()``.

    The extension reads its settings at ``init_app``, so start the plane first and build the app
    with its URL and key:

    >>> with FakeDataPlane() as plane:
    ...     app = create_app({"CIO_RUDDER_DATA_PLANE_URL": plane.url,
    ...                       "CIO_RUDDER_WRITE_KEY": plane.write_key})
    """

    MAX_REQUEST_BYTES = 4000 * 1024

    def __init__(self, write_key: str = "fake-write-key", port: int = 0) -> None:
        self.write_key = write_key
        self.batches: list[list[dict[str, Any]]] = []
        self.requests = 0
        self._plan: deque[tuple[str, float, str | None]] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _QuietServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-data-plane", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event stored so far, in arrival order."""
        with self._lock:
            return [event for batch in self.batches for event in batch]

    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``times`` requests with ``status`` (and store nothing).

        ``retry_after`` is sent as the ``Retry-After`` header: seconds (``"30"``) or an HTTP date.
        """
        with self._lock:
            self._plan.extend([("status", float(status), retry_after)] * times)

    def hang_next(self, seconds: float, times: int = 1) -> None:
        """Wait ``seconds`` before answering the next ``times`` requests (past a client's timeout)."""
        with self._lock:
            self._plan.extend([("hang", seconds, None)] * times)

    def reset_next(self, times: int = 1) -> None:
        """Close the connection without an answer for the next ``times`` requests."""
        with self._lock:
            self._plan.extend([("reset", 0.0, None)] * times)

    def start(self) -> FakeDataPlane:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases requests told to hang
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeDataPlane:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next_misbehaviour(self) -> tuple[str, float, str | None] | None:
        with self._lock:
            self.requests += 1
            return self._plan.popleft() if self._plan else None

    def _store(self, batch: list[dict[str, Any]]) -> None:
        with self._lock:
            self.batches.append(batch)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out or are reset on purpose are expected here: stay quiet."""


def _handler_for(plane: FakeDataPlane) -> type[BaseHTTPRequestHandler]:
    expected_auth = "Basic " + base64.b64encode(f"{plane.write_key}:".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            misbehaviour = plane._next_misbehaviour()
            if misbehaviour is not None:
                kind, value, retry_after = misbehaviour
                if kind == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if kind == "hang":
                    plane._stopping.wait(value)
                else:
                    return self._answer(int(value), "simulated failure", retry_after)
            status, text = self._check(raw)
            self._answer(status, text)

        def _check(self, raw: bytes) -> tuple[int, str]:
            if self.path != "/v1/batch":
                return 404, "not found"
            if self.headers.get("Authorization") != expected_auth:
                return 401, "Failed to read writeKey from header"
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            if len(raw) > plane.MAX_REQUEST_BYTES:
                return 413, "Request size exceeds max limit"
            try:
                batch = json.loads(raw)["batch"]
            except (ValueError, KeyError, TypeError):
                return 400, "Invalid request body"
            if not isinstance(batch, list) or not batch:
                return 400, "Empty batch payload"
            for event in batch:
                if not isinstance(event, dict) or not identifiable(event):
                    return 400, "non-identifiable request"
            plane._store(batch)
            return 200, "OK"

        def _answer(self, status: int, text: str, retry_after: str | None = None) -> None:
            body = text.encode()
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
