"""Outbox stores, chosen by URL as Flask-Limiter chooses its storage: one module per backend.

``store_from_url("sqlite:///cio_rudder_outbox.sqlite3", instance_path=...)`` or
``store_from_url("postgresql://app@db/app")``. A backend's driver is imported only
when its scheme is used, so PostgreSQL needs its extra only where it is chosen.
A new backend is one module with an :class:`OutboxStore` subclass, one line in
``_BACKENDS``, and the contract suite in ``tests/test_store_contract.py`` passing.
"""

from __future__ import annotations

import importlib
import re

from . import forkguard  # noqa: F401  (first: its fork hook must run before the senders' and spools')
from .base import (
    Activity,
    Claim,
    Claimed,
    Clock,
    DeadLetter,
    EventRecord,
    Match,
    OutboxStatus,
    OutboxStore,
    Pending,
    StoreError,
    StoreUnavailable,
    check_durability,
    redact_url,
    searched_fields,
)

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
    "redact_url",
    "searched_fields",
    "store_from_url",
]

#: What a URL's scheme may be (RFC 3986): anything else before a "://" may be part of a password.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")

#: URL scheme -> (module, class, the extra that brings its driver).
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("flask_cio_rudder.store.sqlite", "SQLiteStore", None),
    "postgresql": ("flask_cio_rudder.store.postgres", "PostgresStore", "postgres"),
    "postgres": ("flask_cio_rudder.store.postgres", "PostgresStore", "postgres"),
    "postgresql+psycopg": ("flask_cio_rudder.store.postgres", "PostgresStore", "postgres"),
}


def store_from_url(
    url: str,
    *,
    instance_path: str | None = None,
    table: str | None = None,
    durability: str = "process-crash",
    clock: Clock | None = None,
    create: bool = True,
) -> OutboxStore:
    """The store ``url`` names (``CIO_RUDDER_OUTBOX_URL``); errors name the key, never the password.

    ``sqlite:///name.sqlite3`` is relative to ``instance_path`` (the app's instance folder),
    ``sqlite:////abs/path.sqlite3`` absolute. ``table`` defaults to the backend's own name.
    With ``create=False`` the store makes nothing (no file, no table): for reading another
    outbox, which :meth:`~OutboxStore.has_tables` tells is there.
    """
    check_durability(durability)
    # Text that is no URL, or one of another kind, is not quoted: where its password is (a connection
    # string, a pasted JSON secret, a mistyped "://") cannot be told, so nothing of it can be masked.
    example = "such as sqlite:///cio_rudder_outbox.sqlite3 or postgresql://user@host/database"
    if not isinstance(url, str):
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_URL must be a URL (a str) {example}, not a {type(url).__name__}."
        )
    if "://" not in url:
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_URL must be a URL {example}; it has no :// (its value is not shown: it may "
            "hold a password)."
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        if _SCHEME.fullmatch(scheme):
            named = f"an unknown scheme {scheme!r}"
        else:
            named = "no scheme before its :// (a quote, a space or a prefix such as jdbc: copied with it?)"
        raise RuntimeError(f"CIO_RUDDER_OUTBOX_URL has {named}; use one of {known}, {example}.")
    module_name, class_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if extra is None:
            raise
        raise RuntimeError(
            f"CIO_RUDDER_OUTBOX_URL is a {scheme}:// URL, which needs the {extra!r} extra: "
            f'pip install "Flask-CIO-Rudder[{extra}]" ({error})'
        ) from None
    backend: type[OutboxStore] = getattr(module, class_name)
    return backend.from_url(
        url, instance_path=instance_path, table=table, durability=durability, clock=clock, create=create
    )
