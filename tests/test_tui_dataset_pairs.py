"""The Dataset screen on a preference (DPO, ORPO) project: a pair shows its prompt once, then
the chosen and the rejected answer token by token, side by side (stacked in a narrow
terminal), trained tokens highlighted, each side's cut marked; the text view shows prompt +
chosen and prompt + rejected; the status line says "pair" and which side is truncated; the
stats compare the answers' lengths and warn of a length bias. The widget functions are
tested on hand-written rows; the screen on stand-in engine replies and on the real engine;
the CLI's text output of a pair too."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from textual.widgets import Static
from tui_helpers import CPU, PROJECT_TOML, InProcessEngine, settle, write_tiny_model

from tunedeck.core.commands.preview import pair_report, preference_stats_lines, prompt_length, text_report
from tunedeck.core.project import Project
from tunedeck.tui.app import TunedeckApp
from tunedeck.tui.screens.dataset import DatasetScreen, pair_state
from tunedeck.tui.widgets.dataset_stats import DatasetStats
from tunedeck.tui.widgets.tokens_view import (
    CUT, GUTTER, MASKED, MATCH, SIDE_BY_SIDE, SPECIAL, TRAINED, RowView, legend, pair_templated_text, pair_tokens_text,
    row_parts, tokens_text,
)

PROMPT = ["<|im_start|>", "user", "\n", "Is", " water", " wet", "?", "<|im_end|>", "\n", "<|im_start|>",
          "assistant", "\n"]


def tokens(pieces: list[str], trained: bool, start: int = 0, part: str = "text") -> list[dict[str, Any]]:
    return [{"id": start + i, "text": p, "trained": trained, "part": part} for i, p in enumerate(pieces)]


def side(answer: list[str], *, start: int, cut: int | None = None, part: str = "text") -> dict[str, Any]:
    """Prompt + answer as the core renders a side: prompt tokens masked, the answer trained."""
    toks = tokens(PROMPT, False) + tokens(answer, True, start, part)
    length = len(toks)
    if cut is not None:
        toks = toks[:cut]
    return {"messages": [{"role": "assistant", "content": "".join(answer)}], "text": "".join(PROMPT + answer),
            "tokens": toks, "length": length, "truncated_at": cut, "trained": sum(t["trained"] for t in toks),
            "stop_trained": cut is None}


CHOSEN = ["Yes", ",", " water", " makes", " things", " wet", ".", "<|im_end|>"]
REJECTED = ["No", ".", "<|im_end|>"]


def pair_row(*, chosen_cut: int | None = None, rejected_cut: int | None = None, **extra: Any) -> dict[str, Any]:
    """A preference row as the engine's ``preview_row`` answers (top-level: the chosen side's)."""
    chosen = side(CHOSEN, start=100, cut=chosen_cut)
    rejected = side(REJECTED, start=200, cut=rejected_cut)
    fields = {"prompt": [{"role": "user", "content": "Is water wet?"}],
              "chosen": [{"role": "assistant", "content": "Yes, water makes things wet."}],
              "rejected": [{"role": "assistant", "content": "No."}]}
    row = {"index": 0, "row": 1, "source": None, "sources": 1, "last": False, "format": "preference",
           "fields": fields, "error": None, "messages": None, "tools": None, "max_length": 1024, "unrendered": None,
           "pair": True, "prompt": fields["prompt"], "chosen": chosen, "rejected": rejected,
           **{k: chosen[k] for k in ("text", "tokens", "length", "truncated_at", "trained", "stop_trained")}}
    row.update(extra)
    return row


def pref_stats(longer: float = 50.0, chosen_mean: float = 42.5, rejected_mean: float = 17.25,
               **extra: Any) -> dict[str, Any]:
    """A preference set's ``preview_stats`` reply."""
    stats = {"format": "preference", "rows": 40, "skipped": [{"row": 7, "reason": "the chosen and the rejected "
                                                                                  "answers are the same"}],
             "skipped_count": 1, "nothing_trained": [], "tokens": 2400, "percent_trained": 31.5,
             "loss_on": "assistant", "truncated": 2, "percent_truncated": 5.0, "max_length": 1024,
             "longest": 1100, "eval": {"rows": 0, "ratio": 0.0}, "refusal": None, "sources": [],
             "histogram": {"edges": [10, 20, 30], "counts": [30, 10]}, "done": True,
             "preference": {"pairs": 40, "chosen_tokens_mean": chosen_mean, "rejected_tokens_mean": rejected_mean,
                            "chosen_longer_percent": longer, "truncated_pairs": 2, "identical": 0}}
    stats.update(extra)
    return stats


