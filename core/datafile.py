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
import itertools
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conversation import (
    ROLES, Conversation, MediaError, check_media, check_turns, normalise_tools, openai_turns, sharegpt_turns,
)
from .errors import UserError, file_error
from .sources import Source, apply_weight, project_sources, shares, source_columns, source_format

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
               ".parquet": _read_parquet, ".arrow": _read_arrow}
    reader = readers.get(suffix)
    if reader is None:
        raise UserError(
            f"{key} = {str(path)!r}: unknown file type {suffix or '(none)'}; "
            "use .jsonl, .json, .csv, .parquet, .arrow or a save_to_disk folder"
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


def _read_arrow(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """An Arrow file as ``datasets`` writes its cache (an IPC stream), or an Arrow IPC file."""
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - comes with datasets
        raise UserError("reading Arrow files needs pyarrow; pip install pyarrow") from None
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
    except Exception as exc:
        raise UserError(f"dataset {path}: not a readable Arrow file ({exc.__class__.__name__})") from None
    number = 0
    while True:
        try:
            objs = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as exc:
            raise UserError(f"dataset {path}: corrupt Arrow data after row {number} ({exc.__class__.__name__})") from None
        for obj in objs:
            number += 1
            if limit is not None and number > limit:
                return
            yield number, obj


def read_source(source: Source, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """A source's rows (several files of a cached dataset one after another, numbered on)."""
    files = source.files()
    if len(files) == 1:
        yield from read_rows(files[0], limit, source.key)
        return
    offset = 0
    for path in files:
        last = 0
        for number, row in read_rows(path, None if limit is None else limit - offset, source.key):
            last = number
            if isinstance(row, RowError):
                row = RowError(offset + number, row.reason)
            yield offset + number, row
        offset += last
        if limit is not None and offset >= limit:
            return


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


def candidates(rows: list[dict[str, Any]], columns: dict[str, str] | None = None) -> list[str]:
    """Every format whose fields the first of ``rows`` have (more than one: the choice is ambiguous)."""
    columns = columns or {}
    if not rows:
        return []
    row = rows[0]
    return [fmt for fmt in FORMATS if all(columns.get(f, f) in row for f in REQUIRED_FIELDS[fmt])]


# the fields a format cannot do without (alpaca's input and the system/tools columns are optional)
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"), "text": ("text",),
}


def _row_format(row: dict[str, Any], columns: dict[str, str]) -> str | None:
    for fmt in FORMATS:
        if all(columns.get(f, f) in row for f in REQUIRED_FIELDS[fmt]):
            return fmt
    return None


# preference layouts: (fields that name it, what it is, how to fine-tune on its preferred answers)
PREFERENCE_LAYOUTS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("conversations", "chosen", "rejected"), "ShareGPT conversations with a chosen and a rejected answer", ""),
    (("instruction", "chosen", "rejected"), "instruction / chosen / rejected (Alpaca ranking)",
     'dataset.format = "alpaca" with dataset.columns = {output = "chosen"}'),
    (("prompt", "chosen", "rejected"), "prompt / chosen / rejected pairs",
     'dataset.format = "prompt_completion" with dataset.columns = {completion = "chosen"}'),
    (("chosen", "rejected"), "chosen / rejected conversations",
     'dataset.format = "messages" with dataset.columns = {messages = "chosen"}'),
    (("question", "response_j", "response_k"), "question / response_j / response_k pairs",
     'dataset.format = "prompt_completion" with dataset.columns = {prompt = "question", completion = "response_j"}'),
)


def preference_layout(row: dict[str, Any]) -> tuple[str, str] | None:
    """(what it is, the settings that fine-tune on its preferred answers) when ``row`` is
    preference data: paired (chosen / rejected, in the common layouts) or unpaired
    (prompt / completion / a true-or-false label, as KTO reads it)."""
    for fields, what, hint in PREFERENCE_LAYOUTS:
        if all(f in row for f in fields):
            if fields == ("chosen", "rejected") and not isinstance(row["chosen"], list):
                return "chosen / rejected texts without a prompt", ""
            return what, hint
    if isinstance(row.get("label"), bool) and (("prompt" in row and "completion" in row)
                                                or "messages" in row or "conversations" in row):
        fields = "prompt / completion" if "prompt" in row else ("messages" if "messages" in row else "conversations")
        return f"unpaired preference data: {fields} with a true-or-false label (KTO)", ""
    return None


