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
    for renderable in text_report(report):
        console.print(renderable)
    return 0


def text_report(report: dict[str, Any]) -> list[Any]:
    """The report as rich renderables: the row's text with the trained tokens highlighted,
    its tokens, and the stats."""
    from rich.text import Text

    row, stats = report["row"], report["stats"]
    out: list[Any] = []
    out.append(Text(f"row {row['row']} ({row['format']})", style="bold"))
    if row["error"]:
        out.append(Text(f"skipped: {row['error']}", style="red"))
        out.append(Text(json.dumps(row["fields"], ensure_ascii=False, indent=2) if row["fields"] else ""))
    else:
        out.append(Text("templated text (trained tokens highlighted):", style="bold"))
        out.append(marked_text(row["tokens"], row["truncated_at"]))
        out.append(Text(""))
        out.append(Text(f"tokens: {len(row['tokens'])} kept of {row['length']}, {row['trained']} trained",
                        style="bold"))
        out.append(token_list(row["tokens"], row["truncated_at"]))
    out.append(Text(""))
    out.append(Text("the whole set:", style="bold"))
    out.append(Text("\n".join(stats_lines(stats))))
    return out


def visible(text: str) -> str:
    """Whitespace a reader can see: newlines as ↵ (and a real newline), tabs as →."""
    return text.replace("\t", "→").replace("\n", "↵\n")


def marked_text(tokens: list[dict[str, Any]], truncated_at: int | None) -> Any:
    from rich.text import Text

    text = Text()
    for t in tokens:
        text.append(t["text"], style="bold green" if t["trained"] else "dim")
    if truncated_at is not None:
        text.append(f" ✂ truncated at {truncated_at} tokens", style="bold red")
    return text


def token_list(tokens: list[dict[str, Any]], truncated_at: int | None) -> Any:
    from rich.text import Text

    text = Text()
    for t in tokens:
        piece = visible(t["text"]).replace("\n", "")
        text.append(f"[{piece}]", style="bold green" if t["trained"] else "dim")
        text.append(" ")
    if truncated_at is not None:
        text.append(f"✂ cut at max_length = {truncated_at}", style="bold red")
    return text
