"""The RudderStack data plane: a client for ``POST /v1/batch`` and its settings."""

from __future__ import annotations

import base64
import codecs
import gzip
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, Union
from urllib.parse import SplitResult, urlsplit

import requests

from .settings import check_pasted, check_timeout, number_hint, unset_hint

__all__ = [
    "Answer",
    "DataPlane",
    "Timeout",
    "check_url",
    "configuration_hint",
    "data_plane_from_config",
    "data_plane_settings",
    "identifiable",
    "make_data_plane",
    "retry_after",
]

Timeout = Union[float, tuple[float, float]]


#: What to check when RudderStack answers with these statuses: the settings, not the events, are wrong.
_CONFIGURATION_ERRORS = {
    200: "check CIO_RUDDER_DATA_PLANE_URL: what answers there is not RudderStack",  # a web page
    401: "check CIO_RUDDER_WRITE_KEY: RudderStack does not know this write key",
    403: "check CIO_RUDDER_WRITE_KEY: RudderStack refused this write key",
    404: "check CIO_RUDDER_DATA_PLANE_URL and that the RudderStack source is enabled",
}
_REDIRECTED = (
    "set CIO_RUDDER_DATA_PLANE_URL to the address it leads to, without /v1/batch: redirects are not followed"
)


def configuration_hint(status: int) -> str | None:
    """What to check after an answer with this ``status`` that no retry can help, if it is one."""
    return _CONFIGURATION_ERRORS.get(status, _REDIRECTED if 300 <= status < 400 else None)


#: The most of an answer's body that is read (bytes): RudderStack answers "OK" or a line saying what
#: was wrong, and what a proxy sends beyond this (a page, or an endless stream) is not read.
ANSWER_LIMIT = 4096


@dataclass(frozen=True)
class Answer:
    """What the data plane answered a batch: its status, its headers and the start of its body."""

    status_code: int
    headers: Mapping[str, str]
    #: At most :data:`ANSWER_LIMIT` bytes of the body, decoded.
    text: str
    #: Whether ``text`` is the whole body: ``False`` when the reading stopped at the limit.
    complete: bool = True

    @property
    def is_page(self) -> bool:
        """Whether the answer is a web page (HTML or XML: it starts with ``<``), which RudderStack
        never sends: it answers in plain text. Its type is not asked: a stand-in data plane written
        in Flask sends its ``"OK"`` as ``text/html``; a parked domain may send a page as anything.
        An answer whose start, as far as it is read, is all blank counts as one too: a template's
        page may start with that much white space, and RudderStack's "OK" never does."""
        start = self.text.lstrip()
        return start.startswith("<") or (not start and not self.complete)

    @property
    def stored(self) -> bool:
        """Whether RudderStack stored the batch: a 200, and not a web page (taking one for a
        delivery would drop the events)."""
        return self.status_code == 200 and not self.is_page


