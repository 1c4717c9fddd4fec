"""Project files: ``project.toml`` read, validated, edited and saved.

The file is kept as a tomlkit document so that comments, key order and formatting
survive an edit: loading then saving gives the same bytes. Values are validated into
plain typed values by :mod:`tunedeck.core.schema`; every error is one line naming the
key path, the value and what was expected. Saving is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from .errors import UserError, file_error
from .schema import FIELDS, SECTIONS, check_value, field_for, toml_repr, validate_tree


class Project:
    """A project file and its validated values.

    ``values[section][key]`` holds every setting with defaults filled in (top-level
    keys under section ``""``). Edit with :meth:`set`, which validates first and leaves
    the project unchanged on error.
    """

    def __init__(self, doc: tomlkit.TOMLDocument, path: Path | None = None) -> None:
        self.doc = doc
        self.path = path.resolve() if path is not None else None
        self.values = validate_tree(doc.unwrap(), self._label())
        self.dirty = False

    # -- construction ------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Project:
        path = Path(path)
        if path.is_dir():
            candidate = path / "project.toml"
            if not candidate.is_file():
                raise UserError(f"{path}: is a folder without project.toml; give the path of a project file")
            path = candidate
        try:
            if path.exists() and not path.is_file():  # a pipe or a device would block or never end
                raise UserError(f"{path}: not a regular file; give the path of a project file")
            if path.exists() and path.stat().st_size > PROJECT_MAX_BYTES:
                raise UserError(f"{path}: {path.stat().st_size:,} bytes is not a project file (they are a few KB)")
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise UserError(f"{path}: no such project file; create one with `tunedeck new {path}`") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise file_error(path, exc, "project file") from None
        return cls.from_text(text, path)

    @classmethod
    def from_text(cls, text: str, path: Path | None = None) -> Project:
        label = str(path) if path else "project"
        try:
            # tomllib gives the precise line/column message for syntax errors
            tomllib.loads(text)
            doc = tomlkit.parse(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{label}: not valid TOML: {exc}") from None
        except TOMLKitError as exc:  # pragma: no cover - tomllib catches these first
            raise UserError(f"{label}: not valid TOML: {exc}") from None
        except RecursionError:
            raise UserError(f"{label}: a value is nested too deeply (thousands of brackets); no project key "
                            "takes more than a list or a table of strings") from None
        return cls(doc, path)

    @classmethod
    def new(
        cls,
        name: str,
        *,
        source: str = "default",
        dataset: str = "",
        path: Path | None = None,
    ) -> Project:
        """A starter project with every section written out."""
        doc = tomlkit.document()
        doc.add("schema", 1)
        doc.add("name", name)
        for section in SECTIONS:
            table = tomlkit.table()
            for fld in FIELDS:
                if fld.section == section:
                    if fld.kind == "mapping" and not fld.default:
                        continue
                    table.add(fld.name, fld.default)
            doc.add(tomlkit.nl())
            doc.add(section, table)
        doc["model"]["source"] = source  # type: ignore[index]
        doc["dataset"]["path"] = dataset  # type: ignore[index]
        return cls(doc, path)

    # -- reading -------------------------------------------------------------------

    def _label(self) -> str | None:
        return str(self.path) if self.path else None

    @property
    def name(self) -> str:
        return self.values[""]["name"] or (self.path.stem if self.path else "project")

    @property
    def root(self) -> Path:
        """The folder relative paths are resolved against."""
        return self.path.parent if self.path else Path.cwd()

    def get(self, key: str) -> Any:
        fld = field_for(key)
        return self.values[fld.section][fld.name]

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def source_of(self, key: str) -> str:
        """"project" when the file sets ``key``, else "default"."""
        fld = field_for(key)
        container: Any = self.doc if not fld.section else self.doc.get(fld.section, {})
        return "project" if fld.name in container else "default"

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """A path from the project file, made absolute against the file's folder."""
        p = Path(os.path.expanduser(str(value)))
        return Path(os.path.normpath(p if p.is_absolute() else (self.root / p)))

    def as_dict(self) -> dict[str, Any]:
        """Every value (defaults included) as nested plain dicts, in schema order."""
        out: dict[str, Any] = dict(self.values[""])
        for section in SECTIONS:
            out[section] = dict(self.values[section])
        return out

    def text(self) -> str:
        return tomlkit.dumps(self.doc)

    def value_text(self, key: str) -> str:
        """``key``'s value as TOML, in the form the file writes it when that form is a number
        (``5e-4`` stays ``5e-4``, not ``0.0005``), else in the canonical form."""
        value = self.get(key)
        fld = field_for(key)
        container: Any = self.doc if not fld.section else self.doc.get(fld.section, {})
        if fld.name in container:
            item = container[fld.name]
            literal = item.as_string().strip() if hasattr(item, "as_string") else None
            if literal is not None and _literal_item(literal, value) is not None:
                return literal
        return toml_repr(value)

    # -- editing -------------------------------------------------------------------

    def set(self, key: str, value: Any, *, literal: str | None = None) -> None:
        """Set one key (validated); the file keeps its order, comments and layout.

        ``literal`` is the number as the user typed it (``5e-4``): written in that form
        when it reads back as the very value set, else ignored."""
        self.set_many([(key, value)], literals={key: literal} if literal is not None else None)

    def set_many(self, items: list[tuple[str, Any]], literals: dict[str, str] | None = None) -> None:
        """Set several keys at once; rules between keys are checked on the result only,
        so the order of the edits does not matter. On error nothing changes.
        ``literals`` maps keys to numbers as typed (see :meth:`set`)."""
        new_doc = tomlkit.parse(tomlkit.dumps(self.doc))
        changed = False
        for key, value in items:
            fld = field_for(key)
            value = check_value(fld, value, self._label())
            item = _literal_item((literals or {}).get(key), value)
            container: Any = new_doc
            if fld.section:
                if fld.section not in new_doc:
                    new_doc.add(tomlkit.nl())
                    new_doc.add(fld.section, tomlkit.table())
                container = new_doc[fld.section]
            if fld.name in container and _same(container[fld.name], value) and (
                    item is None or container[fld.name].as_string().strip() == item.as_string()):
                continue
            container[fld.name] = item if item is not None else value
            changed = True
        if not changed:
            return
        values = validate_tree(new_doc.unwrap(), self._label())
        self.doc, self.values, self.dirty = new_doc, values, True

    def unset(self, key: str) -> None:
        """Remove a key from the file so its default applies."""
        fld = field_for(key)
        container: Any = self.doc if not fld.section else self.doc.get(fld.section)
        if container is None or fld.name not in container:
            return
        new_doc = tomlkit.parse(tomlkit.dumps(self.doc))
        target: Any = new_doc if not fld.section else new_doc[fld.section]
        del target[fld.name]
        values = validate_tree(new_doc.unwrap(), self._label())
        self.doc, self.values, self.dirty = new_doc, values, True

    def apply_overrides(self, overrides: list[str]) -> None:
        """Apply ``key.path=value`` overrides (``--set``); values are read as TOML."""
        self.set_many([parse_override(item) for item in overrides])

    def overrides_from(self, saved: Project) -> list[str]:
        """``key=value`` strings that turn ``saved`` into this project (for --set)."""
        out = []
        for fld in FIELDS:
            mine = self.values[fld.section][fld.name]
            theirs = saved.values[fld.section][fld.name]
            if mine != theirs:
                out.append(f"{fld.key}={self.value_text(fld.key)}")
        return out

    # -- saving --------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        target = Path(path).resolve() if path is not None else self.path
        if target is None:
            raise UserError("the project has no file yet; save it with a path")
        atomic_write_text(target, self.text())
        self.path, self.dirty = target, False
        return target


