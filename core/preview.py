"""The dataset preview: a project's rows as the trainer sees them, token by token.

Each row is read by :mod:`tunedeck.core.datafile` (the reader the trainer uses) and
rendered by :func:`tunedeck.core.render.render`, the function that builds the training
examples, so the mask shown is the labels the trainer builds. Four questions, each
answerable on its own:

- :func:`preview_row`: one row (by position, or by its row number): its raw fields, the
  templated text, and every token ``{"id", "text", "trained"}`` up to the truncation point.
  Only the rows up to it are read (JSONL, CSV and Parquet stream), so the first rows of a
  large file show at once.
- :func:`preview_stats`: the whole set: rows, skipped rows with their reasons, a token
  length histogram, percent truncated at ``max_length``, percent of tokens trained, rows
  with nothing trained, and what training would refuse.
- :func:`preview_search`: the next row whose fields contain a text.
- :func:`held_out_positions`: which rows the eval split holds out (the trainer's own
  seeded choice), read in one streaming pass without a tokenizer and kept.

The ``op_*`` functions are the engine's ops (the app asks the engine process: tokenizers
need transformers); the engine keeps one tokenizer per model (:func:`project_tokenizer`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from .conversation import Conversation, MediaError
from .datafile import (
    SAMPLE_ROWS, DatasetSummary, RowError, dataset_problem, eval_count, media_refusal, read_source, sniff, to_messages,
)
from .errors import UserError
from .preference import PREFERENCE, SAME_ANSWERS, length_bias, SAME_TOKENS, Pair, PairStats, render_pair, to_pair
from .render import Rendered, dataset_refusal, is_text_row, render, resolve_chat_template
from .sources import project_sources, shares, source_columns, source_format, weighted_count

TOKENIZERS_KEPT = 4
HISTOGRAM_BINS = 20
SKIPPED_SHOWN = 10  # skipped rows listed in the text stats

# The engine reads the whole set (stats, held-out rows) in a thread of its own, so a row
# asked for meanwhile is answered between two rows of that pass; renders take turns here.
RENDER_LOCK = threading.RLock()

def project_tokenizer(project: Any) -> Any:
    """The tokenizer of the project's model, loaded once per model and kept (loading costs seconds)."""
    return _tokenizer(project["model.source"], str(project.root), bool(project["model.trust_remote_code"]),
                      bool(project["model.allow_pickle"]))


@lru_cache(maxsize=TOKENIZERS_KEPT)
def _tokenizer(source: str, root: str, trust: bool, allow_pickle: bool) -> Any:
    from .models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(source, Path(root), allow_pickle=allow_pickle), trust_remote_code=trust)


# -- reading ------------------------------------------------------------------------------


class _Data:
    """The project's sources, read as the trainer reads them: each with its format (given,
    or detected from its first rows) and its columns."""

    def __init__(self, project: Any) -> None:
        self.project = project
        self.sources = project_sources(project)
        self._formats: dict[int, str] = {}

    def format(self, k: int) -> str:
        if k not in self._formats:
            source = self.sources[k]
            sample = list(read_source(source, SAMPLE_ROWS))
            self._formats[k] = sniff(sample, source_format(source, self.project),
                                     source_columns(source, self.project), source.where(), source.key,
                                     self.project["training.method"])
        return self._formats[k]

    @property
    def formats(self) -> list[str]:
        return [self.format(k) for k in range(len(self.sources))]

    def shown_format(self) -> str:
        formats = set(self.formats)
        return formats.pop() if len(formats) == 1 else "mixed"

    def entries(self, limit: int | None = None) -> Iterator[tuple[int, int, int, dict[str, Any] | RowError]]:
        """(position, source index, row number, row or RowError) for every row, source after source."""
        index = 0
        for k, source in enumerate(self.sources):
            for number, row in read_source(source, None if limit is None else limit - index):
                if limit is not None and index >= limit:
                    return
                yield index, k, number, row
                index += 1

    def messages(self, k: int, row: dict[str, Any] | RowError, notes: list[str] | None = None) -> Conversation:
        """The row as a conversation; ValueError with the reason it is skipped."""
        if isinstance(row, RowError):
            raise ValueError(row.reason)
        p, source = self.project, self.sources[k]
        if self.format(k) == PREFERENCE:
            return to_pair(row, source_columns(source, p), p["dataset.system_prompt"])
        return to_messages(row, self.format(k), source_columns(source, p), p["dataset.system_prompt"], notes)

    def source_info(self, k: int) -> dict[str, Any]:
        source = self.sources[k]
        return {"index": k, "path": source.spec, "key": source.key, "weight": source.weight}


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

    def __call__(self, messages: Any, parts: bool = False, cache: Any = None) -> Any:
        """A conversation rendered (:class:`~tunedeck.core.render.Rendered`), or a preference
        pair's two sides (:class:`~tunedeck.core.preference.RenderedPair`; ``cache``: the
        render cache each side is read from)."""
        p = self.project
        if isinstance(messages, Pair):
            with RENDER_LOCK:
                return render_pair(self.tokenizer, messages, max_length=p["dataset.max_length"],
                                   chat_template=self.template(), reasoning=p["dataset.reasoning"], parts=parts,
                                   cache=cache)
        with RENDER_LOCK:  # one row at a time on a kept tokenizer, whichever thread asks
            template = None if is_text_row(messages) else self.template()
            return render(self.tokenizer, messages, max_length=p["dataset.max_length"],
                          loss_on=p["dataset.loss_on"], chat_template=template, reasoning=p["dataset.reasoning"],
                          parts=parts)


