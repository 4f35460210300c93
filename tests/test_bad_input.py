"""Generated bodies through the webhook: the answer always follows the response policy.

The policy (docs/design.md) in short: a missing or wrong signature is 401, a body over
``CIO_RUDDER_MAX_BODY_BYTES`` is 413, a body that is not a JSON object is 400 (all three
with a JSON ``{"error": ...}``, nothing signalled), an authentic JSON object is 200 with
``status`` accepted, duplicate or rejected, and nothing is ever a 500 unless a host
receiver raised. The apps run with ``TESTING = True``: an exception that escapes the view
is raised in the test instead of becoming a 500 page, so every generated body that passes
here is shown not to crash the view.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from flask_cio_rudder import CioEvent, CioRudder, get_outbox, signals
from flask_cio_rudder.testing import FakeDataPlane, encode, record_events, signature_headers

from .conftest import EMAIL_EVENTS, SIGNING_KEY, WEBHOOK, sample
from .helpers import record_signals

# Reproducible in CI: no example database, the same examples on every run. No deadline:
# a loaded two-core CI machine must not turn a slow example into a failure.
REPRODUCIBLE = settings(database=None, derandomize=True, deadline=None)

SENT_AT = 1700000000
WRITE_KEY = "test-write-key"
SECRETS = (SIGNING_KEY, WRITE_KEY)
SMALL_LIMIT = 600  # bytes; the six samples are 467 to 552 bytes long
TOP_KEYS = ["event_id", "object_type", "metric", "timestamp", "data"]
DATA_KEYS = [
    "customer_id",
    "identifiers",
    "email_address",
    "delivery_id",
    "trigger_id",
    "broadcast_id",
    "campaign_id",
    "action_id",
    "parent_action_id",
    "journey_id",
    "newsletter_id",
    "content_id",
    "transactional_message_id",
    "recipient",
    "subject",
    "content",
    "href",
    "link_id",
    "failure_message",
    "device_id",
    "device_platform",
    "recipients",
    "event_type",
    "proxied",
    "machine",
    "headers",
]
IDENTIFIER_KEYS = ["id", "email", "cio_id"]
IDENTITY_KEYS = ["customer_id", "identifiers", "recipient", "email_address"]
OTHER_EVENTS = [("push", "sent"), ("sms", "delivered"), ("customer", "subscribed"), ("in_app", "opened")]


# -- one long-lived app, as in production ---------------------------------------------------


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Outcome:
    response: TestResponse
    received: list[CioEvent]
    rejected: list[dict[str, Any]]
    logs: list[logging.LogRecord]


@dataclass
class Webhook:
    """An app that keeps its state (the event ids it has seen) across every generated post."""

    app: Flask
    client: FlaskClient
    log: LogRecorder
    accepted: set[str] = field(default_factory=set)

    def post(self, raw: bytes, headers: dict[str, str]) -> Outcome:
        seen_logs = len(self.log.records)
        with record_signals(self.app, signals.event_received, signals.event_rejected) as calls:
            response = self.client.post(WEBHOOK, data=raw, headers=headers)
        received = [kwargs["event"] for name, kwargs in calls if name == "event-received"]
        rejected = [kwargs for name, kwargs in calls if name == "event-rejected"]
        return Outcome(response, received, rejected, self.log.records[seen_logs:])


def forwarder_config(
    forwarder: str, directory: Path, data_plane: FakeDataPlane | None = None
) -> dict[str, Any]:
    """Config for ``CIO_RUDDER_FORWARDER = forwarder``.

    The outbox's background sender is off and its data plane is never called, so nothing
    leaves the process; ``sync`` posts to ``data_plane``, a fake one on loopback.
    """
    config: dict[str, Any] = {"CIO_RUDDER_FORWARDER": forwarder}
    if forwarder in ("outbox", "sync"):
        config["CIO_RUDDER_WRITE_KEY"] = data_plane.write_key if data_plane else WRITE_KEY
        config["CIO_RUDDER_DATA_PLANE_URL"] = data_plane.url if data_plane else "http://127.0.0.1:9"
    if forwarder == "sync":  # sync's default 2 s read timeout is short for a loaded machine's answer
        config["CIO_RUDDER_TIMEOUT"] = (1.0, 10.0)
    if forwarder == "outbox":
        config["CIO_RUDDER_OUTBOX_URL"] = f"sqlite:///{directory / 'outbox.sqlite3'}"
        config["CIO_RUDDER_OUTBOX_SENDER"] = False
    return config


@contextmanager
def build_webhook(**config: Any) -> Iterator[Webhook]:
    app = Flask(__name__)
    app.config.update(TESTING=True, CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none")
    app.config.update(config)
    CioRudder(app)
    recorder = LogRecorder()
    logger = logging.getLogger("flask_cio_rudder")
    logger.addHandler(recorder)
    try:
        yield Webhook(app, app.test_client(), recorder)
    finally:
        logger.removeHandler(recorder)
        app.extensions["cio_rudder"].forwarder.close()


@pytest.fixture(
    scope="module",
    params=[("none", False), ("outbox", False), ("outbox", True)],
    ids=["forwarder=none", "forwarder=outbox", "outbox, fast path"],
)
def webhook(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    forwarder, fast_path = request.param
    config = forwarder_config(forwarder, tmp_path_factory.mktemp("outbox"))
    with build_webhook(**config, CIO_RUDDER_FAST_PATH=fast_path) as webhook:
        yield webhook


@pytest.fixture(scope="module", params=[False, True], ids=["route", "fast path"])
def small_webhook(request: pytest.FixtureRequest) -> Iterator[Webhook]:
    with build_webhook(CIO_RUDDER_MAX_BODY_BYTES=SMALL_LIMIT, CIO_RUDDER_FAST_PATH=request.param) as webhook:
        yield webhook


# -- what the policy says each answer looks like ---------------------------------------------


def signed(raw: bytes) -> dict[str, str]:
    return signature_headers(raw, SIGNING_KEY, timestamp=SENT_AT)


def assert_refused(outcome: Outcome, status: int) -> None:
    """A non-2xx policy answer: JSON ``{"error": ...}``, no secret, nothing signalled."""
    response = outcome.response
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert isinstance(error, str)
    assert error
    assert not any(secret in response.get_data(as_text=True) for secret in SECRETS)
    assert outcome.received == []
    assert outcome.rejected == []
    assert not any(secret in record.getMessage() for record in outcome.logs for secret in SECRETS)
    if status == 401:
        assert any(record.levelno == logging.WARNING for record in outcome.logs)


def assert_answered(webhook: Webhook, outcome: Outcome, body: dict[str, Any]) -> None:
    """An authentic JSON object: 200 with a status, signals and dedupe that match it."""
    response = outcome.response
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    event_id = body.get("event_id")
    assert answer["status"] in {"accepted", "duplicate", "rejected"}
    assert answer["event_id"] == (event_id if event_id and is_real_text(event_id) else None)
    if answer["status"] == "rejected":
        assert isinstance(answer["reason"], str)
        assert answer["reason"]
        assert isinstance(answer["errors"], dict)
        assert outcome.received == []
        assert len(outcome.rejected) == 1
        assert outcome.rejected[0]["reason"] == answer["reason"]
    elif answer["status"] == "duplicate":
        assert event_id in webhook.accepted
        assert outcome.received == []
        assert outcome.rejected == []
    else:
        assert event_id not in webhook.accepted
        webhook.accepted.add(event_id)
        assert outcome.rejected == []
        [event] = outcome.received
        assert event.event_id == event_id
        assert event.raw == body
        # RudderStack refuses a batch holding an event without either id: never accept one.
        assert not (blank(event.payload.get("userId")) and blank(event.payload.get("anonymousId")))


def is_real_text(value: object) -> bool:
    """A string that is valid Unicode (JSON can carry lone surrogates such as ``"\\ud800"``)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def blank(value: object) -> bool:
    """Missing, null or blank, as RudderStack's gateway counts an id (docs: rudderstack.md, Identity):
    it drops the characters Unicode calls other or separators (but the ASCII space) and those
    invisible-characters.com lists, then trims spaces. Its JSON decoder has read a lone surrogate
    as U+FFFD, which it keeps."""
    if not isinstance(value, str):
        return value is None
    return all(
        char == " " or char in INVISIBLE or gateway_drops(unicodedata.category(char)) for char in value
    )


