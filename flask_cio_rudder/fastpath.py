"""The opt-in fast path (``CIO_RUDDER_FAST_PATH``): valid events answered before Flask's request machinery.

A WSGI middleware in front of ``app.wsgi_app``. It serves one kind of request itself: an
authentic webhook whose body is a valid event, new or already accepted. For those it runs
the route's own stages (signature, decoding, validation, duplicate lookup, receivers,
forwarder), the receivers and the forwarder in an app context, and answers 200 as the
route does. Every other request goes to Flask untouched. So does one whose receiver raised:
Flask then serves it from the start, as the route would (its receivers run again there),
with the host app's error handlers. An event the forwarder could not keep is answered 503
here, as the route answers it: through Flask, ``"sync"`` would post it to RudderStack again
and wait out its timeouts a second time, past Customer.io's 4 seconds.

For the requests it serves it skips ``before_request``, ``after_request`` and
``teardown_request`` hooks, ``app.errorhandler``, and ``flask.request`` / ``session`` in
receivers. ``current_app``, ``g`` and ``teardown_appcontext`` work as usual.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from werkzeug.wsgi import get_content_length

from .forwarders import ForwardError
from .signature import SignatureError, verify
from .state import state_of
from .webhook import REFUSED_SIGNATURE, announce_answer, answer_body, keep, not_kept, parse_json

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

__all__ = ["FastPath"]

logger = logging.getLogger("flask_cio_rudder")


class FastPath:
    """Serves the valid events posted to ``path`` for ``app``; hands every other request to ``wsgi_app``."""

    def __init__(self, app: Flask, wsgi_app: WSGIApplication, path: str) -> None:
        self.app = app
        self.state = state_of(app)
        self.wsgi_app = wsgi_app
        self.path = path.rstrip("/")
        self.paths = {self.path, self.path + "/"}  # as the route: with or without one trailing slash

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in self.paths and environ.get("REQUEST_METHOD") == "POST":
            body = self.read_body(environ)
            if body is not None:
                answered = self.serve(environ, body)
                if answered is not None:
                    status, answer = answered
                    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
                    start_response(status, headers)
                    return [answer]
                environ["wsgi.input"] = io.BytesIO(body)  # for Flask to read it again
        return self.wsgi_app(environ, start_response)

    def read_body(self, environ: WSGIEnvironment) -> bytes | None:
        """The body if its ``Content-Length`` is within both limits; else None, and Flask reads it."""
        length = get_content_length(environ)  # None for a chunked body
        if length is None or length > self.state.max_body_bytes:
            return None
        flask_limit = self.app.config["MAX_CONTENT_LENGTH"]
        if flask_limit is not None and length > flask_limit:
            return None
        body: bytes = environ["wsgi.input"].read(length)
        if len(body) < length:  # the client sent less than it announced: Flask's route answers 400
            environ["wsgi.input"] = io.BytesIO(body)
            return None
        return body

    def serve(self, environ: WSGIEnvironment, body: bytes) -> tuple[str, bytes] | None:
        """The status and body answering an authentic body of a valid event, or None if Flask must serve
        the request."""
        started = time.perf_counter()
        app, state = self.app, self.state
        try:
            if state.verify_signature:
                timestamp, signature = (
                    environ.get("HTTP_X_CIO_TIMESTAMP"),
                    environ.get("HTTP_X_CIO_SIGNATURE"),
                )
                try:
                    verify(body, timestamp, signature, state.signing_keys, max_age=state.max_timestamp_age)
                except SignatureError as error:  # the route answers 401 without checking it again
                    environ[REFUSED_SIGNATURE] = ((body, timestamp, signature), error)
                    raise
            event = state.validation(parse_json(body))
            with app.app_context():  # the host app's code runs from here on: receivers, forwarder
                try:
                    outcome = keep(app, state.forwarder, event)
                except ForwardError as error:
                    refusal = not_kept(error)
                    announce_answer(app, refusal.outcome, started, None)
                    return f"{refusal.code} {refusal.name.upper()}", refusal.get_body().encode()
                announce_answer(app, outcome, started, event)
        except Exception:  # not authentic, not valid, a receiver raised: Flask's route answers
            logger.debug("The fast path hands a webhook to Flask's route", exc_info=True)
            return None
        return "200 OK", answer_body(outcome, event.event_id)