def parse_override(item: str) -> tuple[str, Any]:
    """``lora.r=8`` -> ("lora.r", 8); a bare word is a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set lora.r=8")
    field_for(key)  # unknown key -> did-you-mean
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise UserError(f"--set {key}: the value is nested too deeply") from None
    except tomllib.TOMLDecodeError:
        if raw.startswith(("[", "{", '"', "'")):
            raise UserError(f"--set {key}: {raw} is not a valid TOML value") from None
        value = raw
    return key, value


def _literal_item(literal: str | None, value: Any) -> Any:
    """``literal`` (a number as typed) as a TOML item that keeps its form, when it reads
    back as exactly ``value`` (same type and value); else None."""
    if literal is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        item = tomlkit.parse(f"v = {literal.strip()}\n")["v"]
    except (TOMLKitError, ValueError, RecursionError):
        return None
    current = item.unwrap() if hasattr(item, "unwrap") else item
    if item.as_string() != literal.strip() or type(current) is not type(value) or current != value:
        return None
    return item


def _same(item: Any, value: Any) -> bool:
    unwrap = getattr(item, "unwrap", None)
    current = unwrap() if unwrap else item
    return type(current) is type(value) and current == value


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - stale.lstat().st_mtime > STALE_TMP_S:
                stale.unlink()
        except OSError:
            pass


def current_umask() -> int:
    """This process's umask (a new file follows it), read without changing it where Linux allows:
    /proc/self/status's ``Umask`` (psutil does not expose the umask; ``os.umask`` reads it only by
    setting it, which another thread could see), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


PROJECT_MAX_BYTES = 1 << 20
STALE_TMP_S = 60.0  # a temp file of a save older than this was left by a save that was killed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half.

    A new file follows the umask; an existing one keeps its mode. Temp files that killed
    saves left next to ``path`` are removed. Raises UserError (the disk full, permissions,
    a folder in the way), never a bare OSError."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise file_error(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, UnicodeEncodeError)):
            raise file_error(path, exc) from None
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
