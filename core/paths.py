"""Where tunedeck keeps its own files (platformdirs), and the user config."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from platformdirs import user_cache_path, user_config_path

APP = "tunedeck"


def cache_dir() -> Path:
    """Converted models and other caches. ``TUNEDECK_CACHE_DIR`` overrides."""
    env = os.environ.get("TUNEDECK_CACHE_DIR")
    return Path(env) if env else user_cache_path(APP)


def config_dir() -> Path:
    """The user config (theme, recent projects, model folders). ``TUNEDECK_CONFIG_DIR`` overrides."""
    env = os.environ.get("TUNEDECK_CONFIG_DIR")
    return Path(env) if env else user_config_path(APP)


def config_file() -> Path:
    return config_dir() / "config.toml"


def load_user_config() -> dict[str, Any]:
    """The user config as a dict; a missing or broken file reads as empty (it is only preferences)."""
    try:
        return tomllib.loads(config_file().read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def save_user_config(config: dict[str, Any]) -> None:
    from .project import atomic_write_text

    atomic_write_text(config_file(), tomli_w.dumps(config))


def update_user_config(**changes: Any) -> dict[str, Any]:
    config = load_user_config()
    config.update(changes)
    save_user_config(config)
    return config


def add_recent_project(path: Path, limit: int = 10) -> None:
    config = load_user_config()
    recent = [p for p in config.get("recent_projects", []) if isinstance(p, str) and p != str(path)]
    config["recent_projects"] = [str(path)] + recent[: limit - 1]
    save_user_config(config)