def gateway_drops(category: str) -> bool:
    return category[0] in "CZ" and category != "Cs"


#: Ids RudderStack's gateway counts as blank.
BLANKS = ["", "  ", "\u200b", "\ufeff\u3164 ", "\x00"]

#: invisible-characters.com's list, as rudder-go-kit's sanitize.Unicode drops them.
INVISIBLE = set(
    "\u0000\u0009\u00a0\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u2000\u2001\u2002\u2003"
    "\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b\u200c\u200d\u200e\u200f\u202f\u205f\u2060"
    "\u2061\u2062\u2063\u2064\u206a\u206b\u206c\u206d\u206e\u206f\u3000\u2800\u3164\ufeff\uffa0"
)


def assert_policy_for_every_signature(
    webhook: Webhook, raw: bytes, forged: dict[str, str], body: dict[str, Any] | None
) -> None:
    """Post ``raw`` unsigned, forged and signed; ``body`` is its JSON object, ``None`` if it is not one."""
    assert_refused(webhook.post(raw, {"Content-Type": "application/json"}), 401)
    assert_refused(webhook.post(raw, forged), 401)
    outcome = webhook.post(raw, signed(raw))
    if body is None:
        assert_refused(outcome, 400)
        return
    assert_answered(webhook, outcome, body)
    if outcome.response.get_json()["status"] == "accepted":
        retry = webhook.post(raw, signed(raw))  # Customer.io delivers at least once
        assert retry.response.get_json() == {"status": "duplicate", "event_id": body["event_id"]}
        assert retry.received == []
        assert retry.rejected == []


