"""The webhook route: raw body -> signature -> JSON -> event -> signals -> forwarder.

``handle`` runs the steps, each one function below: ``read_body``, ``check_signature``,
then ``process`` (``parse_json``, validate, ``keep``: duplicate check, signals, forwarder)
or ``reject``. The answers follow the response policy in the README: Customer.io holds
back every later webhook while one is failing, so only a request that is not authentic,
too large, not JSON, whose receivers raised, or that the outbox could not keep (503)
gets a non-2xx answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from flask import Blueprint, Flask, Request, Response, current_app, jsonify, request
from werkzeug.exceptions import (
    BadRequest,
    ClientDisconnected,
    HTTPException,
    RequestEntityTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from werkzeug.wsgi import get_content_length

from . import jsoncodec, signals
from .event import CioEvent
from .forwarders import Forwarder, ForwardError
from .schemas import is_text
from .signature import SignatureError, SignatureMismatch, verify
from .state import State, state_of
from .transform import InvalidEvent

__all__ = [
    "BodyTooLarge",
    "InvalidSignature",
    "MalformedBody",
    "Outcome",
    "RetryLater",
    "WebhookError",
    "announce_answer",
    "create_blueprint",
    "not_kept",
    "process",
]

logger = logging.getLogger("flask_cio_rudder")

#: Bytes per read of a body without a ``Content-Length`` (chunked).
_CHUNK = 65536

# The RudderStack event name of each first-class email event, and its signal.
_EMAIL_SIGNALS = {
    "Email Delivered": signals.email_delivered,
    "Email Opened": signals.email_opened,
    "Email Link Clicked": signals.email_clicked,
    "Email Bounced": signals.email_bounced,
    "Email Marked as Spam": signals.email_spammed,
    "Email Unsubscribed": signals.email_unsubscribed,
}


class WebhookError(HTTPException):
    """An HTTP error answered as JSON ``{"error": description}``.

    The subclasses are werkzeug HTTP exceptions, so a host app can customise the
    answer with ``app.errorhandler(InvalidSignature)`` and the like.
    """

    #: The ``outcome`` the ``webhook_answered`` signal reports for this answer.
    outcome = "error"

    def get_body(self, environ: Any = None, scope: Any = None) -> str:
        return json.dumps({"error": self.description})

    def get_headers(self, environ: Any = None, scope: Any = None) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json")]


class InvalidSignature(WebhookError, Unauthorized):
    """401: missing, malformed or wrong ``X-CIO-Signature`` (or a too old ``X-CIO-Timestamp``)."""

    outcome = "refused_signature"


class BodyTooLarge(WebhookError, RequestEntityTooLarge):
    """413: the body is larger than ``CIO_RUDDER_MAX_BODY_BYTES``."""

    outcome = "too_large"


class MalformedBody(WebhookError, BadRequest):
    """400: the body is not a JSON object."""

    outcome = "malformed"


class RetryLater(WebhookError, ServiceUnavailable):
    """503: the event could not be kept now; Customer.io will send it again."""

    outcome = "retry_later"


def create_blueprint(path: str) -> Blueprint:
    """A Blueprint with the one webhook route, at ``path``."""
    blueprint = Blueprint("cio_rudder", __name__)
    # Either way with or without a trailing slash: a 404 or a redirect stalls Customer.io's stream.
    blueprint.add_url_rule(path, view_func=receive, methods=["POST"], strict_slashes=False)
    return blueprint


def receive() -> Response:
    """Handle one Customer.io reporting webhook; announce how it was answered (``webhook_answered``)."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    started = time.perf_counter()
    outcome = "error"  # unless set below: a receiver raised, and Flask answers 500
    event = None
    try:
        response, outcome, event = handle(app, state_of(app))
        return response
    except WebhookError as error:
        outcome = error.outcome
        raise
    finally:
        announce_answer(app, outcome, started, event)


