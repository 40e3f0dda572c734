"""`timbre`: the command line of the Timbre API.

Exit codes (stable, for scripts):
  0  success
  1  the API refused or failed the request (any other API error)
  2  usage error: bad arguments or options, no API key, unreadable config file
  3  authentication: missing, unknown or revoked key; suspended account (401, 403)
  4  not found: no such voice, job or webhook, or audio past its retention (404, 410)
  5  the synthesis job failed
  6  timed out waiting for a job
  7  the API could not be reached
  8  limits: the plan's quota is used up, or the key is rate limited (402, 429)
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from . import config as config_module
from ._client import Timbre
from ._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    GoneError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    TimbreError,
    WaitTimeoutError,
)
from .models import Audio, Job, Model

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_JOB_FAILED, EXIT_TIMEOUT, EXIT_UNREACHABLE, \
    EXIT_LIMIT = range(9)
WEBHOOK_EVENTS = ("job.ready", "job.failed", "voice.deleted", "account.purged")

out = Console()
err = Console(stderr=True)


class State:
    def __init__(self, *, api_key: str | None, base_url: str | None, config: Path | None, as_json: bool) -> None:
        self.flags = {"api_key": api_key, "base_url": base_url}
        self.config = config
        self.as_json = as_json
        self._client: Timbre | None = None

    def client(self) -> Timbre:
        if self._client is None:
            try:
                settings = config_module.load(api_key=self.flags["api_key"], base_url=self.flags["base_url"],
                                              path=self.config)
            except config_module.ConfigError as exc:
                raise click.UsageError(str(exc)) from None
            self._client = Timbre(settings.api_key, base_url=settings.base_url, admin_secret=settings.admin_secret)
        return self._client


def _dump(value: Any) -> Any:
    if isinstance(value, Audio):
        return value.model_dump(mode="json", exclude={"content"})
    if isinstance(value, Model):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(_dump(value), indent=2, default=str))


def _fail(state: State | None, code: int, error: str, message: str, **extra: Any) -> NoReturn:
    if state is not None and state.as_json:
        emit_json({"error": {"code": error, "message": message, **{k: v for k, v in extra.items() if v is not None}}})
    else:
        err.print(f"[bold red]error[/]: {message}" + (f" [dim]({error})[/]" if error else ""))
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map the SDK's exceptions to the documented exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = click.get_current_context().find_object(State)
        try:
            return fn(*args, **kwargs)
        except (AuthenticationError, PermissionDeniedError) as exc:
            if exc.code == "missing_api_key" and exc.request_id is None:
                _fail(state, EXIT_USAGE, exc.code, "no API key: set TIMBRE_API_KEY, pass --api-key, or put api_key "
                      f"in {config_module.config_path()}")
            _fail(state, EXIT_AUTH, exc.code, exc.message, status=exc.status, request_id=exc.request_id)
        except (NotFoundError, GoneError) as exc:
            _fail(state, EXIT_NOT_FOUND, exc.code, exc.message, status=exc.status, request_id=exc.request_id)
        except (QuotaExceededError, RateLimitError) as exc:
            _fail(state, EXIT_LIMIT, exc.code, exc.message, status=exc.status, request_id=exc.request_id)
        except APIError as exc:
            _fail(state, EXIT_API, exc.code, exc.message, status=exc.status, request_id=exc.request_id)
        except JobFailedError as exc:
            _fail(state, EXIT_JOB_FAILED, exc.code, str(exc), job_id=exc.job.job_id)
        except WaitTimeoutError as exc:
            _fail(state, EXIT_TIMEOUT, "wait_timeout", str(exc), job_id=exc.job.job_id)
        except APIConnectionError as exc:
            _fail(state, EXIT_UNREACHABLE, "unreachable", str(exc))
        except TimbreError as exc:
            _fail(state, EXIT_API, "error", str(exc))

    return wrapper


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--json` on every command (as well as before it): machine-readable output on stdout."""

    def turn_on(ctx: click.Context, _: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(State).as_json = True

    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=turn_on, is_eager=True,
                        help="Print JSON for scripts instead of tables.")(fn)


def command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    def decorate(fn: Callable[..., Any]) -> click.Command:
        return group.command(name, **kwargs)(json_option(click.pass_obj(handle_errors(fn))))
    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Exit codes: 0 ok, 1 API error, 2 usage error, 3 authentication, 4 not found, 5 job failed, "
                    "6 wait timed out, 7 API unreachable, 8 quota or rate limit.")