def styles(text) -> dict[str, set[str]]:
    """Each styled piece of ``text`` and the styles it was seen in."""
    out: dict[str, set[str]] = {}
    for span in text.spans:
        out.setdefault(text.plain[span.start:span.end], set()).add(str(span.style))
    return out


# -- the widget functions, on hand-written rows ------------------------------------------------------------


def test_the_prompt_is_what_both_sides_share_before_the_first_trained_token():
    row = pair_row()
    assert prompt_length(row) == len(PROMPT)
    # answers that start alike: the shared start trains, so it is the answers', not the prompt's
    row["rejected"]["tokens"][len(PROMPT)] = dict(row["chosen"]["tokens"][len(PROMPT)])
    assert prompt_length(row) == len(PROMPT)
    # a prompt cut short by max_length: no answer left on either side
    short = pair_row(chosen_cut=5, rejected_cut=5)
    assert prompt_length(short) == 5


def test_side_by_side_the_prompt_once_then_two_labelled_columns():
    row = pair_row()
    width = 60
    text = pair_tokens_text(row, width)
    lines = text.plain.split("\n")
    assert all(cell_len(line) <= width for line in lines)
    assert text.plain.count("<|im_start|>│user") == 1  # the prompt once
    head = next(line for line in lines if GUTTER in line and "chosen" in line)
    left, right = head.split(GUTTER)
    assert left.startswith("chosen") and right.startswith("rejected")
    body = [line.split(GUTTER) for line in lines if GUTTER in line]
    left_text = "".join(a for a, _ in body)
    right_text = "".join(b for _, b in body)
    assert "Yes│,│·water" in left_text and "No│.│<|im_end|>" in right_text
    assert "No" not in left_text and "Yes" not in right_text
    seen = styles(text)
    assert TRAINED in seen["Yes"] and TRAINED in seen["No"]  # what trains, highlighted on both sides
    assert f"{TRAINED} {SPECIAL}" in seen["<|im_end|>"]  # the answers' end-of-turn token trains, shown as special
    assert f"{MASKED} {SPECIAL}" in seen["<|im_start|>"]  # the prompt's, masked
    assert MASKED in seen["user"]


def test_narrow_stacks_chosen_above_rejected():
    row = pair_row()
    width = SIDE_BY_SIDE - 1
    text = pair_tokens_text(row, width)
    assert GUTTER not in text.plain
    lines = text.plain.split("\n")
    assert all(cell_len(line) <= width for line in lines)
    chosen_at = next(i for i, line in enumerate(lines) if line.startswith("chosen"))
    rejected_at = next(i for i, line in enumerate(lines) if line.startswith("rejected"))
    assert chosen_at < rejected_at
    assert "Yes│,│·water" in "\n".join(lines[chosen_at:rejected_at])
    assert "No│.│<|im_end|>" in "\n".join(lines[rejected_at:])


@pytest.mark.parametrize("width", [SIDE_BY_SIDE - 1, 80])
def test_each_side_marks_its_own_cut(width):
    n = len(PROMPT)
    row = pair_row(chosen_cut=n + 3)  # the chosen answer cut after three tokens, the rejected one whole
    text = pair_tokens_text(row, width)
    assert text.plain.count("✂") == 2  # the chosen side's label and its cut line
    assert all(any(str(s.style) == CUT and s.start <= at < s.end for s in text.spans)
               for at in (i for i, c in enumerate(text.plain) if c == "✂"))
    cut_words = " ".join(text.plain[s.start:s.end] for s in text.spans if str(s.style) == CUT)
    said = " ".join(cut_words.split())  # the cut's words, wrapped in the chosen column
    assert f"truncated at max_length = {n + 3}: {len(CHOSEN) - 3} more tokens are not trained on" in said
    assert "makes" not in text.plain  # past the cut


