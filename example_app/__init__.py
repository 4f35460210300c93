"""An example app: Customer.io webhooks in, a suppression list kept, events forwarded to RudderStack.

Run it with ``flask --app example_app run``, or ``python -m example_app.demo`` to
watch the whole flow on this machine with a fake RudderStack data plane.

Settings come from the environment: ``CIO_RUDDER_SIGNING_KEY`` (Customer.io's
webhook signing key), ``CIO_RUDDER_WRITE_KEY`` and ``CIO_RUDDER_DATA_PLANE_URL``
(a RudderStack HTTP source; these three are required), ``CIO_RUDDER_OUTBOX_URL`` (SQLite or PostgreSQL),
``SUPPRESSION_DATABASE`` (by default both SQLite files in the instance folder),
``DASHBOARD_PASSWORD`` (user ``admin``: the operators' dashboard at ``/admin/cio`` and the
suppression list at ``/suppressions``) and
``SECRET_KEY`` (the dashboard's sessions; required, and the same in every worker).
Events go through the default forwarder, the outbox, so Customer.io never waits on
RudderStack and nothing accepted is lost.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from flask_cio_rudder import CioRudder

from . import admin, suppressions

__all__ = ["create_app"]

cio_rudder = CioRudder()

#: The settings read from the environment variables of the same names.
_FROM_ENVIRONMENT = (
    "CIO_RUDDER_SIGNING_KEY",
    "CIO_RUDDER_WRITE_KEY",
    "CIO_RUDDER_DATA_PLANE_URL",
    "CIO_RUDDER_OUTBOX_URL",
    "SUPPRESSION_DATABASE",
    "SECRET_KEY",
)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings from the environment, then ``config`` on top (for tests and the demo)."""
    app = Flask(__name__)
    # No stand-ins: a missing key fails at start (naming it), never a public key that lets anyone
    # post events, nor a data plane that is not yours.
    for key in _FROM_ENVIRONMENT:
        if key in os.environ:
            app.config[key] = os.environ[key]
    app.config.update(config or {})

    if not app.config.get("SECRET_KEY"):
        # Not a random one per process: under gunicorn each worker would refuse the others' sessions,
        # and so most of the dashboard's actions ("this form is out of date").
        raise RuntimeError(
            "SECRET_KEY is not set: the dashboard's sessions need one key shared by every worker, "
            'such as the output of python -c "import secrets; print(secrets.token_hex(32))".'
        )

    cio_rudder.init_app(app)
    suppressions.init_app(app)
    admin.init_app(app)
    return app
