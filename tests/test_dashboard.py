"""The dashboard Blueprint through Flask's test client: pages, search, actions, CSRF, read-only, escaping.

The same pages in a real browser, on the example app, are in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from flask_cio_rudder import get_outbox, transform
from flask_cio_rudder.dashboard import dashboard
from flask_cio_rudder.testing import FakeDataPlane

from .conftest import sample
from .helpers import refuse

Post = Callable[..., TestResponse]
PREFIX = "/admin/cio"
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture
def config(tmp_path: Path, data_plane: FakeDataPlane) -> dict[str, Any]:
    return {
        "SECRET_KEY": "test-secret",
        "CIO_RUDDER_FORWARDER": "outbox",
        "CIO_RUDDER_OUTBOX_URL": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        "CIO_RUDDER_OUTBOX_SENDER": False,
        "CIO_RUDDER_WRITE_KEY": data_plane.write_key,
        "CIO_RUDDER_DATA_PLANE_URL": data_plane.url,
    }


@pytest.fixture
def admin(make_app: Callable[..., Flask], config: dict[str, Any]) -> Flask:
    app = make_app(**config)
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    return app


def token(page: TestResponse | str, field: str = "csrf_token") -> str:
    """The CSRF token of the first form on ``page``, in the form field ``field``."""
    html = page if isinstance(page, str) else page.get_data(as_text=True)
    found = re.search(rf'name="{field}" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def form_fields(page: str) -> dict[str, str]:
    """The hidden fields of the first form on ``page``: what its button posts."""
    form = page[page.index('<form method="post"') :]
    form = form[: form.index("</form>")]
    return {
        name: html.unescape(value)
        for name, value in re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', form)
    }


def text(response: TestResponse) -> str:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return response.get_data(as_text=True)


def test_the_dashboard_is_not_exposed_unless_the_host_registers_it(
    make_app: Callable[..., Flask], config: dict[str, Any]
) -> None:
    app = make_app(**config)
    assert not [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith("cio_rudder_dashboard")]
    assert app.test_client().get(f"{PREFIX}/").status_code == 404


def test_the_overview_shows_the_counters_and_a_chart_of_the_last_hour(admin: Flask, post: Post) -> None:
    client = admin.test_client()
    post(client, sample("opened"))
    post(client, {"event_id": "01NOBODY", "data": {}})
    page = text(client.get(f"{PREFIX}/"))
    assert re.search(r'id="pending">1<', page) and re.search(r'id="dead"><a [^>]*>1<', page)
    assert 'id="sending">on<' in page and "Pause sending" in page
    assert page.count('<rect class="accepted"') == 60
    assert "accepted: 2" in page  # the event and the rejected body, this minute


def test_the_overview_shows_an_error_events_were_delivered_after_as_over(admin: Flask) -> None:
    store = get_outbox(admin).store
    for event_id in ("e1", "e2"):
        store.add(event_id, json.dumps(transform(sample("opened") | {"event_id": event_id})))
    claim = store.claim(1, 60, 3600)
    store.release(claim.owner, [event.event_id for event in claim.events], "RudderStack answered 503")
    page = text(admin.test_client().get(f"{PREFIX}/"))
    assert '<p class="bad" id="last-error">RudderStack answered 503' in page
    assert 'id="last-delivery">last: -<' in page and "delivered since" not in page
    claim = store.claim(2, 60, 3600)
    store.mark_delivered(claim.owner, [event.event_id for event in claim.events])
    page = text(admin.test_client().get(f"{PREFIX}/"))
    assert '<p class="muted" id="last-error">RudderStack answered 503' in page
    assert "; events were delivered since)" in page
    assert re.search(r'id="last-delivery">last: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC<', page)


def test_pause_and_resume_are_posts_with_the_sessions_csrf_token(admin: Flask) -> None:
    client = admin.test_client()
    outbox = get_outbox(admin)
    assert client.post(f"{PREFIX}/pause").status_code == 400  # no token: refused
    assert client.post(f"{PREFIX}/pause", data={"csrf_token": "guess"}).status_code == 400
    assert not outbox.status().paused
    assert client.get(f"{PREFIX}/pause").status_code == 405  # a link cannot pause
    paused = client.post(
        f"{PREFIX}/pause", data={"csrf_token": token(client.get(f"{PREFIX}/"))}, follow_redirects=True
    )
    assert outbox.status().paused and "Sending is paused" in text(paused) and "Resume sending" in text(paused)
    assert 'id="sending">paused<' in text(paused)
    client.post(f"{PREFIX}/resume", data={"csrf_token": token(paused)})
    assert not outbox.status().paused
    other = admin.test_client()  # another browser session: the first one's token is no good there
    other.get(f"{PREFIX}/")
    assert other.post(f"{PREFIX}/pause", data={"csrf_token": token(paused)}).status_code == 400


def test_without_a_secret_key_the_dashboard_fails_naming_it(
    make_app: Callable[..., Flask], config: dict[str, Any]
) -> None:
    app = make_app(**{**config, "SECRET_KEY": None})
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        app.test_client().get(f"{PREFIX}/")


def test_with_flask_wtf_its_csrf_token_protects_the_actions(
    make_app: Callable[..., Flask], config: dict[str, Any]
) -> None:
    from flask_wtf.csrf import CSRFProtect

    app = make_app(**{**config, "WTF_CSRF_CHECK_DEFAULT": False})  # even with its automatic check off
    CSRFProtect(app)
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    client = app.test_client()
    assert client.post(f"{PREFIX}/pause").status_code == 400
    assert (
        client.post(f"{PREFIX}/pause", data={"csrf_token": token(client.get(f"{PREFIX}/"))}).status_code
        == 302
    )
    assert get_outbox(app).status().paused


def test_with_flask_wtf_the_forms_use_its_configured_field_name(
    make_app: Callable[..., Flask], config: dict[str, Any]
) -> None:
    from flask_wtf.csrf import CSRFProtect

    app = make_app(**{**config, "WTF_CSRF_FIELD_NAME": "_csrf"})
    CSRFProtect(app)
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    client = app.test_client()
    sent = token(client.get(f"{PREFIX}/"), field="_csrf")
    assert client.post(f"{PREFIX}/pause", data={"_csrf": sent}).status_code == 302
    assert get_outbox(app).status().paused


def test_read_only_hides_and_refuses_every_action(
    make_app: Callable[..., Flask], config: dict[str, Any], data_plane: FakeDataPlane
) -> None:
    app = make_app(**{**config, "CIO_RUDDER_DASHBOARD_READ_ONLY": True})
    app.register_blueprint(dashboard, url_prefix=PREFIX)
    refuse(app, data_plane, sample("bounced"))
    client = app.test_client()
    pages = [
        text(client.get(f"{PREFIX}{path}"))
        for path in ("/", "/dead-letters", f"/event?id={sample('bounced')['event_id']}")
    ]
    assert not any("<form" in page and 'method="post"' in page for page in pages)
    assert "Requeue" not in pages[1] and "Purge" not in pages[1]
    for action in ("requeue", "purge"):  # not even the confirmation page with its button
        assert client.get(f"{PREFIX}/dead-letters/{action}").status_code == 403
    with client.session_transaction() as session:
        session["_cio_rudder_csrf"] = "known"
    for path in ("/pause", "/dead-letters/requeue", "/dead-letters/purge", "/dead-letters/requeue-one"):
        refused = client.post(
            f"{PREFIX}{path}", data={"csrf_token": "known", "event_id": sample("bounced")["event_id"]}
        )
        assert refused.status_code == 403 and b"CIO_RUDDER_DASHBOARD_READ_ONLY" in refused.data
    assert get_outbox(app).count_dead_letters() == 1 and not get_outbox(app).status().paused


def test_dead_letters_are_searched_shown_and_requeued_one_at_a_time(
    admin: Flask, data_plane: FakeDataPlane
) -> None:
    bounced, opened = sample("bounced"), sample("opened")
    refuse(admin, data_plane, bounced, opened)
    client = admin.test_client()
    listing = text(client.get(f"{PREFIX}/dead-letters"))
    assert 'Dead letters <span class="muted">(2)' in listing and "bob@example.com" in listing
    assert "Email Bounced" in listing and "RudderStack answered 400: simulated failure" in listing
    by_email = text(client.get(f"{PREFIX}/dead-letters", query_string={"email": "BOB@example.com"}))
    assert bounced["event_id"] in by_email and opened["event_id"] not in by_email
    by_id = text(client.get(f"{PREFIX}/dead-letters", query_string={"event_id": opened["event_id"]}))
    assert opened["event_id"] in by_id and bounced["event_id"] not in by_id
    assert "No dead letters match" in text(
        client.get(f"{PREFIX}/dead-letters", query_string={"reason": "timeout"})
    )
    assert client.get(f"{PREFIX}/dead-letters", query_string={"since": "soon"}).status_code == 400
    beyond = text(client.get(f"{PREFIX}/dead-letters", query_string={"page": 10**20}))  # the last page
    assert bounced["event_id"] in beyond and opened["event_id"] in beyond

    body = text(client.get(f"{PREFIX}/event", query_string={"id": bounced["event_id"]}))
    assert "550 5.1.1 The email account" in body and 'id="outcome">dead<' in body
    answered = client.post(
        f"{PREFIX}/dead-letters/requeue-one",
        data={"csrf_token": token(listing), "event_id": bounced["event_id"]},
        follow_redirects=True,
    )
    assert "Requeued: the senders deliver it now." in text(answered) and 'id="outcome">pending<' in text(
        answered
    )
    get_outbox(admin).flush()
    delivered = text(client.get(f"{PREFIX}/events", query_string={"q": bounced["event_id"]}))
    assert '<span class="pill delivered">delivered</span>' in delivered
    assert [event["event"] for event in data_plane.events] == ["Email Bounced"]
    get_outbox(admin).pause()  # an operator who paused sending is not told it goes out now
    answered = client.post(
        f"{PREFIX}/dead-letters/requeue-one",
        data={"csrf_token": token(listing), "event_id": opened["event_id"]},
        follow_redirects=True,
    )
    assert "Requeued: the senders deliver it once sending is resumed (it is paused)." in text(answered)


def test_requeue_all_and_purge_go_through_a_confirmation_page(
    admin: Flask, data_plane: FakeDataPlane, post: Post
) -> None:
    refuse(admin, data_plane, sample("bounced"), sample("opened"))
    client = admin.test_client()
    post(client, {"event_id": "01NOBODY", "object_type": "email", "metric": "sent", "data": {}})
    listing = text(client.get(f"{PREFIX}/dead-letters"))  # the rejected body has nothing to send
    assert "Requeue all 2 that can be sent" in listing and "Purge 3" in listing
    confirm = text(client.get(f"{PREFIX}/dead-letters/requeue", query_string={"reason": "simulated"}))
    assert "Requeue 2 dead letters?" in confirm and "<code>simulated</code>" in confirm
    assert get_outbox(admin).count_dead_letters() == 3  # asking changed nothing
    assert form_fields(confirm)["reason"] == "simulated"
    done = client.post(f"{PREFIX}/dead-letters/requeue", data=form_fields(confirm), follow_redirects=True)
    assert "Requeued 2 events" in text(done)
    assert get_outbox(admin).status().pending == 2
    purge = text(client.get(f"{PREFIX}/dead-letters/purge"))
    assert "Purge 1 dead letter?" in purge and "deleted for good" in purge
    client.post(f"{PREFIX}/dead-letters/purge", data=form_fields(purge))
    assert get_outbox(admin).count_dead_letters() == 0 and get_outbox(admin).status().pending == 2


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_a_bulk_action_asks_again_when_more_match_than_the_operator_confirmed(
    admin: Flask, data_plane: FakeDataPlane, action: str
) -> None:
    """Dead letters keep arriving while a confirmation page is open: "Yes, purge 1" must not delete 2."""
    refuse(admin, data_plane, sample("bounced"))
    client = admin.test_client()
    confirm = text(client.get(f"{PREFIX}/dead-letters/{action}", query_string={"reason": "simulated"}))
    assert f"{action.capitalize()} 1 dead letter?" in confirm
    refuse(admin, data_plane, sample("opened"))  # meanwhile, RudderStack refuses another
    again = text(client.post(f"{PREFIX}/dead-letters/{action}", data=form_fields(confirm)))
    assert "2 dead letters match now, not the 1 you confirmed: nothing was changed yet." in again
    assert f"{action.capitalize()} 2 dead letters?" in again
    outbox = get_outbox(admin)
    assert (outbox.count_dead_letters(), outbox.status().pending) == (2, 0)
    client.post(f"{PREFIX}/dead-letters/{action}", data=form_fields(again))
    assert (outbox.count_dead_letters(), outbox.status().pending) == (0, 2 if action == "requeue" else 0)


def test_the_events_page_tells_what_became_of_an_address(
    admin: Flask, post: Post, data_plane: FakeDataPlane
) -> None:
    client = admin.test_client()
    post(client, sample("bounced"))
    get_outbox(admin).flush()
    post(
        client,
        sample("spammed")
        | {"data": sample("spammed")["data"] | {"identifiers": {"id": "43", "email": "bob@example.com"}}},
    )
    page = text(client.get(f"{PREFIX}/events", query_string={"q": "Bob@Example.com"}))
    assert page.count('class="pill delivered"') == 1 and page.count('class="pill pending"') == 1
    assert "Nothing kept for" in text(
        client.get(f"{PREFIX}/events", query_string={"q": "nobody@example.com"})
    )


def test_an_event_accepted_a_moment_ago_has_its_page(admin: Flask, post: Post) -> None:
    """On SQLite it may still be in the process's spool, not yet in the outbox's table."""
    client = admin.test_client()
    post(client, sample("opened"))
    page = text(client.get(f"{PREFIX}/event", query_string={"id": sample("opened")["event_id"]}))
    assert "Nothing kept" not in page and "Email Opened" in page


def test_the_events_page_says_when_an_address_has_more_events_than_it_lists(
    admin: Flask, post: Post, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("flask_cio_rudder.dashboard.EVENTS_SHOWN", 2)
    client = admin.test_client()
    for n in range(3):
        post(client, sample("opened") | {"event_id": f"01MANY{n}"})
    page = text(client.get(f"{PREFIX}/events", query_string={"q": "ada@example.com"}))
    assert page.count('class="pill pending"') == 2 and "there are more" in page
    monkeypatch.setattr("flask_cio_rudder.dashboard.EVENTS_SHOWN", 3)
    page = text(client.get(f"{PREFIX}/events", query_string={"q": "ada@example.com"}))
    assert page.count('class="pill pending"') == 3 and "there are more" not in page


def test_everything_from_a_body_is_escaped(admin: Flask, post: Post, data_plane: FakeDataPlane) -> None:
    client = admin.test_client()
    hostile = sample("bounced")
    hostile["event_id"] = f'01"><{HOSTILE}'
    hostile["data"] = {"identifiers": {"email": f"{HOSTILE}@example.com"}, "recipient": HOSTILE}
    refuse(admin, data_plane, hostile)  # a dead letter whose every field is attacker-chosen
    post(client, {"event_id": HOSTILE, "metric": HOSTILE, "data": {"subject": HOSTILE}})  # rejected: no one
    assert get_outbox(admin).count_dead_letters() == 2
    pages = [
        text(client.get(f"{PREFIX}/dead-letters")),
        text(client.get(f"{PREFIX}/event", query_string={"id": hostile["event_id"]})),
        text(client.get(f"{PREFIX}/events", query_string={"q": f"{HOSTILE}@example.com"})),
        text(client.get(f"{PREFIX}/events", query_string={"q": HOSTILE})),
    ]
    for page in pages:
        assert "<script>" not in page and "&lt;script&gt;" in page
    response = client.get(f"{PREFIX}/dead-letters")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


def test_a_lone_surrogate_in_a_body_is_shown_escaped_not_a_500(admin: Flask, post: Post) -> None:
    """JSON can carry "\\ud800", which is no text UTF-8 can encode: the event's page failed with a
    UnicodeEncodeError, for an accepted event and for the dead letter of a rejected body alike."""
    client = admin.test_client()
    accepted = sample("opened") | {"event_id": "01LONE"}
    accepted["data"] = accepted["data"] | {"identifiers": {"id": "42", "email": "\ud800@example.com"}}
    post(client, accepted)
    post(client, b'{"event_id":"\\ud800","metric":"bounced","data":{"subject":"\\udfff"}}')
    (rejected,) = get_outbox(admin).dead_letters()
    shown = []
    for event_id in ("01LONE", rejected.event_id):
        response = client.get(f"{PREFIX}/event", query_string={"id": event_id})
        assert response.status_code == 200
        shown.append(text(response))
    assert "\\ud800@example.com" in shown[0] and "\\udfff" in shown[1]
    assert client.get(f"{PREFIX}/events", query_string={"q": "01LONE"}).status_code == 200
    assert client.get(f"{PREFIX}/dead-letters").status_code == 200


def test_an_outbox_that_cannot_be_used_gets_a_page_saying_so_not_a_500(admin: Flask, tmp_path: Path) -> None:
    client = admin.test_client()
    csrf = token(client.get(f"{PREFIX}/"))  # the pause button's form
    (tmp_path / "outbox.sqlite3").rename(tmp_path / "moved-away.sqlite3")  # as a wrong volume mount would
    for response in (
        client.get(f"{PREFIX}/"),
        client.get(f"{PREFIX}/dead-letters"),
        client.post(f"{PREFIX}/pause", data={"csrf_token": csrf}),
    ):
        page = response.get_data(as_text=True)
        assert response.status_code == 503, page[:300]
        assert "The outbox cannot be used now" in page and "outbox.sqlite3" in page
        assert response.headers["Cache-Control"] == "no-store"
