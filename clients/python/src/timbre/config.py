"""Where the command line finds its key and URL: flags, then TIMBRE_API_KEY / TIMBRE_BASE_URL /
TIMBRE_ADMIN_SECRET, then the config file (TIMBRE_CONFIG, else $XDG_CONFIG_HOME/timbre/config.toml, else
~/.config/timbre/config.toml) with top-level `api_key`, `base_url` and `admin_secret`."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ._base import DEFAULT_BASE_URL


class ConfigError(Exception):
    """The config file exists but cannot be read."""


def config_path() -> Path:
    explicit = os.environ.get("TIMBRE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "timbre" / "config.toml"


@dataclass(frozen=True)
class Settings:
    api_key: str | None
    base_url: str
    admin_secret: str | None
    source: str


def load(*, api_key: str | None = None, base_url: str | None = None, admin_secret: str | None = None,
         path: Path | None = None) -> Settings:
    file_values: dict[str, object] = {}
    where = path or config_path()
    if where.exists():
        try:
            file_values = tomllib.loads(where.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {where}: {exc}") from None

    def pick(flag: str | None, env: str, key: str) -> str | None:
        value = flag or os.environ.get(env) or file_values.get(key)
        return str(value) if value else None

    return Settings(api_key=pick(api_key, "TIMBRE_API_KEY", "api_key"),
                    base_url=(pick(base_url, "TIMBRE_BASE_URL", "base_url") or DEFAULT_BASE_URL).rstrip("/"),
                    admin_secret=pick(admin_secret, "TIMBRE_ADMIN_SECRET", "admin_secret"),
                    source=str(where) if file_values else "environment")
