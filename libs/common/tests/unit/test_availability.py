"""Failures that mean "a dependency is down" are told apart from bugs, however deep they are wrapped."""
from __future__ import annotations

import asyncpg
import pytest
from aio_pika.exceptions import ChannelInvalidStateError

from timbre_common.availability import unavailable_dependency
from timbre_common.messaging import BrokerUnavailable, RemoteError, RpcTimeout


def _wrapped(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("handler failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(("exc", "dependency"), [
    (BrokerUnavailable("down"), "broker"),
    (ChannelInvalidStateError("No active transport in channel"), "broker"),
    (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), "database"),
    (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), "database"),
    (asyncpg.InterfaceError("pool is closing"), "database"),
    (ConnectionRefusedError(111, "refused"), "dependency"),
    (RpcTimeout("voices did not answer"), "service"),
    (RemoteError("service_unavailable", "x", status=503, details={"dependency": "database"}), "database"),
])
def test_unavailable_dependencies_are_named(exc: BaseException, dependency: str):
    assert unavailable_dependency(exc) == dependency
    assert unavailable_dependency(_wrapped(exc)) == dependency


@pytest.mark.parametrize("exc", [KeyError("x"), ValueError("bad"), RemoteError("not_found", "x", status=404),
                                 asyncpg.exceptions.UniqueViolationError("dup")])
def test_bugs_and_refusals_are_not_outages(exc: BaseException):
    assert unavailable_dependency(exc) is None