# -- strategies -----------------------------------------------------------------------------

HEX = "0123456789abcdef"
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f\x85"))


@st.composite
def forged_headers(draw: st.DrawFn, raw: bytes) -> dict[str, str]:
    """Headers that must not pass: missing, malformed or wrong ``X-CIO-Signature`` / ``X-CIO-Timestamp``."""
    good = signed(raw)
    signature, sent_at = good["X-CIO-Signature"], good["X-CIO-Timestamp"]
    kind = draw(st.integers(min_value=0, max_value=12))
    headers = {"Content-Type": "application/json", "X-CIO-Timestamp": sent_at}
    if kind == 0:  # timestamp only
        return headers
    if kind == 1:  # signature only
        return {"Content-Type": "application/json", "X-CIO-Signature": signature}
    if kind == 2:
        headers["X-CIO-Signature"] = ""
    elif kind == 3:  # another key
        key = draw(st.text(min_size=1, max_size=20).filter(lambda key: key != SIGNING_KEY))
        headers = signature_headers(raw, key, timestamp=SENT_AT)
    elif kind == 4:  # another body
        headers = signed(raw + draw(st.binary(min_size=1, max_size=3)))
    elif kind == 5:  # another timestamp than the one signed
        headers = dict(
            good, **{"X-CIO-Timestamp": str(SENT_AT + draw(st.integers(min_value=1, max_value=10**6)))}
        )
    elif kind == 6:  # a garbage timestamp
        headers = dict(
            good, **{"X-CIO-Timestamp": draw(HEADER_TEXT.filter(lambda text: text.strip() != sent_at))}
        )
    elif kind == 7:  # one hex digit changed
        position = draw(st.integers(min_value=0, max_value=63))
        digit = draw(st.sampled_from(HEX.replace(signature[position], "")))
        headers["X-CIO-Signature"] = signature[:position] + digit + signature[position + 1 :]
    elif kind == 8:  # truncated
        headers["X-CIO-Signature"] = signature[: draw(st.integers(min_value=1, max_value=63))]
    elif kind == 9:  # extended
        headers["X-CIO-Signature"] = signature + draw(st.text(HEX, min_size=1, max_size=4))
    elif kind == 10:  # dressed up the way other providers send theirs
        headers["X-CIO-Signature"] = draw(st.sampled_from(["sha256=", "v0=", "v0:"])) + signature
    elif kind == 11:  # 64 hex digits, just not the right ones
        headers["X-CIO-Signature"] = draw(
            st.text(HEX, min_size=64, max_size=64).filter(lambda s: s != signature)
        )
    else:  # anything at all
        headers["X-CIO-Signature"] = draw(HEADER_TEXT.filter(lambda text: text.strip() != signature))
    return headers


