"""Dataset screen. Not built yet; for now: the project's training data as tunedeck reads it
(format, rows, rows that do not fit and why), read in a worker thread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.worker import Worker

from tunedeck.core.datafile import DatasetSummary, load_messages

from ..widgets.facts import Facts, NotBuilt
from .base import ProjectScreen

SKIPPED_SHOWN = 5


def dataset_rows(summary: DatasetSummary, fmt_setting: str) -> list[tuple[str, str]]:
    detected = f"{summary.format} (detected)" if fmt_setting == "auto" else summary.format
    rows = [("format", detected), ("rows", f"{summary.rows:,}"), ("usable", f"{summary.good:,}"),
            ("skipped", f"{len(summary.skipped):,}")]
    rows += [(f"row {e.row}", e.reason) for e in summary.skipped[:SKIPPED_SHOWN]]
    if len(summary.skipped) > SKIPPED_SHOWN:
        rows.append(("…", f"{len(summary.skipped) - SKIPPED_SHOWN} more skipped rows"))
    return rows


class DatasetScreen(ProjectScreen):
    """The project's training data."""

    MODE = "dataset"

    @dataclass
    class Read(Message):
        """The training data was read: its format, rows and skipped rows."""

        summary: DatasetSummary

    def __init__(self) -> None:
        super().__init__()
        self._shown: tuple[str, ...] | None = None

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(classes="body"):
            yield NotBuilt("Dataset", "rows rendered with the chat template, token by token, with the loss mask "
                           "the trainer uses; formats, column mapping and the eval split.")
            yield Facts("dataset.path", id="data-facts")

    def forget_project(self) -> None:
        self._shown = None

    def project_shown(self) -> None:
        project = self.session.project
        values = project.values["dataset"]
        key = (values["path"], values["format"], repr(values["columns"]), values["system_prompt"], str(project.root))
        if key == self._shown:
            return
        self._shown = key
        facts = self.query_one("#data-facts", Facts)
        facts.heading = f"dataset.path = {values['path']!r}"
        if not values["path"]:
            facts.fail("no training data set; set dataset.path on the Settings screen (4)")
            return
        path = project.resolve_path(values["path"])
        if path.is_dir():
            facts.fail("a save_to_disk folder: the trainer reads it; this screen cannot show its rows yet")
            return
        facts.status = "reading the rows…"
        self._read(path, values["format"], values["columns"], values["system_prompt"])

    @work(thread=True, exclusive=True, group="read", exit_on_error=False)
    def _read(self, path: Path, fmt: str, columns: dict[str, str], system_prompt: str) -> None:
        _, summary = load_messages(path, fmt, columns, system_prompt)
        self.post_message(self.Read(summary))

    @on(Read)
    def _shown_rows(self, event: Read) -> None:
        fmt = self.session.project["dataset.format"]
        self.query_one("#data-facts", Facts).show(dataset_rows(event.summary, fmt))

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.group == "read":
            self._shown = None
            self.query_one("#data-facts", Facts).fail(message)
        else:
            super().work_failed(worker, message)
