"""The Chat screen: the base model and fine-tuned runs side by side.

One prompt box (``/`` puts the cursor there), two panes. Each pane picks its model from "base" and the project's
finished runs; a prompt goes to both, and the answers stream in token by token, one pane
after the other (each answer is what that model alone gives, so its tokens/s are its own).
The engine process holds one copy of the base weights with the runs' adapters on it
(:mod:`tunedeck.core.chat`); this screen only sends requests from worker threads and
shows what comes back, so a frame never waits on a model. Each pane keeps its own
conversation (multi-turn). Esc stops the answer being generated (the engine stops within a
token). Generation settings (temperature, top_p, top_k, max new tokens, repetition
penalty, seed, greedy) are edited in a dialog. Eval mode runs the eval split's prompts
through both models and pages through the answers next to the reference answer. A
transcript is saved as Markdown next to the project file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, ContentSwitcher, Input, Label, Static
from textual.worker import Worker, get_current_worker

from tunedeck.core.chat import BASE, GenSettings
from tunedeck.core.engine import EngineError
from tunedeck.core.errors import UserError

from ..widgets.chat_pane import ChatPane, EvalView
from .base import ProjectScreen
from .dialogs import Dialog

STREAM_EVERY_S = 0.05
"""How often a streaming answer is redrawn (the pieces in between are batched)."""

SETTING_LABELS = (
    ("temperature", "Temperature (0 = greedy)"),
    ("top_p", "top_p"),
    ("top_k", "top_k (0 = off)"),
    ("max_new_tokens", "Max new tokens"),
    ("repetition_penalty", "Repetition penalty (1 = off)"),
    ("seed", "Seed"),
)


class GenerationDialog(Dialog):
    """Edit the generation settings; a bad value is named in the dialog."""

    BINDINGS = [Binding("ctrl+s", "apply", "Apply", id="chat.settings.apply")]
    DEFAULT_CSS = """
    GenerationDialog {
        .gen-row { height: 1; margin-bottom: 1; }
        .gen-label { width: 30; }
        .gen-row Input { width: 1fr; }
    }
    """

    def __init__(self, settings: GenSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        values = self.settings.as_dict()
        with Vertical(classes="dialog"):
            yield Label("Generation settings", classes="dialog-title")
            for key, label in SETTING_LABELS:
                with Horizontal(classes="gen-row"):
                    yield Label(label, classes="gen-label")
                    yield Input(str(values[key]), id=f"gen-{key}", compact=True)
            yield Checkbox("Greedy: always the likeliest token (exact, repeatable comparisons)",
                           values["greedy"], id="gen-greedy")
            yield Label("", classes="dialog-problem")
            yield Label("enter or ctrl+s applies · esc cancels", classes="dialog-help")

    @on(Input.Submitted)
    def action_apply(self) -> None:
        values: dict[str, Any] = {key: self.query_one(f"#gen-{key}", Input).value.strip()
                                  for key, _ in SETTING_LABELS}
        values["greedy"] = self.query_one("#gen-greedy", Checkbox).value
        try:
            settings = GenSettings.from_dict(values)
        except UserError as exc:
            self.query_one(".dialog-problem", Label).update(exc.message)
            return
        self.dismiss(settings)


class ChatScreen(ProjectScreen):
    """Chat with the base model and the fine-tuned ones, side by side."""

    MODE = "chat"
    DEFAULT_CSS = """
    ChatScreen {
        #chat-switcher, #chat-view, #chat-panes { height: 1fr; }
        #chat-prompt { margin: 0 0; }
    }
    """
    AUTO_FOCUS = "#pane-a .pane-turns"  # not the prompt: the number keys switch screens until "/"
    BINDINGS = [
        Binding("slash", "focus_prompt", "Prompt", id="chat.prompt"),
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+g", "settings", "Settings", id="chat.settings"),
        Binding("ctrl+r", "eval", "Eval mode", id="chat.eval"),
        Binding("ctrl+l", "clear", "Clear", id="chat.clear"),
        Binding("ctrl+t", "save_transcript", "Save transcript", id="chat.save"),
        Binding("n", "page(1)", "Next", show=False, id="chat.eval.next"),
        Binding("p", "page(-1)", "Previous", show=False, id="chat.eval.previous"),
    ]

    @dataclass
    class RunsListed(Message):
        """The models a pane can pick: (label, value) pairs."""

        options: list[tuple[str, str]]

    @dataclass
    class Streamed(Message):
        """A pane's answer so far; a newer one replaces one still queued."""

        pane: str
        text: str
        tokens: int
        tokens_per_s: float | None

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ChatScreen.Streamed) and message.pane == self.pane

    @dataclass
    class Answered(Message):
        """A pane's answer is complete, stopped (result with cancelled) or failed (error)."""

        pane: str
        result: dict[str, Any] | None
        error: str = ""

    @dataclass
    class EvalAnswered(Message):
        """One more eval prompt answered by both models."""

        item: dict[str, Any]
        total: int

    @dataclass
    class EvalDone(Message):
        status: str

    @dataclass
    class Saved(Message):
        path: Path

    def __init__(self) -> None:
        super().__init__()
        self.settings = GenSettings()
        self._options: list[tuple[str, str]] = [("base", BASE)]

    def compose_body(self) -> ComposeResult:
        with ContentSwitcher(initial="chat-view", id="chat-switcher"):
            with Vertical(id="chat-view"):
                with Horizontal(id="chat-panes"):
                    yield ChatPane("A", self._options, BASE, id="pane-a")
                    yield ChatPane("B", self._options, BASE, id="pane-b")
                yield Input(placeholder="Ask both models… (/ to type here · enter sends · esc stops)",
                            id="chat-prompt")
            yield EvalView(id="eval-view")
        yield Static("", id="chat-status", classes="screen-status", markup=False)

    def project_shown(self) -> None:
        self._show_status()
        self._list_runs(self._runs_dir())

    def forget_project(self) -> None:
        self._options = [("base", BASE)]

    # -- the project and its runs ---------------------------------------------------------

    def _runs_dir(self) -> Path:
        project = self.session.project
        return project.resolve_path(project["output.runs_dir"])

    def _request(self) -> dict[str, Any]:
        session = self.session
        return {"project_text": session.project.text(),
                "project_path": str(session.path) if session.path else None,
                "settings": self.settings.as_dict()}

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def _list_runs(self, runs_dir: Path) -> None:
        from tunedeck.core.runs import list_runs

        runs = [r for r in list_runs(runs_dir) if r.status == "finished" and r.adapter]
        options = [("base", BASE)] + [(f"run {r.name}", r.path) for r in reversed(runs)]
        self.post_message(self.RunsListed(options))

    @on(RunsListed)
    def _runs_listed(self, event: RunsListed) -> None:
        first_time = self._options == [("base", BASE)]
        self._options = event.options
        a, b = self.query_one("#pane-a", ChatPane), self.query_one("#pane-b", ChatPane)
        a.set_options(event.options)
        b.set_options(event.options)
        if first_time and len(event.options) > 1 and b.model == BASE and not b.history:
            b.model = event.options[1][1]  # the newest finished run
            b.set_options(event.options)
        self._show_status()

    def _show_status(self, extra: str = "") -> None:
        project = self.session.project
        template = project["model.chat_template"]
        s = self.settings
        sampling = "greedy" if not s.sampling else (f"temperature {s.temperature:g}, top_p {s.top_p:g}, "
                                                   f"top_k {s.top_k}, seed {s.seed}")
        runs = len(self._options) - 1
        parts = [f"{runs} finished run{'s' if runs != 1 else ''}" if runs else
                 "no finished runs yet: train one (5) to compare it with base",
                 f"template: {'the model’s own' if template == 'auto' else template} (a run uses its own)",
                 f"{sampling}, max {s.max_new_tokens} tokens"]
        if extra:
            parts.insert(0, extra)
        self.query_one("#chat-status", Static).update(" · ".join(parts))

    # -- asking ----------------------------------------------------------------------------

    def _panes(self) -> tuple[ChatPane, ChatPane]:
        return self.query_one("#pane-a", ChatPane), self.query_one("#pane-b", ChatPane)

    @property
    def busy(self) -> bool:
        return any(w.is_running and w.group in ("chat", "eval") for w in self.workers)

    @on(Input.Submitted, "#chat-prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.busy:
            self.notify("still answering: esc stops it", severity="warning")
            return
        event.input.value = ""
        a, b = self._panes()
        turns = []
        for pane, other in ((a, b), (b, a)):
            turns.append((pane.id, pane.model, other.model, pane.ask(prompt)))
        self._ask(turns, self._request())

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def _ask(self, turns: list[tuple[str, str, str, list[dict[str, str]]]], request: dict[str, Any]) -> None:
        """Each pane's answer in turn, streamed; Esc (the worker cancelled) stops the one going
        and skips the rest."""
        worker = get_current_worker()
        engine = self.app.engine
        for pane, model, partner, messages in turns:
            if worker.is_cancelled:
                self.post_message(self.Answered(pane, None, "stopped"))
                continue
            batch = _Batch(self, pane)
            try:
                result = engine.stream("chat", model=model, partner=partner, messages=messages,
                                       on_partial=batch, cancel=worker.cancelled_event, **request)
            except EngineError as exc:
                self.post_message(self.Answered(pane, None, exc.message))
                continue
            self.post_message(self.Answered(pane, result))

    @on(Streamed)
    def _streamed(self, event: Streamed) -> None:
        self.query_one(f"#{event.pane}", ChatPane).stream(event.text, event.tokens, event.tokens_per_s)

    @on(Answered)
    def _answered(self, event: Answered) -> None:
        self.query_one(f"#{event.pane}", ChatPane).answered(event.result, event.error)
        if event.pane == "pane-b":  # the last of the two: "stopping…" is over
            self._show_status()
        if event.error and event.error != "stopped":
            self.notify(event.error, severity="error", timeout=10)

    @on(ChatPane.ModelChanged)
    def _model_changed(self, event: ChatPane.ModelChanged) -> None:
        self.query_one("#chat-prompt", Input).focus()

    # -- actions -----------------------------------------------------------------------------

    def action_focus_prompt(self) -> None:
        switcher = self.query_one("#chat-switcher", ContentSwitcher)
        switcher.current = "chat-view"
        self.query_one("#chat-prompt", Input).focus()

    def action_stop(self) -> None:
        stopped = [w for w in self.workers if w.is_running and w.group in ("chat", "eval")]
        for w in stopped:
            w.cancel()
        if stopped:
            self._show_status("stopping…")

    def action_clear(self) -> None:
        if self.busy:
            self.notify("still answering: esc stops it", severity="warning")
            return
        for pane in self._panes():
            pane.clear()

    def action_settings(self) -> None:
        def apply(settings: object) -> None:
            if isinstance(settings, GenSettings):
                self.settings = settings
                self._show_status()

        self.app.push_screen(GenerationDialog(self.settings), apply)

    def action_eval(self) -> None:
        switcher = self.query_one("#chat-switcher", ContentSwitcher)
        if switcher.current == "eval-view":
            switcher.current = "chat-view"
            self.query_one("#chat-prompt", Input).focus()
            return
        switcher.current = "eval-view"
        view = self.query_one(EvalView)
        self.set_focus(None)
        if view.items or self.busy:
            return
        a, b = self._panes()
        view.reset(f"answering the eval prompts with {a.label} and {b.label}… (esc stops)")
        self._eval([a.model, b.model], self._request())

    def action_page(self, step: int) -> None:
        if self.query_one("#chat-switcher", ContentSwitcher).current == "eval-view":
            self.query_one(EvalView).page(step)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "page":
            switchers = self.query("#chat-switcher").results(ContentSwitcher)
            return any(switcher.current == "eval-view" for switcher in switchers)
        return True

    @work(thread=True, exclusive=True, group="eval", exit_on_error=False)
    def _eval(self, models: list[str], request: dict[str, Any]) -> None:
        worker = get_current_worker()

        def item(partial: dict[str, Any]) -> None:
            self.post_message(self.EvalAnswered(partial["item"], partial["total"]))

        try:
            result = self.app.engine.stream("chat_eval", models=models, on_partial=item,
                                            cancel=worker.cancelled_event, **request)
        except EngineError as exc:
            self.post_message(self.EvalDone(exc.message))
            return
        done = len(result["items"])
        self.post_message(self.EvalDone(f"stopped after {done} of {result['total']}" if result["cancelled"]
                                        else f"all {done} answered"))

    @on(EvalAnswered)
    def _eval_answered(self, event: EvalAnswered) -> None:
        self.query_one(EvalView).add(event.item, event.total)

    @on(EvalDone)
    def _eval_done(self, event: EvalDone) -> None:
        self.query_one(EvalView).done(event.status)
        self._show_status()

    def action_save_transcript(self) -> None:
        a, b = self._panes()
        view = self.query_one(EvalView)
        folder = self.session.path.parent if self.session.path else Path.cwd()
        path = folder / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.md"
        self._save(path, transcript_markdown([(a.label, list(a.history)), (b.label, list(b.history))],
                                             list(view.items), self.settings))

    @work(thread=True, group="save", exit_on_error=False)
    def _save(self, path: Path, text: str) -> None:
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write the transcript to {path} ({exc.strerror})") from None
        self.post_message(self.Saved(path))

    @on(Saved)
    def _saved(self, event: Saved) -> None:
        self.notify(f"transcript saved to {event.path}", title="Chat")

    def work_failed(self, worker: Worker[object], message: str) -> None:
        self.notify(message, severity="error", timeout=10)


class _Batch:
    """Collects a pane's streamed pieces in the worker thread; posts the text so far at most
    every :data:`STREAM_EVERY_S` (the final text comes with the answer)."""

    def __init__(self, screen: ChatScreen, pane: str) -> None:
        self.screen = screen
        self.pane = pane
        self.text = ""
        self.last = 0.0

    def __call__(self, partial: dict[str, Any]) -> None:
        self.text += partial["text"]
        now = time.monotonic()
        if now - self.last >= STREAM_EVERY_S:
            self.last = now
            self.screen.post_message(ChatScreen.Streamed(self.pane, self.text, partial["tokens"],
                                                         partial.get("tokens_per_s")))


def transcript_markdown(panes: list[tuple[str, list[dict[str, str]]]], eval_items: list[dict[str, Any]],
                        settings: GenSettings) -> str:
    """A chat (each pane's conversation) and the eval answers, as Markdown."""
    s = settings
    lines = ["# tunedeck chat transcript", "",
             f"Generation: {'greedy' if not s.sampling else f'temperature {s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}, seed {s.seed}'}"
             f", max_new_tokens {s.max_new_tokens}, repetition_penalty {s.repetition_penalty:g}", ""]
    for label, history in panes:
        lines += [f"## {label}", ""]
        for message in history:
            lines += [f"**{message['role']}**:", "", message["content"], ""]
    if eval_items:
        lines += ["## Eval prompts", ""]
        for number, item in enumerate(eval_items, 1):
            prompt = item["messages"][-1]["content"] if item["messages"] else ""
            lines += [f"### {number}. {prompt}", ""]
            for answer in item["answers"]:
                lines += [f"**{answer['model']}**:", "", answer["text"], ""]
            if item.get("reference") is not None:
                lines += ["**reference**:", "", item["reference"], ""]
    return "\n".join(lines).rstrip() + "\n"