def json_object_or_none(raw: bytes) -> dict[str, Any] | None:
    """The body as a JSON object (RFC 8259, so no NaN/Infinity), ``None`` if it is not one."""

    def refuse(token: str) -> None:
        raise ValueError(token)

    try:
        value = json.loads(raw, parse_constant=refuse)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@st.composite
def corrupted_samples(draw: st.DrawFn) -> bytes:
    """A sample event's bytes after a few random byte edits (truncation, insertion, overwrite, deletion)."""
    raw = bytearray(encode(sample(draw(st.sampled_from(EMAIL_EVENTS)))))
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        position = draw(st.integers(min_value=0, max_value=len(raw)))
        edit = draw(st.integers(min_value=0, max_value=3))
        if edit == 0:
            del raw[position:]
        elif edit == 1:
            raw[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif edit == 2:
            raw[position : position + 1] = draw(st.binary(min_size=1, max_size=1))
        else:
            del raw[position : position + draw(st.integers(min_value=1, max_value=20))]
    return bytes(raw)


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    st.sampled_from(["email", "delivered", "bounced", "42", "ada@example.com", "01E4C4CT6YDC7Y5M7FE1GWWPQJ"]),
)
JSON_KEYS = st.sampled_from(TOP_KEYS + DATA_KEYS + IDENTIFIER_KEYS) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(JSON_KEYS, children, max_size=6),
    max_leaves=30,
)


@dataclass(frozen=True)
class Token:
    """Bytes written into a body as they are, where a JSON value goes."""

    text: bytes
    valid: bool  # whether the body stays valid JSON (RFC 8259) with it


VALID_TOKENS = [
    b"1e999",  # decodes to inf
    b"-1e999",
    b"1E400",
    b"1e-400",
    b"-0",
    b"-0.0",
    b"0e0",
    b"12345678901234567890123456789",
    b'"\\ud800"',  # a lone surrogate, which Python's decoder accepts
    b'"\\udfff\\ud800"',
    b'"a\\udfffb"',
    b'"\\uffff"',  # non-characters: valid JSON, valid Unicode, never assigned
    b'"\\ufdd0\\ufffe"',
    b'"\xef\xbf\xbe"',  # U+FFFE written out as UTF-8
    b'"\\u0000"',
    b'"\xc3\xa9t\xc3\xa9"',
    b'"\xf0\x9f\x92\xa5"',
    b'" \\" \\\\ \\/ \\b \\f \\n \\r \\t "',
    b"[[[[[[[[[[]]]]]]]]]]",
    b'{"": {"": {"": null}}}',
    b"\t\n\r []",
]
INVALID_TOKENS = [
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"+Infinity",
    b"nan",
    b"inf",
    b"+1",
    b"01",
    b"-01",
    b".5",
    b"1.",
    b"1e",
    b"0x1F",
    b"True",
    b"None",
    b"undefined",
    b"'quoted'",
    b"",
    b'"\x01"',  # a raw control character inside a string
    b'"\xff\xfe"',  # not UTF-8
    b'"\\x41"',
    b'"\\u12"',
    b'"unterminated',
    b"[1,]",
    b'{"a"}',
    b"tru",
]
TOKENS = st.one_of(
    st.sampled_from([Token(text, True) for text in VALID_TOKENS]),
    st.sampled_from([Token(text, False) for text in INVALID_TOKENS]),
    # Huge integers, up to the 4300 digits that Python's int() accepts by default.
    st.integers(min_value=1, max_value=4300).map(lambda digits: Token(b"-" + b"9" * digits, True)),
    st.integers(min_value=-(10**400), max_value=10**400).map(lambda n: Token(str(n).encode(), True)),
)
KINDS = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "str": st.text(max_size=12) | st.sampled_from(["1585250199", "2020-03-26T19:16:39Z", "", " "]),
    "list": st.lists(JSON_LEAVES, max_size=3),
    "object": st.dictionaries(JSON_KEYS, JSON_LEAVES, max_size=3),
}


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    names = {int: "int", float: "float", str: "str", list: "list", dict: "object"}
    return names.get(type(value), "token")


