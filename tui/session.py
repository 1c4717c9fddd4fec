"""The open project as the app edits it: the working copy, the file as saved, and the
edits that do not validate yet.

One object holds the settings (screens read it; only the app changes it). Edits go
through :meth:`tunedeck.core.project.Project.set`, the validator the CLI's ``--set``
uses, so the editor accepts exactly what ``tunedeck check --set`` accepts. Text typed into
a field is read the way ``--set`` reads it (a TOML value, a bare word as a string), with
friendlier forms for lists and tables: ``q_proj, v_proj`` and ``messages=dialog``.
No Textual here.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunedeck.core.errors import ProjectError, UserError
from tunedeck.core.project import Project, parse_override
from tunedeck.core.schema import Field, field_for, toml_repr

# a target string with any of these is a regex (peft full-matches it against module names)
_REGEX_CHARS = re.compile(r"[.*+?()\[\]|^$\\{}]")


def format_value(fld: Field, value: Any) -> str:
    """A value as it is shown in its text field (the inverse of :func:`parse_text`)."""
    if fld.kind in ("targets", "str_list") and isinstance(value, list):
        return ", ".join(value)
    if fld.kind == "mapping":
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if fld.kind == "sources" and not isinstance(value, str):
        return toml_repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_text(fld: Field, text: str) -> Any:
    """What the user typed into ``fld``'s field, as a value for :meth:`Project.set`.

    Numbers, ``eval_split`` and auto/bool values are read like ``--set`` reads them.
    Strings are taken as typed. ``target_modules``: ``all-linear``, a regex, or names
    separated by commas (a list, matched as suffixes). Lists: comma-separated or TOML.
    Tables: ``key=value, ...`` or a TOML inline table. ``dataset.path``: a path as typed, or
    a TOML list of sources (``[{path = "a.jsonl", weight = 2}, "b.jsonl"]``).
    """
    raw = text.strip()
    if fld.kind == "str" or (fld.kind == "sources" and not raw.startswith("[")):
        return text
    if fld.kind in ("targets", "str_list"):
        if raw.startswith("["):
            return _as_toml(fld, raw)
        if fld.kind == "targets" and (raw == "all-linear" or _REGEX_CHARS.search(raw)):
            return raw
        names = [n for n in re.split(r"[,\s]+", raw) if n]
        return names if (names or fld.kind == "str_list") else raw
    if fld.kind == "devices" and "," in raw and not raw.startswith("["):
        return _as_toml(fld, f"[{raw}]")
    if fld.kind == "mapping":
        if raw.startswith("{"):
            return _as_toml(fld, raw)
        pairs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in raw.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ProjectError(fld.key, f"{part!r} is not valid: expected name=field pairs such as "
                                   "messages=dialog, separated by commas")
            pairs[key.strip()] = value.strip()
        return pairs
    return _as_toml(fld, raw)


def _as_toml(fld: Field, raw: str) -> Any:
    """``raw`` read the way ``--set`` reads a value, with the error worded for a field."""
    try:
        return parse_override(f"{fld.key}={raw}")[1]
    except UserError:
        raise ProjectError(fld.key, f"{raw} is not a valid TOML value") from None


@dataclass
class Invalid:
    """An edit that does not validate: what the field shows, and why it is refused."""

    text: str
    reason: str


def reason_for(exc: UserError, key: str) -> str:
    """A validation error as shown next to field ``key``: without the file name, and
    without the key when it is the field's own."""
    message = exc.message
    if isinstance(exc, ProjectError):
        where = f"{exc.key}: "
        start = message.find(where)
        if start >= 0:
            message = message[start + len(where):] if exc.key == key else message[start:]
    return message


