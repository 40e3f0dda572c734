"""`make up`'s supervisor: a dead service is restarted with back-off, loudly; a crash loop stops everything."""
from __future__ import annotations

import itertools

from timbre_common.supervisor import Supervisor


class Proc:
    pid_counter = itertools.count(100)

    def __init__(self) -> None:
        self.pid = next(self.pid_counter)
        self.returncode: int | None = None


class FakePlatform:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.processes: dict[str, Proc] = {}
        self.starts: list[str] = []

    def start(self, name: str) -> Proc:
        self.processes[name] = Proc()
        self.starts.append(name)
        return self.processes[name]

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    def exited(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.processes.items() if p.returncode is not None}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def setup(**kwargs) -> tuple[Supervisor, FakePlatform, Clock, list[str]]:
    platform, clock, said = FakePlatform(("voices", "gateway")), Clock(), []
    sup = Supervisor(platform, clock=clock, say=said.append, **kwargs)  # type: ignore[arg-type]
    sup.start_all()
    return sup, platform, clock, said


def test_a_dead_service_is_restarted_after_a_growing_back_off_and_the_others_keep_running():
    sup, platform, clock, said = setup(backoff_s=1.0, restart_limit=5, window_s=120)
    gateway = platform.processes["gateway"]
    for expected_delay in (1, 2, 4):
        clock.now += 5
        platform.processes["voices"].returncode = -9
        sup.poll()
        assert "voices died (killed by signal 9)" in said[-1] and f"restarting in {expected_delay}s" in said[-1]
        clock.now += expected_delay - 0.5
        sup.poll()
        assert platform.exited() == {"voices": -9}  # not yet
        clock.now += 0.5
        sup.poll()
        assert platform.exited() == {} and said[-1].startswith("voices restarted")
    assert platform.processes["gateway"] is gateway
    assert platform.starts.count("voices") == 4 and platform.starts.count("gateway") == 1
    assert sup.crash_loop is None


def test_a_service_that_ran_stably_starts_its_back_off_again():
    sup, platform, clock, said = setup(backoff_s=1.0, stable_s=60)
    for _ in range(3):
        clock.now += 100  # ran longer than stable_s before it died
        platform.processes["voices"].returncode = 1
        sup.poll()
        clock.now += 1
        sup.poll()
    assert all("restarting in 1s" in line for line in said if "died" in line)
    assert sup.crash_loop is None


def test_a_crash_loop_stops_the_platform():
    sup, platform, clock, said = setup(backoff_s=0.1, restart_limit=3, window_s=60)
    for _ in range(4):
        platform.processes["gateway"].returncode = 1
        sup.poll()
        clock.now += 1
        sup.poll()
    assert sup.crash_loop == "gateway"
    assert "crash loop" in said[-1]
