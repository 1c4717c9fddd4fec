"""One dataset row, three ways: its raw fields, its templated text, and its tokens.

Tokens the loss trains are highlighted (filled), masked ones dimmed, special tokens shown
as they are written (``<|im_end|>``, underlined), whitespace made visible, and the
truncation point marked. Tool calls, tool results, reasoning and the tool-schema block
(the token's ``part``) each have their colour, filled when trained, and a marker where
they start (``⟨tool call⟩``); :func:`legend` says which is which. The token view wraps between tokens,
never inside one. Text matching the search is highlighted in every view. The row is a
plain dict from the engine's ``preview_row`` op.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import Static

from tunedeck.core.preview import MARKED_PARTS, PART_COLOURS, part_marker

VIEWS = ("tokens", "text", "fields")
TRAINED = "bold black on green"
MASKED = "dim"
SPECIAL = "underline"
CUT = "bold white on red"
MATCH = "bold black on yellow"
EVAL = "bold black on cyan"
SEPARATOR = "│"
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
        if self.view == "tokens":
            return tokens_text(row, self._width, self.search)
        return templated_text(row, self.search)
