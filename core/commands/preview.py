"""`tunedeck preview PROJECT.toml [--row N] [--source K] [--json] [--set key=value ...]`: what the trainer learns from.

Shows one row of the project's dataset (the first, or row N: the numbering of the skipped
list, the line number for JSONL; of source K when dataset.path lists several, numbered
from 1) rendered with the chat template, token by token, with the tokens the loss trains
highlighted and the masked ones dimmed, and tool calls, tool results, reasoning and the
tool schemas each marked where they start (⟨tool call⟩ ... ⟨/tool call⟩); then the whole
set: rows, skipped rows and why, each source's share of the mix, token lengths,
truncation at dataset.max_length, and the share of tokens trained. The rendering and the
mask are the trainer's own.

A preference (DPO, ORPO) project's row is a pair: its prompt, then the chosen and the
rejected answer, each token by token with its trained tokens; the stats count pairs and
compare the answers' lengths.

--json prints {"row": {..., "source": {"index", "path", "key", "weight"}, "tokens":
[{"id", "text", "trained", "part"}, ...]}, "stats": {..., "rows", "sources": [...],
"skipped": [{"row", "reason"}, ...]}}; a pair's row adds "pair": true, "prompt" and
"chosen" and "rejected" (each with its "tokens", "text", "length", "truncated_at",
"trained"), its stats "preference": {"pairs", "chosen_tokens_mean", "rejected_tokens_mean",
"chosen_longer_percent", "truncated_pairs", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import add_set_option
from ..errors import UserError
from ..preview import PART_COLOURS, part_marker, preference_stats_lines, prompt_length, stats_lines

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="show a dataset row token by token with the loss mask, and the set's stats",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("project", help="project file")
    p.add_argument("--row", type=int, metavar="N", help="the row to show (default: the first)")
    p.add_argument("--source", type=int, metavar="K",
                   help="the source --row counts in, from 1, when dataset.path lists several (default: the "
                        "first); without --row, the source's first row")
    add_set_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def collect(project_path: str, overrides: list[str], row: int | None = None,
            source: int | None = None) -> dict[str, Any]:
    """The row and the stats, as a dict; ``source`` counts from 1. Raises UserError on bad input."""
    from ..preview import preview_row, preview_stats, project_tokenizer
    from ..project import Project

    project = Project.load(project_path)
    project.apply_overrides(overrides)
    k = 0
    if source is not None:
        k = _source_index(project, source)
        if row is None:
            row = _first_row(project, k)
    tokenizer = project_tokenizer(project)
    shown = preview_row(project, row=row, source=k, tokenizer=tokenizer)
    return {"row": shown, "stats": preview_stats(project, tokenizer=tokenizer)}


def _source_index(project: Any, source: int) -> int:
    """``--source K`` (from 1) as an index (from 0); UserError when there is no such source."""
    from ..sources import project_sources

    count = len(project_sources(project))  # one at least: an empty dataset.path is refused there
    if not 1 <= source <= count:
        has = f"{count} sources" if count > 1 else "one source (dataset.path is not a list)"
        raise UserError(f"--source {source}: the project has {has}; sources are numbered from 1")
    return source - 1


def _first_row(project: Any, k: int) -> int:
    """The number of source ``k``'s first row."""
    from ..datafile import read_source
    from ..sources import project_sources

    source = project_sources(project)[k]
    for number, _ in read_source(source, 1):
        return number
    raise UserError(f"{source.key} = {source.spec!r} has no rows")


def run(args: argparse.Namespace) -> int:
    report = collect(args.project, args.overrides, args.row, args.source)
    if args.json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    from ..cli import console as cli_console

    console = cli_console()
    plain = not console.is_terminal or console.no_color or console.color_system is None
    for renderable in text_report(report, plain=plain):
        console.print(renderable)
    return 0


PLAIN_NOTATION = ("notation (plain text, no colour): in the templated text «…» encloses the trained tokens "
                  "(the loss is computed on them), the rest is masked; in the token list [token] is trained, "
                  "(token) is masked; ⟨tool call⟩ … ⟨/tool call⟩ encloses a tool call, and so ⟨tool result⟩, "
                  "⟨reasoning⟩ and ⟨tools⟩ (the tool schemas); ✂ marks the cut at max_length")
OPEN, CLOSE = "«", "»"


def _style(token: dict[str, Any]) -> str:
    """Trained bold, masked dim; green, or the colour of a marked part (a tool call, ...)."""
    colour = PART_COLOURS.get(token.get("part", "text"))
    if token["trained"]:
        return f"bold {colour}" if colour else "bold green"
    return f"dim {colour}" if colour else "dim"


def _part_change(previous: str | None, part: str | None) -> tuple[str, str]:
    """The markers where the tokens go from part ``previous`` to ``part``: the end of the
    one (``⟨/tool call⟩``) and the start of the other (``⟨tool result⟩``), each "" if unmarked."""
    if previous == part:
        return "", ""
    end = part_marker(previous, end=True) if previous else None
    start = part_marker(part) if part else None
    return end or "", start or ""


