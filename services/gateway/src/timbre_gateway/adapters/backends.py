"""Which backends this deployment can run right now, learnt from the workers' heartbeats."""
from __future__ import annotations

import time

from timbre_common.catalogue import BACKEND_PREFERENCE
from timbre_common.contracts import Envelope
from timbre_common.contracts.synthesis import WorkerHeartbeat


class BackendRegistry:
    def __init__(self, grace: float = 3.0, clock=time.monotonic, *, warmup_s: float = 12.0) -> None:
        self.grace = grace
        self.clock = clock
        self._seen: dict[str, tuple[float, float, list[str]]] = {}
        self._started = clock()
        # Until every worker has had time to beat once, absence from the registry proves nothing.
        self.warmup_s = warmup_s

    async def on_heartbeat(self, beat: WorkerHeartbeat, *, envelope: Envelope) -> None:
        self._seen[beat.worker_id] = (self.clock(), beat.interval_s, list(beat.backends))

    def available(self) -> list[str]:
        """Backends advertised by a worker whose last beat is recent, in order of preference."""
        now = self.clock()
        live: set[str] = set()
        for seen_at, interval, backends in self._seen.values():
            if now - seen_at <= interval * self.grace:
                live.update(backends)
        return [b for b in BACKEND_PREFERENCE if b in live]

    def known_unavailable(self, backend: str) -> bool:
        """True when no worker has advertised `backend` for longer than a heartbeat cycle."""
        warm = self.clock() - self._started > self.warmup_s or bool(self._seen)
        return warm and backend not in self.available()

    def recently_lost(self, backend: str, window_s: float = 300.0) -> bool:
        """True when a worker advertised `backend` within `window_s` but none does now: a worker restarting
        (an outage to retry), not a backend this deployment lacks."""
        if backend in self.available():
            return False
        now = self.clock()
        return any(backend in backends and now - seen_at <= window_s for seen_at, _, backends in self._seen.values())

    def default_backend(self, fallback: str) -> str:
        live = self.available()
        return live[0] if live else fallback
