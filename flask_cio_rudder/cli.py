"""``flask cio-rudder ...``: look at and act on the outbox from a shell, or run its sender.

Commands that change or delete events (``requeue``, ``purge``) say what they will touch
and ask first, unless ``--yes``; ``--dry-run`` only says it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import AppGroup

from . import ages
from .ages import format_age
from .outbox import Outbox, OutboxForwarder, counted, get_outbox
from .replay import ReplayStopped, ReplaySummary, read_bodies, replay
from .sendtest import send_samples
from .spool import spool_for
from .state import state_of
from .store import DeadLetter, Match, StoreError, store_from_url
from .store.sqlite import sqlite_path

__all__ = ["cli", "outbox_of_current_app"]

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("flask_cio_rudder")

cli = AppGroup("cio-rudder", help="Operate the outbox of Customer.io events bound for RudderStack.")


def _parsed(parse: Callable[[str], float], text: str, option: str) -> float:
    """``parse(text)`` (:mod:`~flask_cio_rudder.ages`), its error a usage error naming ``option``."""
    try:
        return parse(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None


def match_options(command: F) -> F:
    """The dead-letter filter of ``dead-letters``, ``requeue`` and ``purge``: the command gets ``match``."""

    @functools.wraps(command)
    def with_match(
        *args: Any, since: str | None, reason: str | None, event: str | None, email: str | None, **rest: Any
    ) -> Any:
        given = {"--since": since, "--reason": reason, "--event": event, "--email": email}
        for option, value in given.items():
            if value is not None and not value.strip():
                # An empty filter would match every dead letter (or none): never what a script meant.
                raise click.BadParameter(
                    "it is empty; give a value, or leave the option out", param_hint=option
                )
        match = Match(
            since=None if since is None else _parsed(ages.parse_since, since, "--since"),
            reason=reason,
            event=event,
            email=email,
        )
        return command(*args, match=match, **rest)

    options = [
        click.option("--since", help="Accepted since an age (2h, 7d) or a date (2024-05-01T12:00Z, UTC)."),
        click.option("--reason", help="The reason contains this text (any case)."),
        click.option("--event", help="The RudderStack event name contains this text, e.g. 'Email Bounced'."),
        click.option("--email", help="The person's email address (any case)."),
    ]
    decorated: Any = with_match
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def outbox_of_current_app(*, keep_sender: bool = False, making: bool = False) -> Outbox:
    """The current app's outbox; this process's own background sender is stopped unless ``keep_sender``.

    A command's process is short-lived: its sender would only race the command (and,
    at exit, spend the shutdown timeout sending) while the app's real senders run elsewhere.
    Unless ``making`` one is the command's job, it says when loading the app made a new outbox that
    is still empty: the command then works on no outbox the app uses.
    """
    try:
        outbox = get_outbox()
    except RuntimeError as error:
        raise click.ClickException(f"{error} These commands work on the outbox.") from None
    if not keep_sender:
        outbox.sender.stop(flush=False)
    if not making:
        _note_if_new(outbox)
    return outbox


def _note_if_new(outbox: Outbox) -> None:
    """Say (on stderr) when loading the app made the outbox, and it is still empty: no app uses it."""
    if outbox.store.made_new and _holds_nothing(outbox):
        click.echo(
            f"note: there was no outbox at {outbox.url}, so this command made a new, empty one: if the app "
            "keeps its outbox elsewhere, run the command with the app's CIO_RUDDER_OUTBOX_URL",
            err=True,
        )


def _holds_nothing(outbox: Outbox) -> bool:
    """Whether the outbox holds no event at all (an app that uses it has put some in)."""
    status = _store_call(outbox.store.status)
    return not (status.pending or status.delivered or status.dead)


def _store_call(action: Any, *args: Any) -> Any:
    """Run a store call, turning an unreachable store into a one-line error (exit 1)."""
    try:
        return action(*args)
    except StoreError as error:
        raise click.ClickException(str(error)) from None


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(as_json: bool) -> None:
    """Pending, delivered and dead events, the oldest pending age, the last error, paused or not."""
    outbox = outbox_of_current_app()
    current = _store_call(outbox.status)
    if as_json:
        since = current.delivered_since_error
        click.echo(json.dumps({"outbox": outbox.url, **asdict(current), "delivered_since_error": since}))
        return
    now = time.time() if current.read_at is None else current.read_at  # the store's clock, as its times
    last_error = current.last_error or "-"
    if current.last_error_at is not None:
        since = "; events were delivered since" if current.delivered_since_error else ""
        last_error += f" ({format_age(now - current.last_error_at)} ago{since})"
    last_delivery = "-"
    if current.last_delivered_at is not None:
        last_delivery = f"{format_age(now - current.last_delivered_at)} ago"
    click.echo(f"outbox:             {outbox.url}")
    click.echo(f"pending:            {current.pending}")
    click.echo(
        f"  held by senders:  {current.in_flight}"
        + (f" ({', '.join(current.holders)})" if current.holders else "")
    )
    click.echo(f"oldest pending age: {format_age(current.oldest_pending_age)}")
    click.echo(f"delivered:          {current.delivered}")
    click.echo(f"last delivery:      {last_delivery}")
    click.echo(f"dead letters:       {current.dead}")
    click.echo(f"last error:         {last_error}")
    click.echo(f"sending:            {'PAUSED (flask cio-rudder resume)' if current.paused else 'on'}")


@cli.command("pause")
def pause() -> None:
    """Stop sending in every process and worker (for RudderStack maintenance); events are still accepted."""
    outbox = outbox_of_current_app()
    _store_call(outbox.pause)
    click.echo(f"sending is paused for {outbox.url}: events are accepted and kept; `resume` sends them")


@cli.command("resume")
def resume() -> None:
    """Start sending again after `pause`."""
    outbox = outbox_of_current_app()
    _store_call(outbox.resume)
    click.echo(f"sending resumed for {outbox.url}")


def _timeout_option(default: float, help: str) -> Callable[[F], F]:
    """``--timeout``: seconds above zero."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=help,
    )


