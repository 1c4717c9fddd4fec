"""One dataset row, three ways: its raw fields, its templated text, and its tokens.

Tokens the loss trains are highlighted (filled), masked ones dimmed, special tokens shown
as they are written (``<|im_end|>``, underlined), whitespace made visible, and the
truncation point marked. Tool calls, tool results, reasoning and the tool-schema block
(the token's ``part``) each have their colour, filled when trained, and a marker where
they start (``⟨tool call⟩``); :func:`legend` says which is which. The token view wraps between tokens,
never inside one. Text matching the search is highlighted in every view. The row is a
plain dict from the engine's ``preview_row`` op.

A preference pair (a row with ``pair`` set: a prompt, a chosen and a rejected answer) shows
its prompt once, then the two answers token by token side by side, labelled, each with its
own cut (stacked, chosen above rejected, where the view is narrower than
:data:`SIDE_BY_SIDE`); its text view shows prompt + chosen, then prompt + rejected.
"""

from __future__ import annotations

import io
import json
import re
from functools import lru_cache
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text
from textual.widgets import Static

from tunedeck.core.preview import prompt_length
from tunedeck.core.preview import MARKED_PARTS, PART_COLOURS, part_marker

VIEWS = ("tokens", "text", "fields")
TRAINED = "bold black on green"
MASKED = "dim"
SPECIAL = "underline"
CUT = "bold white on red"
MATCH = "bold black on yellow"
EVAL = "bold black on cyan"
SEPARATOR = "│"
SIDES = ("chosen", "rejected")  # a preference pair's two answers, in the order shown
SIDE_BY_SIDE = 56  # the narrowest view (cells) the answers share side by side: a terminal of about 100 columns
GUTTER = " ┃ "  # between the chosen and the rejected column
_SPECIAL = re.compile(r"^<\|?[^<>\s]+\|?>$|^\[[A-Z_]+\]$")  # <|im_end|>, </s>, <eos>, [INST]


def visible(piece: str) -> str:
    """A token's text with its whitespace visible: newline ↵, tab →, a leading space ·."""
    return piece.replace("\n", "↵").replace("\t", "→").replace(" ", "·")


def is_special(piece: str) -> bool:
    """Whether a token reads as a special (control) token such as ``<|im_end|>``."""
    return bool(_SPECIAL.match(piece))


def part_style(part: str, trained: bool) -> str:
    """A token's style: trained filled (green, or its part's colour), masked dimmed (in its
    part's colour, for a marked part)."""
    colour = PART_COLOURS.get(part)
    if colour is None:
        return TRAINED if trained else MASKED
    return f"bold black on {colour}" if trained else f"{MASKED} {colour}"


def marker_style(part: str) -> str:
    return f"bold {PART_COLOURS[part]}"


def row_parts(row: dict[str, Any] | None) -> list[str]:
    """The marked parts a row's tokens have, in the order of :data:`MARKED_PARTS`."""
    if not row:
        return []
    present = {t.get("part") for t in row.get("tokens") or ()}
    if row.get("pair"):  # the chosen side is the row's tokens; the rejected side may have others
        present |= {t.get("part") for t in (row.get("rejected") or {}).get("tokens") or ()}
    return [part for part in MARKED_PARTS if part in present]


def legend(*, eval_row: bool = False, parts: list[str] | tuple[str, ...] = ()) -> Text:
    """The key to the token and text views' styles, each word in the style it names; a
    second line for the marked ``parts`` the row has (tool calls, reasoning, ...)."""
    out = Text()
    for sample, style in (("trained", TRAINED), ("masked", MASKED), ("<|special|>", f"{MASKED} {SPECIAL}"),
                          ("✂ cut", CUT), ("match", MATCH)):
        out.append(sample, style=style)
        if sample != "match":
            out.append("  ")
    if parts:  # each part's marker, in its colour (its trained tokens are filled with it)
        out.append("\n")
        for i, part in enumerate(parts):
            out.append(" " if i else "")
            out.append(str(part_marker(part)), style=marker_style(part))
    if eval_row:
        out.append("\n")
        out.append(" EVAL ", style=EVAL)
        out.append(" this row is held out for evaluation: it is not trained on")
    return out


