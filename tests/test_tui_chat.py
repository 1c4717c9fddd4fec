"""The Chat screen, driven with the pilot: both answers stream into their panes at once, Esc
stops both, the run pickers, the settings dialog (kept per project), eval mode, a transcript;
the engine's ops run in-process (real models), or a stand-in streams scripted answers."""

from __future__ import annotations

import asyncio

import pytest
from textual.widgets import Input, Select, Static
from train_support import (
    ANSWER,
    memorisable_rows,
    sharpened_copy,
    train_inprocess,
    write_project,
)
from tui_helpers import CPU, InProcessEngine, PanesEngine, settle, write_run
from tui_helpers import write_project as write_app_project
from tunedeck.core.chat import GenSettings, saved_settings
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.chat import (
    ChatScreen,
    GenerationDialog,
    GreedyBox,
    closed_fences,
    transcript_markdown,
)
from tunedeck.tui.widgets.chat_pane import ChatPane, EvalView, Turn


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


@pytest.mark.slow
async def test_answers_stream_into_both_panes_and_esc_stops(project_with_run, tmp_path):
    path, run_dir = project_with_run
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        a, b = screen.query_one("#pane-a", ChatPane), screen.query_one("#pane-b", ChatPane)
        assert a.model == "base" and b.model == str(run_dir)  # the newest finished run against base
        assert [label.split(" · ")[:2] for label, _ in a._options] == [["base"], ["run tuned", "finished"]]
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

        # Esc stops both long answers, which go on at once, within a token or so
        screen.settings = GenSettings(greedy=True, max_new_tokens=3000, min_new_tokens=3000)
        prompt.value = "Go on forever."
        await pilot.press("enter")
        for _ in range(400):
            if all("generating" in text_of(p.query_one(".pane-stats", Static)) for p in (a, b)):
                break
            await pilot.pause(0.02)
        await pilot.press("escape")
        await settle(pilot)
        for pane in (a, b):
            stats = text_of(pane.query_one(".pane-stats", Static))
            assert stats.endswith("stopped") and 0 < int(stats.split()[0]) < 3000, stats
            assert len(pane.history) == 6  # what each had when stopped is the answer of its turn

        # the transcript: both conversations, as Markdown next to the project
        await pilot.press("ctrl+t")
        await settle(pilot)
        [saved] = list(path.parent.glob("chat-*.md"))
        text = saved.read_text()
        assert "## base" in text and "## run tuned" in text and ANSWER[:6] in text

        await pilot.press("ctrl+l")
        assert a.history == [] and b.history == []


@pytest.mark.slow
async def test_settings_dialog_and_eval_mode(project_with_run):
    path, run_dir = project_with_run
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
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
        assert "greedy: on · max 6 tokens" in text_of(screen.query_one("#chat-status", Static))

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


@pytest.mark.slow
async def test_merge_from_the_palette(project_with_run):
    path, run_dir = project_with_run
    out = run_dir / "merged"
    app = TunedeckApp(Project.load(path), engine=InProcessEngine(), hardware=CPU)
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


# -- with a stand-in engine: streaming together, the run pickers, the settings ----------------------


@pytest.fixture
def runs_project(tmp_path):
    """The app's small project with runs of every kind: two that can answer (finished and
    stopped early, with adapters) and three that cannot (failed, died, still running)."""
    path = write_app_project(tmp_path / "p")
    runs = path.parent / "runs"
    write_run(runs, "first", loss=0.75, started=1_700_000_000)
    write_run(runs, "early", status="stopped", steps=4, loss=1.25, started=1_700_000_100)
    write_run(runs, "oom", status="failed", adapter=False, loss=None, started=1_700_000_200)
    write_run(runs, "killed", status="died", adapter=False, started=1_700_000_300)
    write_run(runs, "going", status="running", adapter=False, started=1_700_000_400)
    return path


def option_labels(pane: ChatPane) -> list[str]:
    return [label for label, _ in pane._options]


