"""Where a project's rows come from: one file or several, each with its weight and format.

``dataset.path`` is one source or a list of them. A source is a string or a table::

    path = "data/chat.jsonl"
    path = ["a.jsonl", "b.parquet"]
    path = [{path = "tools.jsonl", weight = 2, format = "sharegpt"},
            {path = "HuggingFaceH4/no_robots", split = "train", weight = 0.5}]

A source's ``path`` is a file (JSONL, JSON, CSV, Parquet, Arrow), a folder written by
``datasets``' ``save_to_disk``, or the name of a dataset in the local Hugging Face cache
(``owner/name``: the hub cache's downloaded files, or the ``datasets`` cache's Arrow
files), read offline: nothing is downloaded. A table may give ``format`` and ``columns``
(the file's own; the [dataset] ones otherwise), ``split`` and ``config`` (for cached
datasets) and ``weight``.

**Weight** is how many times each of the source's training rows is used per epoch:
2 uses every row twice, 0.5 a seeded half of them; 1 (the default) each row once. A
source's share of the mix is its rows times its weight over the total.

Light: the standard library only (a cached dataset's files are read by the same readers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SOURCE_KEYS = ("path", "weight", "format", "columns", "split", "config")
DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv", ".arrow")
SPLIT_WORDS = ("train", "validation", "valid", "val", "test", "dev", "eval")
SOURCE_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference")


@dataclass(frozen=True)
class Source:
    """One place rows come from, as the project gives it (see the module docstring)."""

    spec: str  # the path or name as written
    key: str = "dataset.path"  # the project key that names it, for messages
    weight: float = 1.0
    format: str | None = None  # None: the [dataset] format
    columns: dict[str, str] | None = None  # None: the [dataset] columns
    split: str | None = None
    config: str | None = None
    root: Path | None = field(default=None, compare=False)  # the project folder

    @property
    def label(self) -> str:
        return self.spec

    def local(self) -> Path:
        """The file or folder, relative to the project folder."""
        p = Path(os.path.expanduser(self.spec))
        return Path(os.path.normpath(p if p.is_absolute() or self.root is None else self.root / p))

    def files(self) -> list[Path]:
        """The files (or the one file or save_to_disk folder) the rows are read from."""
        if self.spec.startswith(HUB_PREFIX):  # "hf:org/name": the cached dataset, never a local path
            return cached_dataset_files(self.spec[len(HUB_PREFIX):], self.split, self.config, self.key)
        local = self.local()
        if local.exists() or os.path.lexists(local) or not _looks_like_name(self.spec):
            return [local]
        return cached_dataset_files(self.spec, self.split, self.config, self.key)

    def where(self) -> str:
        """The file, or what of the cache a named dataset is read from, for messages."""
        files = self.files()
        return str(files[0]) if len(files) == 1 else f"{self.spec} ({len(files)} files in the Hugging Face cache)"


HUB_PREFIX = "hf:"  # dataset.path = "hf:org/name" names a dataset in the local Hugging Face cache only


def _looks_like_name(spec: str) -> bool:
    """``owner/name`` or ``name``: no suffix of a data file, no leading dot or slash."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", spec)) and not spec.lower().endswith(DATA_SUFFIXES)


