"""Reading dataset files row by row and turning each row into chat messages.

Light on purpose (no ``datasets`` import for the common files): JSONL, JSON and CSV are
read with the standard library, Parquet with pyarrow, ``save_to_disk`` folders with
``datasets``. Rows that do not fit come back as :class:`RowError` with their row number
and a reason; nothing is dropped silently.

Every format is normalised to OpenAI-style messages
(``[{"role": "system"|"user"|"assistant", "content": str}, ...]``), which the
render-and-mask code turns into tokens and labels.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, file_error

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# the field names each format reads, by role in the format (the project's
# dataset.columns maps these to other names)
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}
ROLES = ("system", "user", "assistant")


@dataclass
class RowError:
    row: int  # 1-based row (line for JSONL) number
    reason: str


def read_rows(path: Path, limit: int | None = None,
              key: str = "dataset.path") -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (row number, row dict or RowError), streaming where the format allows.
    ``key`` names the project key the path came from, in the messages."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{key} = {str(path)!r}: no such file or folder") from None
    except OSError as exc:
        raise file_error(path, exc, "dataset file") from None
    if stat.S_ISDIR(mode):
        yield from _read_saved(path, limit, key)
        return
    if not stat.S_ISREG(mode):
        raise UserError(f"{key} = {str(path)!r}: not a regular file (a pipe, a device or a socket); give a "
                        "dataset file or a save_to_disk folder")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    reader = readers.get(suffix)
    if reader is None:
        raise UserError(
            f"{key} = {str(path)!r}: unknown file type {suffix or '(none)'}; "
            "use .jsonl, .json, .csv, .parquet or a save_to_disk folder"
        )
    try:
        yield from reader(path, limit)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
        raise file_error(path, exc, "dataset file") from None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")  # a byte order mark is not part of the first row
    except OSError as exc:
        raise file_error(path, exc, "dataset file") from None


def _json_row(data: bytes | str) -> Any:
    """One JSON value; ValueError with a reason in words for what JSON rejects or cannot hold."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply (thousands of brackets)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"a value JSON cannot hold here ({str(exc).splitlines()[0][:80]})") from None