def _answerless(row: dict[str, Any]) -> str | None:
    """What a row is when it has prompts but no answers: data for other training methods."""
    if "prompt" in row and isinstance(row.get("completions"), list) and isinstance(row.get("labels"), list):
        return "step-wise supervision data (prompt / completions / labels, for process reward models)"
    if "prompt" in row and not any(isinstance(v, (str, list, dict)) for k, v in row.items() if k != "prompt"):
        return "prompt-only data (prompts without answers, for online methods such as GRPO)"
    return None


def media_refusal(path: Any, error: MediaError, row: int, key: str = "dataset.path") -> str:
    return (f"{key}: {path} has {error.what} in {error.where} (row {row}); tunedeck fine-tunes on text only: "
            "use a text-only dataset, or remove those rows or the column")


def sniff(sample: list[tuple[int, dict[str, Any] | RowError]], fmt: str, columns: dict[str, str] | None,
          path: Any, key: str = "dataset.path", method: str = "sft") -> str:
    """The format to read a file with: ``fmt``, or the one detected from its first rows.
    Raises UserError, one line, for what cannot be trained with ``method``
    (``training.method``): rows with images, audio or video (under any format), preference
    data for supervised fine-tuning and supervised data for a preference method, fields no
    format fits."""
    from .preference import PREFERENCE, is_pair_row

    columns = columns or {}
    rows = [(n, r) for n, r in sample if isinstance(r, dict)]
    for number, row in rows:
        try:
            check_media(row)
        except MediaError as exc:
            raise UserError(media_refusal(path, exc, number, key)) from None
    if method != "sft":
        return _pair_format(rows, fmt, columns, path, key, method)
    if fmt == PREFERENCE:
        raise UserError('dataset.format = "preference" reads pairs of answers, which train a preference method: '
                        'set training.method = "dpo" or "orpo" (or another dataset.format)')
    if not rows:
        return "empty" if fmt == "auto" else fmt
    if fmt != "auto":
        # an SFT format given for preference data: say what the data is, not "no assistant answer"
        number, row = rows[0]
        if preference_layout(row) and is_pair_row(row, columns):
            try:
                to_messages(row, fmt, columns)
            except ValueError:
                what, _ = preference_layout(row)
                raise UserError(f"{key}: {path} is preference data ({what}), which dataset.format = \"{fmt}\" reads "
                                f"as rows with one answer each (row {number} has none); set training.method = \"dpo\" "
                                '(or "orpo") to train on its pairs') from None
        return fmt
    if not columns:
        for _, row in rows[:20]:
            layout = preference_layout(row)
            if layout:
                what, hint = layout
                paired = is_pair_row(row)
                tail = ('; set training.method = "dpo" (or "orpo") to train on its pairs' if paired else
                        "; tunedeck trains on pairs (a chosen and a rejected answer to one prompt)")
                tail += (f", or fine-tune on the chosen answers alone with {hint}" if hint else "")
                raise UserError(f"{key}: {path} is preference data ({what}), which trains a preference "
                                f"method, not supervised fine-tuning{tail}")
    detected = detect_format([r for _, r in rows], columns)
    if detected is None:
        kind = _answerless(rows[0][1]) if not columns else None
        if kind:
            raise UserError(f"{key}: {path} is {kind}, with no answer to fine-tune on; supervised fine-tuning needs "
                            "an answer per prompt (set dataset.format and dataset.columns if a column holds one)")
        fields = sorted({k for _, r in rows for k in r})[:8]
        raise UserError(f"{key}: {path}: cannot tell the format from the fields {fields}; set dataset.format "
                        "and, for other field names, dataset.columns (the Dataset screen's m key maps them)")
    return detected


