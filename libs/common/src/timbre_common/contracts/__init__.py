"""Every wire schema of Timbre, in one place."""
from . import accounts, billing, storage, synthesis, voices, webhooks  # noqa: F401  (registers the classes)
from .base import (
    REGISTRY,
    UPCASTERS,
    Ack,
    Command,
    Envelope,
    ErrorReply,
    Event,
    Message,
    Ping,
    Reply,
    lookup,
    new_id,
    resolve,
    upcaster,
    utcnow,
)

__all__ = ["REGISTRY", "UPCASTERS", "Ack", "Command", "Envelope", "ErrorReply", "Event", "Message", "Ping", "Reply",
           "lookup", "new_id", "resolve", "upcaster", "utcnow", "accounts", "billing", "storage", "synthesis", "voices",
           "webhooks"]
