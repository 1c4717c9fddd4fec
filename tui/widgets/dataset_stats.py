"""The whole dataset at a glance: counts, skipped rows, truncation, the share of tokens
trained, and a histogram of token lengths (plotext). Drawn from the UI thread only."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from tunedeck.core.preview import stats_lines


class DatasetStats(VerticalScroll):
    """Stats of the project's dataset (the engine's ``preview_stats`` reply)."""

    DEFAULT_CSS = """
    DatasetStats { width: 100%; height: 1fr; }
    DatasetStats #stats-lines { height: auto; padding: 0 1; }
    DatasetStats #stats-refusal { height: auto; padding: 0 1; color: $error; }
    DatasetStats PlotextPlot { height: 12; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static("counting the rows and tokens…", id="stats-lines", markup=False)
        yield Static("", id="stats-refusal", markup=False)
        yield PlotextPlot(id="stats-plot")

    def status(self, text: str) -> None:
        self.stats = None
        self.query_one("#stats-lines", Static).update(text)
        self.query_one("#stats-refusal", Static).update("")
        self._draw({"edges": [], "counts": []})

    def show(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        self.query_one("#stats-lines", Static).update("\n".join(stats_lines(stats, refusal=False)))
        refusal = stats["refusal"]
        self.query_one("#stats-refusal", Static).update(f"training refuses this dataset: {refusal}"
                                                        if refusal else "")
        self._draw(stats["histogram"])

    def _draw(self, hist: dict[str, list[int]]) -> None:
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("tokens per row")
        edges, counts = hist["edges"], hist["counts"]
        if counts:
            labels = [str(e) for e in edges[:-1]]
            plt.bar(labels, counts)
            step = max(1, -(-max(counts) // 4))
            plt.yticks(list(range(0, max(counts) + step, step)))
            plt.xlabel("tokens (bin start)")
        plot.refresh()