class DataPlane:
    """Posts batches of events to one RudderStack data plane over one ``requests.Session``.

    HTTP Basic auth with the write key as user name and an empty password, gzip
    bodies. The write key lives only in the session's auth, never in a message:
    :meth:`describe` masks it where an answer quotes it. The session's URL, auth, headers,
    proxies and CA bundle are read here, once (only its cookies on each post): a change to
    them afterwards does not reach the posts.
    """

    def __init__(self, url: str, write_key: str, timeout: Timeout) -> None:
        self.batch_url = url.rstrip("/") + "/v1/batch"
        parts = urlsplit(url)  # for messages: the scheme, host and port, no credentials nor path
        self.address = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = (write_key, "")
        self.session.headers.update({"Content-Type": "application/json", "Content-Encoding": "gzip"})
        # The proxies and CA bundle from the environment, read once: requests would read them (every
        # variable, twice) on each post, a fifth of the post's CPU in the web worker's sender thread.
        found = self.session.merge_environment_settings(self.batch_url, {}, None, None, None)
        self.session.proxies, self.session.verify = found["proxies"], found["verify"]
        self.session.trust_env = False
        # The request prepared once (URL, auth, headers), each post a copy with its own body and the
        # session's cookies: requests would merge every setting again, a third of a post's CPU.
        self._request = self.session.prepare_request(requests.Request("POST", self.batch_url))

    def post_batch(self, events_json: Sequence[str], timeout: Timeout | None = None) -> Answer:
        """Send events already encoded as JSON in one batch; what RudderStack answered.

        A redirect is an answer, not followed: requests would send a 301 or 302 on as a GET
        without the batch, and take the 200 of wherever it leads for a delivery. Raises
        ``requests.RequestException`` on timeouts and connection errors.
        """
        body = ('{"batch":[' + ",".join(events_json) + "]}").encode("utf-8")
        request = self._request.copy()
        request.prepare_cookies(self.session.cookies)  # a load balancer's sticky-session cookie, say
        # Level 1: a third of level 6's CPU for a body about a tenth larger (sample traffic).
        request.prepare_body(gzip.compress(body, 1), None)
        response = self.session.send(
            request,
            timeout=timeout or self.timeout,
            allow_redirects=False,
            stream=True,  # read below, up to ANSWER_LIMIT: a proxy's endless answer must not fill memory
        )
        with response:  # read to its end, the connection goes back to the pool; cut short, it is closed
            start = b""
            for chunk in response.iter_content(ANSWER_LIMIT):
                start += chunk
                if len(start) >= ANSWER_LIMIT:
                    break
        complete = len(start) < ANSWER_LIMIT  # else the reading stopped at the limit, perhaps before the end
        start = start[:ANSWER_LIMIT].removeprefix(codecs.BOM_UTF8)  # a page may start with one: see is_page
        return Answer(response.status_code, response.headers, _text(start, response.encoding), complete)

    def describe(self, response: Answer) -> str:
        """A short account of an answer that is no delivery, for logs and operators, with the write key masked
        wherever the answer quotes it (as is, or as the Basic credentials that carry it)."""
        text = response.text.strip()
        if 300 <= response.status_code < 400:
            text = f"a redirect to {response.headers.get('Location') or 'nowhere given'}"
        elif response.status_code == 200 and response.is_page:  # not stored: see Answer.stored
            text = "a web page, where RudderStack answers in plain text"
        # Whatever answered (a proxy, anything on the way over http) must not forge log lines nor
        # steer a terminal: line breaks, carriage returns and escape sequences become spaces.
        text = "".join(char if char.isprintable() else " " for char in text)
        write_key = self.session.auth[0] if isinstance(self.session.auth, tuple) else ""
        if write_key:
            credentials = base64.b64encode(f"{write_key}:".encode()).decode()
            for secret in (credentials, credentials.rstrip("="), write_key):
                text = text.replace(secret, "***")
        text = text[:200]  # after masking: a cut must not leave part of the key behind
        return f"RudderStack answered {response.status_code}" + (f": {text}" if text else "")

    def unreachable(self, error: requests.RequestException) -> str:
        """Why a post got no answer, for logs and operators: where it went, and what to check."""
        return (
            f"could not reach RudderStack at {self.address} ({type(error).__name__}): "
            "check CIO_RUDDER_DATA_PLANE_URL, and that the data plane is up"
        )

    def close(self) -> None:
        self.session.close()


#: Characters Unicode calls printable that RudderStack's gateway still drops before it looks for
#: an id (rudder-go-kit's ``sanitize.Unicode``); every character that is not printable it drops too.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def _text(start: bytes, charset: str | None) -> str:
    """The answer's text in its charset; in UTF-8 when it names none, one Python does not know (a
    proxy's ``utf8mb4``, say) or one that cannot replace what it cannot decode (``idna``): it is read
    for logs and for ``is_page``, never to decide a delivery."""
    try:
        return start.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError):  # ValueError: UnicodeError, or a NUL in the name
        return start.decode("utf-8", "replace")


def identifiable(event: Mapping[str, Any]) -> bool:
    """Whether RudderStack's gateway takes ``event``: its ``userId`` or ``anonymousId`` is neither
    missing, null, nor (once the gateway drops invisible characters) blank. It refuses the whole
    request of an event that is not, so such an event must never be put in a batch."""
    return not all(_blank_id(event.get(key)) for key in ("userId", "anonymousId"))


def _blank_id(value: object) -> bool:
    if not isinstance(value, str):  # the gateway writes any other value as text: only null is blank
        return value is None
    if value.isascii() and value.isprintable():  # the usual id: nothing in it for the gateway to drop
        return not value.strip(" ")
    return all(_dropped(char) for char in value)


def _dropped(char: str) -> bool:
    """Whether the gateway drops ``char`` from an id before it looks for one. Not a lone surrogate
    (``"\\ud800"``, which JSON can carry): its JSON decoder reads that as U+FFFD, which is printable."""
    return char == " " or char in _INVISIBLE or not (char.isprintable() or "\ud800" <= char <= "\udfff")


def data_plane_from_config(config: Mapping[str, Any], default_timeout: Timeout) -> DataPlane:
    """The data plane the config names; fails naming ``CIO_RUDDER_WRITE_KEY`` or ``..._DATA_PLANE_URL``."""
    return make_data_plane(*data_plane_settings(config, default_timeout))


def make_data_plane(url: str, write_key: str, timeout: Timeout) -> DataPlane:
    """A :class:`DataPlane` for settings :func:`data_plane_settings` checked; where requests refuses
    the URL even so (a host name IDNA does not take), fails naming the setting, not quoting the URL."""
    try:
        return DataPlane(url, write_key, timeout)
    except (requests.RequestException, ValueError) as error:  # its message quotes the URL: not here
        raise RuntimeError(
            f"CIO_RUDDER_DATA_PLANE_URL is no URL requests can post to ({type(error).__name__}): "
            "set it to the data plane's URL, such as https://example-dataplane.rudderstack.com"
        ) from None


