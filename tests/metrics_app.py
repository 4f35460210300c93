"""An app served by gunicorn in tests/test_metrics.py: the webhook, /metrics, and which worker answered."""

from __future__ import annotations

import os

from flask import Flask, Response

from flask_cio_rudder import CioRudder
from flask_cio_rudder.metrics import metrics_response

SIGNING_KEY = "metrics-test-key"


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none", CIO_RUDDER_METRICS=True
    )
    CioRudder(app)
    app.add_url_rule("/metrics", view_func=metrics_response)

    @app.after_request
    def tell_the_worker(response: Response) -> Response:
        response.headers["X-Worker"] = str(os.getpid())
        return response

    return app