def _pair_format(rows: list[tuple[int, dict[str, Any]]], fmt: str, columns: dict[str, str], path: Any, key: str,
                 method: str) -> str:
    """The format of a preference method's data: "preference", once its first rows are pairs."""
    from .preference import PREFERENCE, is_pair_row

    if fmt not in ("auto", PREFERENCE):
        raise UserError(f'dataset.format = "{fmt}" reads one answer per row, but training.method = "{method}" '
                        'trains on pairs of a chosen and a rejected answer; set dataset.format = "preference" '
                        '(or "auto"), or training.method = "sft"')
    if not rows or fmt == PREFERENCE:
        return PREFERENCE
    paired = [r for _, r in rows[:20] if is_pair_row(r, columns)]
    if paired:
        return PREFERENCE
    row = rows[0][1]
    layout = preference_layout(row)
    if layout:
        raise UserError(f"{key}: {path} is {layout[0]}, not pairs; training.method = \"{method}\" trains on a chosen "
                        "and a rejected answer to each prompt")
    fields = sorted({k for _, r in rows for k in r})[:8]
    raise UserError(f'{key}: {path} has no chosen and rejected answers (fields {fields}), which training.method = '
                    f'"{method}" trains on; give preference pairs (prompt / chosen / rejected), name their fields '
                    'with dataset.columns (e.g. {chosen = "better", rejected = "worse"}), or set '
                    'training.method = "sft"')


def alpaca_prompt(row: dict[str, Any], columns: dict[str, str]) -> list[dict[str, Any]]:
    """An Alpaca row's prompt as turns: LLaMA-Factory's ``history`` (earlier [question,
    answer] pairs), then the instruction with its input; ValueError naming a field that does not fit."""
    instruction, extra = row_field(row, columns, "instruction"), row_field(row, columns, "input", required=False)
    if not isinstance(instruction, str):
        raise ValueError(f'"{columns.get("instruction", "instruction")}" is not text')
    messages: list[dict[str, Any]] = []
    history = row_field(row, columns, "history", required=False)
    if history:
        if not isinstance(history, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history):
            raise ValueError(f'"{columns.get("history", "history")}" is not a list of [question, answer] pairs')
        for question, answer in history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": instruction if not extra else f"{instruction}\n\n{extra}"})
    return messages


def row_field(row: dict[str, Any], columns: dict[str, str], name: str, required: bool = True) -> Any:
    """A row's field by the name a format gives it (``columns`` maps it to the file's);
    ValueError naming it when a required one is missing."""
    key = columns.get(name, name)
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f'missing field "{key}"')
        return None
    return row[key]


