"""The Dataset screen explains itself: a legend, search matches highlighted and counted,
eval rows marked, messages in the app's words, max_length on the histogram, and tokens
that wrap between tokens, never inside one."""

from __future__ import annotations

import pytest
from rich.cells import cell_len
from test_tui_dataset import SIZE, make_app, open_dataset, project_path, status  # noqa: F401 - a fixture
from textual.widgets import Static
from tui_helpers import burst, drain, settle

from tunedeck.tui.screens.dataset import DatasetScreen
from tunedeck.tui.widgets.dataset_stats import DatasetStats
from tunedeck.tui.widgets.tokens_view import MATCH, RowView, tokens_text

def legend(screen: DatasetScreen) -> str:
    return str(screen.query_one("#dataset-legend", Static).render())


async def test_a_legend_names_every_style(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        text = legend(screen)
        for word in ("trained", "masked", "<|special|>", "✂ cut", "match"):
            assert word in text
        assert "EVAL" not in text  # eval_split = 0 in this project


@pytest.mark.slow
async def test_search_highlights_and_counts_matches(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        await pilot.press("slash", *"1 +", "enter")  # rows 2 ("1 + 1") and 12 ("11 + 11")
        await settle(pilot)
        view = screen.query_one(RowView)
        assert view.row["row"] == 2
        assert "'1 +': 1 of 2" in status(screen)
        text = view.content()
        marked = "".join(text.plain[s.start:s.end] for s in text.spans if str(s.style) == MATCH)
        assert "1" in marked and "+" in marked
        await pilot.press("N")
        await settle(pilot)
        assert view.row["row"] == 12 and "'1 +': 2 of 2" in status(screen)
        await pilot.press("v", "v")  # the raw fields: the match highlighted there too
        fields = view.content()
        assert any(fields.plain[s.start:s.end] == "1 +" for s in fields.spans if str(s.style) == MATCH)
        await pilot.press("escape")  # ends the search
        await pilot.pause()
        assert "of 2 (N next)" not in status(screen)
        assert not any(str(s.style) == MATCH for s in view.content().spans)


@pytest.mark.slow
async def test_eval_rows_are_marked(project_path):
    from tunedeck.core.datafile import load_splits

    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        app.edit_setting("dataset.eval_split", value=0.25)
        screen = await open_dataset(pilot)
        held = sorted(number for number, _ in load_splits(app.session.project).eval)
        assert len(held) == 3
        shown = []
        for _ in range(12):
            view = screen.query_one(RowView)
            if view.row["row"] in held:
                assert "EVAL" in legend(screen) and "EVAL row (held out, not trained)" in status(screen)
                shown.append(view.row["row"])
            else:
                assert "EVAL" not in legend(screen) and "EVAL" not in status(screen)
            await pilot.press("n")
            await settle(pilot)
        assert shown == held


@pytest.mark.slow
async def test_going_past_the_last_row_is_said_in_the_apps_words(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        await pilot.press("g", *"999", "enter")
        await settle(pilot)
        messages = [str(n.message) for n in app._notifications]
        assert "row 999 is past the last row (13)" in messages
        assert not any("--row" in m for m in messages)
        await pilot.press("g", *"abc", "enter")
        await pilot.press("g", "0", "enter")
        await settle(pilot)
        messages = [str(n.message) for n in app._notifications]
        assert "'abc' is not a row number: type a number, e.g. 12" in messages
        assert "row 0: rows are numbered from 1" in messages
        assert screen.query_one(RowView).row["row"] == 1


@pytest.mark.slow
async def test_the_histogram_marks_max_length(project_path):
    app = make_app(project_path)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_dataset(pilot)
        edges = screen.query_one(DatasetStats).stats["histogram"]["edges"]
        cut = (edges[0] + edges[-1]) // 2
        app.edit_setting("dataset.max_length", value=cut)
        await settle(pilot)
        assert edges[0] < cut < edges[-1]  # the cut falls inside the histogram
        plot = screen.query_one("#stats-plot")
        canvas = plot.render().plain  # as drawn, at the panel's size in an 80x24 terminal
        assert f"max_length {cut}" in canvas
        assert "tokens per row (bin start)" in canvas and str(edges[0]) in canvas  # the x axis and its labels
        app.edit_setting("dataset.max_length", value=2048)
        await settle(pilot)
        assert "max_length 2,048 →" in plot.render().plain  # past the longest row


def test_tokens_wrap_between_tokens_never_inside_one():
    pieces = ["<|im_start|>", "user", "\n", "What", " is", " 7", "<|im_end|>", "<|im_end|>", "<|im_start|>", "assistant"]
    tokens = [{"text": t, "trained": i % 2 == 0} for i, t in enumerate(pieces * 3)]
    row = {"tokens": tokens, "truncated_at": None, "length": len(tokens)}
    for width in (12, 17, 23, 40):
        lines = tokens_text(row, width).plain.split("\n")
        for line in lines:
            assert cell_len(line) <= width
            for piece in line.split("│"):
                assert piece in {"<|im_start|>", "user", "↵", "What", "·is", "·7", "<|im_end|>", "assistant", ""}


@pytest.mark.slow
async def test_a_search_typed_in_one_burst_keeps_every_key(project_path):
    app = make_app(project_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_dataset(pilot)
        burst(app, "/", "1", " ", "+", "enter")  # "/" and the text at once, as a terminal read delivers them
        await drain(pilot)
        await settle(pilot)
        assert screen.query_one(RowView).row["row"] == 2
        assert "'1 +': 1 of 2" in status(screen)
        burst(app, "g", "1", "2", "enter")  # go to row 12, same
        await drain(pilot)
        await settle(pilot)
        assert screen.query_one(RowView).row["row"] == 12
