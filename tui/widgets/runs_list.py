"""The runs of a project as a list with columns: name, status, step, final loss, eval
loss, training time. The columns are fitted to the list's width as it changes: time, step
and the long status go first at narrow widths, the name is shortened in its middle, and
the two losses always show in full. Space picks runs for comparison; each picked run
keeps a colour of :data:`PALETTE`, the colour of its curve on the loss plot. ``e`` asks
for the highlighted run to be exported as GGUF (:class:`RunsList.ExportAsked`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import events
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from tunedeck.core.runs import (
    ABORTED, DIED, FAILED_STATUS, FINISHED_STATUS, RUNNING, STARTING, STOPPED, STOPPING, UNKNOWN, RunInfo,
)

from ..training import duration, status_label

# curve colours of the compared runs (RGB: plotext and Textual draw the same colour)
PALETTE = ((0, 190, 220), (255, 150, 0), (225, 90, 225), (90, 200, 90), (235, 205, 0), (110, 140, 255))

STATUS_STYLE = {STARTING: "$text-warning", RUNNING: "$text-success", STOPPING: "$text-warning",
                FINISHED_STATUS: "$text-primary", STOPPED: "$text-primary", ABORTED: "$text-warning",
                FAILED_STATUS: "$text-error", DIED: "$text-error", UNKNOWN: "$text-muted"}
SHORT_STATUS = {STARTING: "start", RUNNING: "run", STOPPING: "stop…", FINISHED_STATUS: "done",
                STOPPED: "stop", ABORTED: "abort", FAILED_STATUS: "fail", DIED: "died", UNKNOWN: "?"}

PREFIX = 3  # the followed mark, the picked swatch, a space
LOSS = 7  # "12.3456" at most; each loss column is a space and this
STATUS_FULL, STATUS_SHORT, TIME = 13, 6, 8
NAME_MIN = 12  # optional columns are added while the name keeps this much


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def loss_text(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"


def middle(text: str, width: int) -> str:
    """``text`` in ``width`` cells, shortened in the middle (a run's date is at its end)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


@dataclass(frozen=True)
class Columns:
    """Which columns show, and how wide the name and step columns are."""

    name: int
    status: int  # 0 (none), STATUS_SHORT or STATUS_FULL
    step: int  # 0: not shown
    time: bool

    @property
    def width(self) -> int:
        return (PREFIX + self.name + (1 + self.status if self.status else 0) + (1 + self.step if self.step else 0)
                + 2 * (1 + LOSS) + (1 + TIME if self.time else 0))


def fit_columns(width: int, runs: Iterable[RunInfo]) -> Columns:
    """The columns for a list ``width`` cells wide: the two losses always, in full."""
    runs = list(runs)
    name_need = max([len(r.name) for r in runs] + [4])
    step_need = max([len(step_text(r)) for r in runs] + [4])
    name_min = min(name_need, NAME_MIN)
    used = PREFIX + 2 * (1 + LOSS)
    status, step, time = 0, 0, False
    # the short status and the step while the name keeps NAME_MIN cells; the time and the
    # long status only where the whole name fits too
    for column, cost, name in (("status", 1 + STATUS_SHORT, name_min), ("step", 1 + step_need, name_min),
                               ("time", 1 + TIME, name_need), ("status_full", STATUS_FULL - STATUS_SHORT, name_need)):
        if column == "status_full" and not status:
            continue
        if used + cost + name > width:
            continue
        used += cost
        if column == "status":
            status = STATUS_SHORT
        elif column == "status_full":
            status = STATUS_FULL
        elif column == "step":
            step = step_need
        else:
            time = True
    return Columns(name=max(4, min(name_need, width - used)), status=status, step=step, time=time)


def step_text(info: RunInfo) -> str:
    return f"{info.step}/{info.max_steps}" if info.max_steps else str(info.step)


def status_text(info: RunInfo, width: int) -> str:
    text = status_label(info.status, info.host) if width >= STATUS_FULL else SHORT_STATUS.get(info.status, "?")
    return middle(text, width)


def header(columns: Columns, title: str) -> Content:
    """The line above the list: its title in the name column, the other columns' names."""
    name = title if len(title) <= columns.name else "run"
    parts = [" " * PREFIX, name.ljust(columns.name)]
    if columns.status:
        parts.append(" " + "status".ljust(columns.status))
    if columns.step:
        parts.append(" " + "step".rjust(columns.step))
    parts.append(" " + "loss".rjust(LOSS) + " " + "eval".rjust(LOSS))
    if columns.time:
        parts.append(" " + "time".rjust(TIME))
    return Content("".join(parts))


def row(info: RunInfo, columns: Columns, followed: bool, color: tuple[int, int, int] | None) -> Content:
    """One run as a line of the list."""
    swatch = ("■", hex_color(color)) if color is not None else " "
    parts: list[str | tuple[str, str]] = ["●" if followed else " ", swatch, " ",
                                          middle(info.name, columns.name).ljust(columns.name)]
    if columns.status:
        parts += [" ", (status_text(info, columns.status).ljust(columns.status), STATUS_STYLE.get(info.status, ""))]
    if columns.step:
        parts.append(" " + step_text(info).rjust(columns.step))
    parts.append(" " + loss_text(info.final_loss).rjust(LOSS))
    parts.append((" " + loss_text(info.eval_loss).rjust(LOSS), "$text-secondary"))
    if columns.time:
        parts.append((" " + duration(info.duration_s if info.started is not None else None).rjust(TIME),
                      "$text-muted"))
    return Content.assemble(*parts)


class RunsList(OptionList):
    """The runs of a project, newest first; space picks runs to compare."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "pick", "Compare", id="train.compare"),
        Binding("e", "export", "Export", id="train.export"),
        Binding("escape", "clear_picks", "Clear compare", show=False, id="train.compare_clear"),
    ]

    @dataclass
    class PicksChanged(Message):
        """The runs picked for comparison changed: their folders, in the order picked."""

        runs_list: RunsList
        picks: tuple[Path, ...]

        @property
        def control(self) -> RunsList:
            return self.runs_list

    @dataclass
    class Laid(Message):
        """The columns changed: the header line above the list follows."""

        runs_list: RunsList
        header: Content

        @property
        def control(self) -> RunsList:
            return self.runs_list

    @dataclass
    class ExportAsked(Message):
        """``e`` on a run: export it as GGUF (the screen opens the dialog, or says why not)."""

        runs_list: RunsList
        run: RunInfo

        @property
        def control(self) -> RunsList:
            return self.runs_list

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.runs: list[RunInfo] = []
        self.followed: Path | None = None
        self.title = "runs"
        self._colors: dict[str, int] = {}  # picked run folder -> index in PALETTE
        self._columns: Columns | None = None
        self._placeholder: Content | None = None

    @property
    def picks(self) -> tuple[Path, ...]:
        return tuple(Path(path) for path in self._colors)

    def color_of(self, run_dir: str | Path) -> tuple[int, int, int] | None:
        index = self._colors.get(str(run_dir))
        return None if index is None else PALETTE[index]

    def show_runs(self, runs: list[RunInfo], followed: Path | None, title: str) -> None:
        """Show ``runs`` (in this order), keeping the highlighted run and the picks that are
        still there."""
        highlighted = self.highlighted_option.id if self.highlighted_option is not None else None
        self.runs, self.title, self._placeholder = list(runs), title, None
        self.followed = followed.resolve() if followed is not None else None
        gone = [path for path in self._colors if path not in {str(r.path) for r in runs}]
        for path in gone:
            del self._colors[path]
        self._columns = None
        self._redraw()
        ids = [str(info.path) for info in self.runs]
        if highlighted in ids:
            self.highlighted = ids.index(highlighted)
        elif self.runs:  # the followed run, else the newest
            followed_at = [i for i, info in enumerate(self.runs) if self._is_followed(info)]
            self.highlighted = (followed_at or [0])[0]
        if gone:
            self.post_message(self.PicksChanged(self, self.picks))

    def show_message(self, message: Content, title: str) -> None:
        """A line in place of the runs (none yet, or the folder could not be read)."""
        self.runs, self.title, self._placeholder, self._columns = [], title, message, None
        self._redraw()

    def on_resize(self, event: events.Resize) -> None:
        if self.runs and self._fit() != self._columns:
            self._redraw()

    def _fit(self) -> Columns:
        width = self.scrollable_content_region.width or self.size.width or 40
        return fit_columns(width, self.runs)

    def _redraw(self) -> None:
        if self._placeholder is not None or not self.runs:
            self.set_options([Option(self._placeholder or Content.styled("no runs yet: s starts one", "$text-muted"),
                                     disabled=True)])
            self.post_message(self.Laid(self, Content(self.title)))
            return
        highlighted = self.highlighted
        self._columns = columns = self._fit()
        self.set_options([Option(row(info, columns, self._is_followed(info), self.color_of(info.path)),
                                 id=str(info.path)) for info in self.runs])
        if highlighted is not None and highlighted < len(self.runs):
            self.highlighted = highlighted
        self.post_message(self.Laid(self, header(columns, self.title)))

    def _is_followed(self, info: RunInfo) -> bool:
        return self.followed is not None and Path(info.path).resolve() == self.followed

    def set_followed(self, followed: Path | None) -> None:
        followed = followed.resolve() if followed is not None else None
        if followed != self.followed:
            self.followed = followed
            self._redraw()

    def action_pick(self) -> None:
        option = self.highlighted_option
        if option is None or option.id is None:
            return
        if option.id in self._colors:
            del self._colors[option.id]
        else:
            free = [i for i in range(len(PALETTE)) if i not in self._colors.values()]
            if not free:
                self.notify(f"at most {len(PALETTE)} runs are compared at once; space on a marked run unmarks it",
                            severity="warning")
                return
            self._colors[option.id] = free[0]
        self._redraw()
        self.post_message(self.PicksChanged(self, self.picks))

    def action_export(self) -> None:
        option = self.highlighted_option
        run = next((info for info in self.runs if option is not None and str(info.path) == option.id), None)
        if run is None:
            self.notify("no run to export: a finished run's adapter is exported", severity="warning")
            return
        self.post_message(self.ExportAsked(self, run))

    def action_clear_picks(self) -> None:
        if self._colors:
            self._colors.clear()
            self._redraw()
            self.post_message(self.PicksChanged(self, ()))
