"""Private RabbitMQ and PostgreSQL servers for fault tests: started in a temporary folder, restartable at will.

Fault tests restart and disconnect brokers and databases; they must never do that to the servers that other
processes on the machine share. Each server here has its own node name, ports and data directory, and is
stopped (and its directory removed) by `stop`.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

RABBIT_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, up: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} within {timeout:.0f}s")


class PrivateBroker:
    """A RabbitMQ node of its own (`timbre-fault-XXXX@localhost`) on free loopback ports."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="timbre-rabbit-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.node = f"timbre-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                                                 "loopback_users = none\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.root), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"), "RABBITMQ_LOG_BASE": str(self.root / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
                "RABBITMQ_PID_FILE": str(self.root / "pid")}

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <this node> ...`; returns its output."""
        out = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self._env(),
                             capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def start(self, timeout: float = 90.0) -> PrivateBroker:
        subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self._env(), cwd=self.root,
                       check=True, capture_output=True, timeout=30)
        # `-detached` returns before the node registers with epmd: ask until it answers.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        _wait_port(self.port, True, timeout)
        return self

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app", timeout=120)
        _wait_port(self.port, True, 60)

    def restart(self) -> None:
        """What an operator does: `stop_app; start_app` (every connection drops, durable state stays)."""
        self.stop_app()
        self.start_app()

    def close_all_connections(self, reason: str = "fault test") -> None:
        self.ctl("close_all_connections", reason)

    def close_connections_named(self, name: str, reason: str = "fault test") -> int:
        """Close the connections whose client-given name is `name`; returns how many."""
        out = self.ctl("list_connections", "pid", "client_properties", "--quiet", "--no-table-headers")
        closed = 0
        for line in out.splitlines():
            pid, _, props = line.partition("\t")
            if f'{{"connection_name","{name}"}}' in props:
                self.ctl("close_connection", pid.strip(), reason)
                closed += 1
        return closed

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except Exception:
            pid_file = self.root / "pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 9)
                except (OSError, ValueError):
                    pass
        shutil.rmtree(self.root, ignore_errors=True)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(found[-1]).parent


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary folder, trust auth, a free loopback port).

    PostgreSQL refuses to run as root: as root, the cluster belongs to and runs as the `postgres` user.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="timbre-pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.bin = _pg_bin()
        self._user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]}: {out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            if self._user:
                entry = pwd.getpwnam(self._user)
                os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync", timeout=120)
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "server.log"),
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                        "-c max_connections=300", "start", timeout=90)
        return self

    def stop(self, mode: str = "fast", remove: bool = True) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop", timeout=60)
        except Exception:
            pass
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Every connection drops; the data stays."""
        self.stop(remove=False)
        self.start()
