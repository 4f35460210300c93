"""Ages and times as operators type and read them: ``7d``, ``12h``, ``2024-05-01T12:00Z``.

Shared by the CLI and the dashboard; each parser raises ``ValueError`` with a message
for people, which the caller puts in its own kind of error.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

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


def parse_since(text: str) -> float:
    """An age back from now (``"2h"``, ``"7d"``) or a date/time (``"2024-05-01T12:00Z"``, UTC if no
    zone is given), as seconds since the epoch."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        pass
    else:
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    try:
        return time.time() - parse_age(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an age (30m, 2h, 7d) nor a date (2024-05-01, 2024-05-01T12:00Z)"
        ) from None


def format_age(seconds: float | None) -> str:
    """Seconds as people read an age: ``45s``, ``12.5m``, ``3.0h``, ``2.1d``; ``-`` for none."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