def announce_answer(app: Flask, outcome: str, started: float, event: CioEvent | None) -> None:
    """Send ``webhook_answered`` for a request that began at ``started`` (``time.perf_counter()``)."""
    if signals.webhook_answered.receivers:
        duration = time.perf_counter() - started
        signals.send(signals.webhook_answered, app, outcome=outcome, duration=duration, event=event)


@dataclass(frozen=True)
class Outcome:
    """What became of one authentic JSON body: ``accepted``, ``duplicate`` or ``rejected`` (and why)."""

    status: str
    event_id: str | None
    reason: str | None = None
    errors: Mapping[str, Any] = field(default_factory=dict)
    #: The event, when it was accepted or a duplicate.
    event: CioEvent | None = None


def handle(app: Flask, state: State) -> tuple[Response, str, CioEvent | None]:
    """The response to the current request, its outcome and the event (accepted or duplicate).

    Raises :class:`WebhookError` for non-2xx."""
    incoming: Request = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not one per use
    body = read_body(incoming, state.max_body_bytes)
    if state.verify_signature:
        check_signature(incoming, body, state.signing_keys, state.max_timestamp_age)
    outcome = process(app, state, body)
    if outcome.status == "rejected":
        answer = jsonify(
            status="rejected", event_id=outcome.event_id, reason=outcome.reason, errors=outcome.errors
        )
        return answer, "rejected", None
    return _answer(outcome.status, outcome.event_id or ""), outcome.status, outcome.event


def process(app: Flask, state: State, body: bytes, *, announce: bool = True) -> Outcome:
    """Decode, validate, deduplicate, signal and keep one body: the webhook's stages after the signature.

    ``flask cio-rudder replay`` runs bodies from a file through here too, with ``announce=False``
    unless asked for signals. Raises :class:`MalformedBody` when the body is not a JSON object,
    :class:`RetryLater` when the outbox cannot be written.
    """
    try:
        decoded = parse_json(body)
    except InvalidEvent as error:  # an object nested too deeply to decode: kept, as below
        return reject(app, state.forwarder, body, {}, error, announce=announce)
    try:
        event = state.validation(decoded)
    except InvalidEvent as error:
        return reject(app, state.forwarder, body, decoded, error, announce=announce)
    try:
        status = keep(app, state.forwarder, event, announce=announce)
    except ForwardError as error:
        raise not_kept(error) from None
    return Outcome(status, event.event_id, event=event)


def not_kept(error: ForwardError) -> RetryLater:
    """The 503 for an accepted event the forwarder could not keep now, saying why in a few words."""
    return RetryLater(f"the event was not kept ({error.reason}); send it again later")


def keep(app: Flask, forwarder: Forwarder, event: CioEvent, *, announce: bool = True) -> str:
    """``"duplicate"`` if the event was accepted before; else announce and keep it: ``"accepted"``.

    Raises :class:`~flask_cio_rudder.forwarders.ForwardError` when the forwarder cannot keep it now.
    """
    if forwarder.is_duplicate(event.event_id):
        return "duplicate"
    if announce:
        send_signals(app, event)
    forwarder.accept(event)
    return "accepted"


