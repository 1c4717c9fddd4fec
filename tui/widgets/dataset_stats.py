"""The whole dataset at a glance: counts, skipped rows, truncation, the share of tokens
trained, and a histogram of token lengths (plotext) with max_length marked: a line where
it cuts the rows, or an arrow past the longest row. Drawn from the UI thread only."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from tunedeck.core.preview import stats_lines


class DatasetStats(Vertical):
    """Stats of the project's dataset (the engine's ``preview_stats`` reply): the lines
    scroll, the histogram stays whole under them (its x axis shows even at 80x24)."""

    DEFAULT_CSS = """
    DatasetStats { width: 100%; height: 1fr; }
    DatasetStats #stats-text { height: 1fr; scrollbar-size-vertical: 1; }
    DatasetStats #stats-lines { height: auto; padding: 0 1; }
    DatasetStats #stats-refusal { height: auto; padding: 0 1; color: $error; }
    DatasetStats PlotextPlot { height: 10; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="stats-text"):
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
        self._draw(stats["histogram"], stats.get("max_length"))

    def _draw(self, hist: dict[str, list[int]], max_length: int | None = None) -> None:
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        edges, counts = hist["edges"], hist["counts"]
        title = ""
        if counts:
            low, width = edges[0], edges[1] - edges[0]
            xs = [k + 1 for k in range(len(counts))]  # bar k at x = k + 1
            plt.bar(xs, counts, width=0.8)
            ticks = xs if len(xs) <= 4 else xs[:: -(-len(xs) // 4)]
            plt.xticks(ticks, [str(edges[x - 1]) for x in ticks])  # a few labels: they fit a narrow panel
            step = max(1, -(-max(counts) // 4))
            plt.yticks(list(range(0, max(counts) + step, step)))
            plt.xlim(0.4, len(xs) + 0.6)
            plt.xlabel("tokens per row (bin start)")
            if max_length:
                if max_length <= low:
                    title = f"← max_length {max_length:,} cuts all"
                elif max_length < edges[-1]:  # rows are cut: a line where the cut falls
                    x = 0.5 + (max_length - low) / width  # bar k spans k ± 0.5
                    plt.vline(x, "red")
                    title = f"│ max_length {max_length:,}"
                else:
                    title = f"max_length {max_length:,} →"
        plt.title(title or "tokens per row")
        plot.refresh()
