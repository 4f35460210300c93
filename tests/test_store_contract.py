"""The contract every outbox store keeps, run against each backend (SQLite, PostgreSQL).

A new backend passes this file and nothing else needs to change. Time is a hand-moved
clock, except where another process takes part.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flask_cio_rudder.store import Match, OutboxStore, Pending, StoreUnavailable, store_from_url
from flask_cio_rudder.transform import transform

from .conftest import sample
from .helpers import Clock, free_port, wait_until
from .stores import Backend, backend_fixture  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
LEASE = 60.0
MAX_AGE = 3600.0


def stored(event_id: str) -> str:
    """The RudderStack event of a sample, as the JSON text a store keeps."""
    return json.dumps(transform(sample("opened") | {"event_id": event_id}))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_added_event_is_known_and_adding_it_again_changes_nothing(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    assert store.add("e1", stored("e1")) is True
    assert store.is_known("e1")
    assert not store.is_known("e2")
    assert store.add("e1", json.dumps({"changed": True})) is False
    claim = store.claim(100, LEASE, MAX_AGE)
    assert [json.loads(event.payload_json)["event"] for event in claim.events] == ["Email Opened"]


def test_a_store_opened_only_to_read_makes_no_table(backend: Backend) -> None:
    """``flask cio-rudder copy-pending`` opens its source so: a mistyped table must not appear."""
    assert backend.store().has_tables()
    reader = store_from_url(backend.url, table=backend.table + "_typo", create=False)
    backend.opened.append(reader)
    assert not reader.has_tables()
    assert not reader.has_tables()  # looking made nothing either


def test_concurrent_adds_of_one_event_keep_it_once(backend: Backend) -> None:
    stores = [backend.store() for _ in range(4)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        added = list(pool.map(lambda n: stores[n % 4].add("same", stored("same")), range(16)))
    assert added.count(True) == 1
    assert stores[0].status().pending == 1


def test_a_rejected_body_is_a_dead_letter_that_does_not_block_a_later_valid_event(
    backend: Backend, clock: Clock
) -> None:
    store = backend.store(clock=clock)
    store.add_rejected("e1", b'{"event_id": "e1", "data": "oops"}', "invalid fields: data")
    store.add_rejected(None, b'{"no": "id"}', "invalid fields: event_id")
    assert not store.is_known("e1")
    letters = {letter.event_id: letter for letter in store.dead_letters()}
    assert letters["e1"].reason == "invalid fields: data"
    assert letters["e1"].body == '{"event_id": "e1", "data": "oops"}'
    assert not letters["e1"].requeueable
    assert any(key.startswith("no-event-id:") for key in letters)
    # A list leaves the bodies out (each may be megabytes), and says the same of the rest.
    listed = {letter.event_id: letter for letter in store.dead_letters(bodies=False)}
    assert {key: replace(letter, body=None) for key, letter in letters.items()} == listed
    assert store.add("e1", stored("e1")) is True
    assert store.status().pending == 1


@pytest.mark.parametrize("event_id", ["\ud800", "a\udfffb", "nul\x00inside", "x" * 5000, "\ufffe\U0010ffff"])
def test_any_string_is_an_event_id_a_store_can_keep(backend: Backend, event_id: str) -> None:
    store = backend.store()
    store.add_rejected(event_id, b"\xff\x00 not utf-8", "reason with \x00 inside")
    assert not store.is_known(event_id)
    assert store.add(event_id, stored("odd")) is True
    assert store.is_known(event_id)
    assert store.add(event_id, stored("odd")) is False
    assert len(store.claim(100, LEASE, MAX_AGE).events) == 1


def test_an_event_kept_under_a_hash_is_found_and_requeued_by_the_key_operators_see(
    backend: Backend,
) -> None:
    store = backend.store()
    long_id = "x" * 300
    store.add(long_id, stored("long"))
    claim = store.claim(100, LEASE, MAX_AGE)
    store.mark_dead(claim.owner, [event.event_id for event in claim.events], "RudderStack answered 400")
    (letter,) = store.dead_letters()
    shown = letter.event_id
    assert shown.startswith("sha256:") and shown != long_id
    for name in (long_id, shown):
        assert [record.event_id for record in store.find(event_id=name)] == [shown]
        assert [dead.event_id for dead in store.dead_letters(match=Match(event_id=name))] == [shown]
    assert store.requeue([shown]) == 1
    assert store.status().pending == 1
    # Copied by key (flask cio-rudder copy-pending), it stays the same event: here, already present.
    assert store.add_many(store.pending()) == 0 and store.status().pending == 1


def test_a_claim_is_leased_until_the_lease_runs_out(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    for n in range(3):
        store.add(f"e{n}", stored(f"e{n}"))
    first = store.claim(100, LEASE, MAX_AGE)
    assert len(first.events) == 3
    assert backend.store(clock=clock).claim(100, LEASE, MAX_AGE).events == []  # nobody else gets them
    clock.now += LEASE + 1  # the lease ran out (a sender stuck past it)
    second = store.claim(100, LEASE, MAX_AGE)
    assert [event.event_id for event in second.events] == ["e0", "e1", "e2"]
    store.mark_delivered(first.owner, ["e0", "e1", "e2"])  # a late answer to a lost lease changes nothing
    assert store.status().pending == 3
    store.mark_delivered(second.owner, ["e0", "e1", "e2"])
    assert store.status().delivered == 3


def test_claims_are_oldest_first_bounded_and_never_overlap(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    for n in range(5):
        clock.now += 1
        store.add(f"e{n}", stored(f"e{n}"))
    assert [event.event_id for event in store.claim(2, LEASE, MAX_AGE).events] == ["e0", "e1"]
    for n in range(5, 205):
        store.add(f"e{n}", stored(f"e{n}"))
    claimers = [backend.store(clock=clock) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        claims = list(pool.map(lambda n: claimers[n % 4].claim(10, LEASE, MAX_AGE), range(40)))
    ids = [event.event_id for claim in claims for event in claim.events]
    assert len(ids) == len(set(ids)) == 203


def test_a_released_event_is_pending_again_with_the_error(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    store.add("e1", stored("e1"))
    claim = store.claim(100, LEASE, MAX_AGE)
    assert store.status().in_flight == 1
    store.release(claim.owner, ["e1"], "RudderStack answered 503")
    status = store.status()
    assert (status.pending, status.in_flight, status.last_error) == (1, 0, "RudderStack answered 503")
    assert status.last_error_at == clock.now
    assert len(store.claim(100, LEASE, MAX_AGE).events) == 1


def test_status_tells_whether_events_were_delivered_after_the_last_error(
    backend: Backend, clock: Clock
) -> None:
    store = backend.store(clock=clock)
    store.add("e1", stored("e1"))
    assert store.status().last_delivered_at is None
    claim = store.claim(100, LEASE, MAX_AGE)
    store.release(claim.owner, ["e1"], "RudderStack answered 503")
    assert not store.status().delivered_since_error
    clock.now += 5
    claim = store.claim(100, LEASE, MAX_AGE)
    store.mark_delivered(claim.owner, ["e1"])
    status = store.status()
    assert (status.last_delivered_at, status.delivered_since_error) == (clock.now, True)
    clock.now += 5
    assert store.purge_delivered(older_than=1) == 1  # a scheduled purge in a quiet hour
    assert store.status().last_delivered_at == clock.now - 5 and store.status().delivered_since_error
    store.add("e2", stored("e2"))
    claim = store.claim(100, LEASE, MAX_AGE)
    store.release(claim.owner, ["e2"], "RudderStack answered 502")  # failing again
    assert not store.status().delivered_since_error


def test_an_event_older_than_the_maximum_age_becomes_a_dead_letter(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    store.add("old", stored("old"))
    claim = store.claim(100, LEASE, MAX_AGE)
    store.release(claim.owner, ["old"], "RudderStack answered 503")
    clock.now += MAX_AGE + 1
    store.add("new", stored("new"))
    claim = store.claim(100, LEASE, MAX_AGE)
    assert [event.event_id for event in claim.events] == ["new"]
    assert claim.expired == 1  # the sender logs it: an operator learns of dead letters it made
    assert store.claim(100, LEASE, MAX_AGE).expired == 0
    (letter,) = store.dead_letters()
    assert letter.event_id == "old"
    assert "CIO_RUDDER_OUTBOX_MAX_AGE" in letter.reason
    assert "RudderStack answered 503" in letter.reason


def test_an_event_a_live_sender_is_posting_does_not_expire_under_it(backend: Backend, clock: Clock) -> None:
    """Another sender's claim (or a flush) past the maximum age leaves a leased batch alone: its
    sender's 200 marks it delivered, not a dead letter that a requeue would send twice."""
    posting, other = backend.store(clock=clock), backend.store(clock=clock)
    posting.add("e1", stored("e1"))
    clock.now += MAX_AGE - 1
    claim = posting.claim(100, LEASE, MAX_AGE)
    clock.now += 3  # past the maximum age, within the lease (and the holder's heartbeat timeout)
    assert other.claim(100, LEASE, MAX_AGE).events == []
    posting.mark_delivered(claim.owner, ["e1"])
    assert (posting.status().delivered, posting.status().dead) == (1, 0)


