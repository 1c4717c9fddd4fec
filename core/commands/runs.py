"""`tunedeck runs [PROJECT_OR_RUNS_DIR] [--json]`: list runs with status, steps, loss, duration and memory.

Memory: the peak the run's estimate gave when training began, and the peak measured
(torch's allocations on a GPU, the trainer's resident memory on a CPU), in GiB.

Given a project file, lists the runs in its output.runs_dir; given a folder, the runs in
it (or, for a folder holding project.toml, that project's runs). Without an argument, the
``runs`` folder here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list training runs and their status", description=__doc__)
    p.add_argument("where", nargs="?", default=None, metavar="PROJECT_OR_RUNS_DIR",
                   help="a project file, or a runs folder (default: ./runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def runs_dir_of(where: str | None) -> Path:
    """The runs folder named by a project file, a project folder or a runs folder."""
    if where is None:
        path = Path("runs")
        if not path.is_dir():
            raise UserError("no runs folder here; give a project file or a runs folder (tunedeck runs PROJECT.toml)")
        return path
    path = Path(where)
    if path.is_file() or (path.is_dir() and (path / "project.toml").is_file() and not (path / "events.jsonl").exists()):
        from ..project import Project

        project = Project.load(path)
        return project.resolve_path(project["output.runs_dir"])
    if path.is_dir():
        return path
    raise UserError(f"{where}: no such project file or runs folder")


def run(args: argparse.Namespace) -> int:
    from ..runs import (
        ABORTED, DIED, FAILED_STATUS, FINISHED_STATUS, RUNNING, STARTING, STOPPED, STOPPING, UNKNOWN, list_runs,
    )

    folder = runs_dir_of(args.where)
    infos = list_runs(folder)
    if args.json:
        json.dump([i.as_dict() for i in infos], sys.stdout, indent=2)
        print()
        return 0
    from ..cli import console as cli_console
    from rich.table import Table
    from rich.text import Text

    console = cli_console()
    if not infos:
        console.print(Text(f"no runs in {folder}"))
        return 0
    colours = {STARTING: "cyan", RUNNING: "cyan", STOPPING: "yellow", FINISHED_STATUS: "green", STOPPED: "green",
               ABORTED: "yellow", FAILED_STATUS: "red", DIED: "red", UNKNOWN: "magenta"}
    table = Table(title=Text(f"runs in {folder}"), header_style="bold")
    for col in ("run", "status", "steps", "loss", "eval loss", "duration", "memory", "note"):
        table.add_column(col, overflow="fold")
    for i in infos:
        steps = f"{i.step}/{i.max_steps}" if i.max_steps else str(i.step)
        table.add_row(
            Text(i.name + (f" ({i.method.upper()})" if i.method != "sft" else "")), Text(f"{i.status} ({i.note})" if i.status == UNKNOWN else i.status,
                               style=colours.get(i.status, "white")), steps, _num(i.final_loss) + (f" acc {i.reward_accuracy:.2f}" if i.reward_accuracy is not None else ""),
            _num(i.eval_loss), _duration(i.duration_s), Text(i.memory or "-"), Text(i.note),
        )
    console.print(table)
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
