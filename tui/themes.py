"""Colour themes as TOML files, turned into :class:`textual.theme.Theme` at start-up.

tunedeck ships its themes in the ``tunedeck.themes`` package (``themes/*.toml`` in the
repository); users add their own as ``themes/*.toml`` in the user config folder. A file's
keys are the fields of ``Theme`` (name, primary, background, dark, ...) plus an optional
``[variables]`` table of Textual design variables.
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

from tunedeck.core.errors import UserError
from tunedeck.core.paths import config_dir

DEFAULT_THEME = "tunedeck-dark"
_FIELDS = {f.name for f in dataclasses.fields(Theme)}
_COLOURS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground", "background",
            "surface", "panel", "boost")


def theme_from_toml(text: str, origin: str) -> Theme:
    """One theme from a TOML file's text; a bad file raises a one-line UserError."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"theme {origin}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise UserError(f"theme {origin}: unknown key {unknown[0]!r}; keys are the fields of textual.theme.Theme")
    if not isinstance(data.get("name"), str) or not isinstance(data.get("primary"), str):
        raise UserError(f"theme {origin}: needs at least name and primary")
    for key in _COLOURS:
        value = data.get(key)
        if value is None:
            continue
        try:
            Color.parse(value)
        except (ColorParseError, TypeError):
            raise UserError(f"theme {origin}: {key}: {value!r} is not a colour") from None
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise UserError(f"theme {origin}: [variables] must map names to strings")
    return Theme(**data)


def bundled_themes() -> list[Theme]:
    """The themes shipped with tunedeck, default first."""
    folder = files("tunedeck.themes")
    themes = [theme_from_toml(entry.read_text(encoding="utf-8"), entry.name)
              for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".toml")]
    return sorted(themes, key=lambda t: t.name != DEFAULT_THEME)


def user_themes(folder: Path | None = None) -> tuple[list[Theme], list[str]]:
    """Themes from the user config's ``themes`` folder, and a line per file that did not load."""
    folder = folder or config_dir() / "themes"
    themes, problems = [], []
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        try:
            themes.append(theme_from_toml(path.read_text(encoding="utf-8"), str(path)))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"theme {path}: cannot read ({exc.__class__.__name__})")
        except UserError as exc:
            problems.append(exc.message)
    return themes, problems
