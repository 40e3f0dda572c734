"""The `timbre` command line against the running platform: its help, voices, say (job, cache hit, streamed),
jobs wait, usage, --json, the config file, and the exit codes scripts rely on."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from timbre import Timbre
from timbre.cli import main
from timbre_common.audio import parse_wav

pytestmark = pytest.mark.e2e


@pytest.fixture
def cli(client, tmp_path):  # type: ignore[no-untyped-def]
    """Runs `timbre ...` with a fresh key in the environment and no config file; returns (exit code, stdout,
    stderr)."""
    env = {"TIMBRE_API_KEY": client.new_key()["api_key"], "TIMBRE_BASE_URL": client.base_url,
           "TIMBRE_CONFIG": str(tmp_path / "absent.toml"), "TIMBRE_ADMIN_SECRET": None}

    def run(*args: str, **extra_env: str | None):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(main, list(args), env={**env, **extra_env}, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    run.env = env  # type: ignore[attr-defined]
    return run


def test_help_reads_well() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    text = result.stdout
    assert text.startswith("Usage: main [OPTIONS] COMMAND [ARGS]...") or "Usage:" in text.splitlines()[0]
    for command in ("voices", "say", "jobs", "usage", "webhooks", "keys", "account"):
        assert f"  {command} " in text, command
    assert "Exit codes: 0 ok, 1 API error, 2 usage error, 3 authentication, 4 not found, 5 job failed" in \
        " ".join(text.split())
    assert "TIMBRE_API_KEY" in text and "--json" in text
    say_help = CliRunner().invoke(main, ["say", "--help"]).stdout
    assert "Speak TEXT in a voice and save the audio." in say_help
    for option in ("--voice", "--output", "--stream", "--format", "--json"):
        assert option in say_help
    # Every command has a one-line summary, none cut short in the listing.
    for group in ("voices", "jobs", "webhooks", "keys"):
        listing = CliRunner().invoke(main, [group, "--help"]).stdout
        commands = listing.split("Commands:")[1].strip().splitlines()
        assert commands and all(len(line.split(None, 1)) == 2 for line in commands), listing


def test_voices_add_ls_rm(cli, wavs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reference = tmp_path / "me.wav"
    reference.write_bytes(wavs.valid_wav(8.0))
    code, out, _ = cli("voices", "add", str(reference), "--name", "cli voice", "--text", "Words of mine.", "--json")
    assert code == 0, out
    voice = json.loads(out)
    assert voice["name"] == "cli voice" and voice["kind"] == "custom"
    code, out, _ = cli("--json", "voices", "ls")
    assert code == 0 and "cli voice" in {v["name"] for v in json.loads(out)}
    code, out, _ = cli("voices", "ls")
    assert code == 0 and "cli voice" in out and "joe" in out and "voice id" in out
    code, out, _ = cli("voices", "rm", "cli voice", "--json")
    assert code == 0 and json.loads(out) == {"deleted": voice["voice_id"]}
    code, out, _ = cli("voices", "rm", "cli voice", "--json")
    assert code == 4 and json.loads(out)["error"]["code"] == "voice_not_found"


def test_say_job_then_cache_hit_then_streamed(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = f"Hello from the command line {uuid.uuid4().hex[:8]}."
    first, second, streamed = tmp_path / "first.wav", tmp_path / "second.wav", tmp_path / "streamed.wav"
    code, out, _ = cli("say", text, "--voice", "joe", "-o", str(first), "--json")
    assert code == 0, out
    said = json.loads(out)
    assert said["cache"] == "MISS" and said["bytes"] == first.stat().st_size and said["job_id"]
    assert parse_wav(first.read_bytes()).duration_s > 1.0
    code, out, err = cli("say", text, "--voice", "joe", "-o", str(second))
    assert code == 0 and "from the cache" in err and second.read_bytes() == first.read_bytes()
    code, out, _ = cli("say", f"Streamed {text}", "--voice", "joe", "-o", str(streamed), "--stream", "--json")
    assert code == 0, out
    assert json.loads(out)["streamed"] is True and parse_wav(streamed.read_bytes()).duration_s > 1.0


def test_jobs_wait_and_usage(cli, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sdk = Timbre(cli.env["TIMBRE_API_KEY"], base_url=client.base_url)
    job = sdk.speech.create(f"Waited for on the command line {uuid.uuid4().hex[:8]}.",
                            voice=sdk.voices.find("joe").voice_id)
    code, out, _ = cli("jobs", "wait", job.job_id, "-o", str(tmp_path / "job.wav"), "--json")  # type: ignore
    assert code == 0, out
    assert json.loads(out)["status"] == "ready" and parse_wav((tmp_path / "job.wav").read_bytes()).duration_s > 1
    code, out, _ = cli("jobs", "get", job.job_id)  # type: ignore[union-attr]
    assert code == 0 and "ready" in out
    code, out, _ = cli("usage", "--json")
    assert code == 0 and json.loads(out)["billing"] == "off"


def test_config_file_and_exit_codes(cli, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config.toml"
    config.write_text(f'api_key = "{cli.env["TIMBRE_API_KEY"]}"\nbase_url = "{client.base_url}"\n')
    code, out, _ = cli("voices", "ls", "--json", TIMBRE_API_KEY=None, TIMBRE_BASE_URL=None, TIMBRE_CONFIG=str(config))
    assert code == 0 and "joe" in {v["name"] for v in json.loads(out)}
    # 2: no key anywhere; a bad option.
    code, out, _ = cli("usage", "--json", TIMBRE_API_KEY=None)
    assert code == 2 and json.loads(out)["error"]["code"] == "missing_api_key"
    assert cli("say")[0] == 2
    # 3: a key the API does not know.
    code, out, _ = cli("usage", "--json", TIMBRE_API_KEY="tb_" + "x" * 40)
    assert code == 3 and json.loads(out)["error"]["code"] == "invalid_api_key"
    # 4: no such job.
    code, out, _ = cli("jobs", "wait", str(uuid.uuid4()), "--json")
    assert code == 4 and json.loads(out)["error"]["code"] == "job_not_found"
    # 1: the API refused the request (text too long), with its code.
    code, out, _ = cli("say", "x" * 6000, "--voice", "joe", "-o", str(tmp_path / "no.wav"), "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "text_too_long"
    # 7: nothing listens there.
    code, out, _ = cli("usage", "--json", TIMBRE_BASE_URL="http://127.0.0.1:9")
    assert code == 7 and json.loads(out)["error"]["code"] == "unreachable"


def test_the_installed_command_runs(client) -> None:  # type: ignore[no-untyped-def]
    """`python -m timbre` (what the `timbre` script runs) answers as a process."""
    done = subprocess.run([sys.executable, "-m", "timbre", "health", "--json"], capture_output=True, text=True,
                          env={"TIMBRE_BASE_URL": client.base_url, "PATH": "/usr/bin:/bin",
                               "HOME": str(Path.home())}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "ok"
