"""The envelope and the base classes of every message on the bus."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

REGISTRY: dict[tuple[str, int], type[Message]] = {}
# (type, version) -> a function turning that version's payload into the next version's.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}

# The closed vocabularies of the wire: a value outside them is a malformed message, not a new state.
JobStatus = Literal["pending", "ready", "failed"]
VoiceKind = Literal["system", "custom"]
UploadPurposeName = Literal["upload", "voice_clone", "stt_input", "watermark_input", "audio_job_input"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
VOICE_KINDS: tuple[str, ...] = get_args(VoiceKind)
UPLOAD_PURPOSE_NAMES: tuple[str, ...] = get_args(UploadPurposeName)


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp on the wire is UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Envelope(BaseModel):
    """What travels beside every payload (as AMQP properties and headers)."""

    model_config = ConfigDict(frozen=True)

    message_id: str = Field(default_factory=new_id)
    type: str
    version: int
    correlation_id: str | None = None
    account_id: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)


class Message(BaseModel):
    """A versioned wire message. Changes are additive; a breaking change is a new class with VERSION + 1."""

    # Unknown fields are ignored so an older consumer reads a newer producer's additive change.
    model_config = ConfigDict(frozen=True, extra="ignore")

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    # True when the message carries binary data (audio) as the AMQP body, its fields in a header.
    BINARY: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        if cls.TYPE:
            key = (cls.TYPE, cls.VERSION)
            if key in REGISTRY and REGISTRY[key] is not cls:
                raise TypeError(f"two message classes claim {cls.TYPE} v{cls.VERSION}")
            REGISTRY[key] = cls

    @classmethod
    def routing_key(cls) -> str:
        return f"{cls.TYPE}.v{cls.VERSION}"


class Event(Message):
    """Something that happened; named in the past tense."""


class Command(Message):
    """An order to one service, sent over RPC; named as an order."""


class Reply(Message):
    """The answer to a command."""


class ErrorReply(Reply):
    """A command refused or failed: a stable code, a message for people, an HTTP status hint."""

    TYPE: ClassVar[str] = "rpc.error"
    code: str
    message: str
    status: int = 500
    details: dict[str, Any] = Field(default_factory=dict)


class Ack(Reply):
    """A command done, nothing to return."""

    TYPE: ClassVar[str] = "rpc.ack"


class Ping(Command):
    """Is this service answering? Every RPC server answers it itself with Ack (health and readiness probes)."""

    TYPE: ClassVar[str] = "rpc.ping"


def lookup(type_: str, version: int) -> type[Message] | None:
    """The class registered for a wire type and version."""
    return REGISTRY.get((type_, version))


def upcaster(type_: str, from_version: int) -> Callable[[Callable[[dict[str, Any]], dict[str, Any]]],
                                                        Callable[[dict[str, Any]], dict[str, Any]]]:
    """Register how a payload of `type_` at `from_version` becomes one of `from_version + 1`.

    A breaking change is a new class with VERSION + 1 and an upcaster from the old one, so a message written
    before the change (in a queue, an outbox, a retry tier) is still read after it."""
    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        UPCASTERS[(type_, from_version)] = fn
        return fn
    return register


def resolve(type_: str, version: int, payload: dict[str, Any]) -> tuple[type[Message], dict[str, Any]] | None:
    """The class to read a payload with, upcasting it through newer versions while this code has no class for
    its own; None when neither a class nor an upcaster chain reaches one."""
    seen = 0
    while (cls := REGISTRY.get((type_, version))) is None:
        step = UPCASTERS.get((type_, version))
        if step is None or seen > 32:
            return None
        payload, version, seen = step(dict(payload)), version + 1, seen + 1
    return cls, payload
