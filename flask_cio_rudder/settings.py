"""Checks of configuration values, run at ``init_app``: each failure names the key and what it takes.

Why at start: a value of the wrong kind (a string read from the environment, say) would
otherwise pass the webhook and fail later in the sender, where events pile up unsent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "check_pasted",
    "check_seconds",
    "check_switch",
    "check_timeout",
    "is_positive_number",
    "number_hint",
    "unset_hint",
]

#: Said of any string where another kind was wanted: the usual cause.
_FROM_ENVIRONMENT = (
    " (a string, as os.environ gives it: app.config.from_prefixed_env() reads "
    "FLASK_CIO_RUDDER_* variables as JSON, so 'false' is False and '30' is 30)"
)


#: The most seconds a setting takes: a hundred years. Beyond about 290, clocks overflow (infinity
#: among them, a natural way to say "never", which would stop every delivery).
_MOST_SECONDS = 100 * 365 * 24 * 3600


def is_positive_number(value: object, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether ``value`` is a finite number (of ``kinds``; never a bool) above zero."""
    if not isinstance(value, kinds) or isinstance(value, bool):
        return False
    return value > 0 and not (isinstance(value, float) and math.isinf(value))  # type: ignore[operator]


def _is_seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds above zero, at most ``_MOST_SECONDS``."""
    return is_positive_number(value) and value <= _MOST_SECONDS  # type: ignore[operator]


def check_switch(config: Mapping[str, Any], key: str) -> bool:
    """``config[key]`` as on or off (``bool()``, as always), unless it is a string, which would
    read as on even when it says ``"false"``."""
    value = config[key]
    if isinstance(value, str):
        raise RuntimeError(f"{key} must be True or False, not {value!r}{_hint(value)}.")
    return bool(value)


def check_seconds(config: Mapping[str, Any], key: str, *, zero: bool = False) -> float:
    """``config[key]`` if it is a number of seconds above zero (or zero, with ``zero``)."""
    value = config[key]
    if not (_is_seconds(value) or (zero and value == 0 and not isinstance(value, bool))):
        least = "zero or more" if zero else "above zero"
        raise RuntimeError(
            f"{key} must be a number of seconds {least}, at most a hundred years ({_MOST_SECONDS}), "
            f"not {value!r}{_hint(value)}."
        )
    return float(value)


def check_timeout(value: Any) -> Any:
    """``CIO_RUDDER_TIMEOUT`` if it is ``None``, seconds, or ``(connect, read)`` seconds; a list (as
    JSON from the environment gives a pair) as a tuple, the only pair requests takes."""
    if value is None or (value == 0 and not isinstance(value, bool)):  # 0 as None: the forwarder's default
        return None
    if _is_seconds(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_seconds, value)):
        return tuple(value)
    raise RuntimeError(
        "CIO_RUDDER_TIMEOUT must be None, a number of seconds above zero, or (connect, read) seconds, "
        f"each at most a hundred years ({_MOST_SECONDS}), not {value!r}{_hint(value)}."
    )


def check_pasted(value: str, key: str, what: str) -> None:
    """Fail naming ``key`` if ``value`` starts or ends with white space or holds an invisible character:
    a key copied, or read from a file, with one never matches. ``value`` is a secret: never quoted."""
    if value != value.strip() or not value.isprintable():
        raise RuntimeError(
            f"{key} starts or ends with a space or a line break, or holds an invisible character "
            f"(copied, or read from a file, with it?): set it to {what} exactly as shown there."
        )


def number_hint(key: str, value: object) -> str:
    """Where text was wanted and ``value`` is a number: how ``from_prefixed_env`` made one of it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    return (
        f": app.config.from_prefixed_env() reads FLASK_{key} as JSON, so a key of digits becomes a "
        """number; write it as a JSON string there ('"0123..."')"""
    )


def unset_hint(key: str) -> str:
    """Where ``key`` is missing from the config but set in the environment: how to get it there."""
    for name in (f"FLASK_{key}", key):
        if name not in os.environ:
            continue
        if not os.environ[name]:
            return f" ({name} is in the environment, but empty)"
        if name != key:
            return f" ({name} is in the environment: call app.config.from_prefixed_env() before init_app)"
        return (
            f" ({key} is in the environment, which Flask does not read by itself: name it FLASK_{key} "
            "and call app.config.from_prefixed_env() before init_app, or copy it into app.config)"
        )
    return ""


def _hint(value: object) -> str:
    return _FROM_ENVIRONMENT if isinstance(value, str) else ""