def text_report(report: dict[str, Any], *, plain: bool = False) -> list[Any]:
    """The report as rich renderables: the row's text with the trained tokens highlighted,
    its tokens, and the stats. ``plain``: for output without colour (a pipe, a file,
    NO_COLOR), the mask is written into the text, with a line that explains the notation."""
    from rich.text import Text

    row, stats = report["row"], report["stats"]
    out: list[Any] = []
    if plain and not row["error"]:
        out.append(Text(PLAIN_NOTATION))
    source = row.get("source")
    where = f" of source {source['index'] + 1}, {source['path']}" if source and row.get("sources", 1) > 1 else ""
    pair = bool(row.get("pair")) and not row["error"] and not row.get("unrendered")
    out.append(Text(f"row {row['row']}{where} ({row['format']}{', a pair' if pair else ''})", style="bold"))
    if row["error"]:
        out.append(Text(f"skipped: {row['error']}", style="red"))
        out.append(Text(json.dumps(row["fields"], ensure_ascii=False, indent=2) if row["fields"] else ""))
    elif pair:
        out.extend(pair_report(row, plain=plain))
    else:
        out.append(Text(f"templated text (trained tokens {'in «…»' if plain else 'highlighted'}):", style="bold"))
        out.append(marked_text(row["tokens"], row["truncated_at"], plain=plain))
        out.append(Text(""))
        out.append(Text(f"tokens: {len(row['tokens'])} kept of {row['length']}, {row['trained']} trained",
                        style="bold"))
        out.append(token_list(row["tokens"], row["truncated_at"], plain=plain))
    out.append(Text(""))
    out.append(Text("the whole set:", style="bold"))
    if stats.get("preference"):
        out.append(Text("\n").join(Text(line, style="bold yellow" if warns else "")
                                   for line, warns in preference_stats_lines(stats)))
    else:
        out.append(Text("\n".join(stats_lines(stats))))
    return out


def pair_report(row: dict[str, Any], *, plain: bool = False) -> list[Any]:
    """A preference pair: the prompt (templated, masked) once, then the chosen and the
    rejected answer, each as its templated text and its tokens, trained ones marked."""
    from rich.text import Text

    start = prompt_length(row)
    prompt = marked_text(row["chosen"]["tokens"][:start], None, plain=plain)
    prompt.rstrip()
    out: list[Any] = [Text(f"prompt ({start} tokens, not trained; shared by both answers):", style="bold"), prompt]
    for name in ("chosen", "rejected"):
        side = row[name]
        answer = side["tokens"][start:]
        out.append(Text(""))
        out.append(Text(f"{name}: {len(answer)} answer token{'' if len(answer) == 1 else 's'}, {side['trained']} "
                        f"trained (prompt + answer: {len(side['tokens'])} kept of {side['length']})", style="bold"))
        out.append(marked_text(answer, side["truncated_at"], plain=plain))
        out.append(token_list(answer, side["truncated_at"], plain=plain))
    return out


def visible(text: str) -> str:
    """Whitespace a reader can see: newlines as ↵ (and a real newline), tabs as →."""
    return text.replace("\t", "→").replace("\n", "↵\n")


def marked_text(tokens: list[dict[str, Any]], truncated_at: int | None, *, plain: bool = False) -> Any:
    """The templated text, trained tokens in bold green, tool calls, tool results, reasoning
    and tool schemas in their colours, each marked where it starts (``⟨tool call⟩``). ``plain``:
    each trained span in «…» and each marked part ended too (``⟨/tool call⟩``)."""
    from rich.text import Text

    text = Text()
    trained = False
    part: str | None = None
    for t in tokens:
        end, start = _part_change(part, t.get("part"))
        if plain and trained and (not t["trained"] or end or start):  # a trained span ends with its part
            text.append(CLOSE)
            trained = False
        if end and plain:
            text.append(end, style=f"bold {PART_COLOURS[str(part)]}")
        if start:
            text.append(start, style=f"bold {PART_COLOURS[t['part']]}")
        part = t.get("part")
        if plain and t["trained"] and not trained:
            text.append(OPEN)
            trained = True
        text.append(t["text"], style=_style(t))
    if plain and trained:
        text.append(CLOSE)
    if plain and part_marker(str(part)):
        text.append(str(part_marker(str(part), end=True)))
    if truncated_at is not None:
        text.append(f" ✂ truncated at {truncated_at} tokens", style="bold red")
    return text


def token_list(tokens: list[dict[str, Any]], truncated_at: int | None, *, plain: bool = False) -> Any:
    """Every token in brackets, trained in bold green, marked parts in their colours and
    marked where they start (``plain``: trained ``[token]``, masked ``(token)``, and each
    marked part ended too)."""
    from rich.text import Text

    text = Text()
    part: str | None = None
    for t in tokens:
        end, start = _part_change(part, t.get("part"))
        if end and plain:
            text.append(end + " ", style=f"bold {PART_COLOURS[str(part)]}")
        if start:
            text.append(start + " ", style=f"bold {PART_COLOURS[t['part']]}")
        part = t.get("part")
        piece = visible(t["text"]).replace("\n", "")
        shown = f"[{piece}]" if t["trained"] or not plain else f"({piece})"
        text.append(shown, style=_style(t))
        text.append(" ")
    if plain and part_marker(str(part)):
        text.append(str(part_marker(str(part), end=True)) + " ")
    if truncated_at is not None:
        text.append(f"✂ cut at max_length = {truncated_at}", style="bold red")
    return text
