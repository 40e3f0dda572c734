"""Fault injection under load: the whole platform keeps its promises while its parts are killed and restarted.

    python tests/chaos/chaos.py --jobs 40 --clients 4        # `make chaos` (CI runs a small count)
    python tests/chaos/chaos.py --jobs 1000 --clients 8      # the long run

Every service runs as a process against a RabbitMQ node and a PostgreSQL cluster of the suite's own (started in
a temporary folder on free ports: restarting them disturbs nobody else). Clients submit synthesis jobs at a
steady pace, each with an Idempotency-Key they retry with until the platform answers, while the suite in turn
SIGKILLs and restarts every service, drops every broker connection, restarts the broker, and restarts
PostgreSQL. After each fault it measures how long until /v1/health says `ok` again and how long until a real
request (a new synthesis, to `ready`) goes through.

It then checks, and exits 1 if any fails: every accepted job reached a terminal state; no idempotency key got
two jobs and no text became two jobs; usage equals the characters of the ready jobs; no message was
dead-lettered; no process exited except those the suite killed (nothing needed a manual restart).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from timbre_common.catalogue import system_voice_id
from timbre_common.sandbox import PrivateBroker, PrivatePostgres, free_port
from timbre_common.supervisor import CORE_SERVICES, Platform, ensure_database

VOICE = system_voice_id("hibari", "heart")
ADMIN = "chaos-admin-" + secrets.token_hex(12)
TERMINAL = ("ready", "failed")


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass
class Submission:
    key: str  # Idempotency-Key
    text: str
    account: str
    job_ids: set[str] = field(default_factory=set)
    attempts: int = 0
    accepted_at: float | None = None
    abandoned: bool = False
    refused: str | None = None


@dataclass
class Recovery:
    fault: str
    health_s: float | None = None
    request_s: float | None = None
    degraded_seen: bool = False


class Load:
    """Clients submitting jobs at a steady pace, each retrying with its Idempotency-Key until accepted."""

    def __init__(self, base: str, keys: list[dict], *, jobs: int, spread_s: float, give_up_s: float) -> None:
        self.base = base
        self.keys = keys
        self.jobs = jobs
        self.interval = max(0.05, spread_s * len(keys) / max(1, jobs))
        self.give_up_s = give_up_s
        self.submissions: list[Submission] = []
        self.statuses: dict[int, int] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in keys]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.jobs:
                return None
            self._next += 1
            return self._next

    def _client(self, key: dict) -> None:
        http = httpx.Client(base_url=self.base, timeout=40)
        auth = {"Authorization": f"Bearer {key['api_key']}"}
        while (n := self._take()) is not None:
            sub = Submission(key=f"chaos-{uuid.uuid4().hex}", text=f"Chaos check {n}, {uuid.uuid4().hex[:6]}.",
                             account=key["account_id"])
            with self._lock:
                self.submissions.append(sub)
            started = time.monotonic()
            while True:
                sub.attempts += 1
                status = 0
                try:
                    r = http.post("/v1/synthesize", json={"voice_id": VOICE, "text": sub.text},
                                  headers={**auth, "Idempotency-Key": sub.key})
                    status = r.status_code
                    if status in (200, 202):
                        sub.job_ids.add(r.json()["job_id"] if status == 202 else r.headers["X-Job-Id"])
                        sub.accepted_at = time.monotonic()
                except httpx.HTTPError:
                    pass
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                if sub.accepted_at is not None:
                    break
                if 400 <= status < 500 and status not in (408, 409, 429):
                    sub.refused = f"{status} {r.text[:200]}"
                    say(f"job {n}: refused ({sub.refused})")
                    break
                if time.monotonic() - started > self.give_up_s:
                    sub.abandoned = True
                    break
                time.sleep(0.5 + random.random())
            # A second answer for the same key must name the same job (idempotency across crashes).
            if sub.accepted_at is not None:
                try:
                    again = http.post("/v1/synthesize", json={"voice_id": VOICE, "text": sub.text},
                                      headers={**auth, "Idempotency-Key": sub.key})
                    if again.status_code == 202:
                        sub.job_ids.add(again.json()["job_id"])
                    elif again.status_code == 200:
                        sub.job_ids.add(again.headers["X-Job-Id"])
                except httpx.HTTPError:
                    pass
            time.sleep(self.interval)
        http.close()


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="timbre-chaos-"))
        self.root.chmod(0o755)  # the database server runs as `postgres` when this runs as root
        self.broker = PrivateBroker(self.root / "rabbit")
        self.postgres = PrivatePostgres(self.root / "pg")
        self.namespace = f"chaos{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.platform: Platform | None = None
        self.recoveries: list[Recovery] = []
        self.unplanned_exits: list[str] = []
        self.probe_key: dict | None = None
        self.probe_jobs: list[str] = []
        self.keys: list[dict] = []
        self.samples: list[tuple[float, bool]] = []
        self._watching = threading.Event()

    # Setup ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        say(f"private broker and database under {self.root}")
        self.broker.start()
        self.postgres.start()
        db_url = self.postgres.url_for("timbre")
        asyncio.run(ensure_database(db_url))
        env = {
            "TIMBRE_ENV": "test", "DATABASE_URL": db_url, "AMQP_URL": self.broker.url,
            "BUS_NAMESPACE": self.namespace, "PORT": str(self.port), "ADMIN_SECRET": ADMIN,
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}", "MODAL_CALLBACK_SECRET": secrets.token_hex(16),
            "STORAGE_BACKEND": "fs", "STORAGE_ROOT": str(self.root / "blobs"),
            "STORAGE_PUBLIC_URL": f"http://127.0.0.1:{free_port()}", "STORAGE_SIGNING_KEY": secrets.token_hex(32),
            "BILLING": "off", "BACKENDS": "embedded", "HEARTBEAT_INTERVAL_S": "1", "SWEEP_INTERVAL_S": "2",
            "JOB_DEADLINE_S": str(self.args.job_deadline_s), "JOB_MAX_ATTEMPTS": "5",
            "GATEWAY_SWEEP_INTERVAL_S": "5", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
            "RATE_LIMIT_PER_MINUTE": "100000", "MAX_CONCURRENT_REQUESTS": "64",
        }
        self.platform = Platform(env=env, log_dir=self.root / "logs")
        self.platform.start_all()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        self._wait_health(time.monotonic(), limit_s=300)
        say("platform healthy")

    def stop(self) -> None:
        if self.platform is not None:
            self.platform.stop_all()
        self.broker.stop()
        self.postgres.stop()

    def new_key(self, label: str) -> dict:
        r = self.http.post("/v1/keys", json={"label": label, "rate_per_minute": 100000, "max_concurrent": 64},
                           headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        return r.json()

    # Measurements --------------------------------------------------------------------------------------
    def _health_ok(self) -> bool:
        try:
            r = self.http.get("/v1/health", timeout=5)
            return r.status_code == 200 and r.json()["status"] == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    def _wait_health(self, since: float, limit_s: float) -> float | None:
        while time.monotonic() - since < limit_s:
            if self._health_ok():
                return time.monotonic() - since
            time.sleep(0.2)
        return None

    def _real_request(self, since: float, limit_s: float) -> float | None:
        """Seconds until a synthesis submitted now is accepted and ready (each try a new text)."""
        assert self.probe_key is not None
        auth = {"Authorization": f"Bearer {self.probe_key['api_key']}"}
        while time.monotonic() - since < limit_s:
            text = f"Probe {uuid.uuid4().hex[:8]} speaks."
            try:
                r = self.http.post("/v1/synthesize", json={"voice_id": VOICE, "text": text}, headers=auth, timeout=10)
            except httpx.HTTPError:
                time.sleep(0.3)
                continue
            if r.status_code != 202:
                time.sleep(0.3)
                continue
            job_id = r.json()["job_id"]
            self.probe_jobs.append(job_id)
            tried = time.monotonic()
            while time.monotonic() - tried < 20:
                try:
                    j = self.http.get(f"/v1/jobs/{job_id}", headers=auth, timeout=5)
                    if j.status_code == 200 and j.json()["status"] == "ready":
                        return time.monotonic() - since
                    if j.status_code == 200 and j.json()["status"] == "failed":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        return None

    def _watch_health(self) -> None:
        """Sample /v1/health all along (its own client, its own thread): faults are timed from the samples."""
        http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5)
        while not self._watching.is_set():
            try:
                r = http.get("/v1/health")
                ok = r.status_code == 200 and r.json()["status"] == "ok"
            except (httpx.HTTPError, ValueError):
                ok = False
            self.samples.append((time.monotonic(), ok))
            time.sleep(0.2)
        http.close()

    def _health_recovery(self, since: float) -> tuple[bool, float | None]:
        """(whether health dipped after `since`, seconds from `since` until it was ok for good)."""
        samples = [(t, ok) for t, ok in list(self.samples) if t >= since]
        bad = [i for i, (_, ok) in enumerate(samples) if not ok]
        if not bad:
            return False, 0.0
        after = [t for t, ok in samples[bad[-1]:] if ok]
        return True, (after[0] - since) if after else None

    def _measure(self, fault: str, since: float) -> None:
        limit = self.args.recovery_limit_s
        request = self._real_request(since, limit)
        # Health may lag the fault (worker heartbeats have a grace of a few beats): give the dip time to show.
        time.sleep(max(0.0, self.args.observe_s - (time.monotonic() - since)))
        self._wait_health(time.monotonic(), limit)
        time.sleep(0.5)
        degraded, health = self._health_recovery(since)
        rec = Recovery(fault, health, request, degraded)
        self.recoveries.append(rec)
        say(f"{fault}: health {'ok after ' + _fmt(health) if degraded else 'never degraded'}, "
            f"a real request after {_fmt(request)}")

    def _check_exits(self, fault: str, expected: set[str]) -> None:
        assert self.platform is not None
        for name, code in self.platform.exited().items():
            if name not in expected:
                self.unplanned_exits.append(f"{name} exited ({code}) during {fault}")
                say(f"!!! {name} exited with {code} during {fault}; restarting it")
                self.platform.start(name)

    # Faults --------------------------------------------------------------------------------------------
    def kill_and_restart(self, name: str) -> None:
        assert self.platform is not None
        say(f"SIGKILL {name}")
        since = time.monotonic()
        self.platform.kill(name)
        self.platform.start(name)  # what an orchestrator (or `make up`'s supervisor) does
        self._measure(f"SIGKILL {name}", since)
        self._check_exits(f"SIGKILL {name}", set())

    def drop_connections(self) -> None:
        say("close_all_connections on the broker")
        since = time.monotonic()
        self.broker.close_all_connections("chaos")
        self._measure("broker connections dropped", since)
        self._check_exits("broker connections dropped", set())

    def restart_broker(self) -> None:
        say("broker stop_app; start_app")
        since = time.monotonic()
        self.broker.stop_app()
        time.sleep(self.args.outage_s)
        self.broker.start_app()
        self._measure("broker restarted", since)
        self._check_exits("broker restarted", set())

    def restart_postgres(self) -> None:
        say("PostgreSQL restart")
        since = time.monotonic()
        self.postgres.stop(remove=False)
        time.sleep(self.args.outage_s)
        self.postgres.start()
        self._measure("PostgreSQL restarted", since)
        self._check_exits("PostgreSQL restarted", set())

    # The run -------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        self.probe_key = self.new_key("probe")
        keys = self.keys = [self.new_key(f"client-{i}") for i in range(self.args.clients)]
        load = Load(f"http://127.0.0.1:{self.port}", keys, jobs=self.args.jobs, spread_s=self.args.spread_s,
                    give_up_s=self.args.give_up_s)
        started = time.monotonic()
        threading.Thread(target=self._watch_health, daemon=True).start()
        load.start()
        time.sleep(self.args.settle_s)
        for name in CORE_SERVICES:
            self.kill_and_restart(name)
            time.sleep(self.args.settle_s)
        self.drop_connections()
        time.sleep(self.args.settle_s)
        self.restart_broker()
        time.sleep(self.args.settle_s)
        self.restart_postgres()
        say("faults done; waiting for the clients to finish submitting")
        load.join()
        self._watching.set()
        submitted_s = time.monotonic() - started
        return self.verify(load, submitted_s)

    def verify(self, load: Load, submitted_s: float) -> int:
        failures: list[str] = []
        accepted = [s for s in load.submissions if s.accepted_at is not None]
        abandoned = [s for s in load.submissions if s.abandoned]
        say(f"{len(load.submissions)} submissions, {len(accepted)} accepted, {len(abandoned)} abandoned; "
            f"answers {dict(sorted(load.statuses.items()))}")
        doubled = [s for s in accepted if len(s.job_ids) != 1]
        if doubled:
            failures.append(f"{len(doubled)} idempotency keys answered with different jobs: "
                            f"{[(s.key, sorted(s.job_ids)) for s in doubled[:5]]}")
        refused = [s for s in load.submissions if s.refused]
        if refused:
            failures.append(f"{len(refused)} valid submissions refused with a 4xx: {[s.refused for s in refused[:3]]}")
        if abandoned:
            failures.append(f"{len(abandoned)} submissions never accepted within {self.args.give_up_s:.0f}s")
        # Every accepted job (and every probe) reaches a terminal state.
        jobs = {next(iter(s.job_ids)): s for s in accepted if s.job_ids}
        drain_started = time.monotonic()
        states = self._wait_terminal(jobs, self.args.drain_s)
        drained_s = time.monotonic() - drain_started
        not_done = {j: st for j, st in states.items() if st not in TERMINAL}
        if not_done:
            failures.append(f"{len(not_done)} accepted jobs not terminal after {self.args.drain_s:.0f}s: "
                            f"{list(not_done.items())[:5]}")
        failed = {j: st for j, st in states.items() if st == "failed"}
        ready = {j for j, st in states.items() if st == "ready"}
        rows = self._sql("SELECT text, count(*) AS n FROM dispatch.jobs GROUP BY text HAVING count(*) > 1")
        if rows:
            failures.append(f"{len(rows)} texts became more than one job: {[r['text'] for r in rows[:5]]}")
        # Usage equals the characters of the ready jobs, per account.
        for key in load.keys:
            expected = sum(len(s.text) for j, s in jobs.items() if j in ready and s.account == key["account_id"])
            used = self._usage(key)
            if used != expected:
                failures.append(f"account {key['account_id']}: usage {used} != {expected} characters ready")
        dead = self._dead_letters()
        if dead:
            failures.append(f"dead-lettered messages: {dead}")
        self._check_exits("the drain", set())
        if self.unplanned_exits:
            failures.append(f"processes exited unasked (would need a restart): {self.unplanned_exits}")
        if not self._health_ok():
            failures.append("the platform is not healthy at the end")
        self._report(load, accepted, ready, failed, submitted_s, drained_s)
        for f in failures:
            say(f"FAIL {f}")
        say("PASS" if not failures else f"{len(failures)} check(s) failed; logs in {self.root / 'logs'}")
        return 0 if not failures else 1

    def _wait_terminal(self, jobs: dict[str, Submission], limit_s: float) -> dict[str, str]:
        keys = {k["account_id"]: k for k in self.keys}
        states: dict[str, str] = {}
        deadline = time.monotonic() + limit_s
        pending = set(jobs)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                key = keys[jobs[job_id].account]
                try:
                    r = self.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key['api_key']}"})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    states[job_id] = r.json()["status"]
                    if states[job_id] in TERMINAL:
                        pending.discard(job_id)
            if pending:
                time.sleep(1)
        return states

    def _usage(self, key: dict) -> int | None:
        r = self.http.get("/v1/usage", headers={"Authorization": f"Bearer {key['api_key']}"})
        return r.json().get("characters_used") if r.status_code == 200 else None

    def _sql(self, query: str) -> list:
        import asyncpg

        async def run() -> list:
            conn = await asyncpg.connect(self.postgres.url_for("timbre"))
            try:
                return await conn.fetch(query)
            finally:
                await conn.close()

        return asyncio.run(run())

    def _dead_letters(self) -> dict[str, int]:
        out = self.broker.ctl("list_queues", "name", "messages", "--quiet", "--no-table-headers")
        dead: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0].startswith(self.namespace) and parts[0].endswith(".dlq"):
                if int(parts[1]):
                    dead[parts[0]] = int(parts[1])
        return dead

    def _report(self, load: Load, accepted: list, ready: set, failed: dict, submitted_s: float,
                drained_s: float) -> None:
        print("\nRecovery after each fault (seconds from the fault until /v1/health says ok, and until a new "
              "synthesis is ready):")
        print("| fault | health ok | real request ok |\n| --- | ---: | ---: |")
        for r in self.recoveries:
            health = _fmt(r.health_s) if r.degraded_seen else "stayed ok"
            print(f"| {r.fault} | {health} | {_fmt(r.request_s)} |")
        retries = sum(s.attempts - 1 for s in load.submissions)
        print(f"\njobs: {len(load.submissions)} submitted by {len(load.keys)} clients over {submitted_s:.0f} s, "
              f"{len(accepted)} accepted, {len(ready)} ready, {len(failed)} failed, {retries} retried submissions; "
              f"answers {dict(sorted(load.statuses.items()))}; all terminal {drained_s:.0f} s after the last "
              f"submission; probe jobs {len(self.probe_jobs)}")
        summary = {"jobs": len(load.submissions), "accepted": len(accepted), "ready": len(ready),
                   "failed": len(failed), "recoveries": [r.__dict__ for r in self.recoveries]}
        print(f"summary: {json.dumps(summary)}")


def _fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=int(os.environ.get("CHAOS_JOBS", "40")))
    p.add_argument("--clients", type=int, default=int(os.environ.get("CHAOS_CLIENTS", "4")))
    p.add_argument("--spread-s", type=float, default=120.0, help="submit the jobs over about this long")
    p.add_argument("--settle-s", type=float, default=3.0, help="pause between faults")
    p.add_argument("--outage-s", type=float, default=3.0, help="how long the broker and database stay down")
    p.add_argument("--observe-s", type=float, default=5.0, help="how long to look for health to dip after a fault")
    p.add_argument("--recovery-limit-s", type=float, default=180.0)
    p.add_argument("--give-up-s", type=float, default=300.0, help="a client stops retrying one job after this")
    p.add_argument("--job-deadline-s", type=float, default=60.0, help="JOB_DEADLINE_S of the dispatcher")
    p.add_argument("--drain-s", type=float, default=600.0, help="wait this long for accepted jobs to end")
    args = p.parse_args()
    chaos = Chaos(args)
    status = 1
    try:
        status = chaos.run()
        return status
    finally:
        chaos.stop()
        if status == 0:  # the logs are kept when something failed
            shutil.rmtree(chaos.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
