"""Flask-CIO-Rudder: Customer.io reporting webhooks, verified, signalled and forwarded to RudderStack."""

from . import signals
from .event import CioEvent
from .extension import CioRudder
from .forwarders import Forwarder, ForwardError, NullForwarder, SyncForwarder
from .outbox import Outbox, OutboxForwarder, get_outbox
from .transform import InvalidEvent, transform

__all__ = [
    "CioEvent",
    "CioRudder",
    "ForwardError",
    "Forwarder",
    "InvalidEvent",
    "NullForwarder",
    "Outbox",
    "OutboxForwarder",
    "SyncForwarder",
    "get_outbox",
    "signals",
    "transform",
]

__version__ = "0.1.0"