@click.option("--api-key", envvar="TIMBRE_API_KEY", help="API key (default: $TIMBRE_API_KEY, then the config file).")
@click.option("--base-url", envvar="TIMBRE_BASE_URL",
              help="API URL (default: $TIMBRE_BASE_URL, then the config file, then http://127.0.0.1:8000).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Config file (default: ~/.config/timbre/config.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")
@click.version_option(__version__, prog_name="timbre", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, api_key: str | None, base_url: str | None, config_file: Path | None,
         as_json: bool) -> None:
    """Clone voices and synthesize speech with the Timbre API.

    \b
      timbre voices add me.wav --name me --text "What I say in the recording."
      timbre say "Hello from Timbre." --voice me -o hello.wav
      timbre jobs wait JOB_ID
    """
    ctx.obj = State(api_key=api_key, base_url=base_url, config=config_file, as_json=as_json)


# Voices ---------------------------------------------------------------------------------------------
@main.group()
def voices() -> None:
    """Clone, list and delete voices."""


@command(voices, "add")
@click.argument("audio", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="A name to call the voice by.")
@click.option("--text", help="What is said in the recording (improves cloning).")
@click.option("--backend", help="Backend that speaks it (default: the deployment's).")
@click.option("--lang", help="Language code (default: en).")
def voices_add(state: State, audio: Path, name: str, text: str | None, backend: str | None,
               lang: str | None) -> None:
    """Clone a voice from AUDIO, a 5-60 s WAV recording."""
    voice = state.client().voices.create(audio, name=name, text=text, backend=backend, lang=lang)
    if state.as_json:
        emit_json(voice)
    else:
        out.print(f"[green]voice added[/]: {voice.name} [bold]{voice.voice_id}[/] ({voice.backend}, {voice.lang})")


@command(voices, "ls")
def voices_ls(state: State) -> None:
    """List system voices and this account's voices."""
    listed = state.client().voices.list()
    if state.as_json:
        emit_json(listed)
        return
    table = Table("voice id", "name", "kind", "backend", "lang", "created", box=None)
    for v in listed:
        table.add_row(v.voice_id, v.name, v.kind, v.backend, v.lang,
                      v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "")
    out.print(table)


@command(voices, "show")
@click.argument("voice")
def voices_show(state: State, voice: str) -> None:
    """Show VOICE (a name or an id) in full."""
    client = state.client()
    record = client.voices.get(client.voices.find(voice).voice_id)
    if state.as_json:
        emit_json(record)
    else:
        out.print_json(data=_dump(record))


@command(voices, "rm")
@click.argument("voice")
def voices_rm(state: State, voice: str) -> None:
    """Delete VOICE (a name or an id), its cached audio and its jobs."""
    client = state.client()
    found = client.voices.find(voice)
    client.voices.delete(found.voice_id)
    if state.as_json:
        emit_json({"deleted": found.voice_id})
    else:
        out.print(f"[green]voice deleted[/]: {found.name} {found.voice_id}")


# Speech ---------------------------------------------------------------------------------------------
class JobProgress:
    """A spinner on stderr with the job's status while it runs (nothing in --json mode)."""

    def __init__(self, state: State, label: str) -> None:
        self.enabled = not state.as_json
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=err, transient=True, disable=not self.enabled)
        self.label = label
        self.task = self.progress.add_task(label, total=None)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_job(self, job: Job, elapsed: float) -> None:
        self.progress.update(self.task, description=f"{self.label}: job {job.job_id[:8]} {job.status}")

    def on_bytes(self, received: int) -> None:
        self.progress.update(self.task, description=f"{self.label}: {received / 1024:.0f} KiB received")


def _write(output: str, data: bytes) -> None:
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(output).write_bytes(data)


@command(main, "say")
@click.argument("text")
@click.option("--voice", "-v", required=True, help="Voice name or id.")
@click.option("--output", "-o", default=None, help="Where to write the audio ('-' for stdout; default: speech.FORMAT).")
@click.option("--format", "response_format", default="wav", show_default=True,
              type=click.Choice(["wav", "mp3", "opus", "flac", "pcm"]), help="Audio format.")