def _plain(value: Any) -> Any:
    """A row's fields as plain JSON data (Parquet and saved datasets may hold other types)."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token as text; special tokens as they are written (``<|im_end|>``)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- one row ------------------------------------------------------------------------------


def preview_row(project: Any, *, index: int | None = None, row: int | None = None, source: int = 0,
                tokenizer: Any = None) -> dict[str, Any]:
    """One row, by position (``index``, from 0, across the sources in order) or by row
    number (``row``, as in the skipped list; the line number for JSONL) in source
    ``source`` (from 0); the first row when neither is given.

    Returns ``index``, ``row``, ``source`` ({"index", "path", "key", "weight"}), ``last``
    (no row after it), ``format``, ``fields`` (the raw row), ``error`` (why the row is
    skipped, or None), ``messages``, ``tools`` (the row's tool schemas, or None), ``text``
    (templated), ``tokens`` ([{"id", "text", "trained", "part"}] up to the truncation
    point; ``part`` is what the token renders: system, user, assistant, reasoning,
    tool_call, tool_result, tools or template), ``length`` (tokens before truncation),
    ``truncated_at`` (the token position of the cut, or None), ``trained`` (tokens trained)
    and ``stop_trained``; ``unrendered`` says why the row could not be rendered at all (the
    model's tokenizer or chat template), or is None.
    """
    data = _Data(project)
    found = None
    if row is not None:
        if row < 1:
            raise UserError(f"--row {row}: row numbers start at 1")
        if not 0 <= source < len(data.sources):
            raise UserError(f"--source {source + 1}: the project has {len(data.sources)} source(s)")
        entries = data.entries()
        for i, k, number, entry in entries:
            if k < source:
                continue
            if k > source or number > row:
                break
            if number == row:
                found = (i, k, number, entry)
                break
        if found is None:
            name = Path(data.sources[source].spec).name
            raise UserError(f"--row {row}: {name} has no row {row}")
        last = next(entries, None) is None  # one pass: the row after it, if any, is the next one read
    else:
        index = index or 0
        if index < 0:
            raise UserError(f"row position {index}: positions start at 0")
        last = True
        for entry in data.entries(index + 2):
            if entry[0] == index:
                found = entry
            elif entry[0] > index:
                last = False
        if found is None:
            raise UserError(f"{Path(data.sources[0].spec).name if len(data.sources) == 1 else 'the dataset'} "
                            f"has no row at position {index + 1}")
    i, k, number, entry = found
    result: dict[str, Any] = {
        "index": i, "row": number, "source": data.source_info(k), "sources": len(data.sources), "last": last,
        "format": data.format(k), "fields": None if isinstance(entry, RowError) else _plain(entry),
        "error": None, "messages": None, "tools": None, "text": "", "tokens": [], "length": 0, "truncated_at": None,
        "trained": 0, "stop_trained": True, "max_length": project["dataset.max_length"], "unrendered": None,
    }
    try:
        messages = data.messages(k, entry)
    except ValueError as exc:
        result["error"] = str(exc)
        return result
    pair = messages if isinstance(messages, Pair) else None
    if pair is not None:
        chosen, rejected = pair.conversations()
        result.update(pair=True, prompt=[dict(m) for m in pair.prompt],
                      chosen={"messages": [dict(m) for m in pair.chosen]},
                      rejected={"messages": [dict(m) for m in pair.rejected]})
        messages = chosen
    result["messages"] = [dict(m) for m in messages]
    result["tools"] = messages.tools
    try:
        tokenizer = tokenizer if tokenizer is not None else project_tokenizer(project)
        r = _Renderer(project, tokenizer)(pair if pair is not None else messages, parts=True)
    except ValueError as exc:
        result["error"] = str(exc)
        return result
    except UserError as exc:  # no tokenizer or no chat template: the row is shown unrendered
        result["unrendered"] = exc.message
        return result
    if pair is not None:
        result["chosen"].update(row_tokens(tokenizer, r.chosen))
        result["rejected"].update(row_tokens(tokenizer, r.rejected))
        r = r.chosen
    result.update(row_tokens(tokenizer, r))
    return result


def row_tokens(tokenizer: Any, r: Rendered) -> dict[str, Any]:
    """A rendered row as the preview shows it: text, tokens with their mask and part, the cut."""
    parts = r.parts or ["text"] * len(r.input_ids)  # a plain document
    return {
        "text": r.text,
        "tokens": [{"id": tid, "text": token_text(tokenizer, tid), "trained": trained, "part": part}
                   for (tid, trained), part in zip(r.tokens, parts)],
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


SKIPPED_KEPT = 1000  # skipped rows (and rows with nothing trained) listed; the counts count them all


PROGRESS_EVERY_S = 0.5  # seconds between the stats' progress partials


def preview_stats(project: Any, *, tokenizer: Any = None, progress: Any = None, cancel: Any = None,
                  cache: bool | None = None) -> dict[str, Any]:
    """The whole set, every row read and rendered as for training (see the module docstring).

    ``skipped`` lists the rows left out before training ({"row", "reason"}, and "source"
    with several sources; the first 1,000, ``skipped_count`` counts them all): rows that do
    not fit the format and rows the chat template cannot render. ``nothing_trained`` lists
    rows whose trained tokens are all cut off by truncation; ``trailing_question_dropped``
    the rows that ended with a question after their last answer, which is dropped (a
    warning: the rest of the row trains). ``sources`` gives each source's rows, usable rows,
    weight and share of the training mix. ``refusal`` is the line training would refuse the
    dataset with, or None.

    Streams: memory does not grow with the file's text, only by a few compact numbers a row
    (its token length, its position, the render cache's index entry). ``progress`` (if given) is called
    now and then with the stats so far (``done`` false); ``cancel`` (a threading.Event)
    stops the pass early, and the result then has ``done`` false.

    ``cache`` (default: when ``tokenizer`` is the project's own, not one passed in): read
    rows rendered before from the project's render cache and add the rows rendered now
    (:mod:`tunedeck.core.rendercache`), so training after the stats tokenizes nothing. A
    finished pass also keeps which rows the eval split holds out (:func:`held_out_positions`).
    """
    import time
    from array import array

    data = _Data(project)
    formats = data.formats
    if cache is None:
        cache = tokenizer is None
    tokenizer = tokenizer if tokenizer is not None else project_tokenizer(project)
    renderer = _Renderer(project, tokenizer)
    rows_cache = _stats_cache(project) if cache else None
    usable_positions = array("q")  # for the held-out split, kept at the end of a finished pass
    several = len(data.sources) > 1
    rows = 0
    skipped: list[dict[str, Any]] = []
    skipped_count = 0
    format_skipped: list[RowError] = []  # the first of them, for the refusal's wording
    format_skipped_count = 0
    lengths = array("I")
    nothing_trained: list[int] = []
    nothing_count = 0
    trimmed: list[int] = []
    trimmed_count = 0
    per_rows = [0] * len(data.sources)
    per_usable = [0] * len(data.sources)
    media: str | None = None
    render_failed: list[tuple[int, str]] = []  # the first row the template cannot render
    truncated = tokens = trained = 0
    done = True
    last_report = time.monotonic()

    pairs = PairStats() if PREFERENCE in formats else None

    def skip(k: int, number: int, reason: str) -> None:
        nonlocal skipped_count
        skipped_count += 1
        if pairs is not None and reason in (SAME_ANSWERS, SAME_TOKENS):
            pairs.identical += 1
        if len(skipped) < SKIPPED_KEPT:
            skipped.append({"row": number, "reason": reason, **({"source": data.sources[k].spec} if several else {})})

    per_held = [0] * len(data.sources)

    def snapshot(finished: bool) -> dict[str, Any]:
        result = _stats_result(project, data, formats, rows, skipped, skipped_count, format_skipped,
                               format_skipped_count, lengths, nothing_trained, nothing_count, trimmed, trimmed_count,
                               per_rows, per_usable, truncated, tokens, trained, media, render_failed, finished,
                               per_held)
        if pairs is not None:
            result["preference"] = pairs.as_dict(len(lengths) - nothing_count)
        return result

    for position, k, number, entry in data.entries():
        if cancel is not None and cancel.is_set():
            done = False
            break
        rows += 1
        per_rows[k] += 1
        if progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            progress(snapshot(False))
        notes: list[str] = []
        try:
            messages = data.messages(k, entry, notes)
        except MediaError as exc:
            media = media or media_refusal(data.sources[k].where(), exc, number, data.sources[k].key)
            skip(k, number, str(exc))
            format_skipped_count += 1
            continue
        except ValueError as exc:
            skip(k, number, str(exc))
            format_skipped_count += 1
            if len(format_skipped) < 1:
                format_skipped.append(RowError(number, str(exc)))
            continue
        per_usable[k] += 1
        usable_positions.append(position)
        try:
            if isinstance(messages, Pair):
                r = _pair_counted(renderer(messages, cache=rows_cache), pairs)
            else:
                r = renderer(messages) if rows_cache is None else rows_cache.render(messages, renderer)
        except ValueError as exc:
            skip(k, number, str(exc))
            if not render_failed:
                render_failed.append((number, str(exc)))
            continue
        if notes:
            trimmed_count += 1
            if len(trimmed) < SKIPPED_KEPT:
                trimmed.append(number)
        lengths.append(r.full_length)
        truncated += r.truncated
        if r.n_trained == 0:
            nothing_count += 1
            if len(nothing_trained) < SKIPPED_KEPT:
                nothing_trained.append(number)
            continue
        tokens += len(r.input_ids)
        trained += r.n_trained
    if rows_cache is not None:
        rows_cache.finish()
    if done:
        held = _keep_held_out(project, usable_positions, rows)
        start = 0
        for k, n in enumerate(per_rows):  # each source's rows held out for eval: not in its training share
            per_held[k] = len(held.within(start, start + n))
            start += n
    return snapshot(done)


class _PairAsRow:
    """A rendered pair counted as one row of the stats: its tokens are both sides'."""

    def __init__(self, r: Any) -> None:
        self.full_length = max(r.chosen.full_length, r.rejected.full_length)
        self.truncated = r.truncated
        both = r.chosen.n_trained and r.rejected.n_trained
        self.n_trained = r.chosen.n_trained + r.rejected.n_trained if both else 0
        self.input_ids = range(len(r.chosen.input_ids) + len(r.rejected.input_ids))  # counted, not read


def _pair_counted(r: Any, pairs: PairStats) -> _PairAsRow:
    """A rendered pair for the stats loop, its answers' lengths added to ``pairs``; ValueError
    for a pair whose answers render the same tokens (training leaves it out too)."""
    if r.same_tokens:
        raise ValueError(SAME_TOKENS)
    row = _PairAsRow(r)
    pairs.truncated_pairs += r.truncated
    if row.n_trained:
        pairs.chosen_trained += r.chosen.n_trained
        pairs.rejected_trained += r.rejected.n_trained
        pairs.chosen_longer += r.chosen.n_trained > r.rejected.n_trained
    return row


def _stats_result(project: Any, data: _Data, formats: list[str], rows: int, skipped: list[dict[str, Any]],
                  skipped_count: int, format_skipped: list[RowError], format_skipped_count: int, lengths: Any,
                  nothing_trained: list[int], nothing_count: int, trimmed: list[int], trimmed_count: int,
                  per_rows: list[int], per_usable: list[int], truncated: int, tokens: int, trained: int,
                  media: str | None, render_failed: list[tuple[int, str]], done: bool,
                  per_held: list[int] | None = None) -> dict[str, Any]:
    max_length = project["dataset.max_length"]
    first_bad = format_skipped or [RowError(0, "")]
    refusal = media
    if refusal is None and done:
        summary = DatasetSummary(data.sources[0].where() if len(data.sources) == 1 else "the dataset",
                                 data.shown_format(), rows, _Many(first_bad[0], format_skipped_count))
        refusal = dataset_problem(summary)
        if refusal is None and rows and not tokens:
            refusal = dataset_refusal(_stats_for_refusal(render_failed, nothing_count, lengths),
                                      max_length=max_length)
    rendered = len(lengths)
    split = project["dataset.eval_split"]
    usable = rows - format_skipped_count
    eval_info: dict[str, Any] = ({"path": str(project.resolve_path(split))} if isinstance(split, str)
                                 else {"ratio": split, "rows": eval_count(usable, split)})
    weights = [src.weight for src in data.sources]
    # the training mix as the trainer builds it: each source's usable rows but those held
    # out for eval (known once the pass is done), times its weight
    training = [u - h for u, h in zip(per_usable, per_held or [0] * len(per_usable))]
    source_shares = shares(training, weights)
    sources = [{**data.source_info(k), "format": formats[k], "rows": per_rows[k], "usable": per_usable[k],
                "train_rows": weighted_count(training[k], weights[k]), "share": round(source_shares[k], 4)}
               for k in range(len(data.sources))]
    return {
        "path": data.sources[0].where() if len(data.sources) == 1 else " + ".join(s.spec for s in data.sources),
        "format": data.shown_format(),
        "sources": sources,
        "rows": rows,
        "usable": usable,
        "skipped": skipped,
        "skipped_count": skipped_count,
        "max_length": max_length,
        "loss_on": project["dataset.loss_on"],
        "histogram": histogram(list(lengths)),
        "longest": max(lengths, default=0),
        "truncated": truncated,
        "percent_truncated": round(100.0 * truncated / rendered, 2) if rendered else 0.0,
        "tokens": tokens,
        "trained_tokens": trained,
        "percent_trained": round(100.0 * trained / tokens, 2) if tokens else 0.0,
        "nothing_trained": nothing_trained,
        "nothing_trained_count": nothing_count,
        "trailing_question_dropped": trimmed,
        "trailing_question_dropped_count": trimmed_count,
        "eval": eval_info,
        "refusal": refusal,
        "done": done,
    }


class _Many:
    """``n`` times the same skipped row, without a list of them (for the refusal's wording)."""

    def __init__(self, item: RowError, n: int) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> RowError:
        return self.item


def _stats_for_refusal(render_failed: list[tuple[int, str]], nothing_count: int, lengths: Any) -> Any:
    from .render import RenderStats

    return RenderStats(rows=len(lengths) + len(render_failed), kept=0, fully_masked=[0] * min(nothing_count, 1),
                       failed=list(render_failed), longest=max(lengths, default=0))


def stats_lines(stats: dict[str, Any], *, refusal: bool = True) -> list[str]:
    """The whole-set stats as short lines of text (the CLI and the app's stats panel)."""
    skipped, none = stats["skipped"], stats["nothing_trained"]
    n_skipped = stats.get("skipped_count", len(skipped))
    n_none = stats.get("nothing_trained_count", len(none))
    trimmed = stats.get("trailing_question_dropped") or []
    n_trimmed = stats.get("trailing_question_dropped_count", len(trimmed))
    ev = stats["eval"]
    lines = [f"format: {stats['format']}"]
    sources = stats.get("sources") or []
    if len(sources) > 1:
        lines.append(f"sources: {len(sources)}")
        for src in sources:
            lines.append(f"  {src['path']}: {src['rows']:,} rows ({src['usable']:,} usable, {src['format']}) · "
                         f"weight {src['weight']:g} · {100 * src['share']:.1f}% of the mix")
    lines += [
        f"rows: {stats['rows']:,} · skipped: {n_skipped:,}",
        f"tokens: {stats['tokens']:,} · trained: {stats['percent_trained']}% (loss_on = {stats['loss_on']})",
        f"truncated: {stats['truncated']:,} rows ({stats['percent_truncated']}%) at max_length = "
        f"{stats['max_length']:,}",
        f"longest: {stats['longest']:,} tokens",
        f"nothing trained: {n_none:,} rows" + (f" (first: row {none[0]})" if none else ""),
        *([f"a question after the last answer dropped: {n_trimmed:,} rows (first: row {trimmed[0]})"] if trimmed
          else []),
        f"eval: {ev['path']}" if "path" in ev else f"eval: {ev['rows']:,} rows held out (eval_split = {ev['ratio']})",
    ]
    for s in skipped[:SKIPPED_SHOWN]:
        where = f"{s['source']} " if s.get("source") else ""
        lines.append(f"  {where}row {s['row']}: {s['reason']}")
    if n_skipped > SKIPPED_SHOWN:
        lines.append(f"  … {n_skipped - SKIPPED_SHOWN:,} more skipped rows")
    if refusal and stats["refusal"]:
        lines.append(f"training refuses this dataset: {stats['refusal']}")
    return lines


# -- search -----------------------------------------------------------------------------------


def prompt_length(row: dict[str, Any]) -> int:
    """How many tokens a pair's two sides share at their start, up to the first trained one:
    the prompt (with the template's start of the answer turn), shown once."""
    shared = 0
    for a, b in zip(row["chosen"]["tokens"], row["rejected"]["tokens"]):
        if a["trained"] or b["trained"] or a.get("id") != b.get("id") or a["text"] != b["text"]:
            break
        shared += 1
    return shared


def answer_lines(pref: dict[str, Any]) -> list[tuple[str, bool]]:
    """How a preference set's chosen and rejected answers compare, as (line, whether it
    warns): their mean lengths and the share of pairs whose chosen answer is longer, with a
    warning on a length bias (:func:`tunedeck.core.preference.length_bias`: the model may
    learn length rather than quality)."""
    mean = f"chosen {pref['chosen_tokens_mean']:,.1f} · rejected {pref['rejected_tokens_mean']:,.1f}"
    out = [(f"answer tokens (mean): {mean}", False)]
    longer = pref.get("chosen_longer_percent")
    if longer is not None and pref.get("pairs"):
        out.append((f"chosen longer: {longer:g}% of pairs", False))
        bias = length_bias(pref)
        if bias:
            out.append((f"⚠ length bias: the model may learn that {bias} is better", True))
    if pref.get("identical"):
        out.append((f"⚠ identical answers: {pref['identical']:,} pairs (nothing to prefer)", True))
    return out


def preference_stats_lines(stats: dict[str, Any], *, refusal: bool = True) -> list[tuple[str, bool]]:
    """A preference set's stats as (line, whether it warns): those of :func:`stats_lines`,
    with pairs for rows followed by :func:`answer_lines`, and the truncated pairs."""
    pref = stats["preference"]
    answers = answer_lines(pref)
    out: list[tuple[str, bool]] = []
    for line in stats_lines(stats, refusal=refusal):
        if line.startswith(("rows:", "pairs:")) and answers:
            out.append(("pairs:" + line.partition(":")[2], False))
            out += answers
            answers = []
        elif line.startswith("truncated:") and "truncated_pairs" in pref:
            out.append((f"truncated: {pref['truncated_pairs']:,} pairs at max_length = {stats['max_length']:,}", False))
        else:
            out.append((line, False))
    return out + answers


def row_contains(entry: dict[str, Any] | RowError, needle: str) -> bool:
    """Whether a raw row's fields (a skipped line: its reason) contain ``needle`` (lower
    case), also as JSON escapes write it."""
    body = json.dumps(entry, ensure_ascii=False, default=str) if isinstance(entry, dict) else entry.reason
    return needle in body.lower() or needle in body.encode("ascii", "backslashreplace").decode().lower()


def rows_matching(project: Any, text: str, cancel: Any = None) -> list[int] | None:
    """The positions of every row containing ``text`` (any case), across the sources, in
    one streaming pass without a tokenizer; None when ``cancel`` stopped it."""
    needle = text.strip().lower()
    found: list[int] = []
    for i, _, _, entry in _Data(project).entries():
        if cancel is not None and cancel.is_set():
            return None
        if row_contains(entry, needle):
            found.append(i)
    return found


def preview_search(project: Any, text: str, *, start: int = 0, backward: bool = False) -> dict[str, Any]:
    """The first row at or after position ``start`` (before it, ``backward``) whose fields
    contain ``text`` (any case), wrapping around: {"index", "row"}, or {"index": None}.
    Streams, keeping no more than two hits."""
    needle = text.strip().lower()
    if not needle:
        raise UserError("search: type some text to look for")
    data = _Data(project)
    first: tuple[int, int] | None = None  # the first hit (a forward search wraps to it)
    before: tuple[int, int] | None = None  # the last hit at or before start
    last: tuple[int, int] | None = None  # the last hit (a backward search wraps to it)
    for i, _, number, entry in data.entries():
        if row_contains(entry, needle):
            if not backward and i >= start:
                return {"index": i, "row": number}
            first = first or (i, number)
            last = (i, number)
            if i <= start:
                before = (i, number)
    hit = (before or last) if backward else first
    if hit is None:
        return {"index": None, "row": None}
    return {"index": hit[0], "row": hit[1]}


# -- the parts of a row a reader tells apart ------------------------------------------------------

MARKED_PARTS = {"reasoning": "reasoning", "tool_call": "tool call", "tool_result": "tool result",
                "tools": "tools"}
"""Token parts (``preview_row``'s ``part``) that the views mark, with their names: the tool
calls, the tool results, the reasoning and the tool-schema block."""
PART_COLOURS = {"reasoning": "magenta", "tool_call": "bright_blue", "tool_result": "dark_orange", "tools": "cyan"}
"""The marked parts' colours (rich colour names), the same in the app and the CLI."""


def part_marker(part: str, *, end: bool = False) -> str | None:
    """The marker written where a run of ``part`` starts (``⟨tool call⟩``) or, with
    ``end``, where it ends (``⟨/tool call⟩``); None for a part that is not marked."""
    name = MARKED_PARTS.get(part)
    if name is None:
        return None
    return f"⟨/{name}⟩" if end else f"⟨{name}⟩"


# -- the render cache of the stats pass --------------------------------------------------------


def _stats_cache(project: Any) -> Any:
    """The project's render cache (:class:`tunedeck.core.rendercache.RowCache`), or None."""
    from .rendercache import RowCache, cache_path

    path = cache_path(project)
    return RowCache(path) if path is not None else None


# -- the rows held out for evaluation ----------------------------------------------------------
#
# Which row positions (as preview_row counts them: every row of every source in order, the
# skipped ones too) the trainer holds out for evaluation, without the trainer's whole-file
# read: one streaming pass keeps the positions of the usable rows (8 bytes a row), and the
# same seeded shuffle as tunedeck.core.datafile.load_splits picks the held ones, so the two
# agree row for row. Kept per project key in the engine and on disk (the UI process may read
# what is known: compute=False); a finished stats pass keeps it too.

HELD_KEPT = 4


class HeldOut:
    """The held-out positions of one dataset and split, sorted; ``usable`` and ``rows`` counted."""

    def __init__(self, held: Any, usable: int | None, rows: int | None) -> None:
        self.held, self.usable, self.rows = held, usable, rows

    def __contains__(self, position: int) -> bool:
        from bisect import bisect_left

        i = bisect_left(self.held, position)
        return i < len(self.held) and self.held[i] == position

    def within(self, start: int, stop: int) -> list[int]:
        from bisect import bisect_left

        return list(self.held[bisect_left(self.held, start):bisect_left(self.held, stop)])


class _NotKnown(Exception):
    pass


def _held_key(project: Any) -> str:
    from .kept import kept_file
    from .sources import data_stamps

    key = {"data": data_stamps(project),
           "dataset": {k: project[f"dataset.{k}"] for k in ("format", "columns", "system_prompt")},
           "split": project["dataset.eval_split"], "seed": project["training.seed"]}
    return str(kept_file("held", key, code=("datafile.py", "conversation.py", "sources.py", "preview.py")))


def _splits_rows(project: Any) -> bool:
    """Whether the eval split is held out of the sources' rows (a ratio above 0)."""
    split = project["dataset.eval_split"]
    return not isinstance(split, str) and split > 0


def _split_held(project: Any, usable: Any, rows: int) -> HeldOut:
    """The seeded choice of :func:`tunedeck.core.datafile.load_splits`, on usable positions."""
    import random
    from array import array

    n = len(usable)
    order = array("q", range(n))  # shuffled in place as load_splits shuffles its list
    random.Random(project["training.seed"]).shuffle(order)
    count = eval_count(n, project["dataset.eval_split"])
    return HeldOut(array("q", sorted(usable[u] for u in order[:count])), n, rows)


def _keep_held_out(project: Any, usable: Any, rows: int) -> HeldOut:
    from .kept import write_kept

    if not _splits_rows(project):
        return HeldOut([], None, None)
    key = _held_key(project)

    try:
        return _read_held(key)  # kept already (read again by another pass meanwhile)
    except _NotKnown:
        pass
    held = _split_held(project, usable, rows)
    write_kept(Path(key), {"held": list(held.held), "usable": held.usable, "rows": held.rows})
    return held


@lru_cache(maxsize=HELD_KEPT)
def _read_held(key: str) -> HeldOut:
    """The held-out positions kept at ``key`` (a file), kept in this process once read;
    _NotKnown (not kept) when there is no such file yet."""
    from array import array

    from .kept import read_kept

    kept = read_kept(Path(key)) or {}
    held, usable, rows = kept.get("held"), kept.get("usable"), kept.get("rows")
    if not (isinstance(held, list) and isinstance(usable, int) and isinstance(rows, int)
            and all(isinstance(p, int) for p in held)):
        raise _NotKnown
    return HeldOut(array("q", sorted(held)), usable, rows)


def _compute_held(project: Any, cancel: Any = None, progress: Any = None) -> HeldOut | None:
    """One streaming pass over the rows (no tokenizer); None when cancelled."""
    import time
    from array import array

    data = _Data(project)
    usable = array("q")
    rows = 0
    last_report = time.monotonic()
    for position, k, _, entry in data.entries():
        if cancel is not None and cancel.is_set():
            return None
        rows += 1
        if progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            progress({"done": False, "rows": rows})
        try:
            data.messages(k, entry)
        except ValueError:
            continue
        usable.append(position)
    return _keep_held_out(project, usable, rows)


def held_out(project: Any, *, compute: bool = True, cancel: Any = None, progress: Any = None) -> HeldOut | None:
    """The project's held-out positions: kept, or read in one streaming pass (``compute``);
    None when not known (``compute`` false) or the pass was cancelled."""
    if not _splits_rows(project):
        return HeldOut([], None, None)  # a separate eval file, or none: no row of these is held out
    key = _held_key(project)
    try:
        return _read_held(key)
    except _NotKnown:
        pass
    if not compute:
        return None
    return _compute_held(project, cancel, progress)


def held_out_positions(project: Any, positions: Any = (), *, start: int | None = None, stop: int | None = None,
                       compute: bool = True, cancel: Any = None, progress: Any = None) -> dict[str, Any] | None:
    """Which row positions (from 0, across the sources in order, as :func:`preview_row`
    counts them) the trainer holds out for evaluation, exactly as
    :func:`tunedeck.core.datafile.load_splits` chooses them.

    Returns ``held`` (a bool per position in ``positions``), ``held_in`` (the held
    positions in ``[start, stop)`` when ``start`` is given; ``stop`` None: to the end),
    ``eval_rows`` (how many are held out), ``usable`` and ``rows`` (None when nothing is
    held out of these rows: ``dataset.eval_split`` is 0 or a file) and ``done`` (false
    when ``cancel`` stopped the pass: nothing is marked). The first call reads the rows once
    (streaming, no tokenizer; ``progress`` gets ``{"done": false, "rows"}`` now and then);
    then the answer is kept per dataset, split and seed, in this process and on disk.
    ``compute`` false: None unless that is already known (no pass).
    """
    positions = [int(p) for p in positions]
    held = held_out(project, compute=compute, cancel=cancel, progress=progress)
    if held is None:
        if not compute:
            return None
        return {"held": [False] * len(positions), "held_in": [], "eval_rows": 0, "usable": None, "rows": None,
                "done": False}
    return {
        "held": [p in held for p in positions],
        "held_in": held.within(start, stop if stop is not None else 1 << 62) if start is not None else [],
        "eval_rows": len(held.held), "usable": held.usable, "rows": held.rows, "done": True,
    }
