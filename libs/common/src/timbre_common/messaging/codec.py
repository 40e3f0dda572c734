"""Message <-> AMQP: JSON body, or binary body with the fields in a header."""
from __future__ import annotations

import json
from datetime import datetime

import aio_pika
from pydantic import ValidationError

from .. import tracing
from ..contracts import Envelope, Message, lookup, resolve

META_HEADER = "x-timbre-meta"


class UndecodableMessage(Exception):
    """A message that no retry can ever make readable: it goes to the dead-letter queue at once."""


def encode(msg: Message, envelope: Envelope, *, body: bytes | None = None, **props: object) -> aio_pika.Message:
    """Build the AMQP message for `msg`; `body` is the binary payload of a BINARY message."""
    headers: dict[str, object] = {
        "x-version": envelope.version,
        "x-occurred-at": envelope.occurred_at.isoformat(),
    }
    if envelope.account_id:
        headers["x-account-id"] = envelope.account_id
    fields = msg.model_dump_json().encode()
    # A binary message (or any reply that carries bytes, e.g. an object's content) moves its fields to a header.
    if msg.BINARY or body is not None:
        headers[META_HEADER] = fields.decode()
        payload, content_type = body or b"", "application/octet-stream"
    else:
        payload, content_type = fields, "application/json"
    tracing.inject(headers)  # the current span's traceparent, when tracing is on
    extra_headers = props.pop("headers", None) or {}
    headers.update(extra_headers)  # type: ignore[arg-type]
    return aio_pika.Message(
        payload,
        message_id=envelope.message_id,
        type=envelope.type,
        correlation_id=envelope.correlation_id,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=envelope.occurred_at,
        headers=headers,
        **props,  # type: ignore[arg-type]
    )


def envelope_for(msg: Message, *, correlation_id: str | None, account_id: str | None,
                 message_id: str | None = None) -> Envelope:
    """A fresh envelope for a message about to be sent."""
    kwargs: dict[str, object] = {}
    if message_id:
        kwargs["message_id"] = message_id
    return Envelope(type=msg.TYPE, version=msg.VERSION, correlation_id=correlation_id,
                    account_id=account_id, **kwargs)


def decode(incoming: aio_pika.abc.AbstractIncomingMessage) -> tuple[Message, Envelope, bytes | None]:
    """Parse and validate an incoming message; UndecodableMessage when that is impossible."""
    headers = incoming.headers or {}
    type_ = incoming.type
    try:
        version = int(headers.get("x-version", 1))  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise UndecodableMessage("bad x-version header") from exc
    cls = lookup(type_ or "", version)
    try:
        meta = headers.get(META_HEADER)
        if cls is None:
            # An older version of a message this code reads in a newer one: upcast it, or give up on it.
            raw = meta if meta is not None else bytes(incoming.body)
            payload = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
            found = resolve(type_ or "", version, payload) if isinstance(payload, dict) else None
            if found is None:
                raise UndecodableMessage(f"unknown message type {type_!r} v{version}")
            cls, payload = found
            msg = cls.model_validate(payload)
            body: bytes | None = bytes(incoming.body) if meta is not None else None
        elif cls.BINARY or meta is not None:
            if isinstance(meta, bytes):
                meta = meta.decode()
            if not isinstance(meta, str):
                raise UndecodableMessage(f"{type_} without its {META_HEADER} header")
            msg = cls.model_validate_json(meta)
            body = bytes(incoming.body)
        else:
            msg = cls.model_validate_json(incoming.body)
            body = None
    except (ValidationError, ValueError, json.JSONDecodeError) as exc:
        raise UndecodableMessage(f"{type_} v{version} failed validation: {exc}") from exc
    occurred = headers.get("x-occurred-at")
    try:
        occurred_at = datetime.fromisoformat(str(occurred)) if occurred else None
    except ValueError:
        occurred_at = None
    account = headers.get("x-account-id")
    env_kwargs: dict[str, object] = {}
    if occurred_at:
        env_kwargs["occurred_at"] = occurred_at
    envelope = Envelope(
        message_id=incoming.message_id or "",
        type=cls.TYPE,
        version=cls.VERSION,
        correlation_id=incoming.correlation_id,
        account_id=str(account) if account else None,
        **env_kwargs,
    )
    return msg, envelope, body
