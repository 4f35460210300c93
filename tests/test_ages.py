"""Ages and dates as operators type them for ``--since`` and the dashboard's filters."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from flask_cio_rudder.ages import parse_since


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=timezone.utc)),
        ("2024-05-01T12:00Z", datetime(2024, 5, 1, 12, tzinfo=timezone.utc)),
        ("2024-05-01 12:00:30", datetime(2024, 5, 1, 12, 0, 30, tzinfo=timezone.utc)),
        ("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)),
        ("2024-05-01t12:00+02:00", datetime(2024, 5, 1, 10, tzinfo=timezone.utc)),
        ("2024-05-01T12:00+0200", datetime(2024, 5, 1, 10, tzinfo=timezone.utc)),
        ("2024-05-01T12 -01", datetime(2024, 5, 1, 13, tzinfo=timezone.utc)),
        ("2024-05-01T12:00:00.1234567Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)),
    ],
)
def test_a_date_means_the_same_on_every_python(text: str, meant: datetime) -> None:
    """``datetime.fromisoformat`` reads more forms from Python 3.11 on; these read alike on 3.9."""
    assert parse_since(text) == meant.timestamp()


def test_an_age_counts_back_from_now() -> None:
    before = time.time()
    since = parse_since("7d")
    assert before - 7 * 86400 <= since <= time.time() - 7 * 86400


@pytest.mark.parametrize("text", ["20240501", "3600", "2024-02-30", "2024-05-01T25:00", "yesterday", ""])
def test_what_is_neither_an_age_with_its_unit_nor_a_date_is_refused(text: str) -> None:
    """A bare number was read as seconds, so ``20240501`` (a date without dashes) meant 234 days ago."""
    with pytest.raises(ValueError, match="is neither an age"):
        parse_since(text)
