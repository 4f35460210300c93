"""A tiny app that ``tests/test_processes.py`` serves from real processes (gunicorn).

Run as ``gunicorn 'tests.process_app:create_app()'`` from the repository root. Every
setting comes from the environment, so each test picks its own outbox, data plane
and timeouts:

========================================  ==============================================
``CIO_RUDDER_OUTBOX_URL``                 the outbox (required)
``CIO_RUDDER_OUTBOX_TABLE``               its table, optional
``CIO_RUDDER_OUTBOX_SENDER``              ``0`` for web workers that only write, optional
``CIO_RUDDER_FAST_PATH``                  ``1`` for the fast path, optional
``CIO_RUDDER_DATA_PLANE_URL``             where the sender posts (required)
``CIO_RUDDER_WRITE_KEY``                  the data plane's write key (required)
``CIO_RUDDER_SIGNING_KEY``                Customer.io's signing key (required)
``CIO_RUDDER_SHUTDOWN_TIMEOUT``           seconds, optional
``CIO_RUDDER_OUTBOX_LEASE``               seconds, optional
``CIO_RUDDER_OUTBOX_MAX_AGE``             seconds, optional
``CIO_RUDDER_TIMEOUT``                    seconds, optional (the data plane request timeout)
``PROCESS_APP_FORWARDED_LOG``             a file: one line ``<pid> <count>`` per batch the
                                          data plane stored, written by the process whose
                                          sender forwarded it (required)
========================================  ==============================================

Every answer carries ``X-Worker-Pid``: the process that handled the request (not the
fast path's answers, which skip ``after_request``).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response

from flask_cio_rudder import CioRudder, signals

_REQUIRED = (
    "CIO_RUDDER_OUTBOX_URL",
    "CIO_RUDDER_DATA_PLANE_URL",
    "CIO_RUDDER_WRITE_KEY",
    "CIO_RUDDER_SIGNING_KEY",
)
_OPTIONAL_SECONDS = (
    "CIO_RUDDER_SHUTDOWN_TIMEOUT",
    "CIO_RUDDER_OUTBOX_LEASE",
    "CIO_RUDDER_OUTBOX_MAX_AGE",
    "CIO_RUDDER_TIMEOUT",
)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["CIO_RUDDER_FORWARDER"] = "outbox"
    for key in _REQUIRED:
        app.config[key] = os.environ[key]
    for key in _OPTIONAL_SECONDS:
        if key in os.environ:
            app.config[key] = float(os.environ[key])
    if "CIO_RUDDER_OUTBOX_TABLE" in os.environ:
        app.config["CIO_RUDDER_OUTBOX_TABLE"] = os.environ["CIO_RUDDER_OUTBOX_TABLE"]
    if "CIO_RUDDER_OUTBOX_SENDER" in os.environ:
        app.config["CIO_RUDDER_OUTBOX_SENDER"] = os.environ["CIO_RUDDER_OUTBOX_SENDER"] != "0"
    app.config["CIO_RUDDER_FAST_PATH"] = os.environ.get("CIO_RUDDER_FAST_PATH") == "1"
    forwarded_log = os.environ["PROCESS_APP_FORWARDED_LOG"]

    def record_forwarded(sender: Flask, payloads: list[dict[str, Any]], **extra: Any) -> None:
        # One short write to a file opened for appending: lines from several processes never mix.
        with open(forwarded_log, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {len(payloads)}\n")

    # weak=False: blinker would otherwise drop this local function as soon as create_app returns.
    signals.event_forwarded.connect(record_forwarded, sender=app, weak=False)

    @app.after_request
    def tell_pid(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    CioRudder(app)
    return app