def to_messages(
    row: dict[str, Any], fmt: str, columns: dict[str, str] | None = None, system_prompt: str = "",
    notes: list[str] | None = None,
) -> Conversation:
    """One row as a :class:`~tunedeck.core.conversation.Conversation`; raises ValueError with
    the reason when it does not fit (:class:`~tunedeck.core.conversation.MediaError` for
    images, audio or video).

    ``text`` rows become a single assistant turn with no prompt (everything trains). A row
    that ends with prompt or tool-result turns after its last answer (a conversation cut
    after a question) loses them: nothing would train on them; ``notes`` gets a word about it.
    """
    columns = columns or {}

    def get(name: str, required: bool = True) -> Any:
        return row_field(row, columns, name, required)

    check_media(row)
    tools = normalise_tools(get("tools", required=False), columns.get("tools", "tools"))
    if tools is None and "tools" not in columns and row.get("functions") is not None:  # OpenAI's older name
        tools = normalise_tools(row["functions"], "functions")
    if fmt in ("messages", "sharegpt"):
        name = FORMAT_FIELDS[fmt][0]
        raw = get(name)
        if isinstance(raw, str):
            try:
                raw = _json_row(raw)
            except ValueError:
                raise ValueError(f'"{columns.get(name, name)}" is a string that is not JSON') from None
        if not isinstance(raw, list):
            raise ValueError(f'"{columns.get(name, name)}" is not a list (got {type(raw).__name__})')
        messages = openai_turns(raw) if fmt == "messages" else sharegpt_turns(raw)
        system = get("system", required=False)
        if isinstance(system, str) and system.strip() and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system})  # a separate system column (LLaMA-Factory)
    elif fmt == "alpaca":
        instruction, output = get("instruction"), get("output")
        for name, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str):
                raise ValueError(f'"{columns.get(name, name)}" is not text')
        messages = alpaca_prompt(row, columns) + [{"role": "assistant", "content": output}]
        system = get("system", required=False)
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt / completion
            messages = openai_turns(prompt) + openai_turns(completion)
        elif isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        else:
            raise ValueError("prompt and completion must be text (or both lists of messages)")
    elif fmt == "text":
        text = get("text")
        if not isinstance(text, str):
            raise ValueError('"text" is not text')
        if not text.strip():
            raise ValueError("empty text")
        _check_text(text)
        return Conversation([{"role": "assistant", "content": text}])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    for m in messages:
        _check_text(m["content"])
        if m.get("reasoning_content"):
            _check_text(m["reasoning_content"])
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if 0 <= last_answer < len(messages) - 1 and all(m["role"] in ("user", "tool") for m in messages[last_answer + 1:]):
        if notes is not None:
            notes.append("a question after the last answer was dropped (nothing trains on it)")
        messages = messages[: last_answer + 1]
    check_turns(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return Conversation(messages, tools)


def _check_text(text: str) -> None:
    """Text a tokenizer can take: valid Unicode (JSON can spell a lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text that is not valid Unicode (a lone surrogate {text[exc.start]!r} at character "
                         f"{exc.start + 1})") from None


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


SAMPLE_ROWS = 200  # rows the format is detected from


def load_messages(
    path: Path,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    system_prompt: str = "",
    limit: int | None = None,
    key: str = "dataset.path",
    method: str = "sft",
) -> tuple[list[tuple[int, Conversation]], DatasetSummary]:
    """Every usable row of one file as (row number, conversation), and a summary with the
    skipped rows. ``key`` names the project key the path came from, in the messages. For a
    preference ``method`` (``training.method``) the rows are
    :class:`~tunedeck.core.preference.Pair` items instead of conversations."""
    return load_source(Source(str(path), key), fmt, columns, system_prompt, limit, method)


def load_source(
    source: Source,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    system_prompt: str = "",
    limit: int | None = None,
    method: str = "sft",
) -> tuple[list[tuple[int, Conversation]], DatasetSummary]:
    """Every usable row of a source, as :func:`load_messages`; streamed (the format is
    detected from the first rows), refusing with one line what cannot be fine-tuned on."""
    from .preference import PREFERENCE, to_pair

    columns = columns or {}
    where = source.where()
    rows = read_source(source, limit)
    sample = []
    for item in rows:
        sample.append(item)
        if len(sample) >= SAMPLE_ROWS:
            break
    fmt = sniff(sample, fmt, columns, where, source.key, method)
    good: list[tuple[int, Conversation]] = []
    skipped: list[RowError] = []
    trimmed: list[int] = []
    count = 0
    for number, row in itertools.chain(sample, rows):
        count += 1
        if isinstance(row, RowError):
            skipped.append(row)
            continue
        notes: list[str] = []
        try:
            item = (to_pair(row, columns, system_prompt) if fmt == PREFERENCE
                    else to_messages(row, fmt, columns, system_prompt, notes))
            good.append((number, item))
        except MediaError as exc:
            raise UserError(media_refusal(where, exc, number, source.key)) from None
        except ValueError as exc:
            skipped.append(RowError(number, str(exc)))
            continue
        if notes:
            trimmed.append(number)
    return good, DatasetSummary(where, fmt, count, skipped, trimmed)


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
class SourceSummary:
    """One source of a project's rows: what it gave and its part of the mix."""

    source: Source
    summary: DatasetSummary
    train_rows: int = 0  # rows it gives the training set per epoch (after its weight)
    share: float = 0.0  # of the training rows per epoch

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.source.spec, "key": self.source.key, "where": self.summary.path,
                "format": self.summary.format, "rows": self.summary.rows, "usable": self.summary.good,
                "skipped": len(self.summary.skipped), "weight": self.source.weight, "train_rows": self.train_rows,
                "share": round(self.share, 4)}


