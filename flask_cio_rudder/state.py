"""What the extension keeps per app, in ``app.extensions["cio_rudder"]``."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask

from .forwarders import Forwarder
from .validation import Validation

__all__ = ["State", "state_of"]


@dataclass(frozen=True)
class State:
    """What the webhook route needs for one app, read from its config once at ``init_app``.

    Its repr leaves the signing keys out: error trackers record a failing frame's locals.
    """

    signing_keys: tuple[str, ...] = field(repr=False)
    verify_signature: bool
    max_timestamp_age: float | None
    max_body_bytes: int
    validation: Validation
    forwarder: Forwarder


def state_of(app: Flask) -> State:
    """The extension's state for ``app``; fails clearly if ``init_app`` never ran for it."""
    try:
        state: State = app.extensions["cio_rudder"]
    except KeyError:
        raise RuntimeError(
            "CioRudder is not registered on this app: call CioRudder(app) or init_app(app) first."
        ) from None
    return state
