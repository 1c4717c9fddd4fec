"""Answers kept on disk: what a fresh process would otherwise compute again.

Values kept within a process (a model's inspection, a tokenizer) are
``functools.lru_cache``\ d functions where they are built; this module keeps the answers
that should outlive the process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

V = TypeVar("V")


# -- answers kept on disk ------------------------------------------------------------------
#
# Answers that cost seconds in a fresh process (a check of the project's targets, the rows
# rendered through the tokenizer, the longest row, what a model class does under peft and
# bitsandbytes), kept as small JSON files under the user cache dir. A file's name is a
# digest of the question: its key, the stamps (path, size, modification time) of the files
# that decide it, the stamps of the code that computes it and the library versions, so a
# changed input, an edit of the code or an upgrade asks afresh.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_VERSIONED = ("tunedeck", "transformers", "peft", "torch", "tokenizers", "bitsandbytes")


def stamp(path: Path, *, skip: tuple[str, ...] = WEIGHT_SUFFIXES) -> Any:
    """What tells that a file (or a folder's files, but ``skip`` suffixes: weights) changed:
    resolved path, size, modification time; ``[path, None]`` when it cannot be read."""
    try:
        if path.is_dir():
            return [str(path.resolve()), sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                for p in path.iterdir() if p.is_file() and p.suffix not in skip)]
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None]


@lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    from .events import library_versions

    return library_versions(_VERSIONED)


def kept_file(kind: str, key: dict[str, Any], code: tuple[str, ...] = ()) -> Path:
    """Where the answer to ``key`` is kept; ``code``: tunedeck.core modules that compute it."""
    from .paths import cache_dir

    here = Path(__file__).parent
    full = {**key, "kind": kind, "code": [stamp(here / name) for name in code], "versions": _versions()}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache_dir() / "kept" / f"{kind}-{digest}.json"


def read_kept(path: Path) -> dict[str, Any] | None:
    """The kept JSON object at ``path``, or None (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_kept(path: Path, value: dict[str, Any]) -> None:
    """Keep ``value`` at ``path`` (atomically); a cache that cannot be written is only slower."""
    from .errors import UserError
    from .project import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(value))
    except (UserError, OSError, TypeError, ValueError):
        pass


def kept_answer(kind: str, key: dict[str, Any], compute: Callable[[], V], *, code: tuple[str, ...] = (),
                keep_refusal: Callable[[Any], bool] | None = None) -> V:
    """``compute()``'s answer to ``key``, from the disk when it was computed before. A
    refusal (UserError) for which ``keep_refusal`` says yes is kept too, and raised again."""
    from .errors import UserError

    path = kept_file(kind, key, code)
    kept = read_kept(path)
    if kept is not None:
        if isinstance(kept.get("refusal"), str):
            raise UserError(kept["refusal"])
        if "answer" in kept:
            return kept["answer"]
    try:
        answer = compute()
    except UserError as exc:
        if keep_refusal is not None and keep_refusal(exc):
            write_kept(path, {"refusal": exc.message})
        raise
    write_kept(path, {"answer": answer})
    return answer