@dataclass
class Session:
    """A project open in the app."""

    project: Project
    saved: Project = field(init=False)
    invalid: dict[str, Invalid] = field(default_factory=dict)
    version: int = 0
    """Counts changes (values, invalid edits, saves): equal versions, nothing to redraw."""

    def __post_init__(self) -> None:
        self.saved = Project.from_text(self.project.text(), self.project.path)

    @property
    def path(self) -> Path | None:
        return self.project.path

    @property
    def dirty(self) -> bool:
        """Unsaved changes: saving would change the file, or an edit is still invalid."""
        return bool(self.invalid) or self.project.text() != self.saved.text()

    def edited(self, key: str) -> bool:
        """Whether ``key``'s value differs from the saved file."""
        return self.project.get(key) != self.saved.get(key)

    def shown(self, key: str) -> str:
        """``key``'s value as its text field shows it; a number in the form the file has it."""
        value = self.project.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.project.value_text(key)
        return format_value(field_for(key), value)

    def line_changed(self, key: str) -> bool:
        """Whether the file would gain or lose ``key``'s line on save (the value may be the same)."""
        return self.project.source_of(key) != self.saved.source_of(key)

    def overrides(self) -> list[str]:
        """``key=value`` items that turn the saved file into the working copy (``--set``)."""
        return self.project.overrides_from(self.saved)

    def edit_text(self, key: str, text: str) -> bool:
        """Apply text typed into ``key``'s field; returns whether the project changed.

        Text that does not validate is kept as an :class:`Invalid` edit with the reason.
        """
        fld = field_for(key)
        try:
            value = parse_text(fld, text)
        except UserError as exc:
            self._mark_invalid(key, Invalid(text, reason_for(exc, key)))
            return False
        return self.edit_value(key, value, text=text)

    def edit_value(self, key: str, value: Any, *, text: str | None = None) -> bool:
        """Set ``key`` to ``value`` (validated); returns whether the project changed.
        A number keeps the form it was typed in (``text``: ``5e-4`` stays ``5e-4``)."""
        before = self.project.doc
        try:
            self.project.set(key, value, literal=text)
        except UserError as exc:
            shown = text if text is not None else format_value(field_for(key), value)
            self._mark_invalid(key, Invalid(shown, reason_for(exc, key)))
            return False
        if self.invalid.pop(key, None) is not None:
            self.version += 1
        changed = self.project.doc is not before
        if changed:
            self.version += 1
            self._retry_invalid()
        return changed

    def reset(self, key: str) -> bool:
        """Remove ``key`` from the file so its default applies; returns whether the project changed."""
        before = self.project.doc
        if self.invalid.pop(key, None) is not None:
            self.version += 1
        try:
            self.project.unset(key)
        except UserError as exc:  # the default breaks a rule between keys
            fld = field_for(key)
            self._mark_invalid(key, Invalid(format_value(fld, fld.default), reason_for(exc, key)))
            return False
        changed = self.project.doc is not before
        if changed:
            self.version += 1
            self._retry_invalid()
        return changed

    def snapshot(self, key: str) -> tuple[bool, Any]:
        """``key`` as it is now: whether the file sets it, and its value (for :meth:`restore`)."""
        return self.project.source_of(key) == "project", self.project.get(key)

    def restore(self, key: str, snapshot: tuple[bool, Any]) -> None:
        """Put ``key`` back as :meth:`snapshot` found it, dropping an invalid edit."""
        in_file, value = snapshot
        if self.invalid.pop(key, None) is not None:
            self.version += 1
        if in_file:  # in the form the saved file has it, when it is that value
            self.edit_value(key, value, text=self.saved.value_text(key) if value == self.saved.get(key) else None)
        else:
            self.reset(key)

    def _mark_invalid(self, key: str, invalid: Invalid) -> None:
        if self.invalid.get(key) != invalid:
            self.invalid[key] = invalid
            self.version += 1

    def _retry_invalid(self) -> None:
        """Edits refused by a rule between keys may pass once the other key changed."""
        for key, pending in list(self.invalid.items()):
            fld = field_for(key)
            try:
                self.project.set(key, parse_text(fld, pending.text), literal=pending.text)
            except UserError as exc:
                self._mark_invalid(key, Invalid(pending.text, reason_for(exc, key)))
            else:
                del self.invalid[key]

    def save(self) -> Path:
        """Write the working copy to its file (atomically); refused while an edit is invalid."""
        if self.invalid:
            first_key, first = next(iter(self.invalid.items()))
            more = f" (and {len(self.invalid) - 1} more)" if len(self.invalid) > 1 else ""
            raise UserError(f"not saved: {first_key} is invalid: {first.reason}{more}")
        path = self.project.save()
        self.saved = Project.from_text(self.project.text(), path)
        self.version += 1
        return path

    def train_command(self, cwd: Path | None = None) -> str:
        """The shell command that trains what the editor shows."""
        parts = ["tunedeck", "train", display_path(self.path, cwd) if self.path else "PROJECT.toml"]
        for item in self.overrides():
            parts += ["--set", item]
        return shlex.join(parts)


def display_path(path: Path, cwd: Path | None = None) -> str:
    """``path`` relative to the working folder when inside it, else with ``~`` for home."""
    cwd = cwd or Path.cwd()
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        pass
    home = Path.home()
    try:
        return str(Path("~") / path.relative_to(home))
    except ValueError:
        return os.fspath(path)