def _read_jsonl(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    n = 0
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise file_error(path, exc, "dataset file") from None
    with fh:
        for number, raw in enumerate(fh, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte order mark
            if not raw.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RowError(number, f"not UTF-8 text (byte {exc.start + 1} of the line)")
                continue
            try:
                obj = _json_row(line)
            except ValueError as exc:
                yield number, RowError(number, str(exc))
                continue
            if not isinstance(obj, dict):
                yield number, RowError(number, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield number, obj


def _read_json(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise file_error(path, exc, "dataset file") from None
    except OSError as exc:
        raise file_error(path, exc, "dataset file") from None
    try:
        data = _json_row(text)
    except ValueError as exc:
        raise UserError(f"dataset {path}: not valid JSON ({exc}); JSON Lines files should end in .jsonl") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: the first list of objects
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise UserError(f"dataset {path}: expected a JSON list of rows")
    for number, obj in enumerate(data[:limit] if limit is not None else data, 1):
        if isinstance(obj, dict):
            yield number, obj
        else:
            yield number, RowError(number, f"expected a JSON object, got {type(obj).__name__}")


CSV_FIELD_LIMIT = 64 * 2**20  # a long answer in one cell is fine; the csv module's default is 128 KiB


def _read_csv(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        number = 0
        try:
            for number, row in enumerate(reader, 1):
                if limit is not None and number > limit:
                    return
                if None in row:
                    yield number, RowError(number, "more fields than the header has")
                    continue
                yield number, {k: v for k, v in row.items() if k is not None}
        except (csv.Error, UnicodeDecodeError) as exc:
            what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"bad CSV ({exc})"
            raise UserError(f"dataset {path}: {what} after row {number}; save it as UTF-8 CSV") from None


def _read_parquet(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - comes with datasets
        raise UserError("reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"dataset {path}: not a readable Parquet file ({exc.__class__.__name__})") from None
    number = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches)
            objs = batch.to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # corrupt pages, bad encodings: pyarrow's own errors
            detail = str(exc).splitlines()[0][:120] if str(exc) else ""
            raise UserError(f"dataset {path}: corrupt Parquet data after row {number} "
                            f"({exc.__class__.__name__}: {detail})") from None
        for obj in objs:
            number += 1
            if limit is not None and number > limit:
                return
            yield number, obj


def _read_saved(path: Path, limit: int | None,
                key: str = "dataset.path") -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    if not any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(f"{key} = {str(path)!r}: a folder, but not one written by save_to_disk")
    try:
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        rows = iter(ds)
    except Exception as exc:
        raise UserError(f"dataset {path}: cannot load the saved dataset ({exc.__class__.__name__})") from None
    number = 0
    while limit is None or number < limit:
        try:
            obj = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise UserError(f"dataset {path}: the saved dataset is damaged after row {number} "
                            f"({exc.__class__.__name__})") from None
        number += 1
        yield number, obj


# -- formats ---------------------------------------------------------------------------


def detect_format(rows: list[dict[str, Any]], columns: dict[str, str] | None = None) -> str | None:
    """The format most of ``rows`` fit, by their fields; None when none fits."""
    columns = columns or {}
    votes: dict[str, int] = {}
    for row in rows:
        fmt = _row_format(row, columns)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if not votes:
        return None
    return max(votes, key=lambda f: (votes[f], -FORMATS.index(f)))


def _row_format(row: dict[str, Any], columns: dict[str, str]) -> str | None:
    def has(name: str) -> bool:
        return columns.get(name, name) in row

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") and has("output"):
        return "alpaca"
    if has("prompt") and has("completion"):
        return "prompt_completion"
    if has("text"):
        return "text"
    return None


def to_messages(
    row: dict[str, Any], fmt: str, columns: dict[str, str] | None = None, system_prompt: str = "",
    notes: list[str] | None = None,
) -> list[dict[str, str]]:
    """One row as chat messages; raises ValueError with the reason when it does not fit.

    ``text`` rows become a single assistant turn with no prompt (everything trains). A row
    that ends with prompt turns after its last answer (a conversation cut after a question)
    loses them: nothing would train on them; ``notes`` gets a word about it.
    """
    columns = columns or {}

    def get(name: str, required: bool = True) -> Any:
        key = columns.get(name, name)
        if key not in row or row[key] is None:
            if required:
                raise ValueError(f'missing field "{key}"')
            return None
        return row[key]

    if fmt == "messages":
        raw = get("messages")
        if isinstance(raw, str):
            try:
                raw = _json_row(raw)
            except ValueError:
                raise ValueError('"messages" is a string that is not JSON') from None
        if not isinstance(raw, list):
            raise ValueError(f'"messages" is not a list (got {type(raw).__name__})')
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ValueError(f"message {i + 1} is not an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i + 1}: unknown role {role!r} (expected system, user or assistant)")
            if not isinstance(content, str):
                raise ValueError(f"message {i + 1}: content is not text")
            messages.append({"role": role, "content": content})
    elif fmt == "sharegpt":
        raw = get("conversations")
        if not isinstance(raw, list):
            raise ValueError(f'"conversations" is not a list (got {type(raw).__name__})')
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise ValueError(f"turn {i + 1} is not an object")
            who, value = m.get("from"), m.get("value")
            role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
            if role is None:
                raise ValueError(f'turn {i + 1}: unknown speaker {who!r} (expected human, gpt or system)')
            if not isinstance(value, str):
                raise ValueError(f"turn {i + 1}: value is not text")
            messages.append({"role": role, "content": value})
    elif fmt == "alpaca":
        instruction, extra, output = get("instruction"), get("input", required=False), get("output")
        for name, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str):
                raise ValueError(f'"{columns.get(name, name)}" is not text')
        prompt = instruction if not extra else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("prompt and completion must be text")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "text":
        text = get("text")
        if not isinstance(text, str):
            raise ValueError('"text" is not text')
        if not text.strip():
            raise ValueError("empty text")
        _check_text(text)
        return [{"role": "assistant", "content": text}]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    for m in messages:
        _check_text(m["content"])
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if 0 <= last_answer < len(messages) - 1 and all(m["role"] == "user" for m in messages[last_answer + 1:]):
        if notes is not None:
            notes.append("a question after the last answer was dropped (nothing trains on it)")
        messages = messages[: last_answer + 1]
    _check_turns(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def _check_text(text: str) -> None:
    """Text a tokenizer can take: valid Unicode (JSON can spell a lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text that is not valid Unicode (a lone surrogate {text[exc.start]!r} at character "
                         f"{exc.start + 1})") from None


def _check_turns(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise ValueError("no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("only a system message")
    if any(m["role"] == "system" for m in body):
        raise ValueError("a system message after the first turn")
    if not any(m["role"] == "assistant" for m in body):
        raise ValueError("no assistant answer to train on")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError("an empty assistant answer")
    if body[0]["role"] != "user":
        raise ValueError("the conversation does not start with a user turn")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise ValueError(f"two {a['role']} turns in a row")


@dataclass
class DatasetSummary:
    path: str
    format: str
    rows: int
    skipped: list[RowError]
    trimmed: list[int] = field(default_factory=list)  # rows whose trailing question was dropped

    @property
    def good(self) -> int:
        return self.rows - len(self.skipped)


def load_messages(
    path: Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    system_prompt: str = "",
    limit: int | None = None,
    key: str = "dataset.path",
) -> tuple[list[tuple[int, list[dict[str, str]]]], DatasetSummary]:
    """Every usable row as (row number, messages), and a summary with the skipped rows.
    ``key`` names the project key the path came from, in the messages."""
    columns = columns or {}
    raw = list(read_rows(path, limit, key))
    if fmt == "auto" and not raw:
        fmt = "empty"
    if fmt == "auto":
        sample = [r for _, r in raw[:200] if isinstance(r, dict)]
        detected = detect_format(sample, columns)
        if detected is None:
            fields = sorted({k for r in sample for k in r})[:8]
            raise UserError(
                f"dataset {path}: cannot tell the format from the fields {fields}; set dataset.format "
                "and, for other field names, dataset.columns"
            )
        fmt = detected
    good: list[tuple[int, list[dict[str, str]]]] = []
    skipped: list[RowError] = []
    trimmed: list[int] = []
    for number, row in raw:
        if isinstance(row, RowError):
            skipped.append(row)
            continue
        notes: list[str] = []
        try:
            good.append((number, to_messages(row, fmt, columns, system_prompt, notes)))
        except ValueError as exc:
            skipped.append(RowError(number, str(exc)))
            continue
        if notes:
            trimmed.append(number)
    return good, DatasetSummary(str(path), fmt, len(raw), skipped, trimmed)


def dataset_problem(summary: DatasetSummary, key: str = "dataset.path") -> str | None:
    """Why a dataset cannot train, or None. Refused: empty, or most rows skipped."""
    if summary.rows == 0:
        return f"{key}: {summary.path} has no rows"
    if summary.good == 0:
        first = summary.skipped[0]
        return (f"{key}: none of the {summary.rows} rows of {summary.path} fit the {summary.format} format "
                f"(row {first.row}: {first.reason}); check dataset.format and dataset.columns")
    if len(summary.skipped) * 2 > summary.rows:
        first = summary.skipped[0]
        return (f"{key}: {len(summary.skipped)} of {summary.rows} rows of {summary.path} do not fit the "
                f"{summary.format} format (row {first.row}: {first.reason}); fix the data or the format")
    return None


def eval_count(rows: int, ratio: float) -> int:
    """Rows held out for evaluation: round(rows * ratio), at least one when ratio > 0."""
    if ratio <= 0 or rows == 0:
        return 0
    return max(1, round(rows * ratio))


@dataclass
class Splits:
    """A project's usable rows, split into training and evaluation (seeded)."""

    train: list[tuple[int, list[dict[str, str]]]]
    eval: list[tuple[int, list[dict[str, str]]]]
    summary: DatasetSummary
    eval_summary: DatasetSummary | None  # a separate eval file's; None for a ratio
    eval_path: Path | None


def load_splits(project: Any) -> Splits:
    """Read a project's [dataset] rows and its eval split, refusing, with one line, a dataset
    that cannot train. The one place that does this: check, the launcher's pre-flight and
    the trainer all call it, so they agree on every row."""
    import random

    if not project["dataset.path"]:
        raise UserError("dataset.path is empty; set it to a JSONL/JSON/CSV/Parquet file "
                        "(e.g. --set dataset.path=data.jsonl)")
    opts = dict(fmt=project["dataset.format"], columns=project["dataset.columns"],
                system_prompt=project["dataset.system_prompt"])
    rows, summary = load_messages(project.resolve_path(project["dataset.path"]), **opts)
    problem = dataset_problem(summary)
    if problem:
        raise UserError(problem)
    split = project["dataset.eval_split"]
    if isinstance(split, str):
        eval_path = project.resolve_path(split)
        eval_rows, eval_summary = load_messages(eval_path, key="dataset.eval_split", **opts)
        problem = dataset_problem(eval_summary, key="dataset.eval_split")
        if problem:
            raise UserError(problem)
        return Splits(rows, eval_rows, summary, eval_summary, eval_path)
    order = list(range(len(rows)))
    random.Random(project["training.seed"]).shuffle(order)
    held = set(order[: eval_count(len(rows), split)])
    train = [r for i, r in enumerate(rows) if i not in held]
    if split > 0 and not train:
        raise UserError(f"dataset.eval_split = {split}: {len(rows)} usable row(s) leave nothing to train on; "
                        "add rows or set dataset.eval_split = 0")
    return Splits(train, [r for i, r in enumerate(rows) if i in held], summary, None, None)
