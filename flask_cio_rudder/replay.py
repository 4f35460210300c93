"""Replay: Customer.io webhook bodies from a file, through the webhook's own stages.

For backfills and for re-driving events from logs. Each body goes through
:func:`flask_cio_rudder.webhook.process`: the same decoding, validation, transform,
deduplication and forwarder as a webhook request, minus the signature (the file is trusted)
and, unless asked, the signals.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from flask import Flask

from .state import state_of
from .webhook import MalformedBody, RetryLater, process

__all__ = ["ReplayStopped", "ReplaySummary", "read_bodies", "replay"]


@dataclass
class ReplaySummary:
    """What a replay did with each body: counts by outcome, rejections by reason, unreadable ones."""

    accepted: int = 0
    duplicate: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    #: "line 3: the body is not valid JSON: ...": bodies that never reached the pipeline.
    malformed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.accepted + self.duplicate + sum(self.rejected.values()) + len(self.malformed)


class ReplayStopped(Exception):
    """The replay stopped at the body ``where``: the outbox could not be written, or a receiver
    (or the forwarder) raised. The bodies before it stay done (``summary``), and replaying the file
    again skips them as duplicates."""

    def __init__(self, where: str, reason: str, summary: ReplaySummary) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.summary = summary


def read_bodies(text: str) -> list[tuple[str, bytes]]:
    """The bodies in ``text`` as (where, raw bytes): one JSON array, or one JSON object per line.

    Blank lines are skipped. Raises ``ValueError``, saying why, when text that starts with ``[`` cannot
    be read as one JSON array.
    """
    text = text.removeprefix("\ufeff")  # a byte order mark, which some editors write
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as error:
            raise ValueError(f"it starts with [ but is not one JSON array ({error})") from None
        except RecursionError:
            raise ValueError(
                "it is one JSON array nested too deeply to be read whole: write one body per line "
                "(jq -c '.[]' FILE); a body too deep to decode is then kept as a dead letter"
            ) from None
        if not isinstance(items, list):
            raise ValueError("it starts with [ but is not one JSON array")
        return [(f"item {number}", _as_body(item)) for number, item in enumerate(items, 1)]
    # Lines end at \n (and \r\n) only: jq -c and json.dumps leave U+2028 and the like unescaped in strings.
    return [
        (f"line {number}", line.removesuffix("\r").encode("utf-8", "surrogateescape"))
        for number, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]


def _as_body(item: object) -> bytes:
    """An item of a JSON array as a webhook body: its JSON in UTF-8, with a lone surrogate (which JSON
    can carry and UTF-8 cannot) escaped."""
    try:
        return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(item, separators=(",", ":")).encode("ascii")


def replay(app: Flask, bodies: Iterable[tuple[str, bytes]], *, announce: bool = False) -> ReplaySummary:
    """Run each body through the webhook's stages for ``app``; signals only when ``announce``.

    Raises :class:`ReplayStopped` at a body it cannot finish (the outbox cannot be written,
    a receiver raised); what was done before stays done.
    """
    state = state_of(app)
    summary = ReplaySummary()
    for where, raw in bodies:
        try:
            outcome = process(app, state, raw, announce=announce)
        except MalformedBody as error:
            summary.malformed.append(f"{where}: {error.description}")
            continue
        except RetryLater as error:
            raise ReplayStopped(where, str(error.description), summary) from error
        except Exception as error:  # where the webhook answers 500: a receiver raised, say
            raise ReplayStopped(where, f"{type(error).__name__}: {error}", summary) from error
        if outcome.status == "rejected":
            summary.rejected[outcome.reason or "rejected"] += 1
        elif outcome.status == "duplicate":
            summary.duplicate += 1
        else:
            summary.accepted += 1
    return summary
