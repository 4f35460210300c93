"""The operators' dashboard: a Blueprint the host app registers under its own prefix and login.

Never registered by :class:`~flask_cio_rudder.CioRudder`: nothing is exposed until the host
mounts it, as with RQ Dashboard::

    from flask_cio_rudder.dashboard import dashboard
    app.register_blueprint(dashboard, url_prefix="/admin/cio")

    @app.before_request
    def only_admins():
        if request.blueprint == dashboard.name:
            ...  # the host's own authentication

(``request.blueprint`` is the name it was registered under: dotted inside another Blueprint. A hook
on ``dashboard`` itself follows it under any name, and applies in every app that registers it.)

Pages are server-rendered (Jinja, no front-end build, no external assets): the overview,
the dead letters (search, body, requeue, purge) and what became of an event or an address.
Actions are POSTs with a CSRF token: Flask-WTF's when the app uses its ``CSRFProtect``,
else one kept in the session (so the app needs a ``SECRET_KEY``).
``CIO_RUDDER_DASHBOARD_READ_ONLY`` hides and refuses every action.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import BadRequest, Forbidden

from .ages import format_age, parse_since
from .outbox import Outbox, counted, get_outbox
from .store import Activity, Match, StoreError

__all__ = ["CSRFError", "dashboard"]

dashboard = Blueprint("cio_rudder_dashboard", __name__, template_folder="templates")

#: Dead letters per page.
PAGE_SIZE = 50
#: The most events the events page lists for one search (the newest); it says when there are more.
EVENTS_SHOWN = 50
_CSRF_KEY = "_cio_rudder_csrf"
_FILTERS = ("event_id", "email", "reason", "event", "since")


class CSRFError(BadRequest):
    """400: a dashboard action came without this session's CSRF token (an old page, or another site)."""

    description = (
        "This form is out of date or did not come from the dashboard (its CSRF token is missing or wrong). "
        "Reload the page and try again."
    )


# -- before and after every page ------------------------------------------------------------------


def _read_only() -> bool:
    return bool(current_app.config.get("CIO_RUDDER_DASHBOARD_READ_ONLY"))


def _uses_flask_wtf() -> bool:
    return "csrf" in current_app.extensions


@dashboard.before_request
def _check_request() -> None:
    """Fail clearly without a way to keep a CSRF token; refuse actions that are not allowed."""
    if not _uses_flask_wtf() and not current_app.secret_key:
        raise RuntimeError(
            "The cio-rudder dashboard keeps its CSRF token in the session, which needs a secret key: "
            "set SECRET_KEY in app.config (or use Flask-WTF's CSRFProtect)."
        )
    if request.method != "POST":
        return
    if _read_only():
        raise _read_only_refusal()
    if _uses_flask_wtf():
        current_app.extensions["csrf"].protect()  # also when the app turned its automatic check off
        return
    sent = request.form.get("csrf_token", "")
    expected = session.get(_CSRF_KEY)
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CSRFError()


def _read_only_refusal() -> Forbidden:
    return Forbidden(
        "The dashboard is read-only (CIO_RUDDER_DASHBOARD_READ_ONLY): use the CLI to change things."
    )


@dashboard.errorhandler(StoreError)
def _outbox_unavailable(error: StoreError) -> tuple[str, int]:
    """The outbox's database is down, locked or gone: a page that says so (no password is in the
    message), not a bare 500; 503, as the webhook answers then."""
    return render_template("cio_rudder/unavailable.html", reason=str(error)), 503


@dashboard.after_request
def _protect_response(response: Response) -> Response:
    """Pages hold personal data: never cached, never framed, nothing loaded from elsewhere, their
    addresses never told to other sites (but to the app itself: Flask-WTF refuses a form posted
    over HTTPS without a Referer from the same site)."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return response


def csrf_token() -> str:
    """The token each form sends: Flask-WTF's if the app uses it, else one kept in the session."""
    if _uses_flask_wtf():
        from flask_wtf.csrf import generate_csrf

        return str(generate_csrf())
    token = session.get(_CSRF_KEY)
    if not isinstance(token, str):
        token = session[_CSRF_KEY] = secrets.token_urlsafe(32)
    return token


@dashboard.app_template_filter("cio_when")
def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


dashboard.add_app_template_filter(format_age, "cio_age")


@dashboard.context_processor
def _page_helpers() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "csrf_field": _csrf_field(), "read_only": _read_only()}


