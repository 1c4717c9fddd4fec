"""A plot of a run that knows when it has room to be read, and the column that holds such plots.

plotext draws a plot of any size, and one with too few rows or columns comes out with no
canvas and its axes upside down. :class:`RunPlot` draws nothing below :data:`MIN_HEIGHT`
x :data:`MIN_WIDTH` cells and says so when its size changes (:class:`RunPlot.Resized`);
the screen then gives its place to a one-line summary. :class:`PlotsColumn` says when the
room for the plots changes, so that a plot put aside is tried again.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import events
from textual.app import RenderResult
from textual.containers import Vertical
from textual.message import Message
from textual_plotext import PlotextPlot

# plotext's frame: a title row, the top border, the x axis and its labels (4 rows), y labels
# and two borders at the side; a canvas of 4 rows by about 20 columns is the least that reads
MIN_HEIGHT = 8
MIN_WIDTH = 30


class RunPlot(PlotextPlot):
    """A plotext plot that renders only when it is large enough to be read."""

    @dataclass
    class Resized(Message):
        """The plot's size changed (readable or not)."""

        plot: RunPlot

        @property
        def control(self) -> RunPlot:
            return self.plot

    @staticmethod
    def fits(width: int, height: int) -> bool:
        """A plot of this size can be read."""
        return width >= MIN_WIDTH and height >= MIN_HEIGHT

    @property
    def readable(self) -> bool:
        """The plot has room for a canvas that can be read."""
        return self.fits(*self.size)

    @property
    def canvas_rows(self) -> int:
        """Rows plotext has for the curves (the frame takes 4)."""
        return max(0, self.size.height - 4)

    def on_resize(self, event: events.Resize) -> None:
        self.post_message(self.Resized(self))

    def render(self) -> RenderResult:
        if not self.readable:  # never the collapsed plot, not even for a frame
            return Text()
        return super().render()


class PlotsColumn(Vertical):
    """A column of plots that says when its own size changes."""

    class Resized(Message):
        """The room for the plots changed."""

    def on_resize(self, event: events.Resize) -> None:
        self.post_message(self.Resized())