def match_spans(text: str, needle: str) -> list[tuple[int, int]]:
    """Where ``needle`` occurs in ``text`` (any case), as (start, end) offsets."""
    needle = needle.strip().lower()
    if not needle:
        return []
    lowered = text.lower()
    spans, start = [], lowered.find(needle)
    while start >= 0:
        spans.append((start, start + len(needle)))
        start = lowered.find(needle, start + len(needle))
    return spans


def _token_matches(tokens: list[dict[str, Any]], needle: str) -> set[int]:
    """Indices of the tokens that hold part of a match of ``needle``."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token["text"])
    hit: set[int] = set()
    for start, end in match_spans("".join(t["text"] for t in tokens), needle):
        hit.update(i for i, off in enumerate(offsets) if off < end and off + len(tokens[i]["text"]) > start)
    return hit


def tokens_text(row: dict[str, Any], width: int = 0, search: str = "") -> Text:
    """The token view: tokens separated by ``│``, trained highlighted, masked dimmed, then
    the cut. With a ``width``, lines break between tokens, never inside one (a token wider
    than the line is the only one folded)."""
    out = Text()
    tokens = row["tokens"]
    matches = _token_matches(tokens, search) if search else set()
    column = 0
    part = None
    for i, token in enumerate(tokens):
        piece = visible(token["text"]) or "∅"
        if token.get("part") != part:
            part = token.get("part")
            marker = part_marker(part) if part else None
            if marker:  # where a tool call, a tool result, reasoning or the tools start
                if width and column and column + cell_len(marker) + 1 + cell_len(piece) > width:
                    out.append("\n")
                    column = 0
                out.append(marker, style=marker_style(part))
                out.append(" ")
                column += cell_len(marker) + 1
        if width and column and column + cell_len(piece) > width:
            out.append("\n")
            column = 0
        style = part_style(token.get("part", "text"), token["trained"])
        if is_special(token["text"]):
            style += f" {SPECIAL}"
        if i in matches:
            style = MATCH
        out.append(piece, style=style)
        column += cell_len(piece)
        if token["text"].endswith("\n"):
            out.append("\n")
            column = 0
        elif i + 1 < len(tokens):
            if width and column + 1 > width:  # no room for the separator: the line ends here
                out.append("\n")
                column = 0
            else:
                out.append(SEPARATOR, style="dim")
                column += 1
    if row["truncated_at"] is not None:
        out.append(f"\n✂ truncated at max_length = {row['truncated_at']}: "
                   f"{row['length'] - row['truncated_at']} more tokens are not trained on", style=CUT)
    return out


def templated_text(row: dict[str, Any], search: str = "") -> Text:
    """The templated text, trained spans highlighted, marked parts coloured and marked at
    their start, the part after the cut struck out."""
    out = Text()
    part = None
    for token in row["tokens"]:
        if token.get("part") != part:
            part = token.get("part")
            marker = part_marker(part) if part else None
            if marker:
                out.append(marker, style=marker_style(part))
        out.append(token["text"], style=part_style(token.get("part", "text"), token["trained"]))
    if row["truncated_at"] is not None:
        out.append("✂", style=CUT)
        kept = "".join(t["text"] for t in row["tokens"])
        rest = row["text"][len(kept):] if row["text"].startswith(kept) else ""
        out.append(rest, style="dim strike")
    _mark(out, search)
    return out


def _answer(side: dict[str, Any], start: int) -> dict[str, Any]:
    """One side of a pair from token ``start`` (after the prompt), as :func:`tokens_text` takes a row."""
    return {"tokens": side["tokens"][start:], "truncated_at": side["truncated_at"], "length": side["length"]}


def side_label(name: str, side: dict[str, Any]) -> Text:
    """A pair side's heading: its name and how many of its tokens train."""
    out = Text(name, style="bold underline")
    out.append(f" · {side['trained']} trained", style="dim")
    if side["truncated_at"] is not None:
        out.append(" ✂", style=CUT)
    return out


def _side_tokens(side: dict[str, Any], start: int, width: int, search: str) -> Text:
    """A pair side's answer token by token, then its cut (if any)."""
    answer = _answer(side, start)
    body = tokens_text(answer, width, search)
    if not answer["tokens"]:  # the cut fell in the prompt: the cut alone, on a line of its own
        body = Text.assemble(("(no answer token left)", "dim"), body)
    body.rstrip()
    return body


@lru_cache(maxsize=1)
def _console() -> Console:
    """A console for :meth:`Text.wrap` (which takes one; nothing is printed to it)."""
    return Console(file=io.StringIO(), width=200, color_system=None)