def test_a_cut_in_the_prompt_leaves_no_answer_and_says_so():
    row = pair_row(chosen_cut=5, rejected_cut=5)
    text = pair_tokens_text(row, 80).plain
    assert text.count("(no answer token left)") == 2 and text.count("✂ truncated") == 2


def test_search_matches_are_highlighted_in_either_answer():
    text = pair_tokens_text(pair_row(), 80, search="makes")
    assert any(text.plain[s.start:s.end] == "·makes" for s in text.spans if str(s.style) == MATCH)
    text = pair_tokens_text(pair_row(), 80, search="no.")
    marked = {text.plain[s.start:s.end] for s in text.spans if str(s.style) == MATCH}
    assert {"No", "."} <= marked


def test_the_text_view_shows_prompt_plus_each_answer():
    row = pair_row()
    text = pair_templated_text(row)
    plain = text.plain
    assert plain.index("prompt + chosen") < plain.index("Yes, water makes") < plain.index("prompt + rejected")
    assert plain.index("prompt + rejected") < plain.rindex("<|im_start|>user") < plain.index("No.")
    assert plain.count("Is water wet?") == 2
    assert TRAINED in styles(text)["No"] and MASKED in styles(text)["user"]


def test_the_row_view_shows_pairs_and_leaves_the_fields_raw():
    view = RowView()  # not mounted: its content, as show() would put it
    row = view.row = pair_row()
    view.view = "fields"
    assert json.loads(view.content().plain) == row["fields"]
    view.view = "text"
    assert "prompt + rejected" in view.content().plain
    view.view = "tokens"
    assert "rejected" in view.content().plain and "No│.│<|im_end|>" in view.content().plain
    sft = view.row = dict(row, pair=False)  # without ``pair``: the single-row view, as before
    assert view.content().plain == tokens_text(sft).plain


def test_the_legend_has_the_parts_of_both_sides():
    row = pair_row()
    row["rejected"] = side(["calls", " a", " tool"], start=300, part="tool_call")
    assert row_parts(row) == ["tool_call"]
    assert "tool call" in legend(parts=row_parts(row)).plain


def test_the_status_says_pair_and_which_side_is_cut():
    n = len(PROMPT)
    assert pair_state(pair_row()) == (f"pair · chosen {n + len(CHOSEN)} tokens, {len(CHOSEN)} trained · "
                                      f"rejected {n + len(REJECTED)} tokens, {len(REJECTED)} trained")
    assert pair_state(pair_row(rejected_cut=n + 1)).endswith("· truncated: rejected")
    assert pair_state(pair_row(chosen_cut=n + 1, rejected_cut=n + 1)).endswith("· truncated: chosen and rejected")


@pytest.mark.parametrize(("longer", "means", "warning"), [
    (50.0, (42.5, 17.25), None), (70.0, (42.5, 17.25), None), (30.0, (12.0, 17.25), None),
    (85.0, (42.5, 17.25), "longer"), (12.5, (12.0, 17.25), "shorter"),
    (0.0, (17.0, 17.0), None),  # every answer cut at max_length: equal lengths are no bias
])
def test_the_stats_compare_the_answers_and_warn_of_a_length_bias(longer, means, warning):
    lines = DatasetStats().lines(pref_stats(longer, *means))
    plain = lines.plain
    assert "pairs: 40 · skipped: 1" in plain and "rows:" not in plain
    assert "row 7: the chosen and the rejected answers are the same" in plain  # the reasons, as for rows
    assert f"answer tokens (mean): chosen {means[0]:.1f} · rejected {means[1]:.1f}" in plain
    assert f"chosen longer: {longer:g}% of pairs" in plain
    assert "truncated: 2 pairs at max_length = 1,024" in plain
    bias = "length bias: the model may learn that"
    if warning is None:
        assert bias not in plain
    else:
        assert f"{bias} {warning} is better" in plain
        start = plain.index("⚠ length bias")
        assert any("$text-warning" in str(s.style) for s in lines.spans if s.start <= start < s.end)


