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
    """``"7d"``, ``"12h"``, ``"30m"`` or ``"45s"``, as seconds.

    A bare number is refused: ``--older-than 7`` meant as days would delete nearly everything.
    """
    unit = _UNITS.get(text[-1:].lower())
    try:
        seconds = float(text[:-1]) * unit if unit else math.nan
    except ValueError:
        seconds = math.nan
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"{text!r} is not an age; use a number (0 or more) with s, m, h or d, like 7d")
    return seconds


# The dates --since takes, the same on every Python (``datetime.fromisoformat`` takes more from 3.11 on,
# such as "20240501", which older ones would read as a number of seconds): a date, then perhaps a time
# (minutes, seconds and their fraction optional), then perhaps a zone (Z, +02:00 or +0200).
_DATE = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<hour>\d{2})(?::(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d+))?)?)?)?"
    r" ?(?:(?P<utc>Z)|(?P<sign>[+-])(?P<zone_hours>\d{2}):?(?P<zone_minutes>\d{2})?)?",
    re.IGNORECASE,
)


def parse_since(text: str) -> float:
    """An age back from now (``"2h"``, ``"7d"``) or a date/time (``"2024-05-01T12:00Z"``, UTC if no
    zone is given), as seconds since the epoch."""
    wrong = f"{text!r} is neither an age (30m, 2h, 7d) nor a date (2024-05-01, 2024-05-01T12:00Z)"
    date = _DATE.fullmatch(text.strip())
    if date is not None:
        try:
            return _read_date(date).timestamp()
        except ValueError:  # 2024-02-30, 25:00
            raise ValueError(wrong) from None
    if text.strip().isdigit():  # seconds, or a date written without its dashes?
        raise ValueError(f"{wrong}: give an age its unit (3600s), a date its dashes")
    try:
        return time.time() - parse_age(text)
    except ValueError:
        raise ValueError(wrong) from None


def _read_date(date: re.Match[str]) -> datetime:
    part = date.groupdict()
    zone = "+00:00"  # UTC unless a zone is given
    if part["sign"]:
        zone = f"{part['sign']}{part['zone_hours']}:{part['zone_minutes'] or '00'}"
    fraction = (part["fraction"] or "")[:6].ljust(6, "0")  # microseconds: a finer fraction is cut
    return datetime.fromisoformat(
        f"{part['date']}T{part['hour'] or '00'}:{part['minute'] or '00'}:{part['second'] or '00'}.{fraction}"
        + zone
    )


def format_age(seconds: float | None) -> str:
    """Seconds as people read an age: ``45s``, ``12.5m``, ``3.0h``, ``2.1d``; ``-`` for none."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
