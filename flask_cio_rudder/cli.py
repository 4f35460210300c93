"""``flask cio-rudder ...``: look at and act on the outbox from a shell, or run its sender."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from .outbox import Outbox, OutboxForwarder
from .store import StoreError, store_from_url

__all__ = ["cli", "outbox_of_current_app", "parse_age"]

logger = logging.getLogger("flask_cio_rudder")

cli = AppGroup("cio-rudder", help="Operate the outbox of Customer.io events bound for RudderStack.")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds, as seconds."""
    unit = _UNITS.get(text[-1:].lower())
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an age; use a number with s, m, h or d, like 7d") from None


def outbox_of_current_app(*, keep_sender: bool = False) -> Outbox:
    """The current app's outbox; this process's own background sender is stopped unless ``keep_sender``.

    A command's process is short-lived: its sender would only race the command (and,
    at exit, spend the shutdown timeout sending) while the app's real senders run elsewhere.
    """
    forwarder = current_app.extensions["cio_rudder"].forwarder
    if not isinstance(forwarder, OutboxForwarder):
        raise click.ClickException(
            "this app does not use the outbox: set CIO_RUDDER_FORWARDER = 'outbox' to use these commands"
        )
    if not keep_sender:
        forwarder.outbox.sender.stop(flush=False)
    return forwarder.outbox


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _store_call(action: Any, *args: Any) -> Any:
    """Run a store call, turning an unreachable store into a one-line error (exit 1)."""
    try:
        return action(*args)
    except StoreError as error:
        raise click.ClickException(str(error)) from None


@cli.command("status")
def status() -> None:
    """Pending, delivered and dead events, the oldest pending age and the last error."""
    outbox = outbox_of_current_app()
    current = _store_call(outbox.status)
    last_error = current.last_error or "-"
    if current.last_error_at is not None:
        last_error += f" ({_age(time.time() - current.last_error_at)} ago)"
    click.echo(f"outbox:             {outbox.url}")
    click.echo(f"pending:            {current.pending}")
    click.echo(
        f"  held by senders:  {current.in_flight}"
        + (f" ({', '.join(current.holders)})" if current.holders else "")
    )
    click.echo(f"oldest pending age: {_age(current.oldest_pending_age)}")
    click.echo(f"delivered:          {current.delivered}")
    click.echo(f"dead letters:       {current.dead}")
    click.echo(f"last error:         {last_error}")


@cli.command("flush")
@click.option("--timeout", default=30.0, show_default=True, help="Give up after this many seconds.")
def flush(timeout: float) -> None:
    """Send what is pending now, from this process; exit 1 if some is still pending, saying why."""
    report = outbox_of_current_app().flush(timeout)
    pending = "?" if report.status is None else report.status.pending
    click.echo(f"sent {report.delivered} events; {pending} still pending")
    for line in report.explain():
        click.echo(f"  {line}")
    if not report.complete:
        raise SystemExit(1)


@cli.command("dead-letters")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, with the body when kept.")
def dead_letters(limit: int, as_json: bool) -> None:
    """List dead letters with their reasons, oldest first."""
    for letter in _store_call(outbox_of_current_app().dead_letters, limit):
        if as_json:
            click.echo(json.dumps(asdict(letter)))
        else:
            note = "" if letter.requeueable else "  [rejected at validation: cannot be requeued]"
            click.echo(f"{letter.event_id}  {letter.reason}{note}")


@cli.command("requeue")
@click.argument("event_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Requeue every dead letter.")
def requeue(event_ids: tuple[str, ...], everything: bool) -> None:
    """Send dead letters again: those named, or all with --all."""
    if bool(event_ids) == everything:
        raise click.UsageError("name event ids, or pass --all")
    count = _store_call(outbox_of_current_app().requeue, None if everything else list(event_ids))
    click.echo(f"requeued {count} events")


@cli.command("purge")
@click.option("--older-than", "older_than", required=True, help="Age such as 30d, 12h or seconds.")
def purge(older_than: str) -> None:
    """Delete delivered events delivered longer ago than --older-than."""
    age = parse_age(older_than)
    count = _store_call(outbox_of_current_app().purge_delivered, age)
    click.echo(f"purged {count} delivered events")


@cli.command("create-table")
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
def create_table(print_sql: bool) -> None:
    """Create the outbox's tables now (they are also created on first use), or print their SQL."""
    outbox = outbox_of_current_app()
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

    Safe to run again: events already here are skipped. The source is only read.
    """
    outbox = outbox_of_current_app()
    try:
        source = store_from_url(source_url, instance_path=current_app.instance_path, table=table)
    except RuntimeError as error:
        raise click.ClickException(str(error).replace("CIO_RUDDER_OUTBOX_URL", "SOURCE_URL")) from None
    try:
        copied, seen = _store_call(outbox.copy_pending_from, source)
        left = _store_call(source.status)
    finally:
        source.close()
    click.echo(
        f"copied {copied} pending events from {source.url} to {outbox.url} ({seen} were already there)"
    )
    if left.dead:
        click.echo(f"the source still holds {left.dead} dead letters; they were not copied")


@cli.command("worker")
def worker() -> None:
    """Run the sender in this process until SIGTERM or SIGINT, logging what it delivers.

    Use it with CIO_RUDDER_OUTBOX_SENDER = False in the web app, so that web workers only
    write to the outbox. On SIGTERM it sends what it can within CIO_RUDDER_SHUTDOWN_TIMEOUT.
    """
    outbox = outbox_of_current_app(keep_sender=True)
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