@click.option("--lang", help="Language code (default: the voice's).")
@click.option("--backend", help="Backend (default: the voice's).")
@click.option("--stream", is_flag=True, help="Write audio as it arrives.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the job.")
def say(state: State, text: str, voice: str, output: str | None, response_format: str, lang: str | None,
        backend: str | None, stream: bool, timeout: float) -> None:
    """Speak TEXT in a voice and save the audio."""
    client = state.client()
    voice_id = client.voices.find(voice).voice_id
    output = output or f"speech.{response_format}"
    result: dict[str, Any] = {"voice_id": voice_id, "output": output, "format": response_format}
    with JobProgress(state, "synthesizing") as progress:
        if stream:
            received = 0
            sink = sys.stdout.buffer if output == "-" else open(output, "wb")  # noqa: SIM115
            try:
                for piece in client.speech.stream(text, voice=voice_id, lang=lang, backend=backend,
                                                  response_format=response_format, on_progress=progress.on_job,
                                                  timeout=timeout):
                    sink.write(piece)
                    sink.flush()
                    received += len(piece)
                    progress.on_bytes(received)
            finally:
                if sink is not sys.stdout.buffer:
                    sink.close()
            result |= {"bytes": received, "streamed": True}
        else:
            answer = client.speech.create(text, voice=voice_id, lang=lang, backend=backend,
                                          response_format=response_format)
            if isinstance(answer, Job):
                client.jobs.wait(answer.job_id, on_progress=progress.on_job, timeout=timeout)
                audio = client.jobs.audio(answer.job_id)
                result["cache"] = "MISS"
            else:
                audio = answer
                result["cache"] = "HIT"
            _write(output, audio.content)
            result |= {"bytes": len(audio.content), "job_id": audio.job_id or getattr(answer, "job_id", None),
                       "content_type": audio.content_type}
    if state.as_json:
        emit_json(result)
    elif output != "-":
        hit = {"HIT": " (from the cache)", "MISS": ""}.get(result.get("cache", ""), "")
        err.print(f"[green]saved[/] {output}: {result['bytes']:,} bytes{hit}")


# Jobs -----------------------------------------------------------------------------------------------
@main.group()
def jobs() -> None:
    """Look at synthesis jobs."""


def _print_job(job: Job) -> None:
    table = Table(show_header=False, box=None)
    for key, value in job.model_dump(exclude_none=True).items():
        table.add_row(f"[dim]{key}[/]", str(value))
    out.print(table)


@command(jobs, "get")
@click.argument("job_id")
def jobs_get(state: State, job_id: str) -> None:
    """Show a job's status."""
    job = state.client().jobs.get(job_id)
    emit_json(job) if state.as_json else _print_job(job)


@command(jobs, "wait")
@click.argument("job_id")
@click.option("--output", "-o", help="Also save the audio here once ready.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait.")
def jobs_wait(state: State, job_id: str, output: str | None, timeout: float) -> None:
    """Wait until a job is ready (exit 0) or failed (exit 5)."""
    client = state.client()
    with JobProgress(state, "waiting") as progress:
        job = client.jobs.wait(job_id, on_progress=progress.on_job, timeout=timeout)
    if output:
        _write(output, client.jobs.audio(job_id).content)
    emit_json(job) if state.as_json else _print_job(job)


# Account --------------------------------------------------------------------------------------------
@command(main, "usage")
def usage(state: State) -> None:
    """Characters used this billing period."""
    report = state.client().usage.get()
    if state.as_json:
        emit_json(report)
        return
    quota = f" of {report.quota:,}" if report.quota else ""
    out.print(f"{report.characters_used:,}{quota} characters, {report.jobs:,} jobs, "
              f"{report.period_start:%Y-%m-%d} to {report.period_end:%Y-%m-%d} (billing {report.billing})")


@command(main, "health")
def health(state: State) -> None:
    """Whether the API is up, and the backends it can run."""
    answer = state.client().health()
    emit_json(answer) if state.as_json else out.print(f"{answer.status}: {', '.join(answer.backends) or 'none'}")


@main.group()
def account() -> None:
    """The account of the API key."""


@command(account, "delete")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def account_delete(state: State, yes: bool) -> None:
    """Delete the account: every voice, job, object and key, everywhere."""
    if not yes and not click.confirm("Delete this account and everything in it?", err=True):
        raise click.Abort()
    purge = state.client().account.delete()
    emit_json(purge) if state.as_json else out.print(f"purge {purge.purge_id}: {purge.status}")