def to_bytes(value: Any) -> bytes:
    if isinstance(value, Token):
        return value.text
    if isinstance(value, dict):
        members = (json.dumps(key).encode() + b":" + to_bytes(item) for key, item in value.items())
        return b"{" + b",".join(members) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(to_bytes(item) for item in value) + b"]"
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def is_valid(value: Any) -> bool:
    if isinstance(value, Token):
        return value.valid
    if isinstance(value, dict):
        return all(is_valid(item) for item in value.values())
    if isinstance(value, list):
        return all(is_valid(item) for item in value)
    return True


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    """One of the six samples with keys deleted, replaced, retyped or overwritten with raw tokens,
    at the top level, in ``data`` and in ``data.identifiers``."""
    body = sample(draw(st.sampled_from(EMAIL_EVENTS)))
    # Mostly a fresh event_id, so that valid mutants are accepted (signals, payload) rather than duplicates.
    body["event_id"] = draw(
        st.just(body["event_id"]) | st.uuids().map(str) | st.text(min_size=1, max_size=26)
    )
    if draw(st.booleans()):  # another event type, which the strict email schemas do not cover
        body["object_type"], body["metric"] = draw(st.sampled_from(OTHER_EVENTS))
    for key in IDENTITY_KEYS:  # who the event is about: kept, or missing, null or blank
        edit = draw(st.sampled_from(["keep", "delete", "null", "blank"]))
        if edit == "delete":
            body["data"].pop(key, None)
        elif edit != "keep":  # blank as RudderStack's gateway sees it: spaces and invisible characters too
            blank = None if edit == "null" else draw(st.sampled_from(BLANKS))
            body["data"][key] = {"id": blank, "email": blank} if key == "identifiers" else blank
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        containers: list[tuple[dict[str, Any], list[str]]] = [(body, TOP_KEYS)]
        data = body.get("data")
        if isinstance(data, dict):
            containers.append((data, DATA_KEYS))
            if isinstance(data.get("identifiers"), dict):
                containers.append((data["identifiers"], IDENTIFIER_KEYS))
        target, keys = containers[draw(st.integers(min_value=0, max_value=len(containers) - 1))]
        key = draw(st.sampled_from(keys) | st.text(max_size=8))
        action = draw(st.sampled_from(["delete", "replace", "retype", "token"]))
        if action == "delete":
            target.pop(key, None)
        elif action == "replace":
            target[key] = draw(JSON_VALUES)
        elif action == "retype":
            other_kinds = sorted(set(KINDS) - {kind_of(target.get(key))})
            target[key] = draw(KINDS[draw(st.sampled_from(other_kinds))])
        else:
            target[key] = draw(TOKENS)
    return body


# -- the properties -------------------------------------------------------------------------


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=300)
@given(raw=st.one_of(st.binary(max_size=2048), corrupted_samples()), data=st.data())
def test_random_bytes_get_a_policy_answer(webhook: Webhook, raw: bytes, data: st.DataObject) -> None:
    assert_policy_for_every_signature(webhook, raw, data.draw(forged_headers(raw)), json_object_or_none(raw))


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=350)
@given(
    value=JSON_VALUES | st.dictionaries(JSON_KEYS, JSON_VALUES, min_size=1, max_size=8),
    style=st.sampled_from([{}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}]),
    data=st.data(),
)
def test_any_json_value_gets_a_policy_answer(
    webhook: Webhook, value: Any, style: dict[str, Any], data: st.DataObject
) -> None:
    raw = json.dumps(value, **style).encode("utf-8")
    body = value if isinstance(value, dict) else None
    assert_policy_for_every_signature(webhook, raw, data.draw(forged_headers(raw)), body)


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=500)
@given(body=mutated_events(), data=st.data())
def test_mutated_events_get_a_policy_answer(
    webhook: Webhook, body: dict[str, Any], data: st.DataObject
) -> None:
    raw = to_bytes(body)
    decoded = json.loads(raw) if is_valid(body) else None
    assert_policy_for_every_signature(webhook, raw, data.draw(forged_headers(raw)), decoded)


def decoder_depth_limit() -> int:
    """How deep an array ``json.loads`` decodes here: about the recursion limit before
    Python 3.12, far deeper after it."""

    def decodes(depth: int) -> bool:
        try:
            json.loads("[" * depth + "]" * depth)
        except RecursionError:
            return False
        return True

    good, bad = 1, 2
    while bad < 2**20 and decodes(bad):
        good, bad = bad, bad * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if decodes(middle) else (good, middle)
    return good


