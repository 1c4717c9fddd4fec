"""The Modules screen's live numbers: what the picked layers train, their cost, and what is
wrong with the pick (from the engine's ``lora_summary``)."""

from __future__ import annotations

from typing import Any

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget

from tunedeck.core.memory import memory_line as core_memory_line

from .summary import counts

PROBLEMS_SHOWN = 3


def memory_line(memory: dict[str, Any]) -> str:
    """An engine memory estimate as one line (:func:`tunedeck.core.memory.memory_line`, the
    line every screen shows): "~1.20 GiB on cuda: QLoRA 4bit bf16, batch 4 × 301 tokens (the longest row), ..."."""
    return core_memory_line(memory)


class ChoiceSummary(Widget):
    """Trainable parameters, adapter size and peak memory of the pick, its target_modules,
    and the errors, warnings and notes that go with it."""

    DEFAULT_CSS = """
    ChoiceSummary {
        height: auto;
        max-height: 10;
        padding: 0 1;
        border-top: solid $primary;
        background: $surface;
    }
    """

    result: reactive[dict[str, Any] | None] = reactive(None, layout=True)
    """The engine's ``lora_summary`` of the pick shown."""
    status: reactive[str] = reactive("", layout=True)
    """A line shown instead of the numbers while there are none yet."""
    error: reactive[str] = reactive("", layout=True)
    """Why there are no numbers for the pick shown (one line)."""
    targets: reactive[str] = reactive("", layout=True)
    """The project's ``lora.target_modules`` now, as TOML."""
    edited: reactive[bool] = reactive(False, layout=True)
    """``lora.target_modules`` differs from the saved file."""

    def render(self) -> Content:
        label = ("LoRA     ", "bold")
        result = self.result
        lines: list[Content] = []
        if self.error:
            lines.append(Content.assemble(label, (self.error, "$text-error")))
        elif result is None:
            lines.append(Content.assemble(label, (self.status or "not counted", "$text-muted")))
        else:
            lines.append(Content.assemble(label, counts(result)))
            if result["memory"]:
                lines.append(Content.assemble(("peak     ", "bold"), memory_line(result["memory"])))
            elif result["memory_error"]:
                lines.append(Content.assemble(("peak     ", "bold"), (f"no estimate: {result['memory_error']}",
                                                                       "$text-warning")))
        if self.targets:
            label = ("targets* ", "bold $text-warning") if self.edited else ("targets  ", "bold")
            lines.append(Content.assemble(label, (self.targets, "$text-primary")))
        if result is not None and not self.error:  # these wrap: the end of a refusal says what to do
            problems = ([Content.styled(f"✗ {e}", "$text-error") for e in result["errors"]]
                        + [Content.styled(f"⚠ {w}", "$text-warning") for w in result["warnings"]]
                        + [Content.styled(f"· {n}", "$text-muted") for n in result["notes"]])
            lines.extend(problems[:PROBLEMS_SHOWN])
        return Content("\n").join(lines)
