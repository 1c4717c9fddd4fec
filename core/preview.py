"""The dataset preview: a project's rows as the trainer sees them, token by token.

Each row is read by :mod:`tunedeck.core.datafile` (the reader the trainer uses) and
rendered by :func:`tunedeck.core.render.render`, the function that builds the training
examples, so the mask shown is the labels the trainer builds. Three questions, each
answerable on its own:

- :func:`preview_row`: one row (by position, or by its row number): its raw fields, the
  templated text, and every token ``{"id", "text", "trained"}`` up to the truncation point.
  Only the rows up to it are read (JSONL, CSV and Parquet stream), so the first rows of a
  large file show at once.
- :func:`preview_stats`: the whole set: rows, skipped rows with their reasons, a token
  length histogram, percent truncated at ``max_length``, percent of tokens trained, rows
  with nothing trained, and what training would refuse.
- :func:`preview_search`: the next row whose fields contain a text.

The ``op_*`` functions are the engine's ops (the app asks the engine process: tokenizers
need transformers); the engine keeps one tokenizer per model (:func:`project_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .datafile import RowError, dataset_problem, DatasetSummary, detect_format, eval_count, read_rows, to_messages
from .errors import UserError
from .kept import Kept
from .render import Rendered, dataset_refusal, is_text_row, render, resolve_chat_template

TOKENIZERS_KEPT = 4
SAMPLE_ROWS = 200  # rows the format is detected from
HISTOGRAM_BINS = 20
SKIPPED_SHOWN = 10  # skipped rows listed in the text stats

_tokenizers: Kept[tuple[str, str, bool, bool], Any] = Kept(TOKENIZERS_KEPT)


def project_tokenizer(project: Any) -> Any:
    """The tokenizer of the project's model, loaded once per model and kept (loading costs seconds)."""
    from .models import load_tokenizer, resolve_source

    source, root = project["model.source"], project.root
    trust, allow_pickle = bool(project["model.trust_remote_code"]), bool(project["model.allow_pickle"])
    return _tokenizers.get((source, str(root), trust, allow_pickle), lambda: load_tokenizer(
        resolve_source(source, root, allow_pickle=allow_pickle), trust_remote_code=trust))


# -- reading ------------------------------------------------------------------------------


def _data_path(project: Any) -> Path:
    if not project["dataset.path"]:
        raise UserError("dataset.path is empty; set it to a JSONL/JSON/CSV/Parquet file "
                        "(e.g. --set dataset.path=data.jsonl)")
    return project.resolve_path(project["dataset.path"])


def _format(project: Any, path: Path) -> str:
    """dataset.format, or the format detected from the first rows (as the trainer detects it)."""
    fmt = project["dataset.format"]
    if fmt != "auto":
        return fmt
    sample = [r for _, r in read_rows(path, SAMPLE_ROWS) if isinstance(r, dict)]
    detected = detect_format(sample, project["dataset.columns"])
    if detected is None:
        if not sample:
            return "empty"
        fields = sorted({k for r in sample for k in r})[:8]
        raise UserError(f"dataset {path}: cannot tell the format from the fields {fields}; set dataset.format "
                        "and, for other field names, dataset.columns")
    return detected


def _entries(path: Path, limit: int | None = None) -> Iterator[tuple[int, int, dict[str, Any] | RowError]]:
    """(position, row number, row or RowError) for every row read."""
    for index, (number, row) in enumerate(read_rows(path, limit)):
        yield index, number, row


def _messages(project: Any, row: dict[str, Any] | RowError, fmt: str,
              notes: list[str] | None = None) -> list[dict[str, str]]:
    """The row as messages; ValueError with the reason it is skipped."""
    if isinstance(row, RowError):
        raise ValueError(row.reason)
    return to_messages(row, fmt, project["dataset.columns"], project["dataset.system_prompt"], notes)


