"""The store interface: what every outbox backend keeps and how a sender takes work from it.

One row per Customer.io ``event_id``. A row is ``pending`` until a sender claims it,
then ``delivered``, or ``dead`` with the reason when RudderStack will never take it.
A claim is a lease held by one sender (the *holder*: a process on SQLite, a
heartbeating sender on PostgreSQL): nobody else claims the batch while the lease
runs and the holder lives, and a batch whose holder died is free without waiting for
the lease: at once on SQLite (from another container, at its lease's end), once its
heartbeat is stale on PostgreSQL. Finishing
a batch (:meth:`OutboxStore.mark_delivered`, ...) names the claim's ``owner`` token,
so a late answer to a lease that was taken over changes nothing.

Every backend raises :class:`StoreUnavailable` (never its driver's own errors) when
the database cannot be reached or written, so nothing outside the store modules
needs to know which database is behind it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable, ClassVar
from urllib.parse import unquote

import orjson

__all__ = [
    "Activity",
    "Claim",
    "Claimed",
    "DeadLetter",
    "EventRecord",
    "Match",
    "OutboxStatus",
    "OutboxStore",
    "Pending",
    "StoreError",
    "StoreUnavailable",
    "bare_in_password",
    "redact_url",
    "searched_fields",
    "storage_key",
]

#: Longest ``event_id`` kept as it is; longer ones are stored under a hash (PostgreSQL's
#: index entries are limited to about 2.7 KB, and Customer.io's ids are 26-character ULIDs).
MAX_KEY_LENGTH = 255

Clock = Callable[[], float]


class StoreError(Exception):
    """The outbox store could not do what was asked."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or written now (down, locked, disk full); try again later.

    The message never holds a password: URLs in it are redacted.
    """


@dataclass(frozen=True)
class Claimed:
    """An event a sender has leased: its id and its RudderStack event as JSON text."""

    event_id: str
    payload_json: str


@dataclass(frozen=True)
class Claim:
    """One claimed batch: ``owner`` names this claim when the sender marks its events.

    ``paused`` says no events were claimed because an operator paused sending; ``expired``, how
    many pending events the claim made dead letters, as older than the claim's ``max_age``.
    """

    owner: str
    events: list[Claimed]
    paused: bool = False
    expired: int = 0


@dataclass(frozen=True)
class Pending:
    """An event to add with :meth:`OutboxStore.add_many` (the spool's mover, copies between stores,
    benchmarks); ``accepted_at`` defaults to now.

    ``event_name`` and ``email`` are kept for operators' searches, as with :meth:`OutboxStore.add`;
    when ``event_name`` is not given both are read from ``payload_json`` (which costs a decode).
    """

    event_id: str
    payload_json: str
    accepted_at: float | None = None
    event_name: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """An event that will not be delivered unless requeued, and why."""

    event_id: str
    reason: str
    accepted_at: float
    attempts: int
    requeueable: bool  # False for bodies rejected at validation: there is nothing to send
    body: str | None  # for those, the body exactly as received
    event_name: str | None = None  # the RudderStack event name, when known
    email: str | None = None  # the person's address, lower case, when known


@dataclass(frozen=True)
class Match:
    """Which dead letters an operator means; every field given must hold (``None``: any).

    ``since``: accepted at or after this time (seconds since the epoch); ``reason``: the
    reason contains this text; ``event``: the RudderStack event name contains it (both
    ignore case); ``event_id`` and ``email``: exactly this one (the email ignoring case);
    ``sendable``: ``True`` for those that can be requeued, ``False`` for rejected bodies.
    """

    since: float | None = None
    reason: str | None = None
    event: str | None = None
    event_id: str | None = None
    email: str | None = None
    sendable: bool | None = None

    @property
    def everything(self) -> bool:
        """Whether no field narrows the match."""
        fields = (self.since, self.reason, self.event, self.event_id, self.email, self.sendable)
        return all(value is None for value in fields)


@dataclass(frozen=True)
class EventRecord:
    """What became of one event: the answer to "did RudderStack get this one, and if not, why?"."""

    event_id: str
    state: str  # "pending", "delivered" or "dead"
    accepted_at: float  # when it was accepted (or rejected, or last requeued)
    delivered_at: float | None
    reason: str | None  # dead: why; pending: the last delivery error
    attempts: int
    rejected: bool  # refused at validation (a dead letter with its body and nothing to send)
    event_name: str | None
    email: str | None
    payload: str | None  # the RudderStack event (JSON), unless rejected
    body: str | None  # the body as received, for rejected ones

    @property
    def outcome(self) -> str:
        """One word for people: ``delivered``, ``pending``, ``dead`` or ``rejected``."""
        return "rejected" if self.rejected else self.state


@dataclass(frozen=True)
class Activity:
    """Events per minute over a recent window, oldest minute first.

    ``start`` is the first minute's start (seconds since the epoch); ``accepted[i]``
    counts events accepted in minute ``i`` (rejected bodies included), ``delivered[i]``
    those RudderStack stored in it.
    """

    start: float
    accepted: list[int]
    delivered: list[int]


@dataclass(frozen=True)
class OutboxStatus:
    """Counts by state, what senders hold now, and the age of the oldest pending event."""

    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None  # seconds
    last_error: str | None
    last_error_at: float | None
    #: Pending events a live sender holds right now (claimed, not yet marked).
    in_flight: int = 0
    #: Who holds them: process ids (SQLite) or sender names (PostgreSQL).
    holders: tuple[str, ...] = ()
    #: Whether an operator paused sending (``flask cio-rudder pause``); events are still accepted.
    paused: bool = False
    #: When the last delivery was (a purge of the delivered events remembers it): later than
    #: ``last_error_at``, the error is over.
    last_delivered_at: float | None = None
    #: The store's clock when this was read (PostgreSQL's is the server's): ages of the times above
    #: are counted from it, so a web server's clock that differs never shows them negative.
    read_at: float | None = None

    @property
    def delivered_since_error(self) -> bool:
        """Whether events were delivered after the last error (so it is not the current state)."""
        if self.last_error_at is None or self.last_delivered_at is None:
            return False
        return self.last_delivered_at > self.last_error_at


class OutboxStore(ABC):
    """Durable store of accepted events, shared by every process (and server) that opens the same URL.

    Implementations are safe to use from many threads and across ``fork()``: each
    process opens its own connections on first use. Times are seconds since the
    epoch from ``clock`` (tests pass a hand-moved one).
    """

    #: Whether :meth:`watch` hears about events other processes add (else senders only poll).
    notifies: ClassVar[bool] = False

    #: The store's URL with any password replaced by ``***``: safe to log.
    url: str
    #: The table that holds the events.
    table: str
    #: Whether this process found nothing where the store lives and made it, empty (an SQLite file):
    #: a command that finds it ``True`` was pointed at no outbox the app uses.
    made_new: bool = False

    @classmethod
    @abstractmethod
    def from_url(
        cls,
        url: str,
        *,
        instance_path: str | None,
        table: str | None,
        durability: str,
        clock: Clock | None,
        create: bool,
    ) -> OutboxStore:
        """The store ``url`` names (see :func:`~flask_cio_rudder.store.store_from_url`): each
        backend reads from the URL and the settings what its own constructor takes."""

    # -- the web request's side ----------------------------------------------------------------

    @abstractmethod
    def is_known(self, event_id: str) -> bool:
        """Whether this event was already accepted (rejected bodies do not count)."""

    @abstractmethod
    def add(
        self, event_id: str, payload_json: str, *, event_name: str | None = None, email: str | None = None
    ) -> bool:
        """Keep an accepted event as pending; ``False`` if it was already there. Durable on return.

        A body that was rejected under the same id earlier is replaced by the event.
        ``event_name`` and ``email`` are kept for operators' searches; when not given they
        are read from ``payload_json``.
        """

    @abstractmethod
    def add_many(self, events: Iterable[Pending]) -> int:
        """Add pending events in large transactions; returns how many were new.

        The spool's mover adds every accepted event this way (on SQLite), and copies between
        stores do; an event already in the store stays as it is.
        """

    def add_claimed(self, events: Sequence[Pending], lease: float, max_age: float) -> Claim:
        """:meth:`add_many` in one transaction, leasing the events it adds to the caller (as claims do).

        For a sender about to send what it has just written (the spool's mover hands its
        batch over): it saves a claim that rewrites every row. Nothing is leased while
        sending is paused, nor an event older than ``max_age`` (a claim makes it a dead
        letter). This default adds and leases nothing; the sender then claims as usual.
        """
        self.add_many(events)
        return Claim("", [])

    @abstractmethod
    def add_rejected(
        self,
        event_id: str | None,
        body: bytes,
        reason: str,
        *,
        event_name: str | None = None,
        email: str | None = None,
    ) -> None:
        """Keep a body that could not be accepted (as received, any bytes) as a dead letter."""

    # -- the sender's side ---------------------------------------------------------------------

    @abstractmethod
    def claim(self, limit: int, lease: float, max_age: float) -> Claim:
        """Lease up to ``limit`` pending events, oldest first, for ``lease`` seconds.

        Events accepted more than ``max_age`` seconds ago become dead letters instead.
        Events held by a sender that no longer lives are claimed as if free. While
        sending is paused nothing is claimed (or expired): the claim is empty and ``paused``.
        """

    @abstractmethod
    def mark_delivered(self, owner: str, event_ids: Sequence[str]) -> None:
        """RudderStack stored these events of claim ``owner``."""

    @abstractmethod
    def release(self, owner: str, event_ids: Sequence[str], error: str) -> None:
        """Give leased events back as pending after a failed attempt, noting the error."""

    @abstractmethod
    def mark_dead(self, owner: str, event_ids: Sequence[str], reason: str) -> None:
        """Make leased events dead letters: RudderStack will not take them as they are."""

    def watch(self, on_new: Callable[[], None], stopping: threading.Event) -> None:  # noqa: B027
        """Call ``on_new`` when another process adds an event, until ``stopping`` is set.

        Runs in a thread of its own. Backends that cannot hear other processes return
        at once (``notifies`` is false); senders poll in any case.
        """

    # -- operators -----------------------------------------------------------------------------

    @abstractmethod
    def status(self) -> OutboxStatus:
        """Counts of pending, delivered and dead events, what senders hold, the last error, paused."""

    @abstractmethod
    def set_paused(self, paused: bool) -> None:
        """Pause or resume sending for every process (and server) that uses this store.

        While paused, :meth:`claim` takes nothing; events are still added. Batches
        already claimed finish. Resuming wakes senders that listen (:meth:`watch`).
        """

    @abstractmethod
    def dead_letters(
        self,
        limit: int = 100,
        *,
        match: Match | None = None,
        offset: int = 0,
        newest_first: bool = False,
        bodies: bool = True,
    ) -> list[DeadLetter]:
        """Dead letters that ``match`` (all by default), oldest first: ``limit`` of them after ``offset``.

        ``bodies=False`` leaves out the rejected bodies (``body`` is ``None``), which a list does not
        show: each can be as large as ``CIO_RUDDER_MAX_BODY_BYTES``."""

    @abstractmethod
    def count_dead_letters(self, match: Match | None = None) -> int:
        """How many dead letters ``match`` (all by default)."""

    @abstractmethod
    def find(
        self, *, event_id: str | None = None, email: str | None = None, limit: int = 50
    ) -> list[EventRecord]:
        """What became of the event with this id, or of the events of this email address (newest first)."""

    @abstractmethod
    def activity(self, minutes: int = 60) -> Activity:
        """Events accepted and delivered per minute in the last ``minutes`` minutes, the current one last."""

    @abstractmethod
    def pending(self, limit: int = 1000, after: str | None = None) -> list[Pending]:
        """Pending events in ``event_id`` order after ``after``: a page of them, to copy elsewhere."""

    @abstractmethod
    def requeue(self, event_ids: Sequence[str] | None = None, *, match: Match | None = None) -> int:
        """Make dead letters pending again (all, these ids, or those that ``match``); returns how many.

        Bodies rejected at validation are left: they have nothing to send. Their age starts
        again now, so ``CIO_RUDDER_OUTBOX_MAX_AGE`` does not kill them at once.
        """

    @abstractmethod
    def purge_dead(self, match: Match | None = None) -> int:
        """Delete the dead letters that ``match`` (all by default); returns how many.

        Their ids are forgotten too, so Customer.io sending one again would be accepted.
        """

    @abstractmethod
    def count_delivered(self, older_than: float) -> int:
        """How many rows were delivered more than ``older_than`` seconds ago: what a purge would delete."""

    @abstractmethod
    def purge_delivered(self, older_than: float) -> int:
        """Delete rows delivered more than ``older_than`` seconds ago; returns how many.

        Their ids are forgotten too, so a replay of such an old event would be accepted again.
        """

    @abstractmethod
    def schema_sql(self) -> str:
        """The SQL that creates the store's tables, for teams that run migrations themselves."""

    @abstractmethod
    def create_tables(self) -> None:
        """Create the tables now if they are missing (they are also created on first use)."""

    @abstractmethod
    def has_tables(self) -> bool:
        """Whether the events table exists, looked for without creating anything."""

    @abstractmethod
    def drop_tables(self) -> None:
        """Drop the store's tables and everything in them (tests, and a deliberate operator)."""

    # -- lifecycle -----------------------------------------------------------------------------

    @abstractmethod
    def close(self, within: float | None = None) -> None:
        """Release this process's connections (and leases, heartbeats); reopened on next use.

        ``within``: the longest wait, in seconds, for what another process holds (``None``: as long as
        it takes); what cannot be closed by then is left for the process's exit.
        """

    @abstractmethod
    def after_fork(self) -> None:
        """Forget, without closing, what the parent process had open: the child opens its own."""