# Webhooks -------------------------------------------------------------------------------------------
@main.group()
def webhooks() -> None:
    """Endpoints that receive signed events."""


@command(webhooks, "add")
@click.argument("url")
@click.option("--event", "events", multiple=True, required=True, type=click.Choice(WEBHOOK_EVENTS),
              help="An event to send (repeat for more).")
@click.option("--description", help="A note for yourself.")
def webhooks_add(state: State, url: str, events: tuple[str, ...], description: str | None) -> None:
    """Register URL for events; prints the signing secret (shown once)."""
    hook = state.client().webhooks.create(url, events=list(events), description=description)
    if state.as_json:
        emit_json({**_dump(hook), "secret": hook.secret})
    else:
        out.print(f"[green]webhook added[/]: {hook.webhook_id}\nsecret (shown once): [bold]{hook.secret}[/]")


@command(webhooks, "ls")
def webhooks_ls(state: State) -> None:
    """List this account's endpoints."""
    listed = state.client().webhooks.list()
    if state.as_json:
        emit_json(listed)
        return
    table = Table("webhook id", "url", "events", box=None)
    for w in listed:
        table.add_row(w.webhook_id, w.url, ", ".join(w.events))
    out.print(table)


@command(webhooks, "rm")
@click.argument("webhook_id")
def webhooks_rm(state: State, webhook_id: str) -> None:
    """Remove an endpoint."""
    state.client().webhooks.delete(webhook_id)
    emit_json({"deleted": webhook_id}) if state.as_json else out.print(f"[green]webhook removed[/]: {webhook_id}")


@command(webhooks, "rotate")
@click.argument("webhook_id")
@click.option("--grace", "grace_s", type=float, help="Seconds the old secret keeps signing (default 24 h).")
def webhooks_rotate(state: State, webhook_id: str, grace_s: float | None) -> None:
    """A new signing secret; the old one stays valid for the grace period."""
    hook = state.client().webhooks.rotate(webhook_id, grace_s=grace_s)
    if state.as_json:
        emit_json({**_dump(hook), "secret": hook.secret})
    else:
        out.print(f"new secret (shown once): [bold]{hook.secret}[/]; the old one signs until "
                  f"{hook.previous_secret_expires_at}")


@command(webhooks, "deliveries")
@click.argument("webhook_id")
@click.option("--limit", default=20, show_default=True)
def webhooks_deliveries(state: State, webhook_id: str, limit: int) -> None:
    """Latest deliveries to an endpoint and their attempts."""
    listed = state.client().webhooks.deliveries(webhook_id, limit=limit)
    if state.as_json:
        emit_json(listed)
        return
    table = Table("event", "type", "status", "attempts", "last answer", box=None)
    for d in listed:
        table.add_row(d.event_id, d.event_type, d.status, str(d.attempts),
                      str(d.last_status or d.last_error or ""))
    out.print(table)


# Keys (admin) ---------------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """API keys (admin: TIMBRE_ADMIN_SECRET or admin_secret in the config file)."""


@command(keys, "create")
@click.option("--label", help="A label for the key.")
@click.option("--account", "account_id", help="Add the key to this account (default: a new account).")
def keys_create(state: State, label: str | None, account_id: str | None) -> None:
    """Create an API key; prints it (shown once)."""
    key = state.client().keys.create(label=label, account_id=account_id)
    if state.as_json:
        emit_json({**_dump(key), "api_key": key.api_key})
    else:
        out.print(f"api key (shown once): [bold]{key.api_key}[/]\naccount: {key.account_id}")


@command(keys, "ls")
@click.option("--account", "account_id", help="Only this account's keys.")
def keys_ls(state: State, account_id: str | None) -> None:
    """List API keys."""
    listed = state.client().keys.list(account_id=account_id)
    if state.as_json:
        emit_json(listed)
        return
    table = Table("key id", "prefix", "account", "label", "revoked", box=None)
    for k in listed:
        table.add_row(k.key_id, k.key_prefix or "", k.account_id, k.label or "", str(k.revoked_at or ""))
    out.print(table)


@command(keys, "revoke")
@click.argument("key_id")
def keys_revoke(state: State, key_id: str) -> None:
    """Revoke an API key."""
    state.client().keys.revoke(key_id)
    emit_json({"revoked": key_id}) if state.as_json else out.print(f"[green]key revoked[/]: {key_id}")


if __name__ == "__main__":
    main()
