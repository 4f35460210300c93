"""Realistic bodies of the six first-class Customer.io email events, shipped with the package.

``flask cio-rudder send-test`` posts them to a deployed webhook; tests, the example app's
demo and the benchmarks use them too. Each call returns a fresh copy.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["EMAIL_METRICS", "email_sample"]

#: The ``metric`` of each of the six email events, in the order a message lives through them.
EMAIL_METRICS = ("delivered", "opened", "clicked", "bounced", "spammed", "unsubscribed")


def email_sample(metric: str) -> dict[str, Any]:
    """A fresh copy of the sample body of the email event with this ``metric`` (``"bounced"``, ...)."""
    if metric not in EMAIL_METRICS:
        raise ValueError(f"no sample for {metric!r}; there are {', '.join(EMAIL_METRICS)}")
    text = resources.files(__name__).joinpath(f"email_{metric}.json").read_text(encoding="utf-8")
    body: dict[str, Any] = json.loads(text)
    return body