def test_sft_stats_lines_are_unchanged():
    from tunedeck.core.preview import stats_lines

    stats = pref_stats()
    del stats["preference"]
    lines = DatasetStats().lines(stats)
    assert lines.plain == "\n".join(stats_lines(stats, refusal=False))


# -- the CLI's text output -----------------------------------------------------------------------------


def test_the_cli_shows_the_prompt_then_each_answer_token_by_token():
    row = pair_row(rejected_cut=len(PROMPT) + 1)
    out = "\n".join(t.plain for t in text_report({"row": row, "stats": pref_stats(90.0)}, plain=True))
    assert "row 1 (preference, a pair)" in out
    assert out.index("prompt (12 tokens") < out.index("chosen: 8 answer tokens, 8 trained") < out.index(
        "rejected: 1 answer token, 1 trained")
    assert "[Yes] [,] [ water]" in out and "[No] ✂ cut at max_length = 13" in out
    assert "«Yes, water makes things wet.<|im_end|>»" in out
    assert "(<|im_start|>)" not in out.split("chosen:")[1]  # the prompt is not repeated for each answer
    assert "chosen longer: 90% of pairs" in out
    assert "length bias: the model may learn that longer is better" in out
    coloured = pair_report(row)
    assert any("bold green" in str(s.style) for t in coloured for s in t.spans)


def test_the_cli_stats_of_pairs_without_a_bias():
    lines = [line for line, warns in preference_stats_lines(pref_stats(50.0)) if not warns]
    assert lines[1:4] == ["pairs: 40 · skipped: 1", "answer tokens (mean): chosen 42.5 · rejected 17.2",
                          "chosen longer: 50% of pairs"]
    assert "truncated: 2 pairs at max_length = 1,024" in lines
    assert not any(warns for _, warns in preference_stats_lines(pref_stats(50.0)))


# -- the screen, on stand-in replies ----------------------------------------------------------------------


class PairEngine(InProcessEngine):
    """The in-process engine, with the preview's answers given: one pair and a preference set's stats."""

    def __init__(self, row: dict[str, Any], stats: dict[str, Any]) -> None:
        super().__init__()
        self.row, self.stats = row, stats

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        if op == "preview_row":
            self.calls.append(op)
            return self.row
        return super().call(op, timeout=timeout, cancel=cancel, **args)

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        if op == "preview_stats_stream":
            self.calls.append(op)
            return self.stats
        return super().stream(op, on_partial=on_partial, timeout=timeout, cancel=cancel, **args)