def test_dead_letters_can_be_requeued_all_or_by_id(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    for event_id in ("a", "b", "c"):
        store.add(event_id, stored(event_id))
    claim = store.claim(100, LEASE, MAX_AGE)
    store.mark_dead(claim.owner, ["a", "b", "c"], "RudderStack answered 400")
    store.add_rejected("r", b'{"event_id": "r"}', "invalid")
    assert store.requeue(["a", "missing"]) == 1
    assert store.status().pending == 1
    assert store.requeue() == 2  # b and c; the rejected body has nothing to send
    assert store.status().dead == 1


def event_of(metric: str, event_id: str, email: str) -> str:
    """The RudderStack event of one of the six samples, for this event id and address."""
    body = sample(metric) | {"event_id": event_id}
    body["data"] = body["data"] | {"identifiers": {"id": "42", "email": email}}
    return json.dumps(transform(body))


def kill(store: OutboxStore, reason: str, *event_ids: str) -> None:
    """Make these pending events dead letters, as a sender does when RudderStack refuses them."""
    claim = store.claim(100, LEASE, MAX_AGE)
    assert sorted(event.event_id for event in claim.events) == sorted(event_ids)
    store.mark_dead(claim.owner, list(event_ids), reason)


@pytest.fixture
def letters(backend: Backend, clock: Clock) -> OutboxStore:
    """Four dead letters a minute apart: three RudderStack refused, one body rejected at validation."""
    store = backend.store(clock=clock)
    for event_id, metric, email, reason in [
        ("d1", "bounced", "Ann@Example.com", "RudderStack answered 400: bad userId"),
        ("d2", "opened", "bob@example.com", "RudderStack answered 400: Invalid request body"),
        ("d3", "bounced", "bob@example.com", "RudderStack answered 413: too big"),
    ]:
        store.add(event_id, event_of(metric, event_id, email))
        kill(store, reason, event_id)
        clock.now += 60
    body = sample("clicked") | {"event_id": "r1"}
    store.add_rejected(
        "r1", json.dumps(body).encode(), "invalid fields: data.href", event_name="Email Link Clicked"
    )
    store.add("ok", event_of("opened", "ok", "bob@example.com"))  # pending, never a dead letter
    return store


def test_dead_letters_filter_by_time_reason_event_id_and_email_a_page_at_a_time(
    letters: OutboxStore, clock: Clock
) -> None:
    def ids(match: Match | None = None, **page: Any) -> list[str]:
        return [letter.event_id for letter in letters.dead_letters(match=match, **page)]

    assert ids() == ["d1", "d2", "d3", "r1"]
    assert ids(Match(since=clock.now - 60)) == ["d3", "r1"]
    assert ids(Match(reason="ANSWERED 400")) == ["d1", "d2"]
    assert ids(Match(event="bounced")) == ["d1", "d3"]
    assert ids(Match(event="Email Bounced", reason="413")) == ["d3"]
    assert ids(Match(event_id="d2")) == ["d2"]
    assert ids(Match(email="ANN@example.com")) == ["d1"]
    assert ids(Match(email="nobody@example.com")) == []
    assert ids(limit=2) == ["d1", "d2"] and ids(limit=2, offset=2) == ["d3", "r1"]
    assert ids(limit=1, newest_first=True) == ["r1"]
    assert letters.count_dead_letters() == 4
    assert letters.count_dead_letters(Match(email="bob@example.com")) == 2
    assert ids(Match(sendable=False)) == ["r1"] and letters.count_dead_letters(Match(sendable=True)) == 3
    (first,) = letters.dead_letters(limit=1)
    assert (first.event_name, first.email) == ("Email Bounced", "ann@example.com")


def test_a_reason_filter_ignores_the_case_of_every_letter(backend: Backend, clock: Clock) -> None:
    """SQLite's lower() lowers ASCII letters only: "Über" found no dead letter there, typed as it is."""
    store = backend.store(clock=clock)
    store.add("d1", event_of("bounced", "d1", "ann@example.com"))
    kill(store, "RudderStack answered 400: Über invalid", "d1")
    for needle in ("Über", "über", "ÜBER INVALID"):
        assert [letter.event_id for letter in store.dead_letters(match=Match(reason=needle))] == ["d1"]
    assert store.count_dead_letters(Match(reason="über")) == 1


def test_requeue_and_purge_take_the_same_filter(letters: OutboxStore) -> None:
    bob = Match(email="bob@example.com")
    assert letters.requeue(match=Match(reason="413", event="opened")) == 0
    assert letters.requeue(match=bob) == 2
    assert letters.count_dead_letters() == 2
    assert sorted(event.event_id for event in letters.claim(100, LEASE, MAX_AGE).events) == ["d2", "d3", "ok"]
    assert letters.purge_dead(Match(event="clicked")) == 1  # the rejected body
    assert [letter.event_id for letter in letters.dead_letters()] == ["d1"]
    assert letters.purge_dead() == 1
    assert letters.count_dead_letters() == 0
    assert letters.add_rejected("r1", b"{}", "again") is None and letters.count_dead_letters() == 1


def test_find_tells_what_became_of_an_event_id_or_an_address(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    for event_id in ("sent", "failing", "refused"):
        store.add(event_id, event_of("opened", event_id, "Carol@example.com"))
    store.add_rejected("bad", b'{"event_id": "bad"}', "no userId or anonymousId", email="carol@example.com")
    claim = store.claim(100, LEASE, MAX_AGE)
    clock.now += 5
    store.mark_delivered(claim.owner, ["sent"])
    store.release(claim.owner, ["failing"], "RudderStack answered 503")
    store.mark_dead(claim.owner, ["refused"], "RudderStack answered 400")

    (sent,) = store.find(event_id="sent")
    assert (sent.outcome, sent.accepted_at, sent.delivered_at) == ("delivered", clock.now - 5, clock.now)
    assert (sent.event_name, sent.email, sent.attempts) == ("Email Opened", "carol@example.com", 1)
    assert json.loads(sent.payload or "")["properties"]["eventId"] == "sent"
    (failing,) = store.find(event_id="failing")
    assert (failing.outcome, failing.reason) == ("pending", "RudderStack answered 503")
    (refused,) = store.find(event_id="refused")
    assert (refused.outcome, refused.reason) == ("dead", "RudderStack answered 400")
    (bad,) = store.find(event_id="bad")
    assert (bad.outcome, bad.reason, bad.body) == (
        "rejected",
        "no userId or anonymousId",
        '{"event_id": "bad"}',
    )
    found = store.find(email="CAROL@example.com ")
    assert sorted(record.event_id for record in found) == ["bad", "failing", "refused", "sent"]
    assert store.find(event_id="unknown") == [] and store.find(email="dan@example.com") == []


def test_activity_counts_events_per_minute_over_the_last_hour(backend: Backend, clock: Clock) -> None:
    clock.now = 1_700_000_000.0 - 1_700_000_000.0 % 60 + 30  # half a minute into a minute
    store = backend.store(clock=clock)
    store.add("two-hours-ago", event_of("opened", "x", "a@example.com"))
    clock.now += 2 * 3600
    store.add_many([Pending("then", stored("then"), accepted_at=clock.now - 10 * 60)])
    store.add("now-1", stored("now-1"))
    store.add("now-2", stored("now-2"))
    store.add_rejected("now-3", b"{}", "invalid")
    claim = store.claim(2, LEASE, 100 * 3600)  # the oldest two: two-hours-ago and then
    store.mark_delivered(claim.owner, [event.event_id for event in claim.events])
    activity = store.activity(60)
    assert len(activity.accepted) == len(activity.delivered) == 60
    assert activity.start == clock.now - 30 - 59 * 60
    assert activity.accepted[-1] == 3 and activity.accepted[-11] == 1 and sum(activity.accepted) == 4
    assert activity.delivered[-1] == 2 and sum(activity.delivered) == 2


def test_pausing_stops_every_claimer_but_not_accepting(backend: Backend, clock: Clock) -> None:
    web, worker = backend.store(clock=clock), backend.store(clock=clock)
    web.add("before", stored("before"))
    web.set_paused(True)
    web.set_paused(True)  # twice: still one pause
    assert web.add("during", stored("during")) is True
    clock.now += MAX_AGE + 1  # a long maintenance window kills nothing while paused
    claim = worker.claim(100, LEASE, MAX_AGE)
    assert (claim.events, claim.paused) == ([], True)
    assert worker.status().paused and worker.status().pending == 2
    worker.set_paused(False)
    assert not web.status().paused
    claim = worker.claim(100, LEASE, 10 * MAX_AGE)
    assert (sorted(event.event_id for event in claim.events), claim.paused) == (["before", "during"], False)


def test_events_added_claimed_are_held_like_a_claim_unless_paused_or_too_old(
    backend: Backend, clock: Clock
) -> None:
    """The spool's hand-off: what the mover adds, leased to its sender, is sent by nobody else."""
    store = backend.store(clock=clock)
    store.add("known", stored("known"))
    old = Pending("old", stored("old"), accepted_at=clock.now - MAX_AGE - 1)
    claim = store.add_claimed(
        [Pending("known", stored("x")), Pending("new", stored("new")), old], LEASE, MAX_AGE
    )
    leased = [event.event_id for event in claim.events]
    assert leased in (["new"], [])  # a backend may lease none (the default): the sender claims them
    assert store.status().pending == 3
    others = backend.store(clock=clock).claim(100, LEASE, MAX_AGE)
    assert sorted(event.event_id for event in others.events) == sorted({"known", "new"} - set(leased))
    assert store.status().dead == 1  # too old to send: a claim makes it a dead letter, as ever
    store.mark_delivered(claim.owner, leased)
    assert [
        (record.state, json.loads(record.payload or "")["event"]) for record in store.find(event_id="new")
    ] == [("delivered" if leased else "pending", "Email Opened")]
    store.set_paused(True)
    assert store.add_claimed([Pending("paused", stored("paused"))], LEASE, MAX_AGE).events == []
    store.set_paused(False)
    assert [event.event_id for event in backend.store(clock=clock).claim(100, LEASE, MAX_AGE).events] == [
        "paused"
    ]


#: The events table as the release before ``event_name`` and ``email`` made it (both backends).
OLD_TABLE = """CREATE TABLE {table} (event_id TEXT PRIMARY KEY, state TEXT NOT NULL, payload TEXT, body TEXT,
    reason TEXT, accepted_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT,
    lease_holder TEXT, leased_at REAL, lease_until REAL, delivered_at REAL)"""


def test_a_table_made_by_the_previous_release_is_migrated_in_place(backend: Backend) -> None:
    numeric = json.loads(event_of("clicked", "numeric", "x"))  # an address given as a number, forwarded as is
    numeric["context"]["traits"]["email"] = 12345
    nul = json.loads(
        event_of("delivered", "nul", "nul@example.com")
    )  # "\u0000": PostgreSQL's json refuses it
    nul["properties"]["emailSubject"] = "Hello\x00"
    emoji = json.loads(event_of("delivered", "emoji", "emoji@example.com"))  # written as \ud83d\ude00
    emoji["properties"]["emailSubject"] = "Sale \U0001f600"
    rows = [
        ("kept", "pending", event_of("bounced", "kept", "Eve@example.com"), None, None, 1.0),
        ("refused", "dead", event_of("opened", "refused", "eve@example.com"), None, "400", 2.0),
        ("rejected", "dead", None, "{}", "invalid", 3.0),
        ("numeric", "dead", json.dumps(numeric), None, "400", 4.0),
        ("blank", "dead", event_of("spammed", "blank", "  "), None, "400", 5.0),
        ("nul", "pending", json.dumps(nul), None, None, 6.0),
        ("emoji", "pending", json.dumps(emoji), None, None, 7.0),
    ]
    insert = f"INSERT INTO {backend.table} (event_id, state, payload, body, reason, accepted_at) VALUES "
    if backend.name == "sqlite":
        import sqlite3

        with closing(sqlite3.connect(backend.url.removeprefix("sqlite:///"))) as db, db:
            db.execute(OLD_TABLE.format(table=backend.table))
            db.executemany(insert + "(?, ?, ?, ?, ?, ?)", rows)
    else:
        import psycopg

        with psycopg.connect(backend.url, autocommit=True) as conn:
            conn.execute(OLD_TABLE.format(table=backend.table).encode())
            conn.cursor().executemany(insert + "(%s, %s, %s, %s, %s, %s)", rows)
    store = backend.store()
    found = store.find(email="eve@example.com")
    assert sorted((record.event_id, record.event_name) for record in found) == [
        ("kept", "Email Bounced"),
        ("refused", "Email Opened"),
    ]
    assert [letter.event_id for letter in store.dead_letters(match=Match(event="opened"))] == ["refused"]
    # Kept as an event added today would be: a number or blanks are no address to search by.
    assert [record.email for record in store.find(event_id="numeric") + store.find(event_id="blank")] == [
        None,
        None,
    ]
    assert store.find(email="12345") == []
    assert [letter.event_id for letter in store.dead_letters(match=Match(event="clicked"))] == ["numeric"]
    assert [record.event_id for record in store.find(email="emoji@example.com")] == ["emoji"]
    assert store.add("new", stored("new")) and len(store.claim(100, LEASE, 1e12).events) == 4
    assert "event_name" in store.schema_sql() and "email" in store.schema_sql()


def test_purge_deletes_only_old_delivered_events(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    store.add("old", stored("old"))
    claim = store.claim(100, LEASE, MAX_AGE)
    store.mark_delivered(claim.owner, ["old"])
    clock.now += 86400
    store.add("pending", stored("pending"))
    assert store.count_delivered(older_than=86401) == 0
    assert store.count_delivered(older_than=3600) == 1
    assert store.purge_delivered(older_than=3600) == 1
    assert store.status().pending == 1
    assert store.purge_delivered(older_than=0) == 0


def test_status_reports_the_oldest_pending_age(backend: Backend, clock: Clock) -> None:
    store = backend.store(clock=clock)
    assert store.status().oldest_pending_age is None
    store.add("e1", stored("e1"))
    clock.now += 90
    assert store.status().oldest_pending_age == 90


def test_bulk_adds_count_only_new_events_and_pending_pages_in_id_order(
    backend: Backend, clock: Clock
) -> None:
    store = backend.store(clock=clock)
    store.add("e003", stored("e003"))
    events = [Pending(f"e{n:03d}", stored(f"e{n:03d}"), accepted_at=clock.now - 10) for n in range(6)]
    assert store.add_many(iter(events)) == 5
    first = store.pending(limit=4)
    rest = store.pending(limit=4, after=first[-1].event_id)
    assert [event.event_id for event in first + rest] == [f"e{n:03d}" for n in range(6)]
    assert first[0].accepted_at == clock.now - 10 and first[0].payload_json == stored("e000")


def test_bulk_adds_keep_the_search_columns_given_else_read_them_from_the_event(backend: Backend) -> None:
    """The spool's mover passes what the webhook knew; a dead process's file gives only the events."""
    store = backend.store()
    given = Pending("given", json.dumps({"n": 1}), event_name="Email Bounced", email=" Ann@Example.com")
    assert store.add_many([given, Pending("read", stored("read"))]) == 2
    (found,) = store.find(email="ann@example.com")
    assert (found.event_id, found.event_name) == ("given", "Email Bounced")
    (read,) = store.find(event_id="read")
    traits = json.loads(stored("read"))["context"]["traits"]
    assert (read.event_name, read.email) == ("Email Opened", traits["email"].lower())


def test_new_events_wake_a_watcher_when_the_backend_notifies(backend: Backend) -> None:
    store, other = backend.store(), backend.store()
    woken, stopping = threading.Event(), threading.Event()
    watcher = threading.Thread(target=store.watch, args=(woken.set, stopping), daemon=True)
    watcher.start()
    try:
        if not store.notifies:
            watcher.join(10)
            assert not watcher.is_alive()  # nothing to listen to: senders poll
            return
        wait_until(woken.is_set, 10, "the watcher is listening (it wakes once on connecting)")
        woken.clear()
        other.add("e1", stored("e1"))
        wait_until(woken.is_set, 10, "the add woke the watcher")
    finally:
        stopping.set()
        watcher.join(10)


def test_the_schema_is_printable_and_names_the_table(backend: Backend) -> None:
    store = backend.store()
    sql = store.schema_sql()
    assert backend.table in sql and "CREATE TABLE" in sql
    store.create_tables()
    store.create_tables()  # again: nothing changes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_opens_its_own_connections_and_leaves_the_parents_alone(backend: Backend) -> None:
    store = backend.store()
    store.add("parent-before", stored("parent-before"))
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running any clean-up
        code = 1
        try:
            code = 0 if store.add("child", stored("child")) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.add("parent-after", stored("parent-after"))  # the parent's connections still work
    assert store.is_known("child")


CLAIM_AND_HOLD = """
import json, sys
from flask_cio_rudder.store import store_from_url

store = store_from_url(sys.argv[1], table=sys.argv[2])
store.HEARTBEAT = 0.2  # PostgreSQL: beat five times a HEARTBEAT_TIMEOUT of 1 s, as 1 s does 5 s
claim = store.claim(int(sys.argv[3]), 600.0, 7 * 24 * 3600)
print(json.dumps([event.event_id for event in claim.events]), flush=True)
sys.stdin.read()  # hold the batch, as a sender stuck mid-batch does, until killed
"""


@pytest.mark.slow
def test_a_batch_held_by_a_live_process_stays_held_and_is_free_once_the_process_is_killed(
    backend: Backend,
) -> None:
    """SQLite: the holder's process is gone, so at once; PostgreSQL: when its heartbeat stops, in seconds."""
    store = backend.store()
    store.HEARTBEAT, store.HEARTBEAT_TIMEOUT = 0.2, 3.0  # type: ignore[attr-defined]  (PostgreSQL's; SQLite ignores them)
    for n in range(8):
        store.add(f"e{n}", stored(f"e{n}"))
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HOLD, backend.url, backend.table, "5"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline() or "null")
        assert held is not None, holder.communicate(timeout=30)[1].decode()
        assert len(held) == 5
        assert len(store.claim(100, 600.0, MAX_AGE).events) == 3  # the five stay with their live holder
        assert store.claim(100, 600.0, MAX_AGE).events == []
        status = store.status()
        assert status.in_flight == 8 and len(status.holders) == 2
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert holder.returncode == -signal.SIGKILL  # died holding the batch: nothing released it
    taken: list[str] = []
    wait_until(
        lambda: (
            taken.extend(event.event_id for event in store.claim(100, 600.0, MAX_AGE).events)
            or len(taken) >= 5
        ),
        30,
        "the dead holder's batch is claimed again",
    )
    assert sorted(taken) == sorted(held)


def test_an_unreachable_store_raises_store_unavailable_without_the_password(tmp_path: Path) -> None:
    blocked = tmp_path / "a-directory.sqlite3"
    blocked.mkdir()
    with pytest.raises(StoreUnavailable, match=r"a-directory\.sqlite3"):
        store_from_url(f"sqlite:///{blocked}")


@pytest.mark.service
def test_an_unreachable_postgresql_raises_store_unavailable_without_the_password() -> None:
    pytest.importorskip("psycopg", reason='psycopg is not installed: pip install -e ".[postgres,test]"')
    store = store_from_url(f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/test")
    store.POOL_TIMEOUT = 0.2  # type: ignore[attr-defined]  # nothing listens: no need to wait 2 s per call
    try:
        assert "s3cret-pw" not in store.url and "***" in store.url
        for call in (lambda: store.is_known("e1"), lambda: store.add("e1", "{}"), store.status):
            with pytest.raises(StoreUnavailable) as raised:
                call()
            assert "s3cret-pw" not in str(raised.value)
    finally:
        store.close()
