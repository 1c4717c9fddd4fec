"""Train screen. Not built yet; for now: the run started from this window (its live status
and last loss, straight from the trainer's events) and the runs already in the project's
runs folder. Runs start and stop from the command palette."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.worker import Worker

from tunedeck.core.runs import RunInfo, list_runs

from ..training import RunState
from ..widgets.facts import Facts, NotBuilt
from .base import ProjectScreen


def run_rows(runs: list[RunInfo]) -> list[tuple[str, str]]:
    def loss(info: RunInfo) -> str:
        return "" if info.final_loss is None else f", loss {info.final_loss:.4f}"

    return [(info.name, f"{info.status}, step {info.step}{loss(info)}" + (f" ({info.note})" if info.note else ""))
            for info in runs]


class TrainScreen(ProjectScreen):
    """The run of this window and the project's runs."""

    MODE = "train"

    @dataclass
    class Listed(Message):
        """The runs found in the project's runs folder."""

        runs: list[RunInfo]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(classes="body"):
            yield NotBuilt("Train", "the live dashboard (loss, eval loss, learning rate and grad norm plots, GPU "
                           "memory, health alarms, detach and re-attach). Until then: ctrl+p → Start training.")
            yield Facts("this window's run", status="none started yet: ctrl+p → Start training", id="run-facts")
            yield Facts("runs folder", status="reading…", id="runs-facts")

    def on_mount(self) -> None:
        super().on_mount()
        self.watch(self.app, "run_state", self._show_run)

    def _show_run(self, state: RunState | None) -> None:
        if state is not None:
            self.query_one("#run-facts", Facts).show(state.rows())
            if state.ended:
                self.project_shown()

    def project_shown(self) -> None:
        project = self.session.project
        runs_dir = project.resolve_path(project["output.runs_dir"])
        self.query_one("#runs-facts", Facts).heading = f"runs in {project['output.runs_dir']}/"
        self._list(runs_dir)

    @work(thread=True, exclusive=True, group="runs", exit_on_error=False)
    def _list(self, runs_dir: Path) -> None:
        self.post_message(self.Listed(list_runs(runs_dir)))

    @on(Listed)
    def _listed(self, event: Listed) -> None:
        facts = self.query_one("#runs-facts", Facts)
        if event.runs:
            facts.show(run_rows(event.runs))
        else:
            facts.status = "no runs yet"

    def work_failed(self, worker: Worker[object], message: str) -> None:
        if worker.group == "runs":
            self.query_one("#runs-facts", Facts).fail(message)
        else:
            super().work_failed(worker, message)
