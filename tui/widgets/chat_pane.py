"""Widgets of the Chat screen: a pane per model (its conversation, streaming answer and
speed) and the eval view (one prompt at a time: both answers and the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Select, Static


class Turn(Static):
    """One message of a conversation."""

    DEFAULT_CSS = """
    Turn {
        padding: 0 1;
        margin-bottom: 1;
        &.-user { color: $text-primary; text-style: bold; }
        &.-assistant { color: $text; }
        &.-stopped { color: $text-warning; }
    }
    """

    def __init__(self, role: str, text: str) -> None:
        super().__init__(text, markup=False, classes=f"-{role}")
        self.text = text

    def set_text(self, text: str) -> None:
        self.text = text
        self.update(text or "…")


class ChatPane(Vertical):
    """One side of the comparison: which model, its conversation, and how fast it answers."""

    DEFAULT_CSS = """
    ChatPane {
        width: 1fr;
        height: 1fr;
        border: round $secondary;
        border-title-color: $text-primary;
        padding: 0;
        &:focus-within { border: round $primary; }
        Select { width: 1fr; margin: 0 0 0 0; }
        .pane-stats { height: 1; padding: 0 1; color: $text-muted; }
        .pane-turns { height: 1fr; scrollbar-size-vertical: 1; }
    }
    """

    @dataclass
    class ModelChanged(Message):
        """The user picked another model for this pane."""

        pane: ChatPane
        model: str

    model: reactive[str] = reactive("base", init=False)
    """"base" or a run folder."""

    def __init__(self, title: str, options: list[tuple[str, str]], model: str, *, id: str) -> None:
        super().__init__(id=id)
        self.border_title = title
        self._options = options
        self.set_reactive(ChatPane.model, model)
        self.history: list[dict[str, str]] = []  # the conversation as sent to the model
        self._answer: Turn | None = None

    def compose(self) -> ComposeResult:
        yield Select(_plain(self._options), value=self.model, allow_blank=False, compact=True, id=f"{self.id}-model")
        yield Static("", classes="pane-stats", markup=False)
        yield VerticalScroll(classes="pane-turns")

    @property
    def label(self) -> str:
        """The pane's model in short: "base" or "run NAME"."""
        return "base" if self.model == "base" else f"run {Path(self.model).name}"

    def set_options(self, options: list[tuple[str, str]]) -> None:
        """The models to pick from (base and the runs, with what the picker says of each);
        keeps the pick when it is there."""
        self._options = options
        select = self.query_one(Select)
        with self.prevent(Select.Changed):
            select.set_options(_plain(options))
            values = [value for _, value in options]
            if self.model not in values:
                self.model = values[0]
            select.value = self.model

    @on(Select.Changed)
    def _picked(self, event: Select.Changed) -> None:
        event.stop()
        if isinstance(event.value, str) and event.value != self.model:
            self.model = event.value
            self.clear()
            self.post_message(self.ModelChanged(self, event.value))

    # -- the conversation ---------------------------------------------------------------

    def stats(self, text: str) -> None:
        self.query_one(".pane-stats", Static).update(text)

    def ask(self, prompt: str) -> list[dict[str, str]]:
        """Add the user's turn and an empty answer; returns the conversation to send."""
        self.history.append({"role": "user", "content": prompt})
        turns = self.query_one(".pane-turns", VerticalScroll)
        self._answer = Turn("assistant", "")
        turns.mount(Turn("user", prompt), self._answer)
        self._answer.set_text("")
        self.stats("waiting…")
        return list(self.history)

    def stream(self, text: str, tokens: int, tokens_per_s: float | None) -> None:
        """The answer so far."""
        if self._answer is None:
            return
        self._answer.set_text(text)
        self.stats(_speed(tokens, tokens_per_s, "generating"))
        self.query_one(".pane-turns", VerticalScroll).scroll_end(animate=False)

    def answered(self, result: dict[str, Any] | None, error: str = "") -> None:
        """The answer is complete (or stopped, or failed with ``error``)."""
        answer, self._answer = self._answer, None
        if answer is None:
            return
        if result is None:
            answer.set_text(f"({error})" if error else "(not answered)")
            answer.add_class("-stopped")
            self.history.pop()  # the question goes unanswered: not part of the conversation
            self.stats(error or "")
            return
        answer.set_text(result["text"])
        self.history.append({"role": "assistant", "content": result["text"]})
        state = "stopped" if result.get("cancelled") else "done"
        if result.get("cancelled"):
            answer.add_class("-stopped")
        self.stats(_speed(result["tokens"], result.get("tokens_per_s"), state))
        self.query_one(".pane-turns", VerticalScroll).scroll_end(animate=False)

    @property
    def answering(self) -> bool:
        return self._answer is not None

    def clear(self) -> None:
        self.history.clear()
        self._answer = None
        self.query_one(".pane-turns", VerticalScroll).remove_children()
        self.stats("")


