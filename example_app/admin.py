"""The operators' pages behind HTTP Basic auth: Flask-CIO-Rudder's dashboard at ``/admin/cio``, and the
suppression list at ``/suppressions``.

The user name is ``admin`` and the password comes from ``DASHBOARD_PASSWORD`` (the
environment, or the app's config). Without a password these pages refuse everyone:
they show email addresses, and the dashboard can requeue and delete events, so they are
never left open. Real apps put them behind their own login instead (see the README's
"Operating" section).
"""

from __future__ import annotations

import hmac
import os

from flask import Flask, Response, current_app, request

from flask_cio_rudder.dashboard import dashboard

__all__ = ["PREFIX", "PROTECTED", "USER", "init_app"]

PREFIX = "/admin/cio"
USER = "admin"
#: The blueprints whose pages need the password: both show people's email addresses.
PROTECTED = frozenset({dashboard.name, "suppressions"})


def init_app(app: Flask) -> None:
    """Mount the dashboard and protect the ``PROTECTED`` pages; every other route is left alone."""
    app.config.setdefault("DASHBOARD_PASSWORD", os.environ.get("DASHBOARD_PASSWORD"))
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    app.before_request(require_password)


def require_password() -> Response | None:
    """401 for the ``PROTECTED`` pages unless the request carries the admin's password (HTTP Basic)."""
    if request.blueprint not in PROTECTED:
        return None
    password = current_app.config.get("DASHBOARD_PASSWORD")
    if not password:
        return Response("Set DASHBOARD_PASSWORD to open this page.\n", 503, mimetype="text/plain")
    auth = request.authorization
    if (
        auth is not None
        and auth.type == "basic"
        and hmac.compare_digest((auth.username or "").encode(), USER.encode())
        and hmac.compare_digest((auth.password or "").encode(), str(password).encode())
    ):
        return None
    return Response(
        "This page needs the admin's password.\n",
        401,
        {"WWW-Authenticate": 'Basic realm="cio-rudder dashboard", charset="UTF-8"'},
        mimetype="text/plain",
    )
