"""The settings editor's live summary: what the LoRA settings train (from the engine), the
edits that block saving, and the shell command that trains what the editor shows."""

from __future__ import annotations

from typing import Any

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from tunedeck.core.units import format_bytes, format_count


class SettingsSummary(Widget):
    """Trainable parameters and adapter size, invalid fields, and the equivalent command."""

    DEFAULT_CSS = """
    SettingsSummary {
        height: auto;
        max-height: 8;
        padding: 0 1;
        border-top: solid $primary;
        background: $surface;
    }
    """

    result: reactive[dict[str, Any] | None] = reactive(None, layout=True)
    """The engine's ``lora_summary`` for the settings shown, once it has answered; training
    would refuse these settings when its ``errors`` are not empty."""
    error: reactive[str] = reactive("", layout=True)
    """Why the engine could not count (one line): the model cannot be read."""
    pending: reactive[bool] = reactive(True, layout=True)
    """Waiting for the engine."""
    invalid: reactive[tuple[str, ...]] = reactive((), layout=True)
    """Keys whose edits do not validate."""
    command: reactive[str] = reactive("", layout=True)
    """``tunedeck train PROJECT.toml --set ...``"""

    def render(self) -> Content:
        width = self.content_region.width or 80
        lines = [self._adapter_line()]
        result = self.result
        if result and not self.pending and not self.error and not result["errors"]:
            adapted = "  ".join(f"{name} x{count}" for name, count in result["adapted"].items())
            lines.append(Content.assemble(("layers  ", "bold"), adapted).truncate(width, ellipsis=True))
            lines.extend(Content.styled(f"⚠ {warning}", "$text-warning").truncate(width, ellipsis=True)
                         for warning in result["warnings"][:2])
        if self.invalid:
            lines.append(Content.styled(f"✗ invalid, not saved: {', '.join(self.invalid)}", "$text-error"))
        lines.append(Content.assemble(("$ ", "bold $text-muted"), (self.command, "$text-primary")))
        return Content("\n").join(lines)

    def _adapter_line(self) -> Content:
        label = ("LoRA  ", "bold")
        if self.pending:
            return Content.assemble(label, ("counting… (the model is built on the meta device: no weights read)",
                                            "$text-muted"))
        error = self.error or (self.result["errors"][0] if self.result and self.result["errors"] else "")
        if error:
            return Content.assemble(label, (error, "$text-error"))
        if self.result is None:
            return Content.assemble(label, ("not counted", "$text-muted"))
        return Content.assemble(label, counts(self.result))


def counts(result: dict[str, Any]) -> Content:
    """An engine ``lora_summary`` as one line: "16,384 trainable (2.1% of 768K) · adapter 64.0 KiB · 14 layers"."""
    layers = result["adapted_layers"]
    return Content.assemble(
        (f"{result['trainable_params']:,}", "bold $text-success"),
        f" trainable ({result['percent']:.2f}% of {format_count(result['total_params'])}) · adapter "
        f"{format_bytes(result['adapter_bytes'])} · {layers} layer{'' if layers == 1 else 's'}",
    )