@pytest.mark.parametrize(
    "forwarder",
    [
        "none",
        "outbox",
        "sync",
    ],
)
def test_deep_nesting_is_answered_at_every_depth(
    forwarder: str, tmp_path: Path, data_plane: FakeDataPlane
) -> None:
    """Small depths, then every depth around the decoder's limit, where re-encoding could blow the stack."""
    limit = decoder_depth_limit()
    with build_webhook(**forwarder_config(forwarder, tmp_path, data_plane)) as webhook:
        for depth in [*range(1, 30), *range(max(30, limit - 80), limit + 20)]:
            array = b"[" * depth + b"]" * depth
            assert_refused(webhook.post(array, signed(array)), 400)

            nested = b'{"a":' * depth + b"1" + b"}" * depth  # an object, however deep: never a 400
            assert_answered(webhook, webhook.post(nested, signed(nested)), {"a": "no event_id"})

            prefix = f'{{"event_id":"deep-{depth}","object_type":"push","metric":"sent",'.encode()
            event = prefix + b'"data":{"customer_id":"42","recipients":' + array + b"}}"
            outcome = webhook.post(event, signed(event))
            answer = outcome.response.get_json()
            if answer["status"] == "rejected":
                # Too deep to decode, or to encode again for RudderStack: rejected, never a 400 or a crash.
                assert depth > 100
                assert (answer["event_id"], answer["reason"]) in {
                    (None, TOO_DEEP_TO_READ),
                    (f"deep-{depth}", "the event is nested too deeply to be sent as JSON"),
                }
                assert outcome.received == []
                assert len(outcome.rejected) == 1
            else:
                assert answer == {"status": "accepted", "event_id": f"deep-{depth}"}
                assert len(outcome.received) == 1

            metric = b"[" * depth + b'"delivered"' + b"]" * depth  # JavaScript joins it to "delivered"
            event = f'{{"event_id":"metric-{depth}","object_type":"email","metric":'.encode() + metric
            event += b',"data":{"customer_id":"42"}}'
            outcome = webhook.post(event, signed(event))
            answer = outcome.response.get_json()
            if answer["status"] == "rejected":
                assert depth > 100
                assert (answer["event_id"], answer["reason"]) == (None, TOO_DEEP_TO_READ)
            else:  # named as RudderStack names it, however deep: it crashed the route with a 500
                assert answer == {"status": "accepted", "event_id": f"metric-{depth}"}
                assert [event.name for event in outcome.received] == ["Email Delivered"]


TOO_DEEP_TO_READ = "the body is nested too deeply to be read"


@pytest.mark.parametrize("forwarder", ["none", "outbox"])
def test_an_object_too_deep_to_decode_is_rejected_and_kept(
    make_app: Callable[..., Flask], post: Callable[..., TestResponse], tmp_path: Path, forwarder: str
) -> None:
    """Customer.io would hold back every later event behind a 400: a 2xx rejection, the body kept."""
    depth = max(decoder_depth_limit(), 1024) + 50  # deeper than json and orjson (1,024) decode
    app = make_app(**forwarder_config(forwarder, tmp_path))
    raw = b' \r\n{"event_id":"E1","object_type":"email","metric":"sent","data":{"customer_id":"42",'
    raw += b'"attributes":' + b"[" * depth + b"]" * depth + b"}}"
    with record_signals(app, signals.event_received, signals.event_rejected) as calls:
        response = post(app.test_client(), raw)
    assert response.status_code == 200
    rejected = {"status": "rejected", "event_id": None, "reason": TOO_DEEP_TO_READ, "errors": {}}
    assert response.get_json() == rejected
    assert calls == [("event-rejected", {"reason": TOO_DEEP_TO_READ, "errors": {}, "body": {}})]
    if forwarder == "outbox":
        [letter] = get_outbox(app).dead_letters()
        assert letter.body == raw.decode()
        assert not letter.requeueable

    too_deep_array = b"[" * depth + b"]" * depth
    assert post(app.test_client(), too_deep_array).status_code == 400  # not an object: nothing kept


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=300)
@given(
    raw=st.one_of(
        st.tuples(st.sampled_from(EMAIL_EVENTS), st.integers(min_value=0, max_value=SMALL_LIMIT)).map(
            lambda padded: encode(sample(padded[0])) + b" " * padded[1]
        ),
        st.binary(min_size=SMALL_LIMIT - 10, max_size=SMALL_LIMIT * 2),
    ),
    data=st.data(),
)
def test_bodies_over_the_limit_are_413(small_webhook: Webhook, raw: bytes, data: st.DataObject) -> None:
    if len(raw) > SMALL_LIMIT:
        assert_refused(small_webhook.post(raw, signed(raw)), 413)
        assert_refused(small_webhook.post(raw, {"Content-Type": "application/json"}), 413)
        assert_refused(small_webhook.post(raw, data.draw(forged_headers(raw))), 413)
    else:
        assert_policy_for_every_signature(
            small_webhook, raw, data.draw(forged_headers(raw)), json_object_or_none(raw)
        )


