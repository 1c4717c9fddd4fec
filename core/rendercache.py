"""Rendered rows kept on disk: a dataset is tokenized once, not once per run.

Rendering (chat template, tokenizer, mask) is the slow part of reading a dataset. The
trainer (:meth:`tunedeck.core.finetune.Run._datasets`) and the whole-set stats of the
dataset preview (:func:`tunedeck.core.preview.preview_stats`) both go through a
:class:`RowCache`: a row rendered before is read from the project's cache file, a new one
is rendered and added to it. So training after the Dataset screen's stats, or a second
run on the same data, tokenizes nothing.

**One file per question.** :func:`cache_path` names the file by a digest of what decides
the tokens: every source's files (:func:`tunedeck.core.sources.data_stamps`: path, size,
modification time, weight, format, columns), the model's tokenizer files, the settings
that render (``model.chat_template``, ``model.trust_remote_code``, ``dataset.format``,
``columns``, ``system_prompt``, ``reasoning``, ``max_length``, ``loss_on``, ``training.method``), the code that
renders and the library versions (:func:`tunedeck.core.kept.kept_file`). A change to any
of them names another file; the least recently used files beyond :data:`FILES_KEPT` are
removed.

**Rows by content.** Inside a file a row is found by a digest of its conversation (the
messages and tool schemas after the format and columns are applied), so a row repeated by
a source's weight, or the same conversation twice, is rendered once, and the held-out eval
rows and a separate eval file's rows are found as well as the training rows.

**The file** (little-endian, read without pickle; written to a temp file in the same
folder and renamed, so a reader sees the old file or the new one)::

    ids      int32 per token     every rendered row's kept tokens, one row after another
    mask     1 bit per token     trained (label = the token) or not (label = -100), packed
    index    41 bytes per row    sorted by digest: digest, first token, kept tokens, tokens
                                 before truncation, trained tokens, reason, stop trained
    reasons  JSON list           why rows could not be rendered (the template's refusals)
    footer   JSON                version, counts, where each part starts, a blake2b of each
    trailer  16 bytes            the footer's length and a magic word

A file that does not read back exactly (cut short, a bad digest, counts that do not add
up) is ignored, and the next render writes it afresh; a cache that cannot be written only
costs the time to render again.

Light at import (the standard library); numpy is imported when a cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

IGNORE = -100
MAGIC = b"TDRCACHE"
VERSION = 1
TRAILER = struct.Struct("<Q8s")  # footer length, magic
FILES_KEPT = 4  # cache files kept (the least recently used beyond are removed)
STALE_TMP_S = 3600.0  # a temp file not written to for this long was left by a killed writer
CHUNK_TOKENS = 1 << 20  # tokens per write and per copied block (a multiple of 8)
# what the rendering of a row depends on (besides the tokenizer and the settings in the key)
CODE = ("render.py", "datafile.py", "conversation.py", "sources.py", "preview.py", "rendercache.py", "preference.py")
RENDER_SETTINGS = ("format", "columns", "system_prompt", "reasoning", "max_length", "loss_on")

_RECORD = struct.Struct("<16sqiiiiB")  # digest, start, kept, full length, trained, reason, stop


def _index_dtype() -> Any:
    import numpy as np

    return np.dtype([("digest", "S16"), ("start", "<i8"), ("kept", "<i4"), ("full", "<i4"),
                     ("trained", "<i4"), ("reason", "<i4"), ("stop", "u1")])


# -- which file -----------------------------------------------------------------------------


def cache_key(project: Any) -> dict[str, Any] | None:
    """What decides a project's rendered rows; None without a dataset or a readable model."""
    from .kept import stamp
    from .models import resolve_source
    from .sources import data_stamps

    if not project["dataset.path"]:
        return None
    try:
        ref = resolve_source(project["model.source"], project.root, allow_pickle=True)
    except Exception:  # noqa: BLE001 - no model, no tokenizer: nothing to key by
        return None
    return {"tokenizer": stamp(ref.path), "data": data_stamps(project),
            "dataset": {k: project[f"dataset.{k}"] for k in RENDER_SETTINGS},
            "template": project["model.chat_template"], "trust": bool(project["model.trust_remote_code"]),
            "method": project["training.method"]}


