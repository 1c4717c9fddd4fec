"""One dataset row, three ways: its raw fields, its templated text, and its tokens.

Tokens the loss trains are highlighted, masked ones dimmed, special tokens shown as they
are written (``<|im_end|>``), whitespace made visible, and the truncation point marked.
The row is a plain dict from the engine's ``preview_row`` op.
"""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual.widgets import Static

VIEWS = ("tokens", "text", "fields")
TRAINED = "bold black on green"
MASKED = "dim"
CUT = "bold white on red"


def visible(piece: str) -> str:
    """A token's text with its whitespace visible: newline ↵, tab →, a leading space ·."""
    return piece.replace("\n", "↵").replace("\t", "→").replace(" ", "·")


def tokens_text(row: dict[str, Any]) -> Text:
    """The token view: ``[token]`` per token, trained highlighted, masked dimmed, then the cut."""
    out = Text()
    for i, token in enumerate(row["tokens"]):
        out.append(visible(token["text"]) or "∅", style=TRAINED if token["trained"] else MASKED)
        out.append("│" if i + 1 < len(row["tokens"]) else "", style="dim")
        if token["text"].endswith("\n"):
            out.append("\n")
    if row["truncated_at"] is not None:
        out.append(f"\n✂ truncated at max_length = {row['truncated_at']}: "
                   f"{row['length'] - row['truncated_at']} more tokens are not trained on", style=CUT)
    return out


def templated_text(row: dict[str, Any]) -> Text:
    """The templated text, trained spans highlighted, the part after the cut struck out."""
    out = Text()
    for token in row["tokens"]:
        out.append(token["text"], style=TRAINED if token["trained"] else MASKED)
    if row["truncated_at"] is not None:
        out.append("✂", style=CUT)
        kept = "".join(t["text"] for t in row["tokens"])
        rest = row["text"][len(kept):] if row["text"].startswith(kept) else ""
        out.append(rest, style="dim strike")
    return out


def fields_text(row: dict[str, Any]) -> Text:
    """The raw row, as read from the file."""
    if row["fields"] is None:
        return Text("(this row could not be read)", style="dim")
    return Text(json.dumps(row["fields"], ensure_ascii=False, indent=2))


class RowView(Static):
    """One row in one of :data:`VIEWS`."""

    DEFAULT_CSS = """
    RowView { width: 100%; height: auto; padding: 0 1; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", markup=False, **kwargs)
        self.row: dict[str, Any] | None = None
        self.view = "tokens"

    def show(self, row: dict[str, Any] | None, view: str | None = None) -> None:
        self.row = row
        if view is not None:
            self.view = view
        self.update(self.content())

    def content(self) -> Text:
        row = self.row
        if row is None:
            return Text("")
        if self.view == "fields" or row["error"] or row["unrendered"]:
            out = Text()
            if row["error"]:
                out.append(f"skipped: {row['error']}\n\n", style="bold red")
            elif row["unrendered"]:
                out.append(f"not rendered: {row['unrendered']}\n\n", style="bold red")
            out.append_text(fields_text(row))
            return out
        return tokens_text(row) if self.view == "tokens" else templated_text(row)