_KEY_PREFIX = "sha256:"
_HASHED_KEY = re.compile(r"sha256:[0-9a-f]{64}")


def storage_key(event_id: str) -> str:
    """The key an ``event_id`` is stored under: itself, unless no database could keep it as text.

    Ids with a lone surrogate (not encodable as UTF-8), a NUL character (PostgreSQL's text
    refuses it), or longer than ``MAX_KEY_LENGTH`` are stored under a hash of their code
    points (``sha256:`` and 64 lowercase hex digits), so every ``str`` has a key and the same
    id always gets the same one. A string of that form is taken as a key already: the key the
    dashboard and the CLI show finds its event, and copying events from one outbox to
    another keeps them under the keys they had.
    """
    if _HASHED_KEY.fullmatch(event_id):
        return event_id
    if len(event_id) <= MAX_KEY_LENGTH and "\x00" not in event_id and not event_id.startswith(_KEY_PREFIX):
        try:
            event_id.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return event_id
    return _KEY_PREFIX + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()


def rejected_key(event_id: str | None, body: bytes) -> str:
    """The key of a rejected body: its ``event_id``, or a hash of the body when it has none."""
    if event_id is None:
        return "no-event-id:" + hashlib.sha256(body).hexdigest()[:32]
    return storage_key(event_id)


