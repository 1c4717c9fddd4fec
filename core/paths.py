"""Where tunedeck keeps its own files (platformdirs), and the user config.

The user config (``config.toml``) is preferences only: a value of the wrong type, or a file
that is not TOML, reads as the defaults (:class:`UserConfig` says which keys tunedeck reads
and checks them, here only). tunedeck's writes edit the file as a tomlkit document, so the
comments, key order and formatting a user wrote survive them; a file that cannot be read as
TOML is never written over (the write is refused in one line, the file left as it is).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
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


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _texts(value: Any) -> list[str] | None:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else None


def _text_table(value: Any) -> dict[str, str] | None:  # every value a string, or none of it
    return dict(value) if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()) else None


def _tables(value: Any) -> dict[str, dict[str, Any]] | None:
    return {k: dict(v) for k, v in value.items() if isinstance(v, dict)} if isinstance(value, dict) else None


# the keys tunedeck reads, each with its check: the value as its type, None when it has another
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "theme": _text, "recent_projects": _texts, "model_dirs": _texts, "keymap": _text_table, "chat_settings": _tables,
}


@dataclass
class UserConfig:
    """The user config as tunedeck reads it: each key of its type, or its default."""

    theme: str | None = None  # a theme's name (tunedeck.themes or the user's own)
    recent_projects: list[str] = field(default_factory=list)  # project files, newest first
    model_dirs: list[str] = field(default_factory=list)  # folders the Models list scans too
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys (Textual's set_keymap)
    chat_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # project file -> generation settings

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UserConfig:
        checked = _checked(raw)
        return cls(**{key: checked[key] for key in _CHECKS if key in checked})


def _checked(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each key tunedeck reads checked: a value of the wrong type left out (it
    reads as the default), the items of a list that are not strings dropped; other keys kept."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        check = _CHECKS.get(key)
        value = value if check is None else check(value)
        if value is not None:
            out[key] = value
    return out


class _Broken(Exception):
    """The user config exists but cannot be read as TOML (``error`` says why)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _document() -> tomlkit.TOMLDocument:
    """The user config file as a tomlkit document (an empty one when there is none yet).
    Raises _Broken for a file that is not UTF-8 TOML, or that cannot be read."""
    try:
        text = config_file().read_text(encoding="utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    except (OSError, UnicodeDecodeError) as exc:
        raise _Broken(exc) from None
    try:
        return tomlkit.parse(text)
    except Exception as exc:  # TOMLKitError, and whatever else a hostile file makes the parser raise
        raise _Broken(exc) from None


def load_user_config() -> dict[str, Any]:
    """The user config as a dict, its keys checked (:class:`UserConfig`); a missing or broken
    file reads as empty (it is only preferences)."""
    try:
        return _checked(_document().unwrap())
    except _Broken:
        return {}


def user_config() -> UserConfig:
    """The user config, typed; the defaults for a missing or broken file."""
    return UserConfig.from_dict(load_user_config())


def _assign(table: Any, key: str, value: Any) -> None:
    """Set ``table[key]`` to ``value``, touching no more of the document than changes: an
    equal value is left as written (its comments with it), a table is edited key by key."""
    old = table.get(key)
    if old is not None and _same(_plain(old), value):
        return
    if isinstance(old, dict) and isinstance(value, Mapping):
        for gone in [k for k in old if k not in value]:
            del old[gone]
        for k, v in value.items():
            _assign(old, k, v)
        return
    table[key] = value


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _same(old: Any, new: Any) -> bool:
    """Whether a plain value read from the file is ``new`` (of the same type: 1 is not true)."""
    if isinstance(old, dict) and isinstance(new, Mapping):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(map(_same, old, new))
    return type(old) is type(new) and old == new


def _edit(change: Callable[[tomlkit.TOMLDocument], None]) -> dict[str, Any]:
    """Apply ``change`` to the user config file in place (atomically), keeping what the
    user wrote around it; returns the config after it. A file that cannot be read as TOML
    is left as it is: a UserError says so (tunedeck's change is not kept)."""
    from .errors import file_error
    from .project import atomic_write_text

    path = config_file()
    try:
        doc = _document()
    except _Broken as broken:
        raise file_error(path, broken.error, "TOML file",
                         "fix it (or delete it) so that tunedeck can keep its preferences there") from None
    change(doc)
    atomic_write_text(path, tomlkit.dumps(doc))
    return _checked(doc.unwrap())


def save_user_config(config: dict[str, Any]) -> None:
    """Make the user config ``config``: its keys set, the others removed (comments kept)."""

    def change(doc: tomlkit.TOMLDocument) -> None:
        for gone in [key for key in doc if key not in config]:
            del doc[gone]
        for key, value in config.items():
            _assign(doc, key, value)

    _edit(change)


def update_user_config(**changes: Any) -> dict[str, Any]:
    """Set these keys of the user config (the rest as written); returns the config after."""

    def change(doc: tomlkit.TOMLDocument) -> None:
        for key, value in changes.items():
            _assign(doc, key, value)

    return _edit(change)


def add_recent_project(path: Path, limit: int = 10) -> None:
    recent = [p for p in user_config().recent_projects if p != str(path)]
    update_user_config(recent_projects=[str(path)] + recent[: limit - 1])