def _csrf_field() -> str:
    """The form field the token goes in: Flask-WTF's configured name if the app uses it."""
    if _uses_flask_wtf():
        return str(current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token"))
    return "csrf_token"


def _outbox() -> Outbox:
    try:
        return get_outbox()
    except RuntimeError as error:  # not the outbox forwarder: there is nothing to show
        raise Forbidden(f"The cio-rudder dashboard needs the outbox: {error}") from None


# -- overview -------------------------------------------------------------------------------------


@dashboard.get("/")
def overview() -> str:
    """Counters, the last error, paused or not, and events per minute over the last hour."""
    outbox = _outbox()
    status = outbox.status()
    activity = outbox.activity(60)
    return render_template("cio_rudder/overview.html", status=status, chart=_chart(activity), url=outbox.url)


def _chart(activity: Activity, width: int = 600, height: int = 120) -> dict[str, Any]:
    """Bars of an inline SVG chart (numbers only: nothing from a body reaches it)."""
    top = max([1, *activity.accepted, *activity.delivered])
    step = width / len(activity.accepted)
    bars = [
        {
            "x": round(index * step, 1),
            "accepted": round(accepted / top * height, 1),
            "delivered": round(delivered / top * height, 1),
            "title": f"{_when(activity.start + index * 60)[11:16]} UTC: {accepted} in, {delivered} delivered",
        }
        for index, (accepted, delivered) in enumerate(zip(activity.accepted, activity.delivered))
    ]
    return {
        "bars": bars,
        "width": width,
        "height": height,
        "step": round(step, 1),
        "top": top,
        "accepted": sum(activity.accepted),
        "delivered": sum(activity.delivered),
    }


@dashboard.post("/pause")
def pause() -> Any:
    _outbox().pause()
    flash("Sending is paused in every process: events are still accepted and kept.")
    return redirect(url_for(".overview"))


@dashboard.post("/resume")
def resume() -> Any:
    _outbox().resume()
    flash("Sending resumed.")
    return redirect(url_for(".overview"))


# -- dead letters ---------------------------------------------------------------------------------


def _filters(source: Any) -> tuple[dict[str, str], Match]:
    """The search form's values (kept to fill the form again) and the match they make."""
    values = {name: str(source.get(name, "")).strip() for name in _FILTERS}
    try:
        since = parse_since(values["since"]) if values["since"] else None
    except ValueError:
        raise BadRequest(
            f"'Accepted since' must be an age (30m, 2h, 7d) or a date (2024-05-01), not {values['since']!r}."
        ) from None
    match = Match(
        since=since,
        reason=values["reason"] or None,
        event=values["event"] or None,
        event_id=values["event_id"] or None,
        email=values["email"] or None,
    )
    return values, match


@dashboard.get("/dead-letters")
def dead_letters() -> str:
    """Dead letters, newest first, searchable by event id, email, reason, event name and time."""
    outbox = _outbox()
    values, match = _filters(request.args)
    total = outbox.count_dead_letters(match)
    sendable = outbox.count_dead_letters(replace(match, sendable=True)) if total else 0
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, request.args.get("page", 1, type=int) or 1), pages)
    offset = (page - 1) * PAGE_SIZE
    letters = outbox.dead_letters(PAGE_SIZE, match=match, offset=offset, newest_first=True, bodies=False)
    return render_template(
        "cio_rudder/dead_letters.html",
        letters=letters,
        total=total,
        sendable=sendable,
        page=page,
        pages=pages,
        filters=values,
        filtered=not match.everything,
        query={name: value for name, value in values.items() if value},
    )


@dashboard.route("/dead-letters/<any(requeue, purge):action>", methods=["GET", "POST"])
def bulk(action: str) -> Any:
    """Requeue or purge every dead letter that matches: a confirmation page (GET), then the act (POST)."""
    if _read_only():  # not even the confirmation page, with its button
        raise _read_only_refusal()
    outbox = _outbox()
    values, match = _filters(request.form if request.method == "POST" else request.args)
    query: dict[str, Any] = {name: value for name, value in values.items() if value}
    matching = outbox.count_dead_letters(replace(match, sendable=True) if action == "requeue" else match)
    if request.method == "POST":
        # The operator agreed to the number the page showed: if more (or fewer) match now, ask again.
        confirmed = request.form.get("expected", type=int)
        if confirmed == matching:
            if action == "requeue":
                requeued = counted(outbox.requeue(match=match), "event")
                flash(f"Requeued {requeued}: the senders deliver them {_sent_when(outbox)}.")
            else:
                flash(f"Deleted {counted(outbox.purge_dead(match), 'dead letter')}.")
            return redirect(url_for(".dead_letters", **query))
        was = "" if confirmed is None else f", not the {confirmed} you confirmed"
        flash(f"{counted(matching, 'dead letter')} match now{was}: nothing was changed yet.")
    return render_template(
        "cio_rudder/confirm.html",
        action=action,
        matching=matching,
        filters=values,
        query=query,
        filtered=not match.everything,
    )


@dashboard.post("/dead-letters/requeue-one")
def requeue_one() -> Any:
    """Requeue the one dead letter named in the form, then show what became of it."""
    event_id = request.form.get("event_id", "")
    outbox = _outbox()
    count = outbox.requeue([event_id])
    flash(
        f"Requeued: the senders deliver it {_sent_when(outbox)}."
        if count
        else "Nothing to requeue: it is not a dead letter that can be sent."
    )
    return redirect(url_for(".event", id=event_id))


def _sent_when(outbox: Outbox) -> str:
    """When requeued events go out: now, or once an operator resumes sending."""
    return "once sending is resumed (it is paused)" if outbox.status().paused else "now"


# -- events ---------------------------------------------------------------------------------------


@dashboard.get("/events")
def events() -> str:
    """What became of an event id, or of the events of an email address."""
    query = request.args.get("q", "").strip()
    records = _outbox().find(query, limit=EVENTS_SHOWN + 1) if query else []
    return render_template(
        "cio_rudder/events.html", q=query, records=records[:EVENTS_SHOWN], more=len(records) > EVENTS_SHOWN
    )


@dashboard.get("/event")
def event() -> str:
    """One event: its outcome, times, reason, and its body or RudderStack event (escaped)."""
    event_id = request.args.get("id", "")
    record = _outbox().event(event_id) if event_id else None
    return render_template(
        "cio_rudder/event.html",
        event_id=event_id,
        record=record,
        shown=_pretty(record.body or record.payload) if record else None,
    )


def _pretty(text: str | None) -> str | None:
    """JSON indented for reading (as text: the template escapes it); anything else as it is.

    A lone surrogate, which JSON can carry (``"\\ud800"``) and a page cannot, is shown as that escape.
    """
    if text is None:
        return None
    with contextlib.suppress(ValueError, RecursionError):  # not JSON: shown as it is
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