@pytest.fixture
def project_path(tmp_path, monkeypatch) -> Path:
    """A project whose data is a few preference rows (the stand-in engine answers for them)."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": [{"role": "assistant", "content": f"A{i}"}],
             "rejected": [{"role": "assistant", "content": f"B{i}"}]} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_tiny_model(tmp_path / "tiny-llama")
    path = tmp_path / "demo.toml"
    path.write_text(PROJECT_TOML, encoding="utf-8")
    return path


async def open_dataset(pilot) -> DatasetScreen:
    await pilot.press("3")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, DatasetScreen)
    return screen


@pytest.mark.parametrize("size", [(120, 30), (80, 24)])
async def test_the_screen_shows_a_pair_and_the_preference_stats(project_path, size):
    n = len(PROMPT)
    engine = PairEngine(pair_row(rejected_cut=n + 1), pref_stats(85.0))
    app = TunedeckApp(Project.load(project_path), engine=engine, hardware=CPU)
    async with app.run_test(size=size) as pilot:
        screen = await open_dataset(pilot)
        status = str(screen.query_one("#dataset-status", Static).render())
        assert "· pair · chosen" in status and "truncated: rejected" in status
        view = screen.query_one(RowView)
        shown = view.content().plain
        side_by_side = view.content_region.width >= SIDE_BY_SIDE
        assert side_by_side == (size[0] >= 100)  # columns from about 100 terminal columns, stacked below
        assert (GUTTER in shown) == side_by_side
        assert shown.count("<|im_start|>│user") == 1 and "chosen" in shown and "rejected" in shown
        assert all(cell_len(line) <= view.content_region.width for line in shown.split("\n")[2:])
        lines = str(screen.query_one("#stats-lines", Static).render())
        assert "pairs: 40" in lines and "length bias: the model may learn that longer is better" in lines
        await pilot.press("v")
        assert "prompt + chosen" in view.content().plain
        await pilot.press("v")
        assert json.loads(view.content().plain) == engine.row["fields"]


# -- the screen, on the real engine -------------------------------------------------------------------------


PREFS_TOML = PROJECT_TOML.replace('[training]\n', '[training]\nmethod = "dpo"\n')


@pytest.fixture
def prefs_path(project_path, default_model_dir) -> Path:
    """The preference project on the bundled model (its chat template), for the real engine."""
    project_path.write_text(PREFS_TOML.replace('"tiny-llama"', json.dumps(str(default_model_dir))), encoding="utf-8")
    return project_path


async def test_the_real_engine_shows_chosen_and_rejected_with_their_trained_tokens(prefs_path):
    from tunedeck.core.preview import preview_row

    app = TunedeckApp(Project.load(prefs_path), engine=InProcessEngine(), hardware=CPU)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await open_dataset(pilot)
        view = screen.query_one(RowView)
        row = view.row
        assert row is not None and row["pair"] and row == preview_row(app.session.project, index=0)
        for name, answer in (("chosen", "A0"), ("rejected", "B0")):
            trained = "".join(t["text"] for t in row[name]["tokens"] if t["trained"])
            assert trained.startswith(answer) and row[name]["trained"] > 0
        text = view.content()
        seen = styles(text)
        assert TRAINED in seen["A"] and TRAINED in seen["B"]  # both answers shown, what trains highlighted
        columns = [line.split(GUTTER) for line in text.plain.split("\n") if GUTTER in line]
        assert columns[0][0].startswith("chosen") and columns[0][1].startswith("rejected")
        assert columns[1][0].startswith("A│0│<|im_end|>") and columns[1][1].startswith("B│0│<|im_end|>")
        assert text.plain.count("Q│0") == 1  # the prompt once
        status = str(screen.query_one("#dataset-status", Static).render())
        assert "· pair · chosen" in status
        lines = str(screen.query_one("#stats-lines", Static).render())
        assert "pairs: 4" in lines and "answer tokens (mean): chosen" in lines


def test_the_cli_preview_of_a_real_pair_in_text_and_json(prefs_path, capsys):
    from tunedeck.core import cli

    assert cli.main(["preview", str(prefs_path), "--row", "2", "--set", "dataset.max_length=33"]) == 0
    out = capsys.readouterr().out  # not a terminal: the plain notation
    assert "row 2 (preference, a pair)" in out and "prompt (32 tokens" in out
    chosen, rejected = out.split("\nchosen: ")[1].split("\nrejected: ")
    assert chosen.startswith("1 answer token, 1 trained") and "«A»" in chosen
    assert "[A] ✂ cut at max_length = 33" in chosen
    assert rejected.startswith("1 answer token, 1 trained") and "[B] ✂ cut at max_length = 33" in rejected
    assert "pairs: 4 · skipped: 0" in out and "truncated: 4 pairs at max_length = 33" in out
    assert cli.main(["preview", str(prefs_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["row"]["pair"] is True and report["stats"]["preference"]["pairs"] == 4
    for name in ("chosen", "rejected"):
        assert any(t["trained"] for t in report["row"][name]["tokens"])
