"""The Flask extension: configuration, per-app state and the webhook Blueprint."""

from __future__ import annotations

import atexit
import difflib
import importlib.util
import logging
import math
import weakref
from collections.abc import Mapping
from typing import Any

from flask import Flask

from .cli import cli
from .fastpath import FastPath
from .forwarders import Forwarder, ForwarderFactory, NullForwarder, SyncForwarder
from .outbox import DEFAULT_URL, OutboxForwarder
from .settings import check_pasted, check_switch, is_positive_number, number_hint, unset_hint
from .state import State
from .validation import Validation
from .webhook import create_blueprint

__all__ = ["CioRudder"]

logger = logging.getLogger("flask_cio_rudder")

#: Every configuration key and its default. Options given to ``CioRudder(...)``
#: replace these defaults; ``app.config`` overrides both.
DEFAULTS: dict[str, Any] = {
    "CIO_RUDDER_SIGNING_KEY": None,
    "CIO_RUDDER_VERIFY_SIGNATURE": True,
    "CIO_RUDDER_MAX_TIMESTAMP_AGE": None,
    "CIO_RUDDER_WEBHOOK_PATH": "/webhooks/customerio",
    "CIO_RUDDER_MAX_BODY_BYTES": 5 * 1024 * 1024,
    "CIO_RUDDER_VALIDATION": "compatible",
    "CIO_RUDDER_METRICS": False,
    "CIO_RUDDER_FORWARDER": "outbox",
    "CIO_RUDDER_WRITE_KEY": None,
    "CIO_RUDDER_DATA_PLANE_URL": None,
    "CIO_RUDDER_TIMEOUT": None,
    "CIO_RUDDER_MAX_REQUESTS_PER_SECOND": None,
    "CIO_RUDDER_OUTBOX_URL": DEFAULT_URL,
    "CIO_RUDDER_OUTBOX_TABLE": None,
    "CIO_RUDDER_OUTBOX_PATH": None,  # deprecated: CIO_RUDDER_OUTBOX_URL
    "CIO_RUDDER_OUTBOX_DURABILITY": "process-crash",
    "CIO_RUDDER_OUTBOX_SENDER": True,
    "CIO_RUDDER_OUTBOX_BATCH_SIZE": 100,
    "CIO_RUDDER_OUTBOX_MAX_AGE": 7 * 24 * 3600,
    "CIO_RUDDER_OUTBOX_KEEP_DELIVERED": 30 * 24 * 3600,
    "CIO_RUDDER_OUTBOX_LEASE": 60,
    "CIO_RUDDER_SHUTDOWN_TIMEOUT": 2.0,
    "CIO_RUDDER_DASHBOARD_READ_ONLY": False,
    "CIO_RUDDER_FAST_PATH": False,
}


#: The keys that are on or off: any value but a string, read as bool() reads it.
_SWITCHES = (
    "CIO_RUDDER_VERIFY_SIGNATURE",
    "CIO_RUDDER_METRICS",
    "CIO_RUDDER_OUTBOX_SENDER",
    "CIO_RUDDER_DASHBOARD_READ_ONLY",
    "CIO_RUDDER_FAST_PATH",
)


class CioRudder:
    """Receive Customer.io reporting webhooks in a Flask app and forward them to RudderStack.

    ``CioRudder(app)`` or, with an app factory, ``ext = CioRudder()`` then
    ``ext.init_app(app)``. Keyword options are defaults for the config keys of the
    same name (``signing_key=`` for ``CIO_RUDDER_SIGNING_KEY``, ...).
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        self.defaults: dict[str, Any] = {}
        for name, value in options.items():
            key = f"CIO_RUDDER_{name.upper()}"
            if key not in DEFAULTS:
                known = ", ".join(sorted(k[len("CIO_RUDDER_") :].lower() for k in DEFAULTS))
                raise TypeError(f"CioRudder() got an unknown option {name!r}; options are: {known}")
            self.defaults[key] = value
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the webhook route on ``app``; fails fast on a missing setting."""
        if "cio_rudder" in app.extensions:
            raise RuntimeError("CioRudder is already registered on this app; call init_app once per app.")
        for key, default in DEFAULTS.items():
            app.config.setdefault(key, self.defaults.get(key, default))
        config = app.config
        _warn_of_unknown_settings(config)
        for key in _SWITCHES:
            check_switch(config, key)
        verify_signature = bool(config["CIO_RUDDER_VERIFY_SIGNATURE"])
        keys = _signing_keys(config["CIO_RUDDER_SIGNING_KEY"])
        if verify_signature and not keys:
            raise RuntimeError(
                f"CIO_RUDDER_SIGNING_KEY is not set{unset_hint('CIO_RUDDER_SIGNING_KEY')}: copy the webhook "
                "signing key from Customer.io (Data & Integrations > Reporting Webhooks), or set "
                "CIO_RUDDER_VERIFY_SIGNATURE = False to accept unsigned requests (never in production)."
            )
        if not verify_signature:
            logger.warning(
                "CIO_RUDDER_VERIFY_SIGNATURE is off: anyone who can reach %s can post events.",
                config["CIO_RUDDER_WEBHOOK_PATH"],
            )
        max_body_bytes = config["CIO_RUDDER_MAX_BODY_BYTES"]
        if not is_positive_number(max_body_bytes, int):
            raise RuntimeError(
                f"CIO_RUDDER_MAX_BODY_BYTES must be a positive number of bytes, not {max_body_bytes!r}."
            )
        max_timestamp_age = config["CIO_RUDDER_MAX_TIMESTAMP_AGE"]
        if max_timestamp_age not in (None, math.inf) and not is_positive_number(max_timestamp_age):
            raise RuntimeError(  # a string from the environment would fail every request instead
                "CIO_RUDDER_MAX_TIMESTAMP_AGE must be None (off) or a positive number of seconds, "
                f"not {max_timestamp_age!r}."
            )
        path = config["CIO_RUDDER_WEBHOOK_PATH"]
        if not (isinstance(path, str) and path.startswith("/")) or "<" in path:
            raise RuntimeError(  # a <variable> would make Flask pass an argument the route does not take
                f"CIO_RUDDER_WEBHOOK_PATH must be a URL path starting with '/' and holding no <variable>, "
                f"such as '/webhooks/customerio', not {path!r}."
            )
        validation = Validation(config["CIO_RUDDER_VALIDATION"])
        if config["CIO_RUDDER_METRICS"]:
            from . import metrics  # optional: needs prometheus_client, and says so when it is missing
        # Last, as it may start threads and open files: if a later step fails, it is closed again and
        # the app is left as it was, so that init_app can be called again once the cause is fixed.
        forwarder = create_forwarder(app, config["CIO_RUDDER_FORWARDER"])
        try:
            app.extensions["cio_rudder"] = State(
                signing_keys=keys,
                verify_signature=verify_signature,
                max_timestamp_age=max_timestamp_age,
                max_body_bytes=max_body_bytes,
                validation=validation,
                forwarder=forwarder,
            )
            app.register_blueprint(create_blueprint(path))
            if config["CIO_RUDDER_METRICS"]:
                metrics.enable(app)
        except BaseException:
            app.extensions.pop("cio_rudder", None)
            forwarder.close()
            raise
        _open_forwarders.add(forwarder)
        if config["CIO_RUDDER_FAST_PATH"]:
            app.wsgi_app = FastPath(app, app.wsgi_app, path)  # type: ignore[method-assign]
        app.cli.add_command(cli)
        _exempt_from_csrf(app)


