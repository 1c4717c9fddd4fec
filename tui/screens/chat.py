"""The Chat screen: the base model and fine-tuned runs side by side.

One prompt box (``/`` puts the cursor there), two panes. Each pane picks its model from "base" and the project's
runs (each shown with its status, steps and final loss; runs that are still training or
ended without an adapter are left out until ctrl+f shows every run). A prompt goes to both,
and both answers stream in at once, token by token: the engine generates them as one batch
on the one copy of the base weights it holds, with the runs' adapters on it
(:mod:`tunedeck.core.chat`), each answer what that model alone gives and each pane's
tokens/s its own. This screen only sends requests from worker threads and shows what comes
back, so a frame never waits on a model. Each pane keeps its own conversation (multi-turn).
Esc stops both answers (the engine stops within a token). Generation settings
(temperature, top_p, top_k, max new tokens, repetition penalty, seed, greedy) are edited
in a dialog and kept per project in the user config. Eval mode runs the eval split's
prompts through both models and pages through the answers next to the reference answer. A
transcript is saved as Markdown next to the project file.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, ContentSwitcher, Input, Label, Static
from textual.worker import Worker, get_current_worker
from tunedeck.core.chat import BASE, GenSettings, save_settings, saved_settings
from tunedeck.core.engine import EngineError
from tunedeck.core.errors import UserError
from tunedeck.core.runs import ENDED

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


class GreedyBox(Checkbox, inherit_bindings=False):
    """The greedy switch: space (or a click) turns it on and off, and its label says which;
    enter is left to the dialog, where it applies the settings."""

    BINDINGS: ClassVar[list[Binding]] = [Binding("space", "toggle_button", "Toggle", show=False, id="chat.greedy")]

    def __init__(self, value: bool, *, id: str) -> None:
        super().__init__(greedy_label(value), value, id=id)

    def watch_value(self) -> None:
        super().watch_value()
        self.label = greedy_label(self.value)


def greedy_label(on: bool) -> str:
    state = "on: always the likeliest token (exact, repeatable comparisons)" if on else "off: sampled"
    return f"greedy: {state} · space turns it {'off' if on else 'on'}"


class GenerationDialog(Dialog):
    """Edit the generation settings; a bad value is named in the dialog. Enter (in a field
    or on the greedy switch) and ctrl+s apply them."""

    BINDINGS = [Binding("ctrl+s,enter", "apply", "Apply", id="chat.settings.apply")]

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
            yield GreedyBox(values["greedy"], id="gen-greedy")
            yield Label("", classes="dialog-problem")
            yield Label("enter or ctrl+s applies · esc cancels", classes="dialog-help")

    @on(Input.Submitted)
    def action_apply(self) -> None:
        values: dict[str, Any] = {key: self.query_one(f"#gen-{key}", Input).value.strip()
                                  for key, _ in SETTING_LABELS}
        values["greedy"] = self.query_one("#gen-greedy", GreedyBox).value
        try:
            settings = GenSettings.from_dict(values)
        except UserError as exc:
            self.query_one(".dialog-problem", Label).update(exc.message)
            return
        self.dismiss(settings)


class ChatScreen(ProjectScreen):
    """Chat with the base model and the fine-tuned ones, side by side."""

    MODE = "chat"
    AUTO_FOCUS = "#pane-a .pane-turns"  # not the prompt: the number keys switch screens until "/"
    BINDINGS = [
        Binding("slash", "focus_prompt", "Prompt", id="chat.prompt"),
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+g", "settings", "Settings", id="chat.settings"),
        Binding("ctrl+r", "eval", "Eval mode", id="chat.eval"),
        Binding("ctrl+l", "clear", "Clear", id="chat.clear"),
        Binding("ctrl+t", "save_transcript", "Save transcript", id="chat.save"),
        Binding("ctrl+f", "all_runs", "All runs", id="chat.all_runs"),
        Binding("n", "page(1)", "Next", show=False, id="chat.eval.next"),
        Binding("p", "page(-1)", "Previous", show=False, id="chat.eval.previous"),
    ]

    @dataclass
    class RunsListed(Message):
        """The models a pane can pick: (label, value) pairs, and how many runs were left out."""

        options: list[tuple[str, str]]
        hidden: int = 0

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
        last: bool = True  # the last pane of the prompt: the screen is idle again

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
        self._hidden = 0  # runs left out of the pickers (unfinished)
        self.show_all_runs = False
        self._settings_for: Path | None = None  # the project file the settings were read for

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
        path = self.session.path
        if path != self._settings_for:  # another project: its own settings
            self._settings_for = path
            self.settings = saved_settings(path)
        self._show_status()
        self._list_runs(self._runs_dir(), self.show_all_runs)

    def forget_project(self) -> None:
        self._options = [("base", BASE)]
        self._hidden = 0

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
    def _list_runs(self, runs_dir: Path, show_all: bool) -> None:
        from tunedeck.core.runs import list_runs

        runs = list(reversed(list_runs(runs_dir)))  # the newest first
        usable = [r for r in runs if chat_ready(r.status, r.adapter)]
        shown = runs if show_all else usable
        options = [("base", BASE)] + [(run_label(r), r.path) for r in shown]
        self.post_message(self.RunsListed(options, len(runs) - len(usable)))

    @on(RunsListed)
    def _runs_listed(self, event: RunsListed) -> None:
        first_time = self._options == [("base", BASE)]
        self._options = event.options
        self._hidden = event.hidden
        a, b = self.query_one("#pane-a", ChatPane), self.query_one("#pane-b", ChatPane)
        a.set_options(event.options)
        b.set_options(event.options)
        if first_time and len(event.options) > 1 and b.model == BASE and not b.history:
            b.model = event.options[1][1]  # the newest run
            b.set_options(event.options)
        self._show_status()

    def _show_status(self, extra: str = "") -> None:
        project = self.session.project
        template = project["model.chat_template"]
        runs = len(self._options) - 1
        if self.show_all_runs:
            listed = f"all {runs} run{'s' if runs != 1 else ''} (ctrl+f: finished only)"
        elif runs:
            listed = f"{runs} finished run{'s' if runs != 1 else ''}"
        else:
            listed = "no finished runs yet: train one (5) to compare it with base"
        if self._hidden and not self.show_all_runs:
            listed += f" ({self._hidden} unfinished hidden, ctrl+f shows them)"
        parts = [listed, f"template: {'the model’s own' if template == 'auto' else template} (a run uses its own)",
                 settings_summary(self.settings)]
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
        turns = [(pane.id, pane.model, pane.ask(prompt)) for pane in self._panes()]
        self._ask(turns, self._request())

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def _ask(self, turns: list[tuple[str, str, list[dict[str, str]]]], request: dict[str, Any]) -> None:
        """Both panes' answers at once, each streamed into its pane; Esc (the worker
        cancelled) stops both."""
        worker = get_current_worker()
        batches = [_Batch(self, pane) for pane, _, _ in turns]

        def route(partial: dict[str, Any]) -> None:
            batches[int(partial.get("pane", 0))](partial)

        panes = [{"model": model, "messages": messages} for _, model, messages in turns]
        last = len(turns) - 1
        try:
            result = self.app.engine.chat_panes(panes, on_text=route,
                                            cancel=worker.cancelled_event, **request)
        except EngineError as exc:
            for i, (pane, _, _) in enumerate(turns):
                self.post_message(self.Answered(pane, None, exc.message, last=i == last))
            return
        for i, (pane, _, _) in enumerate(turns):
            answer, error = result["answers"][i], result["errors"][i]
            self.post_message(self.Answered(pane, answer, error or "", last=i == last))

    @on(Streamed)
    def _streamed(self, event: Streamed) -> None:
        self.query_one(f"#{event.pane}", ChatPane).stream(event.text, event.tokens, event.tokens_per_s)

    @on(Answered)
    def _answered(self, event: Answered) -> None:
        self.query_one(f"#{event.pane}", ChatPane).answered(event.result, event.error)
        if event.last:  # "stopping…" is over
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
                if self.session.path is not None:
                    self._keep_settings(self.session.path, settings)

        self.app.push_screen(GenerationDialog(self.settings), apply)

    @work(thread=True, group="config", exit_on_error=False)
    def _keep_settings(self, path: Path, settings: GenSettings) -> None:
        """The settings, kept for this project in the user config (with the app's other
        writes to it, one at a time)."""
        lock = getattr(self.app, "_config_lock", None)
        try:
            if lock is not None:
                with lock:
                    save_settings(path, settings)
            else:
                save_settings(path, settings)
        except OSError as exc:
            raise UserError(f"cannot keep the generation settings in the user config ({exc.strerror})") from None

    def action_all_runs(self) -> None:
        """Show every run in the pickers, or only those that can answer (the default)."""
        self.show_all_runs = not self.show_all_runs
        if self.session is not None:
            self._list_runs(self._runs_dir(), self.show_all_runs)

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
            result = self.app.engine.chat_eval(models, on_item=item,
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


def chat_ready(status: str, adapter: str | None) -> bool:
    """Whether a run can answer in chat: it has ended (not training now, nor on another host)
    and left an adapter."""
    return adapter is not None and status in ENDED


def run_label(run: Any) -> str:
    """A run as its picker shows it: name, status, steps and final loss."""
    steps = f"{run.step}/{run.max_steps}" if run.max_steps and run.step != run.max_steps else str(run.step)
    method = getattr(run, "method", "sft")
    parts = [f"run {run.name}" + (f" ({method.upper()})" if method != "sft" else ""), run.status,
             f"{steps} step{'s' if run.step != 1 else ''}"]
    if run.final_loss is not None:
        parts.append(f"loss {run.final_loss:.4f}")
    if run.adapter is None:
        parts.append("no adapter")
    return " · ".join(parts)


def settings_summary(settings: GenSettings) -> str:
    """The generation settings in words, greedy or not said first."""
    s = settings
    if not s.sampling:
        return f"greedy: on · max {s.max_new_tokens} tokens"
    return (f"greedy: off · temperature {s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}, seed {s.seed} · "
            f"max {s.max_new_tokens} tokens")


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def closed_fences(text: str) -> str:
    """``text`` with a code fence it leaves open closed at its end (CommonMark's rules: a
    fence closes on a line of the same character, at least as long, with nothing after it),
    so what follows it in a Markdown file is not read as code."""
    fence = ""
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match is None:
            continue
        run, rest = match.group(1), match.group(2)
        if not fence:
            if run[0] == "`" and "`" in rest:  # not a fence: an inline code span
                continue
            fence = run
        elif run[0] == fence[0] and len(run) >= len(fence) and not rest.strip():
            fence = ""
    if not fence:
        return text
    return text + ("" if text.endswith("\n") else "\n") + fence


def transcript_markdown(panes: list[tuple[str, list[dict[str, str]]]], eval_items: list[dict[str, Any]],
                        settings: GenSettings) -> str:
    """A chat (each pane's conversation) and the eval answers, as Markdown. A message that
    leaves a code fence open gets it closed, so the next heading stays a heading."""
    s = settings
    lines = ["# tunedeck chat transcript", "",
             f"Generation: {settings_summary(s)}, repetition_penalty {s.repetition_penalty:g}", ""]
    for label, history in panes:
        lines += [f"## {label}", ""]
        for message in history:
            lines += [f"**{message['role']}**:", "", closed_fences(message["content"]), ""]
    if eval_items:
        lines += ["## Eval prompts", ""]
        for number, item in enumerate(eval_items, 1):
            prompt = item["messages"][-1]["content"] if item["messages"] else ""
            first = prompt.strip().splitlines()[0] if prompt.strip() else ""
            if len(first) > 80:
                first = first[:79] + "…"
            lines += [f"### {number}. {first}".rstrip(), ""]
            if prompt.strip() != first:  # a long or multi-line prompt: whole, under its heading
                lines += ["**prompt**:", "", closed_fences(prompt), ""]
            for answer in item["answers"]:
                lines += [f"**{answer['model']}**:", "", closed_fences(answer["text"]), ""]
            if item.get("reference") is not None:
                lines += ["**reference**:", "", closed_fences(item["reference"]), ""]
    return "\n".join(lines).rstrip() + "\n"
