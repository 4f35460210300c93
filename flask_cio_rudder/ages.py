"""Ages and times as operators type and read them: ``7d``, ``12h``, ``2024-05-01T12:00Z``.

Shared by the CLI and the dashboard; each parser raises ``ValueError`` with a message
for people, which the caller puts in its own kind of error.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime

__all__ = ["format_age", "parse_age", "parse_since"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds, as seconds."""
    unit = _UNITS.get(text[-1:].lower())
    try:
        seconds = float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        seconds = math.nan
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{text!r} is not an age; use a number (0 or more) with s, m, h or d, like 7d")
    return seconds


# The dates --since takes, the same on every Python (``datetime.fromisoformat`` takes more from 3.11 on,
# such as "20240501", which older ones would read as a number of seconds): a date, then perhaps a time
# (seconds and up to 6 digits of their fraction optional), then perhaps a zone.
_DATE = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<time>\d{2}:\d{2})(?::(?P<seconds>\d{2})(?:\.(?P<fraction>\d{1,6}))?)?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?",
    re.IGNORECASE,
)


def parse_since(text: str) -> float:
    """An age back from now (``"2h"``, ``"7d"``) or a date/time (``"2024-05-01T12:00Z"``, UTC if no
    zone is given), as seconds since the epoch."""
    wrong = f"{text!r} is neither an age (30m, 2h, 7d) nor a date (2024-05-01, 2024-05-01T12:00Z)"
    date = _DATE.fullmatch(text.strip())
    if date is not None:
        parts = date.groupdict()
        written = parts["date"] + "T" + (parts["time"] or "00:00") + ":" + (parts["seconds"] or "00")
        written += "." + (parts["fraction"] or "").ljust(6, "0")
        zone = parts["zone"] or "+00:00"
        try:
            when = datetime.fromisoformat(written + ("+00:00" if zone.upper() == "Z" else zone))
        except ValueError:  # 2024-02-30, 25:00
            raise ValueError(wrong) from None
        return when.timestamp()
    if not text[-1:].isalpha():  # a plain number: seconds, or a date written without dashes?
        raise ValueError(f"{wrong}: give an age its unit")
    try:
        return time.time() - parse_age(text)
    except ValueError:
        raise ValueError(wrong) from None


def format_age(seconds: float | None) -> str:
    """Seconds as people read an age: ``45s``, ``12.5m``, ``3.0h``, ``2.1d``; ``-`` for none."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