async def test_both_panes_stream_at_the_same_time(runs_project):
    engine = PanesEngine({"base": "one two three four five six", "first": "uno dos tres cuatro cinco seis"},
                         hold=True)
    app = TunedeckApp(Project.load(runs_project), engine=engine, hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        a, b = screen.query_one("#pane-a", ChatPane), screen.query_one("#pane-b", ChatPane)
        b.model = str(runs_project.parent / "runs" / "first")
        b.set_options(b._options)
        prompt = screen.query_one("#chat-prompt", Input)
        await pilot.press("/")
        prompt.value = "Count."
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.pause(0.2)
        # half-way through: both panes show their answer so far and are generating, together
        for pane, first in ((a, "one"), (b, "uno")):
            assert text_of(pane.query_one(".pane-stats", Static)).endswith("generating")
            shown = [t.text for t in pane.query(Turn)]
            assert shown[-1].startswith(first) and len(shown[-1].split()) < 6, shown
        [request] = engine.requests
        assert [p["model"] for p in request["panes"]] == ["base", str(runs_project.parent / "runs" / "first")]
        assert request["panes"][0]["messages"] == [{"role": "user", "content": "Count."}]
        engine.go.set()
        await settle(pilot)
        assert a.history[-1] == {"role": "assistant", "content": "one two three four five six"}
        assert b.history[-1] == {"role": "assistant", "content": "uno dos tres cuatro cinco seis"}
        for pane in (a, b):
            assert text_of(pane.query_one(".pane-stats", Static)) == "6 tokens · 10.0 tokens/s · done"
        assert engine.calls.count("chat_panes") == 1  # one request answers both panes

        # esc stops both, half-way
        engine.go.clear()
        engine.halfway.clear()
        prompt.value = "Again."
        await pilot.press("enter")
        assert await asyncio.to_thread(engine.halfway.wait, 10)
        await pilot.press("escape")
        await settle(pilot)
        for pane in (a, b):
            stats = text_of(pane.query_one(".pane-stats", Static))
            assert stats.startswith("3 tokens") and stats.endswith("stopped"), stats


async def test_the_pickers_show_status_steps_and_loss_and_hide_unfinished_runs(runs_project):
    app = TunedeckApp(Project.load(runs_project), engine=PanesEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        a, b = screen.query_one("#pane-a", ChatPane), screen.query_one("#pane-b", ChatPane)
        assert option_labels(a) == ["base", "run early · stopped · 4 steps · loss 1.2500",
                                    "run first · finished · 10 steps · loss 0.7500"]
        assert b.model == str(runs_project.parent / "runs" / "early")  # the newest run that can answer
        status = text_of(screen.query_one("#chat-status", Static))
        assert "2 finished runs (3 unfinished hidden, ctrl+f shows them)" in status
        await pilot.press("ctrl+f")
        await settle(pilot)
        labels = option_labels(a)
        assert labels[0] == "base" and len(labels) == 6
        assert "run going · running · 10 steps · loss 0.5000 · no adapter" in labels
        assert "run killed · died · 10 steps · loss 0.5000 · no adapter" in labels
        assert "run oom · failed · 0/10 steps · no adapter" in labels
        assert "all 5 runs (ctrl+f: finished only)" in text_of(screen.query_one("#chat-status", Static))
        # a run's name is shown as it is, never read as markup
        select = a.query_one(Select)
        assert all(isinstance(label, str) for label in labels) and select.value == "base"
        await pilot.press("ctrl+f")
        await settle(pilot)
        assert len(option_labels(b)) == 3 and b.model == str(runs_project.parent / "runs" / "early")


@pytest.mark.slow
async def test_enter_applies_the_settings_and_they_are_kept_per_project(runs_project, tmp_path):
    app = TunedeckApp(Project.load(runs_project), engine=PanesEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        assert screen.settings == GenSettings()
        assert "greedy: off · temperature 0.7" in text_of(screen.query_one("#chat-status", Static))
        await pilot.press("ctrl+g")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, GenerationDialog)
        box = dialog.query_one("#gen-greedy", GreedyBox)
        assert str(box.label).startswith("greedy: off")
        dialog.query_one("#gen-max_new_tokens", Input).value = "12"
        box.focus()
        await pilot.press("space")  # space turns greedy on; the label says so
        await pilot.pause()
        assert box.value and str(box.label).startswith("greedy: on")
        await pilot.press("enter")  # enter on the switch applies the settings: it does not toggle it
        await pilot.pause()
        assert app.screen is screen
        assert screen.settings.greedy and screen.settings.max_new_tokens == 12
        assert "greedy: on · max 12 tokens" in text_of(screen.query_one("#chat-status", Static))
        # enter in a field applies too
        await pilot.press("ctrl+g")
        await pilot.pause()
        app.screen.query_one("#gen-seed", Input).focus()
        app.screen.query_one("#gen-seed", Input).value = "99"
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is screen and screen.settings.seed == 99 and screen.settings.greedy
        await settle(pilot)
    assert saved_settings(runs_project) == GenSettings(greedy=True, max_new_tokens=12, seed=99)
    other = write_app_project(tmp_path / "other")
    assert saved_settings(other) == GenSettings()  # kept per project

    # the next time the project opens, its settings are back
    app = TunedeckApp(Project.load(runs_project), engine=PanesEngine(), hardware=CPU)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_chat(pilot)
        assert screen.settings == GenSettings(greedy=True, max_new_tokens=12, seed=99)
        assert "greedy: on · max 12 tokens" in text_of(screen.query_one("#chat-status", Static))


def test_a_transcript_closes_a_code_fence_an_answer_left_open():
    panes = [("base", [{"role": "user", "content": "Code?"},
                       {"role": "assistant", "content": "Here:\n```python\nprint(1)"}]),
             ("run tuned", [{"role": "user", "content": "Code?"},
                            {"role": "assistant", "content": "~~~~\nx\n~~~\nstill code"}])]
    items = [{"messages": [{"role": "user", "content": "Write\n```\nthis"}], "reference": "```sh\nls",
              "answers": [{"model": "base", "text": "````\nopen"}, {"model": "tuned", "text": "`a` ```b```"}]}]
    text = transcript_markdown(panes, items, GenSettings(greedy=True))
    # outside a code block every heading stays a heading: fences open and close in pairs
    fence = ""
    headings = []
    for line in text.splitlines():
        stripped = line.strip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            run = stripped[:len(stripped) - len(stripped.lstrip(marker[0]))]
            if not fence:
                if not (marker == "```" and "`" in stripped[len(run):]):
                    fence = run
            elif run[0] == fence[0] and len(run) >= len(fence) and not stripped[len(run):].strip():
                fence = ""
        elif line.startswith("#") and not fence:
            headings.append(line)
    assert not fence
    assert headings == ["# tunedeck chat transcript", "## base", "## run tuned", "## Eval prompts", "### 1. Write"]
    assert "Generation: greedy: on · max 256 tokens" in text
    assert closed_fences("no code") == "no code" and closed_fences("```\nx\n```") == "```\nx\n```"
    assert closed_fences("~~~~\nx\n~~~") == "~~~~\nx\n~~~\n~~~~"
