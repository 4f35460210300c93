"""``flask cio-rudder send-test URL``: the check to run right after deploying.

Posts the six sample email events, signed as Customer.io signs them, to a deployed
webhook and reports each answer, before Customer.io is pointed at it. Every run
gives the events fresh ``event_id`` values, so a second run is not all duplicates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import requests

from .samples import EMAIL_METRICS, email_sample
from .testing import encode, signature_headers

__all__ = ["SampleAnswer", "new_event_id", "send_samples"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_event_id(now: float | None = None) -> str:
    """A new ULID (26 characters, time first), the form of Customer.io's own ``event_id``."""
    milliseconds = int((time.time() if now is None else now) * 1000)
    number = (milliseconds << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(number >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(frozen=True)
class SampleAnswer:
    """How the deployed webhook answered one sample."""

    metric: str
    event_id: str
    status_code: int | None  # None: no answer at all
    outcome: str  # the body's "status" (accepted, duplicate, rejected), or what went wrong

    @property
    def ok(self) -> bool:
        return self.outcome == "accepted"


def send_samples(
    url: str, key: str | None, *, timeout: float = 10.0, metrics: Sequence[str] = EMAIL_METRICS
) -> list[SampleAnswer]:
    """Post each sample (fresh ``event_id``, timestamp now) to ``url``, signed with ``key`` if given."""
    answers = []
    with requests.Session() as session:
        for metric in metrics:
            body = email_sample(metric)
            body["event_id"] = new_event_id()
            body["timestamp"] = int(time.time())
            raw = encode(body)
            headers = signature_headers(raw, key) if key else {"Content-Type": "application/json"}
            try:
                # A redirect is the answer Customer.io gets (no 2xx), not a page to follow: a login
                # hook's, say, whose login form would read as the webhook's answer.
                response = session.post(
                    url, data=raw, headers=headers, timeout=timeout, allow_redirects=False
                )
            except requests.RequestException as error:
                answers.append(
                    SampleAnswer(metric, body["event_id"], None, f"no answer ({type(error).__name__})")
                )
                continue
            answers.append(SampleAnswer(metric, body["event_id"], response.status_code, _outcome(response)))
    return answers


def _outcome(response: requests.Response) -> str:
    """Where it redirects, else the ``status`` of a JSON answer, else its ``error``, else its text's start."""
    if response.is_redirect:
        return f"a redirect to {response.headers['Location'][:120]}"
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        if isinstance(answer.get("status"), str):
            reason = answer.get("reason")
            status = str(answer["status"])
            return status + (f": {reason}" if status == "rejected" and reason else "")
        if isinstance(answer.get("error"), str):
            return str(answer["error"])
    text = response.text.strip().replace("\n", " ")[:120]
    return text or response.reason or "no body"