def _lines(text: Text, width: int) -> list[Text]:
    """``text`` as lines at most ``width`` cells wide (words wrapped, a longer token folded)."""
    return list(text.wrap(_console(), width, overflow="fold"))


def _wrapped(text: Text, width: int) -> Text:
    """``text`` wrapped at ``width`` cells (as it is without a width)."""
    return Text("\n").join(_lines(text, width)) if width else text


def pair_tokens_text(row: dict[str, Any], width: int = 0, search: str = "") -> Text:
    """The token view of a preference pair: the prompt once, then the chosen and the rejected
    answer in two labelled columns (each wrapped between tokens, with its own cut), or
    stacked, chosen first, in a view narrower than :data:`SIDE_BY_SIDE`."""
    start = prompt_length(row)
    heading = Text("prompt", style="bold underline")
    heading.append(f" · {start} tokens, not trained", style="dim")
    prompt = tokens_text({"tokens": row["chosen"]["tokens"][:start], "truncated_at": None, "length": start},
                         width, search)
    prompt.rstrip()
    out = Text("\n").join([_wrapped(heading, width), prompt, Text()])
    out.append("\n")
    sides = [(name, row[name]) for name in SIDES]
    if width < SIDE_BY_SIDE:
        blocks = []
        for name, side in sides:
            body = _side_tokens(side, start, width, search)
            blocks.append(Text("\n").join([_wrapped(side_label(name, side), width), _wrapped(body, width)]))
        out.append_text(Text("\n\n").join(blocks))
        return out
    column = (width - cell_len(GUTTER)) // 2
    columns = []
    for name, side in sides:
        body = _side_tokens(side, start, column, search)
        columns.append(_lines(side_label(name, side), column) + _lines(body, column))
    height = max(len(lines) for lines in columns)
    rows = []
    for i in range(height):
        left, right = (lines[i] if i < len(lines) else Text() for lines in columns)
        left.pad_right(column - left.cell_len)
        rows.append(Text.assemble(left, (GUTTER, "dim"), right))
    out.append_text(Text("\n").join(rows))
    return out


def pair_templated_text(row: dict[str, Any], search: str = "") -> Text:
    """The text view of a preference pair: prompt + chosen, then prompt + rejected, each as
    :func:`templated_text` shows a row."""
    out = Text()
    for i, name in enumerate(SIDES):
        if i:
            out.append("\n\n")
        out.append(f"prompt + {name}", style="bold underline")
        out.append("\n")
        body = templated_text(row[name], search)
        body.rstrip()
        out.append_text(body)
    return out


def fields_text(row: dict[str, Any], search: str = "") -> Text:
    """The raw row, as read from the file."""
    if row["fields"] is None:
        return Text("(this row could not be read)", style="dim")
    out = Text(json.dumps(row["fields"], ensure_ascii=False, indent=2))
    _mark(out, search)
    return out


def _mark(text: Text, search: str) -> None:
    for start, end in match_spans(text.plain, search):
        text.stylize(MATCH, start, end)


class RowView(Static):
    """One row in one of :data:`VIEWS`."""

    DEFAULT_CSS = """
    RowView { width: 100%; height: auto; padding: 0 1; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.row: dict[str, Any] | None = None
        self.view = "tokens"
        self.search = ""
        self._width = 0

    def show(self, row: dict[str, Any] | None, view: str | None = None, search: str | None = None) -> None:
        self.row = row
        if view is not None:
            self.view = view
        if search is not None:
            self.search = search
        self.update(self.content())

    def on_resize(self) -> None:
        if self.content_region.width != self._width and self.row is not None:
            self.update(self.content())

    def content(self) -> Text:
        row = self.row
        self._width = self.content_region.width
        if row is None:
            return Text("")
        if self.view == "fields" or row["error"] or row["unrendered"]:
            out = Text()
            if row["error"]:
                out.append(f"skipped: {row['error']}\n\n", style="bold red")
            elif row["unrendered"]:
                out.append(f"not rendered: {row['unrendered']}\n\n", style="bold red")
            out.append_text(fields_text(row, self.search))
            return out
        if row.get("pair"):
            if self.view == "tokens":
                return pair_tokens_text(row, self._width, self.search)
            return pair_templated_text(row, self.search)
        if self.view == "tokens":
            return tokens_text(row, self._width, self.search)
        return templated_text(row, self.search)
