"""Runs the whole platform as local processes (`make up`), and lets tests start, kill and restart them.

`python -m timbre_common.supervisor` starts every service in the foreground. A service that dies is restarted
with back-off (1 s, 2 s, 4 s ... 30 s), loudly; the others keep running. Ctrl-C stops them all cleanly; so
does a crash loop (one service dying RESTART_LIMIT times within RESTART_WINDOW_S), with exit status 1.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse, urlunparse

CORE_SERVICES: tuple[str, ...] = ("storage", "voices", "dispatcher", "billing", "gpu_worker", "gateway")
SERVICES: dict[str, str] = {
    "storage": "timbre_storage",
    "voices": "timbre_voices",
    "dispatcher": "timbre_dispatcher",
    "billing": "timbre_billing",
    "gpu_worker": "timbre_gpu_worker",
    "gateway": "timbre_gateway",
}
# `make up`: each service but the gateway (which serves /metrics on its API port) gets METRICS_PORT_BASE + n.
METRICS_OFFSETS: dict[str, int] = {"storage": 1, "voices": 2, "dispatcher": 3, "billing": 4, "gpu_worker": 5}


def metrics_ports(base: int) -> dict[str, int]:
    """The metrics port of each service under `make up` (none when `base` is 0)."""
    return {name: base + offset for name, offset in METRICS_OFFSETS.items()} if base else {}


def metrics_banner(gateway_port: str, ports: dict[str, int]) -> str:
    """Where each service's metrics are, for the operator starting the platform."""
    lines = [f"  gateway     http://127.0.0.1:{gateway_port}/metrics (Authorization: Bearer $ADMIN_SECRET)"]
    lines += [f"  {name:<11} http://127.0.0.1:{port}/metrics" for name, port in ports.items()]
    if not ports:
        lines.append("  (other services: METRICS_PORT_BASE=0, no metrics ports)")
    return "timbre: Prometheus metrics:\n" + "\n".join(lines)


async def ensure_database(database_url: str) -> None:
    """Create the database named in the URL when the server lacks it."""
    import asyncpg

    parsed = urlparse(database_url)
    name = parsed.path.lstrip("/") or "postgres"
    maintenance = urlunparse(parsed._replace(path="/postgres"))
    conn = await asyncpg.connect(maintenance)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await conn.close()


async def drop_database(database_url: str) -> None:
    import asyncpg

    parsed = urlparse(database_url)
    name = parsed.path.lstrip("/")
    conn = await asyncpg.connect(urlunparse(parsed._replace(path="/postgres")))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@dataclass
class Platform:
    """A set of service processes sharing one environment."""

    env: Mapping[str, str]
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=lambda: dict(SERVICES))
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start (or restart) one service."""
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = self._logs.get(name) or open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
            self._logs[name] = out
        env = {**os.environ, **self.env, **self.extra_env.get(name, {})}
        proc = subprocess.Popen([sys.executable, "-m", self.modules[name]], env=env,
                                stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start_extra(self, name: str, module: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start another process of a service under its own name (e.g. a second worker)."""
        self.modules[name] = module
        self.extra_env[name] = dict(env)
        return self.start(name)

    def start_all(self) -> None:
        for name in CORE_SERVICES:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to ack, nack or finish anything."""
        proc = self.processes[name]
        proc.kill()
        proc.wait(10)

    def stop(self, name: str, timeout: float = 20.0) -> int | None:
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def stop_all(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self._logs.values():
            log.close()

    def exited(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.processes.items() if p.poll() is not None}

    def log(self, name: str) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Supervisor:
    """Restarts dead services with back-off; gives up on a crash loop."""

    def __init__(self, platform: Platform, *, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 restart_limit: int = 5, window_s: float = 120.0, stable_s: float = 60.0,
                 clock=time.monotonic, say=None) -> None:
        self.platform = platform
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.restart_limit, self.window_s, self.stable_s = restart_limit, window_s, stable_s
        self.clock = clock
        self.say = say or (lambda text: print(f"timbre: {text}", file=sys.stderr, flush=True))
        self.started_at: dict[str, float] = {}
        self.deaths: dict[str, list[float]] = {}
        self.due: dict[str, float] = {}  # service -> when to start it again
        self.crash_loop: str | None = None

    def start_all(self) -> None:
        self.platform.start_all()
        now = self.clock()
        self.started_at = dict.fromkeys(self.platform.processes, now)

    def poll(self) -> None:
        """Notice deaths, schedule restarts, run those due; sets `crash_loop` when a service keeps dying."""
        now = self.clock()
        for name, code in self.platform.exited().items():
            if name in self.due:
                continue
            ran = now - self.started_at.get(name, now)
            deaths = [t for t in self.deaths.get(name, []) if now - t <= self.window_s]
            if ran >= self.stable_s:
                deaths = []  # it had recovered: a new death starts the back-off again
            deaths.append(now)
            self.deaths[name] = deaths
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            if len(deaths) > self.restart_limit:
                self.say(f"!!! {name} died {len(deaths)} times within {self.window_s:.0f}s ({how}): crash loop, "
                         "stopping everything")
                self.crash_loop = name
                return
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (len(deaths) - 1))
            self.say(f"!!! {name} died ({how}) after {ran:.1f}s; restarting in {delay:.0f}s "
                     f"(restart {len(deaths)} of at most {self.restart_limit} within {self.window_s:.0f}s)")
            self.due[name] = now + delay
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                self.platform.start(name)
                self.started_at[name] = self.clock()
                self.say(f"{name} restarted (pid {self.platform.processes[name].pid})")


def main() -> int:
    from .settings import CommonSettings

    settings = CommonSettings()
    asyncio.run(ensure_database(settings.database_url.get_secret_value()))
    platform = Platform(env={})
    supervisor = Supervisor(platform, restart_limit=int(os.environ.get("RESTART_LIMIT", "5")),
                            window_s=float(os.environ.get("RESTART_WINDOW_S", "120")))
    ports = metrics_ports(int(os.environ.get("METRICS_PORT_BASE", "9100") or 0))
    for name, port in ports.items():
        platform.extra_env[name] = {"METRICS_PORT": str(port)}
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum  # type: ignore[assignment]

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start_all()
    print(f"timbre: {len(SERVICES)} services starting; gateway on http://127.0.0.1:{os.environ.get('PORT', '8000')}"
          " (Ctrl-C stops everything; a service that dies is restarted)", file=sys.stderr, flush=True)
    print(metrics_banner(os.environ.get("PORT", "8000"), ports), file=sys.stderr, flush=True)
    status = 0
    while stop["signal"] is None:
        supervisor.poll()
        if supervisor.crash_loop is not None:
            status = 1
            break
        time.sleep(0.5)
    platform.stop_all()
    print("timbre: stopped", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
