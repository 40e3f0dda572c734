"""A service process ends within a bounded time after SIGTERM, whatever its start or stop is doing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from timbre_common.logging import configure_logging
    from timbre_common.runtime import serve_until_signalled

    MODE = sys.argv[1]

    class Service:
        async def start(self):
            if MODE == "stuck_start":
                await asyncio.Event().wait()
            print("started", flush=True)

        async def stop(self):
            if MODE == "stuck_stop":
                await asyncio.Event().wait()
            if MODE == "blocking_stop":
                time.sleep(3600)  # the event loop itself is stuck

    configure_logging("test", "INFO")
    asyncio.run(serve_until_signalled(Service(), timeout_s=1.0))
    print("clean exit", flush=True)
""")


def _run(mode: str, *, wait_started: bool) -> tuple[int, float, str]:
    """Start a service in `mode`, SIGTERM it; its exit status, the seconds it took and its output."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    if wait_started:
        while "started" not in proc.stdout.readline():
            pass
    else:
        time.sleep(2.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{mode}: SIGTERM ignored for 20 s")
    return proc.returncode, time.monotonic() - sent, out


def test_a_clean_stop_exits_zero():
    code, _, out = _run("clean", wait_started=True)
    assert code == 0 and "clean exit" in out


def test_a_signal_during_a_stuck_start_is_obeyed():
    code, _, out = _run("stuck_start", wait_started=False)
    assert code == 0 and "service_start_abandoned" in out


def test_a_stop_that_hangs_is_cut_off():
    code, _, out = _run("stuck_stop", wait_started=True)
    assert code == 1 and "service_stop_timed_out" in out


def test_an_event_loop_blocked_during_stop_is_cut_off_by_the_watchdog():
    code, _, out = _run("blocking_stop", wait_started=True)
    assert code == 1 and "service_stop_watchdog_fired" in out