def data_plane_settings(config: Mapping[str, Any], default_timeout: Timeout) -> tuple[str, str, Timeout]:
    """The data plane's URL, write key and timeout from the config, each checked (see
    :func:`data_plane_from_config`): what a process needs to make its own :class:`DataPlane`."""
    write_key = config.get("CIO_RUDDER_WRITE_KEY")
    if write_key and not isinstance(write_key, str):  # its value is a secret: not in the message
        kind, hint = type(write_key).__name__, number_hint("CIO_RUDDER_WRITE_KEY", write_key)
        raise RuntimeError(f"CIO_RUDDER_WRITE_KEY must be text, the source's write key, not a {kind}{hint}.")
    if not write_key:
        raise RuntimeError(
            f"CIO_RUDDER_WRITE_KEY is not set{unset_hint('CIO_RUDDER_WRITE_KEY')}: set it to the write key "
            "of a RudderStack HTTP source, or set CIO_RUDDER_FORWARDER = 'none' to forward nothing."
        )
    # No write key holds one of these. Outside Latin-1, requests would fail on each post with an error
    # holding the key (HTTP Basic auth carries it as Latin-1); any other would get a 401 from RudderStack.
    check_pasted(write_key, "CIO_RUDDER_WRITE_KEY", "the write key of RudderStack's source page")
    if not write_key.isascii():
        raise RuntimeError(
            "CIO_RUDDER_WRITE_KEY holds a character that is not ASCII, which no write key does: "
            "set it to the write key exactly as RudderStack's source page shows it."
        )
    url = check_url(config.get("CIO_RUDDER_DATA_PLANE_URL"), "CIO_RUDDER_DATA_PLANE_URL")
    return url, write_key, check_timeout(config.get("CIO_RUDDER_TIMEOUT")) or default_timeout


def check_url(url: object, key: str) -> str:
    """Return ``url`` if it is the http(s) address of a data plane, else fail naming the config ``key``
    (never quoting it: a URL may hold a password)."""
    example = "such as https://example-dataplane.rudderstack.com"
    parts = _split(url) if isinstance(url, str) else None
    if not isinstance(url, str) or parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        hint = unset_hint(key) if url is None else ""
        raise RuntimeError(f"{key} must be the http(s) URL of your RudderStack data plane, {example}{hint}")
    if any(_stray(char) for char in url) or any(unicodedata.category(char) == "Cf" for char in parts.path):
        raise RuntimeError(
            f"{key} holds a space, a line break or an invisible character (copied with it?): "
            f"set it to the data plane's URL alone, {example}"
        )
    if "@" in parts.netloc and "@" in parts.path:  # a password's bare "@" then "/": its tail goes elsewhere
        raise RuntimeError(
            f"{key} holds an @ that is not percent-encoded, which would send part of its credentials to "
            "another host: write @ as %40 and / as %2F, or leave the credentials out (the write key goes "
            "in CIO_RUDDER_WRITE_KEY)"
        )
    if "?" in url or "#" in url or _ENDPOINT.search(parts.path):
        raise RuntimeError(
            f"{key} must be the data plane's address alone, {example}: no endpoint such as /v1/batch and "
            "no query, as the events go to its /v1/batch, with CIO_RUDDER_WRITE_KEY"
        )
    if not _reachable_address(parts):
        raise RuntimeError(
            f"{key} names no host and port a request can go to (a name with an empty or over-long part "
            f"between dots, or a port that is no number up to 65535?): set it to the data plane's URL, "
            f"{example}"
        )
    return url


def _split(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or ``None`` where it refuses the URL (its error may quote a password)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _stray(char: str) -> bool:
    """White space or a control character: in a URL, copied with it (urlsplit() drops some unsaid)."""
    return char.isspace() or unicodedata.category(char) == "Cc"


def _reachable_address(parts: SplitResult) -> bool:
    """Whether a URL's host and port are ones requests can post to: else it fails only on each post,
    quoting the whole URL (a password with it)."""
    try:
        parts.port  # noqa: B018  (reading it checks it: ValueError if no number up to 65535)
    except ValueError:
        return False
    host = parts.hostname or ""
    labels = host.removesuffix(".").split(".")  # an IPv6 address has one, which urlsplit() checked
    # The length of a label that is not ASCII is its IDNA form's, which requests checks itself.
    return bool(host) and all(label and (len(label) <= 63 or not label.isascii()) for label in labels)


#: The end of a path that names one of the data plane's endpoints (``/v1/batch``), not the data plane
#: (a proxy's prefix, even one ending in ``/v1``, is the data plane's address there).
_ENDPOINT = re.compile(r"/v1/(batch|track|identify|page|screen|group|alias|import|webhook)/*$", re.IGNORECASE)


def retry_after(response: Answer, now: float) -> float | None:
    """Seconds RudderStack asks us to wait (``Retry-After`` on a 429 or 503), or ``None``.

    The header is a number of seconds or an HTTP date (compared with ``now``, seconds since
    the epoch); a date in the past means at once, anything unreadable is ignored.
    """
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # str.isdigit() alone takes "²", which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": GMT all the same, as HTTP dates always are
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)