def _warn_of_unknown_settings(config: Mapping[str, Any]) -> None:
    """Log each ``CIO_RUDDER_*`` key that is no setting, with the one it resembles: a misspelt
    optional setting (a lease, a batch size) would otherwise leave its default in force unseen."""
    prefix = "CIO_RUDDER_"
    names = [known[len(prefix) :] for known in DEFAULTS]  # compared without the prefix all share
    for key in config:
        if key.startswith(prefix) and key not in DEFAULTS:
            resembles = difflib.get_close_matches(key[len(prefix) :], names, n=1)
            hint = f" (did you mean {prefix}{resembles[0]}?)" if resembles else ""
            logger.warning("%s is not a Flask-CIO-Rudder setting%s; it is ignored.", key, hint)


# Every forwarder still in use, closed at interpreter exit (the outbox flushes then).
# Weak, so apps built and dropped (in test suites, say) are not kept alive by it.
_open_forwarders: weakref.WeakSet[Forwarder] = weakref.WeakSet()


@atexit.register
def _close_forwarders() -> None:
    for forwarder in list(_open_forwarders):
        forwarder.close()


#: The forwarders ``CIO_RUDDER_FORWARDER`` may name.
_BUILT_IN: dict[str, ForwarderFactory] = {
    "outbox": OutboxForwarder,
    "sync": SyncForwarder,
    "none": NullForwarder,
}


def create_forwarder(app: Flask, choice: str | ForwarderFactory) -> Forwarder:
    """Build the forwarder that ``CIO_RUDDER_FORWARDER`` names for ``app``."""
    if isinstance(choice, str):
        if choice not in _BUILT_IN:
            names = ", ".join(repr(name) for name in _BUILT_IN)
            raise RuntimeError(
                f"CIO_RUDDER_FORWARDER = {choice!r} is unknown: use one of {names}, or a Forwarder subclass."
            )
        choice = _BUILT_IN[choice]
    if not callable(choice):
        raise RuntimeError("CIO_RUDDER_FORWARDER must be a name or a Forwarder subclass.")
    forwarder = choice(app)
    if not isinstance(forwarder, Forwarder):
        raise RuntimeError("CIO_RUDDER_FORWARDER must build a flask_cio_rudder.Forwarder.")
    return forwarder


def _signing_keys(value: object) -> tuple[str, ...]:
    """``CIO_RUDDER_SIGNING_KEY`` as a tuple of keys: one string, or a list for rotation."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        keys: tuple[str, ...] = (value,)
    elif isinstance(value, (list, tuple)) and all(isinstance(key, str) and key for key in value):
        keys = tuple(value)
    else:  # never the value: it is a secret
        hint = number_hint("CIO_RUDDER_SIGNING_KEY", value)
        kind = type(value).__name__
        raise RuntimeError(
            f"CIO_RUDDER_SIGNING_KEY must be a string or a list of non-empty strings, not {kind}{hint}."
        )
    for key in keys:  # else every webhook would be refused (401), and send-test, signing alike, pass
        check_pasted(key, "CIO_RUDDER_SIGNING_KEY", "the reporting webhook's signing key in Customer.io")
    return keys


def _exempt_from_csrf(app: Flask) -> None:
    """Keep Flask-WTF's CSRFProtect off the webhook: Customer.io cannot send a CSRF token.

    If CSRFProtect is set up after this extension, the hook below runs before its
    check (hooks run in the order they were registered) and exempts the route then.
    """
    view_path = "flask_cio_rudder.webhook.receive"

    def exempt() -> None:
        csrf = app.extensions.get("csrf")
        if csrf is not None:
            csrf.exempt(view_path)

    if "csrf" in app.extensions:
        exempt()
    elif importlib.util.find_spec("flask_wtf") is not None:  # else no CSRFProtect can come: no hook
        app.before_request(exempt)