def match_conditions(match: Match | None, placeholder: str, position: str) -> tuple[str, list[object]]:
    """SQL that narrows dead letters to ``match`` (`` AND ...`` clauses, or ``""``) and its parameters.

    ``placeholder`` is the driver's (``?`` or ``%s``); ``position`` the database's substring
    function taking (haystack, needle) (``instr``, ``strpos``), so no LIKE pattern needs escaping.
    """
    if match is None:
        return "", []
    conditions: list[str] = []
    params: list[object] = []
    if match.since is not None:
        conditions.append(f"accepted_at >= {placeholder}")
        params.append(match.since)
    for column, needle in (("reason", match.reason), ("event_name", match.event)):
        if needle:
            conditions.append(f"{position}(lower(COALESCE({column}, '')), {placeholder}) > 0")
            params.append(clean_text(needle.lower()))
    if match.event_id is not None:
        conditions.append(f"event_id = {placeholder}")
        params.append(storage_key(match.event_id))
    if match.email is not None:
        conditions.append(f"email = {placeholder}")
        params.append(search_email(match.email) or "")
    if match.sendable is not None:
        conditions.append("payload IS NOT NULL" if match.sendable else "payload IS NULL")
    return "".join(f" AND {condition}" for condition in conditions), params


def minute_of(now: float) -> float:
    """The start of the minute ``now`` is in (seconds since the epoch)."""
    return float(int(now // 60) * 60)


def per_minute(rows: Iterable[tuple[int, int]], minutes: int) -> list[int]:
    """Counts by minute index (rows of ``(index, count)``) as a list of ``minutes`` counts."""
    counts = [0] * minutes
    for index, count in rows:
        if 0 <= int(index) < minutes:
            counts[int(index)] = int(count)
    return counts


def newest_delivery(kept: float | None, meta: dict[str, str]) -> float | None:
    """When the last delivery was: the newest delivered row kept, or the newest a purge deleted."""
    times = [kept] if kept is not None else []
    if "purged_delivered_at" in meta:
        times.append(float(meta["purged_delivered_at"]))
    return max(times, default=None)


def search_columns(
    payload_json: str, event_name: str | None, email: str | None
) -> tuple[str | None, str | None]:
    """What ``add`` keeps in the ``event_name`` and ``email`` columns: the caller's, else the payload's."""
    if event_name is None:
        return payload_summary(payload_json)
    return clean_text(event_name), search_email(email)


def payload_summary(payload_json: str) -> tuple[str | None, str | None]:
    """The RudderStack event name and the email address (lower case) in an event's JSON, if any."""
    try:  # orjson: only two strings are read, so its reading of huge integers as floats does not matter
        payload = orjson.loads(payload_json)
    except orjson.JSONDecodeError:  # a lone surrogate, say
        try:
            payload = json.loads(payload_json)
        except ValueError:
            return None, None
    name, email = searched_fields(payload)
    return name, search_email(email)


def searched_fields(payload: object) -> tuple[str | None, str | None]:
    """The RudderStack event name and the email address in an event, each only if it is text: what
    the ``event_name`` and ``email`` columns keep, however the event reached the store."""
    if not isinstance(payload, dict):
        return None, None
    name = payload.get("event")
    context = payload.get("context")
    traits = context.get("traits") if isinstance(context, dict) else None
    email = traits.get("email") if isinstance(traits, dict) else None
    return (name if isinstance(name, str) else None), (email if isinstance(email, str) else None)


def search_email(email: object) -> str | None:
    """An email address as the stores keep and search it: trimmed, lower case; ``None`` if not text."""
    if not isinstance(email, str) or not email.strip():
        return None
    return clean_text(email.strip().lower())


def clean_text(text: str) -> str:
    """``text`` as any database keeps it: lone surrogates and NUL escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def body_text(body: bytes) -> str:
    """A body as text any database keeps: invalid UTF-8 and NUL escaped, nothing dropped."""
    return body.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, so it can be logged.

    The credentials end at the first ``@`` before any ``/``, as libpq reads them; as a password may
    hold an ``@`` or ``/`` its owner did not percent-encode, which libpq then reads into the host or
    the database name, everything up to the last ``@`` before the query is masked (too much is
    harmless). Then every setting whose name ends in ``password`` or ``secret`` is masked wherever
    it is: a URL's query, libpq's ``key=value`` form, or text that is no URL at all (a quoted one,
    a whole ``.env`` line, a typo).
    """
    masked = _without_password(url) if "://" in url else _without_typed_password(url)
    return _without_secret_settings(masked)


def _without_password(url: str) -> str:
    """``url`` with the password of its credentials (``user:password@``) masked."""
    scheme, _, rest = url.partition("://")
    at, slash = rest.find("@"), rest.find("/")
    if at < 0 or slash == 0:  # no @, or no host (a file path, a socket's folder): no credentials
        return url
    # libpq ends the credentials at the first @ or /, so a password's bare @ or / leaves its rest in
    # the host or the database name: mask up to the last @ before the query (too much is harmless).
    path = slash if 0 <= slash < at and _is_host_list(rest[:slash]) else rest.find("/", at)
    query = _QUERY.search(rest, path if 0 <= path < at else at)
    if query is not None and query.start() < at:  # an @ only in the query
        return url
    end = rest.rindex("@", 0, len(rest) if query is None else query.start())
    user, colon, _password = rest[:end].partition(":")
    return f"{scheme}://{user}:***{rest[end:]}" if colon else url


#: Where a URL's query starts: a ``?`` and a setting's name, then ``=`` (a bare ``?`` may be a password's).
_QUERY = re.compile(r"\?[\w%]+=")


def _is_host_list(authority: str) -> bool:
    """Whether ``authority`` reads as libpq's hosts (``db1:5432,db2``): every port a number."""
    for host in authority.split(","):
        if host.startswith("["):  # an IPv6 address: its port follows the "]"
            host = host.partition("]")[2]
        _name, colon, port = host.partition(":")
        if colon and not port.isdigit():
            return False
    return True


def bare_in_password(rest: str) -> bool:
    """Whether a password holds an ``@`` or ``/`` that is not percent-encoded, which libpq would
    read as part of the host (and quote in its errors). ``rest`` is the URL after ``://``.

    libpq's credentials end at the first ``@`` or ``/``. A bare ``@`` leaves one in the host; a bare
    ``/`` ends them early, leaving ``user:start-of-password`` as a host with a port that is no number.
    An ``@`` in the query is no sign, nor one in the database name of a URL without credentials;
    after credentials it is taken for the tail of a password (``user:a@b/c@host/db``).
    """
    at, slash = rest.find("@"), rest.find("/")
    if at >= 0 and (slash < 0 or at < slash):  # an @ in the host, or one in the database name after it
        return "@" in rest[at + 1 :].split("?", 1)[0]
    authority = rest if slash < 0 else rest[:slash]
    _host, colon, port = authority.rpartition(":")
    ipv6 = authority.startswith("[") and authority.endswith("]")
    return bool(colon) and not ipv6 and not port.isdigit() and "@" in rest.split("?", 1)[0]


def _without_typed_password(text: str) -> str:
    """``text`` with what looks like a password masked: from the first ``:`` after the last ``/`` before
    the first ``@``, up to that ``@``. For a URL mistyped without its ``://`` (``postgresql:u:pw@host``,
    ``postgresql//u:pw@host``): too much is harmless."""
    at = text.find("@")
    colon = text.find(":", text.rfind("/", 0, max(at, 0)) + 1, max(at, 0))
    return text if colon < 0 else f"{text[: colon + 1]}***{text[at:]}"


#: A setting's name and its ``=``, after the start, ``?``, ``&``, white space or a quote.
_SETTING_NAME = re.compile(r"(?<![^?&\s'])([\w%]+)\s*=\s*")


def _without_secret_settings(text: str) -> str:
    """``text`` with the value of every setting named ``...password`` or ``...secret`` masked, the
    name read as libpq reads it, percent-escapes decoded (``pass%77ord``). Each value runs as libpq
    reads it: in a URL's query to the next ``&``; elsewhere to white space, or between quotes."""
    query = text.find("?") if "://" in text else -1
    kept, done = [], 0
    for setting in _SETTING_NAME.finditer(text):
        start = setting.end()
        if start < done or not unquote(setting.group(1)).lower().endswith(("password", "secret")):
            continue
        kept.append(text[done:start] + "***")
        done = _value_end(text, start, in_query=0 <= query < setting.start())
    return "".join(kept) + text[done:]


def _value_end(text: str, start: int, *, in_query: bool) -> int:
    """Where the setting's value that starts at ``start`` ends (a backslash escapes what follows)."""
    quoted = text.startswith("'", start)
    ends = "'" if quoted else "&" if in_query else " \t\n\r\f\v"
    at = start + quoted
    while at < len(text) and text[at] not in ends:
        at += 2 if text[at] == "\\" else 1
    return min(at + quoted, len(text))


#: ``CIO_RUDDER_OUTBOX_DURABILITY``'s values: what an accepted event must survive before the answer.
DURABILITIES = ("process-crash", "power-loss")


def check_durability(value: object) -> str:
    """``value`` if it is one of :data:`DURABILITIES`, else fail naming the key."""
    if value not in DURABILITIES:
        choices = ", ".join(repr(name) for name in DURABILITIES)
        raise RuntimeError(f"CIO_RUDDER_OUTBOX_DURABILITY must be one of {choices}, not {value!r}.")
    return str(value)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")


def check_table_name(name: object, *, schemas: bool) -> str:
    """``name`` if it is a plain SQL identifier (``schema.table`` too when ``schemas``), else fail."""
    parts = name.split(".") if isinstance(name, str) else []
    if not parts or len(parts) > (2 if schemas else 1) or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        allowed = "letters, digits and _ (48 at most)" + (", optionally schema.table" if schemas else "")
        raise RuntimeError(f"CIO_RUDDER_OUTBOX_TABLE must be a table name of {allowed}, not {name!r}.")
    return str(name)
