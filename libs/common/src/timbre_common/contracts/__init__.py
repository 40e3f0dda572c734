"""Every wire schema of Timbre, in one place."""
from . import accounts, billing, storage, synthesis, voices, webhooks  # noqa: F401  (registers the classes)
from .base import REGISTRY, Ack, Command, Envelope, ErrorReply, Event, Message, Ping, Reply, lookup, new_id, utcnow

__all__ = ["REGISTRY", "Ack", "Command", "Envelope", "ErrorReply", "Event", "Message", "Ping", "Reply", "lookup",
           "new_id", "utcnow", "accounts", "billing", "storage", "synthesis", "voices", "webhooks"]