def _plain(options: list[tuple[str, str]]) -> list[tuple[Text, str]]:
    """Options whose labels are shown as they are (a run's name is never read as markup)."""
    return [(Text(label), value) for label, value in options]


def _speed(tokens: int, tokens_per_s: float | None, state: str) -> str:
    rate = f" · {tokens_per_s:.1f} tokens/s" if tokens_per_s else ""
    return f"{tokens} tokens{rate} · {state}"


class EvalView(Vertical):
    """The eval prompts answered by both models, one at a time, with the reference answer."""

    DEFAULT_CSS = """
    EvalView {
        height: 1fr;
        .eval-head { height: auto; padding: 0 1; color: $text-muted; }
        .eval-prompt { padding: 0 1; margin-bottom: 1; color: $text-primary; }
        .eval-answers { height: 1fr; }
        .eval-box { width: 1fr; height: 1fr; border: round $secondary; border-title-color: $text-primary;
                    padding: 0 1; scrollbar-size-vertical: 1; }
        .eval-reference { border: round $success; }
    }
    """

    index: reactive[int] = reactive(0, init=False)

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id)
        self.items: list[dict[str, Any]] = []
        self.total = 0
        self.status = ""

    def compose(self) -> ComposeResult:
        yield Static("", classes="eval-head", markup=False)
        yield Static("", classes="eval-prompt", markup=False)
        with Horizontal(classes="eval-answers"):
            for name in ("a", "b", "ref"):
                with VerticalScroll(classes="eval-box" + (" eval-reference" if name == "ref" else ""),
                                    id=f"eval-{name}"):
                    yield Static("", markup=False)

    def reset(self, status: str) -> None:
        self.items, self.total, self.status = [], 0, status
        self.index = 0
        self.show()

    def add(self, item: dict[str, Any], total: int) -> None:
        self.items.append(item)
        self.total = total
        self.show()

    def done(self, status: str) -> None:
        self.status = status
        self.show()

    def page(self, step: int) -> None:
        if self.items:
            self.index = max(0, min(len(self.items) - 1, self.index + step))

    def watch_index(self) -> None:
        self.show()

    def show(self) -> None:
        head = self.query_one(".eval-head", Static)
        where = f"prompt {self.index + 1} of {len(self.items)}" if self.items else "no prompts answered yet"
        total = f" ({self.total} in all)" if self.total else ""
        head.update(f"{where}{total} · n/p: next/previous · {self.status}")
        if not self.items:
            self.query_one(".eval-prompt", Static).update("")
            for name in ("a", "b", "ref"):
                self.query_one(f"#eval-{name} Static", Static).update("")
            return
        item = self.items[self.index]
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"] if m["role"] != "system")
        self.query_one(".eval-prompt", Static).update(prompt)
        for name, answer in zip(("a", "b"), item["answers"]):
            box = self.query_one(f"#eval-{name}", VerticalScroll)
            box.border_title = answer["model"]
            box.query_one(Static).update(answer["text"])
        ref = self.query_one("#eval-ref", VerticalScroll)
        reference = item.get("reference") or "(no reference answer)"
        if item.get("rejected"):  # a preference pair: the answer preferred, and the one rejected
            ref.border_title = "reference: chosen / rejected"
            reference = Text.assemble(reference, "\n\n", ("rejected: ", "bold"), (item["rejected"], "dim"))
        else:
            ref.border_title = "reference"
        ref.query_one(Static).update(reference)