@pytest.mark.parametrize("forwarder", ["none", "outbox"])
def test_a_refused_large_body_is_not_remembered(
    make_app: Callable[..., Flask], post: Callable[..., TestResponse], forwarder: str, tmp_path: Path
) -> None:
    client = make_app(
        CIO_RUDDER_MAX_BODY_BYTES=SMALL_LIMIT, **forwarder_config(forwarder, tmp_path)
    ).test_client()
    body = sample("bounced")
    padded = encode(body) + b" " * SMALL_LIMIT
    assert post(client, padded).status_code == 413
    again = post(client, body)
    assert again.status_code == 200
    assert again.get_json()["status"] == "accepted"


RECEIVERS = [
    (signals.event_received, "delivered"),
    (signals.email_delivered, "delivered"),
    (signals.email_opened, "opened"),
    (signals.email_clicked, "clicked"),
    (signals.email_bounced, "bounced"),
    (signals.email_spammed, "spammed"),
    (signals.email_unsubscribed, "unsubscribed"),
]


@pytest.mark.parametrize("forwarder", ["none", "outbox"])
@pytest.mark.parametrize(("signal", "metric"), RECEIVERS, ids=[signal.name for signal, _ in RECEIVERS])
def test_a_raising_receiver_gives_500_and_nothing_is_remembered(
    make_app: Callable[..., Flask],
    post: Callable[..., TestResponse],
    signal: Any,
    metric: str,
    forwarder: str,
    tmp_path: Path,
) -> None:
    app = make_app(PROPAGATE_EXCEPTIONS=False, **forwarder_config(forwarder, tmp_path))
    client = app.test_client()
    body = sample(metric)
    calls: list[str] = []

    def broken_receiver(sender: Flask, event: CioEvent, **extra: Any) -> None:
        calls.append(event.event_id)
        raise RuntimeError("the host app's database is down")

    with signal.connected_to(broken_receiver, sender=app):
        first = post(client, body)
        retry = post(client, body)
    assert first.status_code == 500
    assert retry.status_code == 500
    assert calls == [body["event_id"], body["event_id"]], "Customer.io's retry must run the receivers again"

    after_fix = post(client, body)
    assert after_fix.status_code == 200
    assert after_fix.get_json() == {"status": "accepted", "event_id": body["event_id"]}


# -- bodies that once crashed the view (found by the properties above) -------------------------


def _legacy_body() -> dict[str, Any]:
    return {
        "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQL",
        "event_type": "email_delivered",
        "timestamp": 1585250199,
        "data": {"customer_id": "42", "email_address": "ada@example.com"},
    }


def _without(key: str) -> dict[str, Any]:
    body = sample("delivered")
    del body[key]
    return body


@pytest.mark.parametrize(
    "body",
    [_without("object_type"), _without("metric"), _legacy_body()],
    ids=["no-object_type", "no-metric", "legacy-event_type"],
)
def test_body_without_object_type_or_metric_is_accepted(
    client: FlaskClient, post: Callable[..., TestResponse], body: dict[str, Any]
) -> None:
    with record_events(client.application) as events:
        response = post(client, body)
    assert response.status_code == 200
    assert response.get_json()["status"] == "accepted"
    assert [event.name for event in events] == ["Unknown Event"]


