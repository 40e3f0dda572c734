"""Which failures mean "a dependency is down, retry later" rather than "this request is broken"."""
from __future__ import annotations


def unavailable_dependency(exc: BaseException) -> str | None:
    """What is unreachable when `exc` says a dependency is down (`broker`, `database`, `service`...); else None.

    Such a failure answers 503 with Retry-After (HTTP) or `service_unavailable` (RPC), never `internal_error`.
    """
    import aio_pika.exceptions
    import asyncpg

    from .messaging.rpc import BrokerUnavailable, RemoteError, RpcTimeout

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BrokerUnavailable | aio_pika.exceptions.AMQPError
                      | aio_pika.exceptions.ChannelInvalidStateError):
            return "broker"
        if isinstance(exc, RpcTimeout):
            return "service"
        if isinstance(exc, RemoteError) and exc.status == 503:
            return str((exc.details or {}).get("dependency") or "service")
        if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError
                      | asyncpg.exceptions.TooManyConnectionsError):
            return "database"
        if isinstance(exc, asyncpg.InterfaceError) and ("connection" in str(exc) or "pool" in str(exc)):
            return "database"
        if isinstance(exc, ConnectionRefusedError | ConnectionResetError):
            # A socket refused or reset: asyncpg's pool connecting to a restarting server, an S3 endpoint away.
            return "dependency"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None