def cache_path(project: Any) -> Path | None:
    """The project's cache file (it may not exist yet); None when there is nothing to key it by."""
    from .kept import kept_file

    key = cache_key(project)
    if key is None:
        return None
    return kept_file("rendered", key, code=CODE).with_suffix(".bin")


def row_digest(messages: Any) -> bytes:
    """16 bytes naming a conversation: its messages and tool schemas."""
    body = json.dumps([list(messages), getattr(messages, "tools", None)], ensure_ascii=False, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# -- reading --------------------------------------------------------------------------------


class CachedRow:
    """A row read from a cache file, with what :class:`tunedeck.core.render.Rendered` gives
    the trainer and the stats: ``input_ids``, ``labels``, ``full_length``, ``truncated``,
    ``n_trained``, ``stop_trained`` and ``example()``."""

    __slots__ = ("_file", "_i")

    def __init__(self, file: CacheFile, i: int) -> None:
        self._file, self._i = file, i

    @property
    def input_ids(self) -> Any:
        """The kept tokens (a read-only numpy view; ``len()`` reads nothing)."""
        start, kept = self._file.span(self._i)
        return self._file.ids[start:start + kept]

    @property
    def labels(self) -> list[int]:
        import numpy as np

        start, kept = self._file.span(self._i)
        ids = self._file.ids[start:start + kept]
        return np.where(self._file.trained_bits(start, kept), ids, IGNORE).tolist()

    @property
    def full_length(self) -> int:
        return int(self._file.index["full"][self._i])

    @property
    def truncated(self) -> bool:
        return self.full_length > int(self._file.index["kept"][self._i])

    @property
    def n_trained(self) -> int:
        return int(self._file.index["trained"][self._i])

    @property
    def stop_trained(self) -> bool:
        return bool(self._file.index["stop"][self._i])

    def example(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids.tolist(), "labels": self.labels}


class CacheFile:
    """A cache file, read and checked; :meth:`open` gives None for one that does not read back."""

    def __init__(self, path: Path, index: Any, reasons: list[str], ids: Any, mask: Any, tokens: int) -> None:
        self.path, self.index, self.reasons, self.ids, self.mask, self.tokens = path, index, reasons, ids, mask, tokens
        self.digests = index["digest"]

    @classmethod
    def open(cls, path: Path) -> CacheFile | None:
        try:
            return cls._read(path)
        except Exception:  # noqa: BLE001 - a damaged or foreign file is only a cache that is not there
            return None

    @classmethod
    def _read(cls, path: Path) -> CacheFile | None:
        import numpy as np

        dtype = _index_dtype()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe put in its place does not block
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < TRAILER.size:
                return None
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # what is checked is what is read
        finally:
            os.close(fd)
        size = len(mapped)
        length, magic = TRAILER.unpack(mapped[size - TRAILER.size:])
        if magic != MAGIC or length > size - TRAILER.size:
            return None
        footer = json.loads(mapped[size - TRAILER.size - length:size - TRAILER.size])
        if footer.get("version") != VERSION:
            return None
        rows, tokens = int(footer["rows"]), int(footer["tokens"])
        parts = footer["parts"]
        layout = {"ids": (0, 4 * tokens), "mask": (4 * tokens, (tokens + 7) // 8)}
        layout["index"] = (sum(layout["mask"]), rows * dtype.itemsize)
        layout["reasons"] = (sum(layout["index"]), int(parts["reasons"]["size"]))
        if sum(layout["reasons"]) + length + TRAILER.size != size:
            return None
        view = memoryview(mapped)
        try:
            for name, (offset, n) in layout.items():
                if hashlib.blake2b(view[offset:offset + n], digest_size=16).hexdigest() != parts[name]["blake2b"]:
                    return None
        finally:
            view.release()
        offset, n = layout["index"]
        index = np.frombuffer(mapped[offset:offset + n], dtype=dtype)
        offset, n = layout["reasons"]
        reasons = json.loads(mapped[offset:offset + n].decode("utf-8"))
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            return None
        if rows:
            starts, kept = index["start"], index["kept"]
            ok = (np.all(starts >= 0) and np.all(kept >= 0) and np.all(starts + kept <= tokens)
                  and np.all(kept <= index["full"]) and np.all(index["trained"] <= kept)
                  and np.all((index["reason"] >= -1) & (index["reason"] < len(reasons)))
                  and np.all(index["digest"][1:] > index["digest"][:-1]))
            if not ok:
                return None
        ids = np.frombuffer(mapped, dtype="<i4", count=tokens, offset=0)
        mask = np.frombuffer(mapped, dtype="u1", count=(tokens + 7) // 8, offset=4 * tokens)
        try:
            os.utime(path)  # recently used: kept when older files are removed
        except OSError:
            pass
        return cls(path, index, reasons, ids, mask, tokens)

    def __len__(self) -> int:
        return len(self.index)

    def find(self, digest: bytes) -> int | None:
        """The record of the row with ``digest``, or None."""
        import numpy as np

        if not len(self.index):
            return None
        key = np.array(digest, dtype="S16")
        i = int(np.searchsorted(self.digests, key))
        if i < len(self.index) and self.digests[i:i + 1].tobytes() == digest:
            return i
        return None

    def span(self, i: int) -> tuple[int, int]:
        record = self.index[i]
        return int(record["start"]), int(record["kept"])

    def trained_bits(self, start: int, count: int) -> Any:
        """Whether each of ``count`` tokens from ``start`` is trained (bools)."""
        import numpy as np

        if not count:
            return np.zeros(0, dtype=bool)
        first, last = start // 8, (start + count + 7) // 8
        bits = np.unpackbits(np.asarray(self.mask[first:last]))
        skip = start - 8 * first
        return bits[skip:skip + count].astype(bool)

    def row(self, i: int) -> CachedRow:
        """The row at record ``i``; ValueError (the reason) for a row the template could not render."""
        reason = int(self.index["reason"][i])
        if reason >= 0:
            raise ValueError(self.reasons[reason])
        return CachedRow(self, i)


# -- writing --------------------------------------------------------------------------------


class _Writer:
    """Writes a cache file as rows come (tokens to disk at once, the index in memory: 41
    bytes a row), then renames it into place."""

    def __init__(self, final: Path) -> None:
        import numpy as np

        self.np = np
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final.parent)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        self.main, self.main_path = os.fdopen(fd, "wb"), Path(name)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.mask.", suffix=".tmp", dir=final.parent)
        except OSError:
            self.main.close()
            _unlink(self.main_path)
            raise
        self.side, self.side_path = os.fdopen(fd, "w+b"), Path(name)
        self.tokens = 0
        self.records = bytearray()
        self.reasons: list[str] = []
        self._reason_ids: dict[str, int] = {}
        self._ids: list[Any] = []
        self._bits: list[Any] = []
        self._pending = 0
        self._carry = np.zeros(0, dtype=np.uint8)  # trained bits not yet a whole byte
        self.ids_hash = hashlib.blake2b(digest_size=16)
        self.mask_hash = hashlib.blake2b(digest_size=16)
        # a pass that ends in an error leaves no temp files (after a rename the name is free)
        weakref.finalize(self, _unlink, self.main_path, self.side_path)

    def add(self, digest: bytes, ids: Any, trained: Any, full: int, stop: bool) -> None:
        np = self.np
        ids = np.asarray(ids, dtype="<i4")
        bits = np.asarray(trained, dtype=np.uint8)
        self.records += _RECORD.pack(digest, self.tokens, len(ids), int(full), int(np.count_nonzero(bits)), -1, bool(stop))
        self._tokens(ids, bits)

    def add_failed(self, digest: bytes, reason: str) -> None:
        number = self._reason_ids.get(reason)
        if number is None:
            number = self._reason_ids[reason] = len(self.reasons)
            self.reasons.append(reason)
        self.records += _RECORD.pack(digest, self.tokens, 0, 0, 0, number, True)

    def add_file(self, old: CacheFile) -> None:
        """Every row of ``old``, its tokens copied block by block."""
        np = self.np
        index = np.array(old.index)
        index["start"] += self.tokens
        failed = index["reason"] >= 0
        index["reason"][failed] += len(self.reasons)
        self.reasons.extend(old.reasons)
        self.records += index.tobytes()
        for a in range(0, old.tokens, CHUNK_TOKENS):
            b = min(old.tokens, a + CHUNK_TOKENS)
            self._tokens(np.asarray(old.ids[a:b]), old.trained_bits(a, b - a).astype(np.uint8))

    def _tokens(self, ids: Any, bits: Any) -> None:
        self._ids.append(ids)
        self._bits.append(bits)
        self.tokens += len(ids)
        self._pending += len(ids)
        if self._pending >= CHUNK_TOKENS:
            self._flush()

    def _flush(self, last: bool = False) -> None:
        np = self.np
        if self._ids:
            block = np.concatenate(self._ids).astype("<i4", copy=False).tobytes()
            self.main.write(block)
            self.ids_hash.update(block)
        bits = np.concatenate([self._carry, *self._bits]) if self._bits else self._carry
        whole = len(bits) if last else len(bits) // 8 * 8
        if whole:
            packed = np.packbits(bits[:whole]).tobytes()
            self.side.write(packed)
            self.mask_hash.update(packed)
        self._carry = bits[whole:]
        self._ids, self._bits, self._pending = [], [], 0

    def finish(self) -> None:
        """Write the index and the footer and put the file in place."""
        import shutil

        from .project import current_umask

        np = self.np
        self._flush(last=True)
        self.side.seek(0)
        shutil.copyfileobj(self.side, self.main, 8 << 20)
        index = np.frombuffer(bytes(self.records), dtype=_index_dtype())
        order = np.argsort(index["digest"], kind="stable")
        index = index[order]
        if len(index):
            first = np.ones(len(index), dtype=bool)
            first[1:] = index["digest"][1:] != index["digest"][:-1]
            index = index[first]  # a row rendered twice (read twice) is kept once
        index_bytes = index.tobytes()
        reasons = json.dumps(self.reasons, ensure_ascii=False).encode("utf-8")
        parts = {"ids": {"blake2b": self.ids_hash.hexdigest()}, "mask": {"blake2b": self.mask_hash.hexdigest()},
                 "index": {"blake2b": hashlib.blake2b(index_bytes, digest_size=16).hexdigest()},
                 "reasons": {"blake2b": hashlib.blake2b(reasons, digest_size=16).hexdigest(), "size": len(reasons)}}
        footer = json.dumps({"version": VERSION, "rows": len(index), "tokens": self.tokens, "parts": parts}).encode()
        self.main.write(index_bytes)
        self.main.write(reasons)
        self.main.write(footer)
        self.main.write(TRAILER.pack(len(footer), MAGIC))
        self.main.close()
        self.side.close()
        self.side_path.unlink(missing_ok=True)
        os.chmod(self.main_path, 0o666 & ~current_umask())
        os.replace(self.main_path, self.final)

    def discard(self) -> None:
        for fh, path in ((self.main, self.main_path), (self.side, self.side_path)):
            try:
                fh.close()
            except OSError:
                pass
            path.unlink(missing_ok=True)


def _unlink(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_stale(folder: Path) -> None:
    """Temp files that writers killed part way left behind."""
    now = time.time()
    for stale in folder.glob(".rendered-*.tmp"):
        try:
            if now - stale.lstat().st_mtime > STALE_TMP_S:
                stale.unlink()
        except OSError:
            pass


def prune(folder: Path, keep: int = FILES_KEPT) -> None:
    """Remove the least recently used cache files beyond ``keep``."""
    files = []
    for path in folder.glob("rendered-*.bin"):
        try:
            files.append((path.stat().st_mtime, path))
        except OSError:
            pass
    for _, path in sorted(files, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


# -- the cache a pass renders through ---------------------------------------------------------


class RowCache:
    """Rendered rows for one pass over a project's data: read from its cache file when they
    are there, rendered (and added) when not; :meth:`finish` writes the file when anything
    was rendered.

    ``repeats``: the pass hands the same row object more than once (a source's weight) and
    keeps every result anyway (the trainer): remember results by object too, so a repeat
    costs no digest. ``write``: False reads only (ranks but the first of a multi-process run).
    """

    def __init__(self, path: Path | None, *, repeats: bool = False, write: bool = True) -> None:
        self.path = path
        self.old = CacheFile.open(path) if path is not None and path.exists() else None
        self.damaged = path is not None and path.exists() and self.old is None
        self.write = write and path is not None
        self.read = 0  # distinct rows read from the file
        self.rendered = 0  # distinct rows rendered in this pass
        self.written = False
        self._writer: _Writer | None = None
        self._repeats: dict[int, tuple[Any, Any]] | None = {} if repeats else None
        self._new: set[bytes] | None = set() if repeats else None  # digests met in this pass

    def render(self, messages: Any, render_one: Callable[[Any], Any]) -> Any:
        """``render_one(messages)``, or the row as kept; raises ValueError (the reason) as render does."""
        if self._repeats is not None:
            seen = self._repeats.get(id(messages))
            if seen is not None and seen[0] is messages:
                return _result(seen[1])
        digest = row_digest(messages)
        result: Any
        i = self.old.find(digest) if self.old is not None else None
        if i is not None:
            if self._new is None or digest not in self._new:
                self.read += 1
            if self._new is not None:
                self._new.add(digest)
            try:
                result = self.old.row(i)
            except ValueError as exc:
                result = exc
        else:
            try:
                result = render_one(messages)
            except ValueError as exc:
                result = exc
            self._keep(digest, result)
        if self._repeats is not None:
            self._repeats[id(messages)] = (messages, _Slim.of(result))
        return _result(result)

    def _keep(self, digest: bytes, result: Any) -> None:
        if self._new is not None:
            if digest in self._new:
                return
            self._new.add(digest)
        self.rendered += 1
        if not self.write:
            return
        try:
            if self._writer is None:
                self._writer = _Writer(self.path)  # type: ignore[arg-type]
            if isinstance(result, ValueError):
                self._writer.add_failed(digest, str(result))
                return
            np = self._writer.np
            ids = np.asarray(result.input_ids, dtype="<i4")
            labels = np.asarray(result.labels, dtype="<i4")
            trained = labels != IGNORE
            if len(ids) != len(labels) or not np.array_equal(labels[trained], ids[trained]):
                return  # labels that are not the tokens or -100: not kept (never so today)
            self._writer.add(digest, ids, trained.view(np.uint8), result.full_length, result.stop_trained)
        except (OSError, ValueError, OverflowError):
            self._abandon()

    def _abandon(self) -> None:
        if self._writer is not None:
            self._writer.discard()
        self._writer = None
        self.write = False

    def finish(self) -> bool:
        """Write the file (the rows read and the rows rendered) when rows were rendered; whether it was."""
        writer = self._writer
        if writer is None:
            self.close()
            return False
        try:
            if self.old is not None:
                writer.add_file(self.old)
            self.close()
            writer.finish()
        except (OSError, ValueError, OverflowError):
            writer.discard()
            return False
        finally:
            self._writer = None
        self.written = True
        prune(self.path.parent)  # type: ignore[union-attr]
        return True

    def close(self) -> None:
        """Let the file go (its mapping goes with the last row read from it)."""
        self.old = None
        self._repeats = None if self._repeats is None else {}

    def report(self) -> dict[str, Any]:
        """What the pass did with the cache, for the run's data info."""
        return {"file": str(self.path) if self.path else None, "rows_read": self.read, "rows_rendered": self.rendered,
                "used": self.read > 0, "written": self.written, "damaged_file_ignored": self.damaged}


class _Slim:
    """A rendered row without its text and offsets (what a repeat of it needs, kept for the pass)."""

    __slots__ = ("full_length", "input_ids", "labels", "stop_trained")

    def __init__(self, input_ids: list[int], labels: list[int], full_length: int, stop_trained: bool) -> None:
        self.input_ids, self.labels, self.full_length, self.stop_trained = input_ids, labels, full_length, stop_trained

    @classmethod
    def of(cls, result: Any) -> Any:
        if isinstance(result, (ValueError, CachedRow)):
            return result
        return cls(result.input_ids, result.labels, result.full_length, result.stop_trained)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    def example(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def _result(result: Any) -> Any:
    if isinstance(result, ValueError):
        raise ValueError(str(result))
    return result
