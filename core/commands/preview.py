"""`tunedeck preview PROJECT.toml [--row N] [--json] [--set key=value ...]`: what the trainer learns from.

Shows one row of the project's dataset (the first, or row N: the numbering of the skipped
list, the line number for JSONL) rendered with the chat template, token by token, with
the tokens the loss trains highlighted and the masked ones dimmed; then the whole set:
rows, skipped rows and why, token lengths, truncation at dataset.max_length, and the
share of tokens trained. The rendering and the mask are the trainer's own.

--json prints {"row": {..., "tokens": [{"id", "text", "trained"}, ...]}, "stats": {...,
"rows", "skipped": [{"row", "reason"}, ...]}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import add_set_option
from ..preview import stats_lines

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="show a dataset row token by token with the loss mask, and the set's stats",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("project", help="project file")
    p.add_argument("--row", type=int, metavar="N", help="the row to show (default: the first)")
    add_set_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def collect(project_path: str, overrides: list[str], row: int | None = None) -> dict[str, Any]:
    """The row and the stats, as a dict; raises UserError on bad input."""
    from ..preview import preview_row, preview_stats, project_tokenizer
    from ..project import Project

    project = Project.load(project_path)
    project.apply_overrides(overrides)
    tokenizer = project_tokenizer(project)
    shown = preview_row(project, row=row, tokenizer=tokenizer)
    return {"row": shown, "stats": preview_stats(project, tokenizer=tokenizer)}


def run(args: argparse.Namespace) -> int:
    report = collect(args.project, args.overrides, args.row)
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
                  "(token) is masked; ✂ marks the cut at max_length")
OPEN, CLOSE = "«", "»"


def text_report(report: dict[str, Any], *, plain: bool = False) -> list[Any]:
    """The report as rich renderables: the row's text with the trained tokens highlighted,
    its tokens, and the stats. ``plain``: for output without colour (a pipe, a file,
    NO_COLOR), the mask is written into the text, with a line that explains the notation."""
    from rich.text import Text

    row, stats = report["row"], report["stats"]
    out: list[Any] = []
    if plain and not row["error"]:
        out.append(Text(PLAIN_NOTATION))
    out.append(Text(f"row {row['row']} ({row['format']})", style="bold"))
    if row["error"]:
        out.append(Text(f"skipped: {row['error']}", style="red"))
        out.append(Text(json.dumps(row["fields"], ensure_ascii=False, indent=2) if row["fields"] else ""))
    else:
        out.append(Text(f"templated text (trained tokens {'in «…»' if plain else 'highlighted'}):", style="bold"))
        out.append(marked_text(row["tokens"], row["truncated_at"], plain=plain))
        out.append(Text(""))
        out.append(Text(f"tokens: {len(row['tokens'])} kept of {row['length']}, {row['trained']} trained",
                        style="bold"))
        out.append(token_list(row["tokens"], row["truncated_at"], plain=plain))
    out.append(Text(""))
    out.append(Text("the whole set:", style="bold"))
    out.append(Text("\n".join(stats_lines(stats))))
    return out


def visible(text: str) -> str:
    """Whitespace a reader can see: newlines as ↵ (and a real newline), tabs as →."""
    return text.replace("\t", "→").replace("\n", "↵\n")


def marked_text(tokens: list[dict[str, Any]], truncated_at: int | None, *, plain: bool = False) -> Any:
    """The templated text, trained tokens in bold green (``plain``: each trained span in «…»)."""
    from rich.text import Text

    text = Text()
    trained = False
    for t in tokens:
        if plain and t["trained"] != trained:
            text.append(OPEN if t["trained"] else CLOSE)
            trained = t["trained"]
        text.append(t["text"], style="bold green" if t["trained"] else "dim")
    if plain and trained:
        text.append(CLOSE)
    if truncated_at is not None:
        text.append(f" ✂ truncated at {truncated_at} tokens", style="bold red")
    return text


def token_list(tokens: list[dict[str, Any]], truncated_at: int | None, *, plain: bool = False) -> Any:
    """Every token in brackets, trained in bold green (``plain``: trained ``[token]``,
    masked ``(token)``)."""
    from rich.text import Text

    text = Text()
    for t in tokens:
        piece = visible(t["text"]).replace("\n", "")
        shown = f"[{piece}]" if t["trained"] or not plain else f"({piece})"
        text.append(shown, style="bold green" if t["trained"] else "dim")
        text.append(" ")
    if truncated_at is not None:
        text.append(f"✂ cut at max_length = {truncated_at}", style="bold red")
    return text
