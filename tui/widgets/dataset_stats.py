"""The whole dataset at a glance: counts, skipped rows, truncation, the share of tokens
trained, and a histogram of token lengths (plotext) with max_length marked: a line where
it cuts the rows, or an arrow past the longest row. With several sources, each one's rows
and share of the training mix, the source of the row shown marked. Stats that are still
being counted say how far the count is. A preference set (DPO, ORPO) counts pairs and
compares its answers: the mean length of the chosen and the rejected answers, and the share
of pairs whose chosen answer is longer, with a warning when that share leans far one way
(the model may learn length rather than quality). Drawn from the UI thread only."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.content import Content
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static
from textual_plotext import PlotextPlot

from tunedeck.core.preview import preference_stats_lines
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

    BAR = 10  # cells of a source's share bar
    NAME = 26  # cells of a source's name; a longer one shows its end

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats: dict[str, Any] | None = None  # the whole set's, once counted
        self.partial: dict[str, Any] | None = None  # the count so far, while it runs
        self.current_source: int | None = None  # the source of the row shown

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="stats-text"):
            yield Static("counting the rows and tokens…", id="stats-lines", markup=False)
            yield Static("", id="stats-refusal", markup=False)
        yield PlotextPlot(id="stats-plot")

    def status(self, text: str) -> None:
        self.stats = self.partial = None
        self.query_one("#stats-lines", Static).update(text)
        self.query_one("#stats-refusal", Static).update("")
        self._draw({"edges": [], "counts": []})

    def show(self, stats: dict[str, Any]) -> None:
        """The stats: the whole set's (``done``), or the count so far (``done`` false)."""
        done = stats.get("done", True)
        self.stats, self.partial = (stats, None) if done else (None, stats)
        self.query_one("#stats-lines", Static).update(self.lines(stats))
        refusal = stats["refusal"]
        self.query_one("#stats-refusal", Static).update(f"training refuses this dataset: {refusal}"
                                                        if refusal and done else "")
        self._draw(stats["histogram"], stats.get("max_length"))

    def show_source(self, index: int | None) -> None:
        """Mark source ``index`` (from 0) as the one the row shown comes from."""
        if index == self.current_source:
            return
        self.current_source = index
        shown = self.stats or self.partial
        if shown is not None:
            self.query_one("#stats-lines", Static).update(self.lines(shown))

    def lines(self, stats: dict[str, Any]) -> Text | Content:
        """The stats as text: how far a count still running is, the sources and their
        shares (when there are several), then the set's figures; a preference set's with
        pairs for rows, the mean answer length (trained tokens) of the chosen and the
        rejected answers, the share of pairs whose chosen answer is longer (a warning, in
        the warning colour, where it leans far one way) and the truncated pairs."""
        out = Text()
        preference = bool(stats.get("preference"))
        if not stats.get("done", True):
            out.append(f"reading… {stats['rows']:,} {'pairs' if preference else 'rows'} so far\n", style="bold")
        sources = stats.get("sources") or []
        if len(sources) > 1:
            out.append("sources (share of the mix)\n")
            for src in sources:
                out.append_text(self._source_lines(src))
        rest = {**stats, "sources": []}  # listed above, in lines that fit the panel
        if preference:
            lines = [Content.from_rich_text(out).rstrip()] if out else []
            lines += [Content.styled(line, "bold $text-warning") if warns else Content(line)
                      for line, warns in preference_stats_lines(rest, refusal=False)]
            return Content("\n").join(lines)
        out.append("\n".join(stats_lines(rest, refusal=False)))
        return out

    def _source_lines(self, src: dict[str, Any]) -> Text:
        current = src["index"] == self.current_source
        name = src["path"]  # as the project writes it: a path, or a cached dataset's name
        if len(name) > self.NAME:
            name = "…" + name[-(self.NAME - 1):]
        filled = round(src["share"] * self.BAR)
        line = Text()
        line.append("▸" if current else " ", style="bold")
        line.append(f"{src['index'] + 1} {name}", style="bold" if current else "")
        if src["weight"] != 1:
            line.append(f" ×{src['weight']:g}")
        line.append("\n  ")
        line.append("█" * filled, style="green")
        line.append("░" * (self.BAR - filled), style="dim")
        usable = f", {src['usable']:,} usable" if src["usable"] != src["rows"] else ""
        rows = f"{src['rows']:,} row" + ("" if src["rows"] == 1 else "s")
        line.append(f" {100 * src['share']:.1f}% · {rows}{usable}\n")
        return line

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