class _Renderer:
    """render() with the project's settings; the chat template is resolved as the trainer resolves it."""

    def __init__(self, project: Any, tokenizer: Any) -> None:
        self.project, self.tokenizer = project, tokenizer
        self._template: str | None = None

    def template(self) -> str:
        if self._template is None:
            p = self.project
            self._template = resolve_chat_template(self.tokenizer, p["model.chat_template"],
                                                   model_label=f"model {p['model.source']}")
        return self._template

    def __call__(self, messages: list[dict[str, str]]) -> Rendered:
        p = self.project
        template = None if is_text_row(messages) else self.template()
        return render(self.tokenizer, messages, max_length=p["dataset.max_length"], loss_on=p["dataset.loss_on"],
                      chat_template=template)


def _plain(value: Any) -> Any:
    """A row's fields as plain JSON data (Parquet and saved datasets may hold other types)."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token as text; special tokens as they are written (``<|im_end|>``)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- one row ------------------------------------------------------------------------------


def preview_row(project: Any, *, index: int | None = None, row: int | None = None,
                tokenizer: Any = None) -> dict[str, Any]:
    """One row, by position (``index``, from 0) or by row number (``row``, as in the skipped
    list; the line number for JSONL); the first row when neither is given.

    Returns ``index``, ``row``, ``last`` (no row after it), ``format``, ``fields`` (the raw
    row), ``error`` (why the row is skipped, or None), ``messages``, ``text`` (templated),
    ``tokens`` ([{"id", "text", "trained"}] up to the truncation point), ``length`` (tokens
    before truncation), ``truncated_at`` (the token position of the cut, or None),
    ``trained`` (tokens trained) and ``stop_trained``; ``unrendered`` says why the row could
    not be rendered at all (the model's tokenizer or chat template), or is None.
    """
    path = _data_path(project)
    fmt = _format(project, path)
    found = None
    if row is not None:
        if row < 1:
            raise UserError(f"--row {row}: row numbers start at 1")
        for i, number, data in _entries(path):
            if number == row:
                found = (i, number, data)
            elif number > row:
                break
            if found:
                break
        if found is None:
            raise UserError(f"--row {row}: {path.name} has no row {row}")
    else:
        index = index or 0
        if index < 0:
            raise UserError(f"row position {index}: positions start at 0")
        for i, number, data in _entries(path, index + 1):
            if i == index:
                found = (i, number, data)
        if found is None:
            raise UserError(f"{path.name} has no row at position {index + 1}")
    i, number, data = found
    last = sum(1 for _ in _entries(path, i + 2)) <= i + 1
    result: dict[str, Any] = {
        "index": i, "row": number, "last": last, "format": fmt,
        "fields": None if isinstance(data, RowError) else _plain(data),
        "error": None, "messages": None, "text": "", "tokens": [], "length": 0, "truncated_at": None,
        "trained": 0, "stop_trained": True, "max_length": project["dataset.max_length"], "unrendered": None,
    }
    try:
        messages = _messages(project, data, fmt)
    except ValueError as exc:
        result["error"] = str(exc)
        return result
    result["messages"] = messages
    try:
        tokenizer = tokenizer if tokenizer is not None else project_tokenizer(project)
        r = _Renderer(project, tokenizer)(messages)
    except ValueError as exc:
        result["error"] = str(exc)
        return result
    except UserError as exc:  # no tokenizer or no chat template: the row is shown unrendered
        result["unrendered"] = exc.message
        return result
    result.update(row_tokens(tokenizer, r))
    return result


def row_tokens(tokenizer: Any, r: Rendered) -> dict[str, Any]:
    """A rendered row as the preview shows it: text, tokens with their mask, the cut."""
    return {
        "text": r.text,
        "tokens": [{"id": tid, "text": token_text(tokenizer, tid), "trained": trained} for tid, trained in r.tokens],
        "length": r.full_length,
        "truncated_at": len(r.input_ids) if r.truncated else None,
        "trained": r.n_trained,
        "stop_trained": r.stop_trained,
    }


# -- the whole set ------------------------------------------------------------------------


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> dict[str, list[int]]:
    """Token lengths in ``bins`` equal-width bins: ``edges`` (bins + 1) and ``counts``."""
    if not lengths:
        return {"edges": [], "counts": []}
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    n = -(-(high - low + 1) // width)
    counts = [0] * n
    for length in lengths:
        counts[(length - low) // width] += 1
    return {"edges": [low + k * width for k in range(n + 1)], "counts": counts}


def preview_stats(project: Any, *, tokenizer: Any = None) -> dict[str, Any]:
    """The whole set, every row read and rendered as for training (see the module docstring).

    ``skipped`` lists every row left out before training ({"row", "reason"}): rows that do
    not fit the format and rows the chat template cannot render. ``nothing_trained`` lists
    rows whose trained tokens are all cut off by truncation; ``trailing_question_dropped``
    the rows that ended with a question after their last answer, which is dropped (a
    warning: the rest of the row trains). ``refusal`` is the line
    training would refuse the dataset with, or None.
    """
    path = _data_path(project)
    fmt = _format(project, path)
    tokenizer = tokenizer if tokenizer is not None else project_tokenizer(project)
    renderer = _Renderer(project, tokenizer)
    rows = 0
    skipped: list[dict[str, Any]] = []
    format_skipped: list[RowError] = []
    lengths: list[int] = []
    nothing_trained: list[int] = []
    trimmed: list[int] = []
    truncated = tokens = trained = 0
    for _, number, data in _entries(path):
        rows += 1
        notes: list[str] = []
        try:
            messages = _messages(project, data, fmt, notes)
        except ValueError as exc:
            skipped.append({"row": number, "reason": str(exc)})
            format_skipped.append(RowError(number, str(exc)))
            continue
        try:
            r = renderer(messages)
        except ValueError as exc:
            skipped.append({"row": number, "reason": str(exc)})
            continue
        if notes:
            trimmed.append(number)
        lengths.append(r.full_length)
        truncated += r.truncated
        if r.n_trained == 0:
            nothing_trained.append(number)
            continue
        tokens += len(r.input_ids)
        trained += r.n_trained
    max_length = project["dataset.max_length"]
    refusal = dataset_problem(DatasetSummary(str(path), fmt, rows, format_skipped))
    if refusal is None and rows and not tokens:
        refusal = dataset_refusal(_stats_for_refusal(skipped, format_skipped, nothing_trained, lengths),
                                  max_length=max_length)
    rendered = len(lengths)
    split = project["dataset.eval_split"]
    usable = rows - len(format_skipped)
    eval_info: dict[str, Any] = ({"path": str(project.resolve_path(split))} if isinstance(split, str)
                                 else {"ratio": split, "rows": eval_count(usable, split)})
    return {
        "path": str(path),
        "format": fmt,
        "rows": rows,
        "usable": usable,
        "skipped": skipped,
        "max_length": max_length,
        "loss_on": project["dataset.loss_on"],
        "histogram": histogram(lengths),
        "longest": max(lengths, default=0),
        "truncated": truncated,
        "percent_truncated": round(100.0 * truncated / rendered, 2) if rendered else 0.0,
        "tokens": tokens,
        "trained_tokens": trained,
        "percent_trained": round(100.0 * trained / tokens, 2) if tokens else 0.0,
        "nothing_trained": nothing_trained,
        "trailing_question_dropped": trimmed,
        "eval": eval_info,
        "refusal": refusal,
    }


def _stats_for_refusal(skipped: list[dict[str, Any]], format_skipped: list[RowError], nothing_trained: list[int],
                       lengths: list[int]) -> Any:
    from .render import RenderStats

    failed_rows = {e.row for e in format_skipped}
    return RenderStats(rows=len(lengths) + len(skipped) - len(format_skipped), kept=0,
                       fully_masked=list(nothing_trained),
                       failed=[(s["row"], s["reason"]) for s in skipped if s["row"] not in failed_rows],
                       longest=max(lengths, default=0))


def stats_lines(stats: dict[str, Any], *, refusal: bool = True) -> list[str]:
    """The whole-set stats as short lines of text (the CLI and the app's stats panel)."""
    skipped, none = stats["skipped"], stats["nothing_trained"]
    ev = stats["eval"]
    lines = [
        f"format: {stats['format']}",
        f"rows: {stats['rows']:,} · skipped: {len(skipped):,}",
        f"tokens: {stats['tokens']:,} · trained: {stats['percent_trained']}% (loss_on = {stats['loss_on']})",
        f"truncated: {stats['truncated']:,} rows ({stats['percent_truncated']}%) at max_length = "
        f"{stats['max_length']:,}",
        f"longest: {stats['longest']:,} tokens",
        f"nothing trained: {len(none):,} rows" + (f" (first: row {none[0]})" if none else ""),
        *([f"a question after the last answer dropped: {len(stats['trailing_question_dropped']):,} rows (first: "
           f"row {stats['trailing_question_dropped'][0]})"] if stats.get("trailing_question_dropped") else []),
        f"eval: {ev['path']}" if "path" in ev else f"eval: {ev['rows']:,} rows held out (eval_split = {ev['ratio']})",
    ]
    for s in skipped[:SKIPPED_SHOWN]:
        lines.append(f"  row {s['row']}: {s['reason']}")
    if len(skipped) > SKIPPED_SHOWN:
        lines.append(f"  … {len(skipped) - SKIPPED_SHOWN} more skipped rows")
    if refusal and stats["refusal"]:
        lines.append(f"training refuses this dataset: {stats['refusal']}")
    return lines


# -- search -----------------------------------------------------------------------------------


def preview_search(project: Any, text: str, *, start: int = 0, backward: bool = False) -> dict[str, Any]:
    """The first row at or after position ``start`` (before it, ``backward``) whose fields
    contain ``text`` (any case), wrapping around: {"index", "row"}, or {"index": None}."""
    needle = text.strip().lower()
    if not needle:
        raise UserError("search: type some text to look for")
    path = _data_path(project)
    hits: list[tuple[int, int]] = []
    for i, number, data in _entries(path):
        body = json.dumps(_plain(data), ensure_ascii=False) if isinstance(data, dict) else data.reason
        if needle in body.lower() or needle in body.encode("ascii", "backslashreplace").decode().lower():
            if not backward and i >= start:
                return {"index": i, "row": number}
            hits.append((i, number))
    if not hits:
        return {"index": None, "row": None}
    if backward:
        before = [h for h in hits if h[0] <= start]
        i, number = before[-1] if before else hits[-1]
    else:
        i, number = hits[0]  # wrapped around
    return {"index": i, "row": number}


# -- engine ops ---------------------------------------------------------------------------------


def _project(project_text: str, project_path: str | None) -> Any:
    from .project import Project

    return Project.from_text(project_text, Path(project_path) if project_path else None)


def op_preview_row(project_text: str, project_path: str | None = None, index: int | None = None,
                   row: int | None = None) -> dict[str, Any]:
    """One row of the project's dataset, rendered and masked (:func:`preview_row`)."""
    return preview_row(_project(project_text, project_path), index=index, row=row)


def op_preview_stats(project_text: str, project_path: str | None = None) -> dict[str, Any]:
    """The whole dataset's stats (:func:`preview_stats`)."""
    return preview_stats(_project(project_text, project_path))


def op_preview_search(project_text: str, project_path: str | None = None, text: str = "", start: int = 0,
                      backward: bool = False) -> dict[str, Any]:
    """The next row containing ``text`` (:func:`preview_search`)."""
    return preview_search(_project(project_text, project_path), text, start=start, backward=backward)


PREVIEW_OPS = {
    "preview_row": op_preview_row,
    "preview_stats": op_preview_stats,
    "preview_search": op_preview_search,
}
