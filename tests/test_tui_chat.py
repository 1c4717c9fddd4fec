"""The Chat screen, driven with the pilot: answers stream into both panes, Esc stops, the
settings dialog, eval mode, a transcript; the engine's ops run in-process (real models)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from textual.widgets import Input, Select, Static

from tui_helpers import CPU, InProcessEngine, settle

from tunedeck.core import engine
from tunedeck.core.chat import GenSettings
from tunedeck.core.engine import EngineError
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.chat import ChatScreen, GenerationDialog
from tunedeck.tui.widgets.chat_pane import ChatPane, EvalView

from train_support import ANSWER, memorisable_rows, sharpened_copy, train_inprocess, write_project

pytestmark = pytest.mark.slow


class StreamingEngine(InProcessEngine):
    """The in-process engine, with streaming ops: partials go to ``on_partial`` and the
    caller's cancel event reaches the generation, as in the engine process."""

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        self.calls.append(op)
        with self._serving:
            reply = engine.handle({"id": 0, "op": op, "args": args}, emit=on_partial or (lambda p: None),
                                  cancel=cancel)
        if reply["ok"]:
            return reply["result"]
        raise EngineError(reply["error"])


@pytest.fixture(scope="module")
def project_with_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-app")
    sharp = sharpened_copy(tiny_model_dir, root / "sharp")
    path = write_project(root / "project", sharp, memorisable_rows(), training={"max_steps": 10},
                         lora={"r": 16, "alpha": 32}, dataset={"eval_split": 0.25, "max_length": 96})
    code, _, run_dir = train_inprocess(path, run_name="tuned")
    assert code == 0
    return path, run_dir


def text_of(widget: Static) -> str:
    return str(widget.render())


async def open_chat(pilot) -> ChatScreen:
    await pilot.press("6")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ChatScreen)
    return screen


async def test_answers_stream_into_both_panes_and_esc_stops(project_with_run, tmp_path):
    path, run_dir = project_with_run
    app = TunedeckApp(Project.load(path), engine=StreamingEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        a, b = screen.query_one("#pane-a", ChatPane), screen.query_one("#pane-b", ChatPane)
        assert a.model == "base" and b.model == str(run_dir)  # the newest finished run against base
        assert [label for label, _ in a._options] == ["base", "run tuned"]
        assert "Not built yet" not in "".join(text_of(w) for w in screen.query(Static))
        screen.settings = GenSettings(greedy=True, max_new_tokens=8)
        prompt = screen.query_one("#chat-prompt", Input)
        assert not prompt.has_focus  # the number keys still switch screens
        await pilot.press("/")
        assert prompt.has_focus
        prompt.value = "Say the magic words."
        await pilot.press("enter")
        await settle(pilot)
        assert a.history[-1]["role"] == b.history[-1]["role"] == "assistant"
        assert b.history[-1]["content"].startswith(ANSWER[:6])
        assert not a.history[-1]["content"].startswith(ANSWER[:6])
        for pane in (a, b):
            stats = text_of(pane.query_one(".pane-stats", Static))
            assert stats.startswith("8 tokens · ") and "tokens/s" in stats and stats.endswith("done")
        # a second turn: each pane sends its own history
        prompt.value = "Again."
        await pilot.press("enter")
        await settle(pilot)
        assert [m["role"] for m in b.history] == ["user", "assistant", "user", "assistant"]

        # Esc stops a long answer within a token or so; the other pane is not started
        screen.settings = GenSettings(greedy=True, max_new_tokens=3000, min_new_tokens=3000)
        prompt.value = "Go on forever."
        await pilot.press("enter")
        for _ in range(400):
            if "generating" in text_of(a.query_one(".pane-stats", Static)):
                break
            await pilot.pause(0.02)
        await pilot.press("escape")
        await settle(pilot)
        stats = text_of(a.query_one(".pane-stats", Static))
        assert stats.endswith("stopped") and int(stats.split()[0]) < 3000
        assert text_of(b.query_one(".pane-stats", Static)) == "stopped"
        assert len(b.history) == 4  # the unanswered question is not part of B's conversation

        # the transcript: both conversations, as Markdown next to the project
        await pilot.press("ctrl+t")
        await settle(pilot)
        [saved] = list(path.parent.glob("chat-*.md"))
        text = saved.read_text()
        assert "## base" in text and "## run tuned" in text and ANSWER[:6] in text

        await pilot.press("ctrl+l")
        assert a.history == [] and b.history == []


async def test_settings_dialog_and_eval_mode(project_with_run):
    path, run_dir = project_with_run
    app = TunedeckApp(Project.load(path), engine=StreamingEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        await pilot.press("ctrl+g")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, GenerationDialog)
        dialog.query_one("#gen-top_p", Input).value = "4"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "top_p = '4': must be between 0 and 1" in text_of(dialog.query_one(".dialog-problem"))
        dialog.query_one("#gen-top_p", Input).value = "0.5"
        dialog.query_one("#gen-max_new_tokens", Input).value = "6"
        dialog.query_one("#gen-greedy").value = True
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is screen
        assert (screen.settings.top_p, screen.settings.max_new_tokens, screen.settings.greedy) == (0.5, 6, True)
        assert "greedy, max 6 tokens" in text_of(screen.query_one("#chat-status", Static))

        await pilot.press("ctrl+r")
        await settle(pilot)
        view = screen.query_one(EvalView)
        assert len(view.items) == 2 and "all 2 answered" in view.status
        assert text_of(view.query_one("#eval-ref Static", Static)) == ANSWER
        assert text_of(view.query_one("#eval-b Static", Static)).startswith(ANSWER[:6])
        assert view.query_one("#eval-a").border_title == "base"
        await pilot.press("n")
        assert view.index == 1
        await pilot.press("p")
        assert view.index == 0
        await pilot.press("ctrl+r")  # back to the chat
        assert screen.query_one("#chat-prompt", Input).has_focus

        # a run whose adapter went missing: one line in the pane and a notification, no crash
        (run_dir / "adapter" / "adapter_config.json").rename(run_dir / "adapter" / "config.bak")
        try:
            screen.query_one("#chat-prompt", Input).value = "Hi"
            await pilot.press("enter")  # the prompt has the focus (back from eval mode)
            await settle(pilot)
            b = screen.query_one("#pane-b", ChatPane)
            assert "adapter_config.json is missing" in text_of(b.query_one(".pane-stats", Static))
            assert b.history == []
            assert screen.query_one("#pane-a", ChatPane).history[-1]["role"] == "assistant"
        finally:
            (run_dir / "adapter" / "config.bak").rename(run_dir / "adapter" / "adapter_config.json")
        assert screen.query_one("#pane-a", ChatPane).query_one(Select).value == "base"


async def test_merge_from_the_palette(project_with_run):
    path, run_dir = project_with_run
    out = run_dir / "merged"
    app = TunedeckApp(Project.load(path), engine=StreamingEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p", *"Merge run: tuned")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
        notes = [n.message for n in app._notifications]
        assert any(m.startswith("tuned merged: ") for m in notes), notes
        # a second merge into the same folder is refused with one line, not a crash
        app.merge_run(str(run_dir))
        await settle(pilot)
        assert any("the folder is not empty" in n.message for n in app._notifications)