def read_body(incoming: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes without reading them all.

    From a server that does not set ``wsgi.input_terminated`` (gunicorn and werkzeug's
    do) it is read as the WSGI spec says, exactly ``Content-Length`` bytes, which skips
    werkzeug's stream wrapper (about 10 µs). Werkzeug's stream is used otherwise, and in
    apps that set Flask's ``MAX_CONTENT_LENGTH`` below the body's length, which then
    answer 413 as Flask does. A body that comes up short was read first by a host app's
    ``before_request`` hook: then it is the one ``request.get_data()`` kept. The body is
    kept where ``request.get_data()`` looks, so receivers and later hooks can read it too.
    """
    body = _read_body(incoming, limit)
    # Where werkzeug's own get_data(cache=True) keeps it (and get_json() and form parsing look).
    incoming._cached_data = body
    return body


def _read_body(incoming: Request, limit: int) -> bytes:
    environ = incoming.environ
    length = get_content_length(environ)
    if length is not None and length > limit:
        raise BodyTooLarge(f"the body is larger than CIO_RUDDER_MAX_BODY_BYTES ({limit} bytes)")
    try:
        if length is not None and not environ.get("wsgi.input_terminated"):
            flask_limit = incoming.max_content_length
            if flask_limit is None or length <= flask_limit:
                data: bytes = environ["wsgi.input"].read(length)
                return data if len(data) == length else _kept(incoming, length, limit)
        stream = incoming.stream
        body = _checked(_read_to_end(stream, limit + 1 if length is None else length), limit)
        if length is None and getattr(stream, "is_exhausted", False) and environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()  # werkzeug's stream stopped at Flask's limit, and more came
        if not body or (length is not None and len(body) < length):
            return _kept(incoming, length, limit)
        return body
    except BodyTooLarge:
        raise
    except ClientDisconnected:  # werkzeug's, for a body that ends before its Content-Length
        raise _cut_short(length) from None
    except RequestEntityTooLarge:  # werkzeug's, for Flask's MAX_CONTENT_LENGTH below our own limit
        raise BodyTooLarge(
            f"the body is larger than Flask's MAX_CONTENT_LENGTH ({incoming.max_content_length} bytes)"
        ) from None


def _read_to_end(stream: IO[bytes], most: int) -> bytes:
    """Up to ``most`` bytes, reading until the stream ends, as one read may return less than asked
    (a chunked body). It stops where werkzeug's stream is exhausted: at Flask's MAX_CONTENT_LENGTH,
    a read past it raises 413 even when the body is exactly that long."""
    chunks, size = [], 0
    while size < most and not getattr(stream, "is_exhausted", False):
        chunk = stream.read(min(_CHUNK, most - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _kept(incoming: Request, length: int | None, limit: int) -> bytes:
    """The body ``request.get_data()`` kept, for a body a host app's ``before_request`` hook read first;
    400 if there is none and the client sent less than its ``Content-Length`` (it hung up)."""
    body = _checked(incoming.get_data(cache=True), limit)
    if length is not None and len(body) < length:
        raise _cut_short(length)
    return body


def _cut_short(length: int | None) -> MalformedBody:
    announced = "" if length is None else f" ({length} bytes)"
    return MalformedBody(f"the body ended before its Content-Length{announced}: the client hung up")


def _checked(body: bytes, limit: int) -> bytes:
    if len(body) > limit:
        raise BodyTooLarge(f"the body is larger than CIO_RUDDER_MAX_BODY_BYTES ({limit} bytes)")
    return body


#: Where the fast path leaves ``((body, timestamp, signature), SignatureError)`` for a request it
#: refused: a forged request must not cost the signature's HMACs twice.
REFUSED_SIGNATURE = "flask_cio_rudder.refused_signature"


def check_signature(incoming: Request, body: bytes, keys: Iterable[str], max_age: float | None) -> None:
    environ = incoming.environ
    timestamp, signature = environ.get("HTTP_X_CIO_TIMESTAMP"), environ.get("HTTP_X_CIO_SIGNATURE")
    refused = environ.get(REFUSED_SIGNATURE)
    try:
        if refused is not None and refused[0] == (body, timestamp, signature):  # unless a hook changed it
            raise refused[1]
        verify(body, timestamp, signature, tuple(keys), max_age=max_age)
    except SignatureError as error:
        hint = _WRONG_KEY if isinstance(error, SignatureMismatch) else ""
        logger.warning("Refused a Customer.io webhook from %s: %s%s", incoming.remote_addr, error, hint)
        raise InvalidSignature(str(error)) from None


#: For the log only: the answer tells whoever sent the request nothing of the app's settings.
_WRONG_KEY = (
    "; if Customer.io sent it, set CIO_RUDDER_SIGNING_KEY to the signing key of this reporting webhook "
    "(Customer.io: Data & Integrations, Reporting Webhooks)"
)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _integer(text: str) -> int | float:
    """A JSON integer; past Python's 4,300-digit conversion limit, a float as JavaScript reads it."""
    digits = len(text) - text.startswith("-")  # the limit counts digits, not the sign
    return int(text) if digits <= 4300 else float(text)


def _json_loads(body: bytes) -> Any:
    """The reference decoding: the json module's, refusing NaN and keeping integers exact."""
    return json.loads(body, parse_constant=_no_constants, parse_int=_integer)


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode the body; anything but a JSON object is a 400 that names the problem.

    Decoded as :func:`_json_loads` decodes it, through orjson where that gives the same
    (see :mod:`flask_cio_rudder.jsoncodec`). An object nested deeper than the decoder
    reads (about a thousand levels before Python 3.12) raises :class:`InvalidEvent`: it is
    an authentic object the pipeline cannot carry, which a 400 would stall Customer.io on.
    """
    try:
        decoded = jsoncodec.loads(body, _json_loads)
    except RecursionError:
        if _starts_an_object(body):
            raise InvalidEvent("the body is nested too deeply to be read") from None
        raise MalformedBody("the body must be a JSON object, one Customer.io event") from None
    except ValueError as error:
        raise MalformedBody(f"the body is not valid JSON: {error}") from None
    if not isinstance(decoded, dict):
        raise MalformedBody("the body must be a JSON object, one Customer.io event")
    return decoded


def _starts_an_object(body: bytes) -> bool:
    """Whether the body's JSON text, in the encoding ``json`` reads it in, starts with ``{``."""
    text = body.decode(json.detect_encoding(body), "replace")
    return text.lstrip(" \t\n\r").startswith("{")


def send_signals(app: Flask, event: CioEvent) -> None:
    """Announce the event; a receiver that raises makes the request fail."""
    if signals.event_received.receivers:
        signals.send(signals.event_received, app, event=event)
    email_signal = _EMAIL_SIGNALS.get(event.name)
    if email_signal is not None and email_signal.receivers:
        signals.send(email_signal, app, event=event)


def reject(
    app: Flask,
    forwarder: Forwarder,
    raw: bytes,
    body: dict[str, Any],
    error: InvalidEvent,
    *,
    announce: bool = True,
) -> Outcome:
    """Keep an authentic body that cannot be accepted as a dead letter; the answer is 2xx.

    A 4xx would make Customer.io hold back every later event for days, for a body no
    retry can mend. Only when it cannot be kept is the answer 503, as for accepted events.
    """
    event_id = body.get("event_id")
    if not (isinstance(event_id, str) and event_id and is_text(event_id)):
        event_id = None  # no key to keep it under; the forwarder makes one from the body
    if announce:  # first: a receiver that raises leaves nothing kept, as for accepted events
        signals.send(signals.event_rejected, app, reason=error.reason, errors=error.errors, body=body)
    try:
        forwarder.reject(raw, event_id, error.reason, error.errors)
    except ForwardError as failure:
        raise RetryLater(f"the rejected event was not kept ({failure.reason}); send it again later") from None
    return Outcome("rejected", event_id, error.reason, error.errors)


def _answer(status: str, event_id: str) -> Response:
    """The 2xx answer of an accepted or duplicate event (built directly: this is the hot path)."""
    return Response(answer_body(status, event_id), content_type="application/json")


def answer_body(status: str, event_id: str) -> bytes:
    """The JSON body of an accepted or duplicate event's answer.

    orjson writes it as ``json`` would: two strings, and ``event_id`` is real text (``build`` checked).
    """
    return orjson.dumps({"status": status, "event_id": event_id})
