"""``flask cio-rudder ...``: look at and act on the outbox from a shell."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click
from flask import current_app
from flask.cli import AppGroup

from .forwarders import OutboxForwarder

__all__ = ["cli", "outbox_of_current_app", "parse_age"]

cli = AppGroup("cio-rudder", help="Operate the outbox of Customer.io events bound for RudderStack.")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds, as seconds."""
    unit = _UNITS.get(text[-1:].lower())
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an age; use a number with s, m, h or d, like 7d") from None


def outbox_of_current_app() -> OutboxForwarder:
    forwarder = current_app.extensions["cio_rudder"].forwarder
    if not isinstance(forwarder, OutboxForwarder):
        raise click.ClickException(
            "this app does not use the outbox: set CIO_RUDDER_FORWARDER = 'outbox' to use these commands"
        )
    return forwarder


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@cli.command("status")
def status() -> None:
    """Pending, delivered and dead events, the oldest pending age and the last error."""
    current = outbox_of_current_app().status()
    last_error = current.last_error or "-"
    if current.last_error_at is not None:
        last_error += f" ({_age(time.time() - current.last_error_at)} ago)"
    click.echo(f"pending:            {current.pending}")
    click.echo(f"oldest pending age: {_age(current.oldest_pending_age)}")
    click.echo(f"delivered:          {current.delivered}")
    click.echo(f"dead letters:       {current.dead}")
    click.echo(f"last error:         {last_error}")


@cli.command("flush")
@click.option("--timeout", default=30.0, show_default=True, help="Give up after this many seconds.")
def flush(timeout: float) -> None:
    """Send what is pending now, from this process."""
    outbox = outbox_of_current_app()
    sent = outbox.flush(timeout)
    left = outbox.status().pending
    click.echo(f"sent {sent} events; {left} still pending")
    if left:
        raise SystemExit(1)


@cli.command("dead-letters")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, with the body when kept.")
def dead_letters(limit: int, as_json: bool) -> None:
    """List dead letters with their reasons, oldest first."""
    for letter in outbox_of_current_app().dead_letters(limit):
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
    count = outbox_of_current_app().requeue(None if everything else list(event_ids))
    click.echo(f"requeued {count} events")


@cli.command("purge")
@click.option("--older-than", "older_than", required=True, help="Age such as 30d, 12h or seconds.")
def purge(older_than: str) -> None:
    """Delete delivered events delivered longer ago than --older-than."""
    count = outbox_of_current_app().purge_delivered(parse_age(older_than))
    click.echo(f"purged {count} delivered events")