@dataclass
class Splits:
    """A project's usable rows, split into training and evaluation (seeded)."""

    train: list[tuple[int, Conversation]]
    eval: list[tuple[int, Conversation]]
    summary: DatasetSummary  # every source's together
    eval_summary: DatasetSummary | None  # a separate eval file's; None for a ratio
    eval_path: Path | None
    sources: list[SourceSummary] = field(default_factory=list)


def load_sources(project: Any) -> list[tuple[Source, list[tuple[int, Conversation]], DatasetSummary]]:
    """Each of the project's sources read (its format and columns, or the [dataset] ones),
    refusing with one line a source that cannot train."""
    out = []
    for source in project_sources(project):
        rows, summary = load_source(source, source_format(source, project), source_columns(source, project),
                                    project["dataset.system_prompt"], method=project["training.method"])
        problem = dataset_problem(summary, key=source.key)
        if problem:
            raise UserError(problem)
        out.append((source, rows, summary))
    return out


def _merged(parts: list[tuple[Source, list[Any], DatasetSummary]]) -> DatasetSummary:
    if len(parts) == 1:
        return parts[0][2]
    formats = {p[2].format for p in parts}
    skipped = [RowError(e.row, f"{src.spec}: {e.reason}") for src, _, summary in parts for e in summary.skipped]
    return DatasetSummary(" + ".join(src.spec for src, _, _ in parts), formats.pop() if len(formats) == 1 else "mixed",
                          sum(p[2].rows for p in parts), skipped,
                          [n for _, _, summary in parts for n in summary.trimmed])


def load_splits(project: Any) -> Splits:
    """Read a project's [dataset] rows (every source, weighted) and its eval split, refusing,
    with one line, a dataset that cannot train. The one place that does this: check, the
    launcher's pre-flight and the trainer all call it, so they agree on every row.

    The eval rows are held out of the sources' usable rows before the weights apply, so a
    repeated row never lands on both sides."""
    import random

    parts = load_sources(project)
    opts = dict(fmt=project["dataset.format"], columns=project["dataset.columns"],
                system_prompt=project["dataset.system_prompt"], method=project["training.method"])
    summary = _merged(parts)
    tagged = [(k, r) for k, (_, rows, _) in enumerate(parts) for r in rows]
    seed = project["training.seed"]
    split = project["dataset.eval_split"]
    eval_summary = eval_path = None
    if isinstance(split, str):
        eval_path = project.resolve_path(split)
        eval_rows, eval_summary = load_messages(eval_path, key="dataset.eval_split", **opts)
        problem = dataset_problem(eval_summary, key="dataset.eval_split")
        if problem:
            raise UserError(problem)
        held: set[int] = set()
    else:
        order = list(range(len(tagged)))
        random.Random(seed).shuffle(order)
        held = set(order[: eval_count(len(tagged), split)])
        eval_rows = [r for i, (_, r) in enumerate(tagged) if i in held]
        if split > 0 and len(held) == len(tagged):
            raise UserError(f"dataset.eval_split = {split}: {len(tagged)} usable row(s) leave nothing to train on; "
                            "add rows or set dataset.eval_split = 0")
    by_source: list[list[tuple[int, Conversation]]] = [[] for _ in parts]
    for i, (k, r) in enumerate(tagged):
        if i not in held:
            by_source[k].append(r)
    train: list[tuple[int, Conversation]] = []
    infos = []
    for k, ((source, _, source_summary), rows) in enumerate(zip(parts, by_source)):
        used = apply_weight(rows, source.weight, seed + k)
        train.extend(used)
        infos.append(SourceSummary(source, source_summary, len(used)))
    for info, share in zip(infos, shares([i.train_rows for i in infos], [1.0] * len(infos))):
        info.share = share
    return Splits(train, eval_rows, summary, eval_summary, eval_path, infos)