def parse_sources(value: Any, root: Path | None = None, where: str = "dataset.path") -> list[Source]:
    """``dataset.path`` as a list of :class:`Source`; ValueError (one line) for a bad entry."""
    if isinstance(value, str):
        return [Source(value, where, root=root)] if value else []
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a path or a list of paths and tables, not {type(value).__name__}")
    if not value:
        return []
    out = []
    for i, entry in enumerate(value, 1):
        key = f"{where}[{i}]"
        if isinstance(entry, str):
            if not entry:
                raise ValueError(f"{key} is empty; give a file, a save_to_disk folder or a cached dataset's name")
            out.append(Source(entry, key, root=root))
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{key} must be a path or a table such as {{path = \"a.jsonl\", weight = 2}}")
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            raise ValueError(f"{key}: unknown key {unknown[0]!r}; a source has {', '.join(SOURCE_KEYS)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{key} has no path; e.g. {{path = \"a.jsonl\", weight = 2}}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight <= 1000):
            raise ValueError(f"{key}.weight = {weight!r}: give a number > 0 and <= 1000 (2 uses each row twice, "
                             "0.5 half of them)")
        fmt = entry.get("format")
        if fmt is not None and fmt not in SOURCE_FORMATS:
            raise ValueError(f"{key}.format = {fmt!r}: use one of {', '.join(SOURCE_FORMATS)}")
        columns = entry.get("columns")
        if columns is not None and (not isinstance(columns, dict)
                                    or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise ValueError(f'{key}.columns must be a table of strings such as {{messages = "dialog"}}')
        for name in ("split", "config"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise ValueError(f"{key}.{name} must be a string")
        out.append(Source(path, key, float(weight), None if fmt in (None, "auto") else fmt, columns,
                          entry.get("split"), entry.get("config"), root=root))
    return out


def project_sources(project: Any) -> list[Source]:
    """The project's sources; UserError when dataset.path is empty."""
    try:
        sources = parse_sources(project["dataset.path"], project.root)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not sources:
        raise UserError("dataset.path is empty; set it to a JSONL/JSON/CSV/Parquet file "
                        "(e.g. --set dataset.path=data.jsonl)")
    return sources


def data_stamps(project: Any) -> list[Any]:
    """What tells that any of the project's data changed: each source's files (size, time)
    and how it is read (weight, format, columns, split); empty without a dataset."""
    from .kept import stamp

    try:
        sources = parse_sources(project["dataset.path"], project.root)
    except ValueError:
        return []
    out: list[Any] = []
    for source in sources:
        try:
            files = source.files()
        except UserError:
            files = [source.local()]
        out.append([[stamp(f) for f in files], source.weight, source.format, source.columns, source.split,
                    source.config])
    return out


def relative_sources(value: Any, root: Path, run_dir: Path) -> Any:
    """``dataset.path`` with its local paths made relative to ``run_dir`` (a run's snapshot);
    cached datasets' names stay as they are."""
    def rel(spec: str) -> str:
        if spec.startswith(HUB_PREFIX):
            return spec
        source = Source(spec, root=root)
        local = source.local()
        if not local.exists() and _looks_like_name(spec):
            return spec
        return os.path.relpath(local, run_dir)

    if isinstance(value, str):
        return rel(value) if value else value
    out = []
    for entry in value:
        if isinstance(entry, str):
            out.append(rel(entry))
        else:
            out.append({**entry, "path": rel(entry["path"])})
    return out


def source_format(source: Source, project: Any) -> str:
    return source.format or project["dataset.format"]


def source_columns(source: Source, project: Any) -> dict[str, str]:
    return dict(source.columns) if source.columns is not None else dict(project["dataset.columns"])


def weighted_count(rows: int, weight: float) -> int:
    """Rows a source gives per epoch at ``weight``."""
    whole = int(weight)
    return rows * whole + round(rows * (weight - whole))


def apply_weight(rows: list[Any], weight: float, seed: int) -> list[Any]:
    """The rows used per epoch at ``weight``: whole copies, then a seeded share of the rest."""
    import random

    if weight == 1.0:
        return list(rows)
    whole = int(weight)
    out = list(rows) * whole
    extra = round(len(rows) * (weight - whole))
    if extra:
        picked = sorted(random.Random(seed).sample(range(len(rows)), extra))
        out.extend(rows[i] for i in picked)
    return out


def shares(counts: list[int], weights: list[float]) -> list[float]:
    """Each source's share of the mix (rows × weight over the total), in [0, 1]."""
    used = [weighted_count(c, w) for c, w in zip(counts, weights)]
    total = sum(used)
    return [u / total if total else 0.0 for u in used]


# -- the local Hugging Face cache -----------------------------------------------------------


def hub_cache() -> Path:
    """The hub cache folder, as huggingface_hub finds it (without importing it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.environ[var]))
    return _hf_home() / "hub"


def datasets_cache() -> Path:
    """The ``datasets`` library's cache folder (its Arrow files)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_DATASETS_CACHE"]))
    return _hf_home() / "datasets"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def cached_dataset_files(name: str, split: str | None, config: str | None, key: str = "dataset.path") -> list[Path]:
    """The data files of dataset ``name`` in the local caches, for ``split`` (default
    "train") and ``config``; UserError (one line) when it is not there."""
    split = split or "train"
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        files = sorted(p for p in snapshot.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                       and not p.name.startswith(".") and p.name not in ("dataset_infos.json", "dataset_info.json"))
        files = _pick(files, snapshot, split, config, name, key)
        if files:
            return files
    arrow = _arrow_cache(name, split, config, key)
    if arrow:
        return arrow
    where = f"split {split!r}" + (f" of config {config!r}" if config else "")
    if snapshot is not None:
        raise UserError(f"{key} = {name!r}: the cached dataset has no data files for {where} "
                        f"(in {snapshot}); set split (and config) in the source's table")
    raise UserError(f"{key} = {name!r}: no such file or folder, and no dataset {name} in the local Hugging Face cache "
                    f"({hub_cache()} or {datasets_cache()}); give a file path, or download the dataset first")


def _hub_snapshot(name: str) -> Path | None:
    repo = hub_cache() / ("datasets--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        ref = (repo / "refs" / "main").read_text().strip()
    except OSError:
        ref = ""
    if ref and (snapshots / ref).is_dir():
        return snapshots / ref
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _split_of(path: Path, base: Path) -> str | None:
    """The split a data file belongs to, from its folder or file name (``data/train-0000-of-0002.parquet``)."""
    parts = [*path.relative_to(base).parent.parts, path.stem]
    for part in reversed(parts):
        words = re.split(r"[-_.]", part.lower())
        for word in words[:1] + words[-1:]:
            if word in SPLIT_WORDS:
                return {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"
                        }.get(word, word)
    return None


def _pick(files: list[Path], base: Path, split: str, config: str | None, name: str, key: str) -> list[Path]:
    if config:
        files = [f for f in files if config in f.relative_to(base).parts[:-1]]
    else:
        tops = sorted({f.relative_to(base).parts[0] for f in files if len(f.relative_to(base).parts) > 2})
        if len(tops) > 1 and not any(t == "data" for t in tops):
            raise UserError(f"{key} = {name!r}: the cached dataset has several configs ({', '.join(tops[:6])}); "
                            "pick one with config in the source's table")
    exact = [f for f in files if split in f.relative_to(base).parts[:-1] or f.stem == split
             or f.stem.startswith(split + "-")]
    if exact:
        return exact
    wanted = {"valid": "validation", "val": "validation", "dev": "validation"}.get(split, split)
    splits = {f: _split_of(f, base) for f in files}
    if not any(splits.values()):
        return files if wanted == "train" else []
    return [f for f in files if splits[f] == wanted]


def _arrow_cache(name: str, split: str, config: str | None, key: str) -> list[Path]:
    root = datasets_cache() / name.replace("/", "___")
    if not root.is_dir():
        return []
    found = [p for p in root.rglob("*.arrow") if _arrow_split(p.name) == split]
    if config:
        found = [p for p in found if p.relative_to(root).parts[0] == config]
    if not found:
        return []
    newest = max(found, key=lambda p: p.stat().st_mtime).parent  # one prepared version
    return sorted(p for p in found if p.parent == newest)


def _arrow_split(filename: str) -> str | None:
    m = re.fullmatch(r".+?-(\w+?)(?:-\d{5}-of-\d{5})?\.arrow", filename)
    return m.group(1) if m else None


def iter_sources(sources: list[Source], read: Any, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(source index, each item ``read(source, limit)`` yields), source after source."""
    for k, source in enumerate(sources):
        for item in read(source, limit):
            yield k, item