@pytest.mark.parametrize("forwarder", ["none", "outbox"])
@pytest.mark.parametrize("event_id", [b'"\\ud800"', b'"a\\udfffb"', b'"\\udfff\\ud800"'])
def test_an_event_id_holding_a_lone_surrogate_is_rejected_and_kept(
    make_app: Callable[..., Flask],
    post: Callable[..., TestResponse],
    tmp_path: Path,
    forwarder: str,
    event_id: bytes,
) -> None:
    """No key to deduplicate on: a 2xx rejection (never a 500), kept as a dead letter under its own key."""
    app = make_app(**forwarder_config(forwarder, tmp_path))
    raw = b'{"event_id":' + event_id + b',"object_type":"email","metric":"sent","data":{"customer_id":"42"}}'
    with record_events(app) as events:
        response = post(app.test_client(), raw)
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["status"] == "rejected"
    assert answer["event_id"] is None
    assert "lone UTF-16 surrogate" in answer["reason"]
    assert events == []
    if forwarder == "outbox":
        [letter] = get_outbox(app).dead_letters()
        assert letter.body == raw.decode()
        assert not letter.requeueable


@pytest.mark.parametrize("validation", ["compatible", "strict"])
def test_outbox_keeps_a_body_holding_a_lone_surrogate_in_a_copied_field(
    make_app: Callable[..., Flask], post: Callable[..., TestResponse], tmp_path: Path, validation: str
) -> None:
    """``subject`` is copied into the RudderStack event: it is sent as the JSON escape it came as."""
    app = make_app(CIO_RUDDER_VALIDATION=validation, **forwarder_config("outbox", tmp_path))
    raw = b'{"event_id":"E3","object_type":"push","metric":"sent",'
    raw += b'"data":{"customer_id":42,"subject":"Hi \\ud83d"}}'
    response = post(app.test_client(), raw)
    assert response.status_code == 200
    if validation == "strict":  # customer_id is a string in Customer.io's schema
        assert response.get_json()["status"] == "rejected"
        assert response.get_json()["errors"] == {"data": {"customer_id": ["Not a valid string."]}}
    else:
        assert response.get_json()["status"] == "accepted"
        assert get_outbox(app).status().pending == 1


@pytest.mark.parametrize(
    "field_json", [b'"device_id":1e999', b'"recipients":[-1e999]', b'"event_type":{"a":1E400}']
)
def test_a_number_json_cannot_carry_in_a_copied_field_is_rejected(
    client: FlaskClient, post: Callable[..., TestResponse], field_json: bytes
) -> None:
    raw = (
        b'{"event_id":"E1","object_type":"push","metric":"sent","data":{"customer_id":"42",'
        + field_json
        + b"}}"
    )
    with record_events(client.application) as events:
        response = post(client, raw)
    assert response.status_code == 200
    assert response.get_json()["status"] == "rejected"
    assert "number too large for JSON" in response.get_json()["reason"]
    assert events == []


@pytest.mark.parametrize(("field", "status"), [("device_id", "rejected"), ("attributes", "accepted")])
def test_an_integer_past_pythons_digit_limit_is_still_a_json_object(
    client: FlaskClient, post: Callable[..., TestResponse], field: str, status: str
) -> None:
    """Valid JSON, though Python's int() refuses more than 4,300 digits: read as JavaScript reads it, a
    float (infinity here). Copied into the event it cannot be sent; in a field the event drops, fine."""
    raw = b'{"event_id":"E2","object_type":"push","metric":"sent","data":{"customer_id":"42","'
    raw += field.encode() + b'":' + b"9" * 5000 + b"}}"
    response = post(client, raw)
    assert response.status_code == 200
    assert response.get_json()["status"] == status


@pytest.mark.parametrize("sign", [b"", b"-"], ids=["positive", "negative"])
def test_an_integer_at_pythons_digit_limit_stays_exact(
    app: Flask, client: FlaskClient, post: Callable[..., TestResponse], sign: bytes
) -> None:
    """4,300 digits is what int() still takes, whatever the sign: the receivers see the exact integer."""
    number = sign + b"9" * 4300
    raw = b'{"event_id":"E3","object_type":"push","metric":"sent","data":{"customer_id":"42","attributes":'
    raw += number + b"}}"
    with record_signals(app, signals.event_received) as calls:
        assert post(client, raw).get_json()["status"] == "accepted"
    assert calls[0][1]["event"].raw["data"]["attributes"] == int(number)