@cli.command("flush")
@_timeout_option(30.0, "Give up after this many seconds.")
def flush(timeout: float) -> None:
    """Send what is pending now, from this process; exit 1 if some is still pending, saying why."""
    report = outbox_of_current_app().flush(timeout)
    pending = "?" if report.status is None else report.status.pending
    click.echo(f"sent {counted(report.delivered, 'event')}; {pending} still pending")
    for line in report.explain():
        click.echo(f"  {line}")
    if not report.complete:
        raise SystemExit(1)


def _describe(letter: DeadLetter) -> str:
    """One line per dead letter: id, time, event, address, reason."""
    when = datetime.fromtimestamp(letter.accepted_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")  # UTC
    note = "" if letter.requeueable else "  [rejected at validation: cannot be requeued]"
    return (
        f"{letter.event_id}  {when}  {letter.event_name or '-'}  {letter.email or '-'}  {letter.reason}{note}"
    )


@cli.command("dead-letters")
@match_options
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="List at most this many."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, with the body when kept.")
def dead_letters(match: Match, limit: int, as_json: bool) -> None:
    """List dead letters (those that match the filters), oldest first, with their reasons."""
    outbox = outbox_of_current_app()
    letters = _store_call(lambda: outbox.dead_letters(limit, match=match, bodies=as_json))
    for letter in letters:
        click.echo(json.dumps(asdict(letter)) if as_json else _describe(letter))
    if as_json:  # JSON lines only, for scripts
        return
    if not letters:
        click.echo("no dead letters" if match.everything else "no dead letters match")
    elif len(letters) == limit:
        more = _store_call(outbox.count_dead_letters, match) - limit
        if more > 0:
            click.echo(f"... and {more} more (--limit)")


def _one_letter(outbox: Outbox, event_id: str) -> list[DeadLetter]:
    return outbox.dead_letters(1, match=Match(event_id=event_id), bodies=False)


def _confirm(
    question: str, yes: bool, count: int | None = None, recount: Callable[[], int] | None = None
) -> None:
    """Ask before a destructive step unless ``--yes``; aborts (exit 1) on no, or when nobody can answer.

    With ``recount``, also when it no longer gives ``count``: the operator agreed to that number of
    dead letters, and more may have come while the question waited.
    """
    if yes:
        return
    click.confirm(question, abort=True)
    if recount is not None:
        now = _store_call(recount)
        if now != count:
            click.echo(f"{now} match now, not the {count} you confirmed: nothing was changed; run it again.")
            raise SystemExit(1)


@cli.command("requeue")
@click.argument("event_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Requeue every dead letter.")
@match_options
@click.option("--dry-run", is_flag=True, help="Say what would be requeued; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def requeue(event_ids: tuple[str, ...], everything: bool, match: Match, dry_run: bool, yes: bool) -> None:
    """Send dead letters again: those named, those that match the filters, or all with --all.

    Bodies rejected at validation have nothing to send and stay dead letters.
    """
    chosen = sum((bool(event_ids), everything, not match.everything))
    if chosen != 1:
        raise click.UsageError(
            "use one of: event ids, --all, or filters (--since/--reason/--event/--email)"
            if chosen
            else "name event ids, pass --all, or filter with --since/--reason/--event/--email"
        )
    outbox = outbox_of_current_app()
    ids = list(dict.fromkeys(event_ids)) or None  # each named once, however often it is given
    if ids is None:
        sendable = replace(match, sendable=True)
        shown = _store_call(lambda: outbox.dead_letters(100, match=sendable, bodies=False))
        count = _store_call(outbox.count_dead_letters, sendable)
        others = _store_call(outbox.count_dead_letters, match) - count
        what = "every dead letter" if everything else "the dead letters that match"
    else:
        letters = [letter for event_id in ids for letter in _store_call(_one_letter, outbox, event_id)]
        shown = [letter for letter in letters if letter.requeueable]
        count, others = len(shown), len(letters) - len(shown)
        what = "these dead letters"
        unknown = sorted(set(ids) - {letter.event_id for letter in letters})
        if unknown:
            click.echo(f"not dead letters (nothing to requeue): {', '.join(unknown)}")
    left = f"; {counted(others, 'rejected body', 'rejected bodies')} cannot be sent" if others else ""
    if dry_run:
        for letter in shown:
            click.echo(_describe(letter))
        if count > len(shown):
            click.echo(f"... and {count - len(shown)} more")
        click.echo(f"would requeue {counted(count, 'event')}{left}")
        return
    if not count:
        click.echo(f"requeued 0 events: nothing matches that can be sent{left}")
        if ids:  # named ids that are not there to send: a script should know
            raise SystemExit(1)
        return
    recount = None if ids else lambda: outbox.count_dead_letters(sendable)  # named ids cannot grow
    _confirm(
        f"Requeue {counted(count, 'event')} ({what}) to be sent to RudderStack again?", yes, count, recount
    )
    requeued = _store_call(lambda: outbox.requeue(ids, match=None if everything or ids else match))
    click.echo(f"requeued {counted(requeued, 'event')}{left}")


@cli.command("purge")
@click.option(
    "--older-than", "older_than", help="Delete delivered events delivered longer ago (30d, 12h, 90m, 3600s)."
)
@click.option(
    "--dead-letters", "dead", is_flag=True, help="Delete dead letters (those that match the filters)."
)
@match_options
@click.option("--dry-run", is_flag=True, help="Say how many would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(older_than: str | None, dead: bool, match: Match, dry_run: bool, yes: bool) -> None:
    """Delete delivered events older than --older-than, or dead letters with --dead-letters.

    Deleted events are forgotten: Customer.io sending one again would be accepted again.
    """
    if older_than is not None and dead:
        raise click.UsageError("pass --older-than AGE or --dead-letters, not both: run purge once for each")
    if older_than is None and not dead:
        raise click.UsageError(
            "pass --older-than AGE (delivered events) or --dead-letters (with any filters)"
        )
    if not dead and not match.everything:
        raise click.UsageError("--since/--reason/--event/--email filter dead letters: add --dead-letters")
    outbox = outbox_of_current_app()
    if older_than is not None:
        age = _parsed(ages.parse_age, older_than, "--older-than")
        counted_at = time.monotonic()
        old = _store_call(outbox.count_delivered, age)
        if dry_run or not old:
            click.echo(
                f"would purge {counted(old, 'event')} delivered more than {older_than} ago"
                if dry_run
                else f"purged 0 delivered events: none was delivered more than {older_than} ago"
            )
            return
        _confirm(f"Delete the {counted(old, 'event')} delivered more than {older_than} ago?", yes)
        # Those delivered before the moment counted, not also those the wait for an answer made old.
        count = _store_call(outbox.purge_delivered, age + (time.monotonic() - counted_at))
        click.echo(f"purged {counted(count, 'delivered event')}")
        return
    matching = _store_call(outbox.count_dead_letters, match)
    if dry_run or not matching:
        click.echo(
            f"would purge {counted(matching, 'dead letter')}"
            if dry_run
            else "purged 0 dead letters: none match"
        )
        return
    _confirm(
        f"Delete {counted(matching, 'dead letter')} for good?",
        yes,
        matching,
        lambda: outbox.count_dead_letters(match),
    )
    count = _store_call(outbox.purge_dead, match)
    click.echo(f"purged {counted(count, 'dead letter')}")


@cli.command("create-table")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
def create_table(print_sql: bool) -> None:
    """Create the outbox's tables now (they are also created on first use), or print their SQL."""
    outbox = outbox_of_current_app(making=True)
    if print_sql:
        click.echo(outbox.store.schema_sql(), nl=False)
        return
    _store_call(outbox.store.create_tables)
    click.echo(f"the outbox's tables are ready in {outbox.url} (table {outbox.store.table})")


@cli.command("copy-pending")
@click.argument("source_url")
@click.option("--table", default=None, help="The source's table, if not its backend's default.")
def copy_pending(source_url: str, table: str | None) -> None:
    """Copy the pending events of another outbox (e.g. the old SQLite file) into this app's outbox.

    Safe to run again: events already here are skipped. The source is only read, except that
    an SQLite source first takes in what its stopped processes left in its spool.
    """
    outbox = outbox_of_current_app(making=True)  # a new outbox is what events are moved to
    try:
        if source_url.lower().startswith("sqlite:"):
            path = sqlite_path(source_url, current_app.instance_path)
            if not os.path.isfile(path):
                problem = "a folder, not an SQLite file" if os.path.isdir(path) else "which does not exist"
                raise click.ClickException(f"SOURCE_URL names {path}, {problem}: check the path")
        source = store_from_url(
            source_url, instance_path=current_app.instance_path, table=table, create=False
        )
    except RuntimeError as error:  # the store's checks name the app's settings: say which argument
        if "CIO_RUDDER_OUTBOX_TABLE" in str(error):
            message = str(error).replace("CIO_RUDDER_OUTBOX_TABLE", "--table")
            raise click.BadParameter(message, param_hint="--table") from None
        message = str(error).replace("CIO_RUDDER_OUTBOX_URL", "SOURCE_URL")
        raise click.BadParameter(message, param_hint="SOURCE_URL") from None
    try:
        if not _store_call(source.has_tables):  # never made here: a mistyped table would copy nothing
            raise click.ClickException(
                f"{source.url} has no outbox table {source.table!r}: name the source's table with --table"
            )
        spool = spool_for(source, durability="process-crash")
        spooled = 0 if spool is None else _store_call(spool.move)
        copied, seen = _store_call(outbox.copy_pending_from, source)
        left = _store_call(source.status)
    finally:
        source.close()
    if spooled:
        click.echo(
            f"moved {counted(spooled, 'event')} that stopped processes left in {source.url}'s spool "
            "into it first"
        )
    click.echo(
        f"copied {counted(copied, 'pending event')} from {source.url} to {outbox.url} ({seen} already there)"
    )
    if left.dead:
        click.echo(f"the source still holds {counted(left.dead, 'dead letter')}, not copied")


@cli.command("worker")
def worker() -> None:
    """Run the sender in this process until SIGTERM or SIGINT, logging what it delivers.

    Use it with CIO_RUDDER_OUTBOX_SENDER = False in the web app, so that web workers only
    write to the outbox. On SIGTERM it sends what it can within CIO_RUDDER_SHUTDOWN_TIMEOUT.
    """
    outbox = outbox_of_current_app(keep_sender=True, making=True)  # may start before any web process
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        logger.info("Received %s: sending what can be sent, then stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("Sending the outbox %s to RudderStack (pid %d)", outbox.url, os.getpid())
    outbox.run_worker(stopping)
    logger.info("Stopped")


@cli.command("replay")
@click.argument("file", type=click.File("r", encoding="utf-8", errors="surrogateescape"))
@click.option(
    "--signals", "announce", is_flag=True, help="Send the extension's signals, as the webhook does."
)
def replay_command(file: Any, announce: bool) -> None:
    """Feed Customer.io webhook bodies from FILE (one JSON object per line, or a JSON array) through the
    webhook's validation, transform, deduplication and outbox, without signals unless --signals.

    For backfills and for re-driving events from logs. Events already accepted are skipped as duplicates,
    so running a file twice is safe.
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    forwarder = state_of(app).forwarder
    if isinstance(forwarder, OutboxForwarder):
        forwarder.outbox.sender.stop(flush=False)  # the app's own senders deliver what this keeps
        _note_if_new(forwarder.outbox)
    try:
        bodies = read_bodies(file.read())
    except ValueError as error:
        raise click.ClickException(f"cannot read {file.name}: {error}") from None
    with click.progressbar(bodies, label="replaying", show_pos=True) as progress:
        try:
            summary = replay(app, progress, announce=announce)
        except ReplayStopped as stopped:
            _report_replay(stopped.summary, file.name, announce, isinstance(forwarder, OutboxForwarder))
            raise click.ClickException(
                f"stopped at {stopped}. The bodies before it are done: once that is mended, replay "
                "the file again (they are skipped as duplicates)."
            ) from None
    _report_replay(summary, file.name, announce, isinstance(forwarder, OutboxForwarder))
    if summary.malformed:
        raise click.ClickException(
            "some bodies were left out: the file needs one JSON object per line (`jq -c .` writes a "
            "pretty-printed file so) or one JSON array"
        )


def _report_replay(summary: ReplaySummary, name: str, announce: bool, kept: bool) -> None:
    """What a replay did, by outcome, with the reasons for rejections and the lines left out."""
    rejected = sum(summary.rejected.values())
    click.echo(
        f"{counted(summary.total, 'body', 'bodies')} from {name}: {summary.accepted} accepted, "
        f"{summary.duplicate} duplicate, {rejected} rejected, "
        f"{counted(len(summary.malformed), 'not a JSON object', 'not JSON objects')}"
        + ("" if announce else " (no signals sent; --signals sends them)")
    )
    if rejected:
        click.echo(
            "rejected (kept as dead letters):" if kept else "rejected (not kept: the app has no outbox):"
        )
        for reason, count in summary.rejected.most_common():
            click.echo(f"  {count:>6}  {reason}")
    if summary.malformed:
        click.echo("not JSON objects (left out):")
        for where in summary.malformed[:20]:
            click.echo(f"  {where}")
        if len(summary.malformed) > 20:
            click.echo(f"  ... and {len(summary.malformed) - 20} more")


@cli.command("send-test")
@click.argument("url")
@_timeout_option(10.0, "Seconds to wait for each answer.")
def send_test(url: str, timeout: float) -> None:
    """Post the six sample email events, signed with CIO_RUDDER_SIGNING_KEY, to a deployed webhook URL
    and report each answer: the check to run after deploying, before pointing Customer.io at it.

    Exit 1 unless all six are accepted.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(
            "give the deployed webhook's http(s) URL, such as https://app.example.com/webhooks/customerio",
            param_hint="URL",
        )
    keys = state_of(current_app._get_current_object()).signing_keys  # type: ignore[attr-defined]
    click.echo(f"posting the six sample email events to {url}")
    click.echo(
        "  signed with CIO_RUDDER_SIGNING_KEY" + (" (the first key of the list)" if len(keys) > 1 else "")
        if keys
        else "  unsigned: CIO_RUDDER_SIGNING_KEY is not set"
    )
    click.echo(
        "  each with a fresh event_id, so each run is new events, not duplicates: an app that forwards\n"
        "  them sends six sample events (customers 42 to 45) to RudderStack"
    )
    answers = send_samples(url, keys[0] if keys else None, timeout=timeout)
    for answer in answers:
        code = "-" if answer.status_code is None else str(answer.status_code)
        click.echo(f"  email_{answer.metric:<13} {code:>3}  {answer.outcome}  ({answer.event_id})")
    accepted = sum(answer.ok for answer in answers)
    if any(answer.status_code == 401 for answer in answers):
        click.echo("the webhook refused the signature: is CIO_RUDDER_SIGNING_KEY the same here and there?")
    if any(answer.outcome.startswith("a redirect to ") for answer in answers):
        click.echo(
            "the webhook redirected, which Customer.io takes for a failure: post to the URL it leads to, or "
            "let the webhook through the app's login hook (skip it where request.blueprint == 'cio_rudder')"
        )
    if any(answer.status_code in (404, 405) for answer in answers):
        click.echo(
            "no webhook answers at that URL: is its path the app's CIO_RUDDER_WEBHOOK_PATH "
            f"({current_app.config['CIO_RUDDER_WEBHOOK_PATH']} here)?"
        )
    if accepted != len(answers):
        raise click.ClickException(f"{accepted} of {len(answers)} accepted")
    click.echo(f"OK: {accepted} of {len(answers)} accepted")
