"""Messaging on aio-pika: topology, publishing with confirms, consuming with a policy, RPC."""
from .bus import Bus, PgDeduper, PublishRefused
from .codec import UndecodableMessage, decode, encode, envelope_for
from .consumer import Consumer, Deduper
from .outbox import OutboxBus, TransactionalPool
from .rpc import BrokerUnavailable, Conflict, Invalid, NotFound, RemoteError, RpcClient, RpcError, RpcServer, RpcTimeout
from .topology import (
                       QUEUES,
                       RETRY_DELAYS,
                       Names,
                       QueueSpec,
                       declare_topology,
                       ensure_topology,
                       local_work_queue,
                       modal_executor_queue,
                       voice_profile_queue,
                       voice_profile_routing_key,
                       work_routing_key,
)

__all__ = ["Bus", "PgDeduper", "PublishRefused", "UndecodableMessage", "decode", "encode", "envelope_for",
           "Consumer", "Deduper", "OutboxBus", "TransactionalPool",
           "BrokerUnavailable", "Conflict", "Invalid", "NotFound", "RemoteError", "RpcClient", "RpcError",
           "RpcServer", "RpcTimeout",
           "QUEUES", "RETRY_DELAYS", "Names", "QueueSpec", "declare_topology", "ensure_topology", "local_work_queue",
           "modal_executor_queue", "voice_profile_queue", "voice_profile_routing_key", "work_routing_key"]
