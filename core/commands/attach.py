"""`tunedeck attach RUN [--text] [--stop | --save | --abort]`: follow a run that goes on elsewhere.

RUN is a run folder (``runs/NAME``), or a run's name in the ``runs`` folder here. In a
terminal it opens the app's Train screen on the run (its project, from the run's
snapshot when the project file has moved): the history from events.jsonl, then live, with
the controls. ``--text`` (or output that is not a terminal) prints the history and the
progress instead, until the run ends; Ctrl-C leaves it (the run goes on). ``--stop`` asks
the run to save a checkpoint and the adapter at the end of the current step and end;
``--save`` to save a checkpoint and go on; ``--abort`` to end at once, saving nothing. A
trainer that is gone without a final report is shown as died, and recorded so in the
run's events.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attach", help="follow a running (or finished) run; stop, save or abort it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder (runs/NAME), or a run's name in ./runs")
    p.add_argument("--text", action="store_true", help="print the progress instead of opening the dashboard")
    group = p.add_mutually_exclusive_group()
    for name, text in (("stop", "save a checkpoint and the adapter at the end of this step, then end"),
                       ("save", "save a checkpoint now and go on"), ("abort", "end at once, saving nothing")):
        group.add_argument(f"--{name}", dest="control", action="store_const", const=name, help=text)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..launcher import attach
    from ..runs import send_control
    from .train import Progress

    handle = attach(args.run, runs_dir="runs")
    console = Console(stderr=True, highlight=False)
    if args.control is not None:
        if handle.ended:
            raise UserError(f"{handle.name} has ended ({handle.status}); nothing to {args.control}")
        send_control(handle.run_dir, args.control)
        console.print(f"{handle.name}: {args.control} requested")
        if args.control == "save":
            return 0
    if not args.text and args.control is None and sys.stdout.isatty() and sys.stdin.isatty():
        from tunedeck.tui.app import run_app

        return run_app(str(run_project(handle.run_dir)), attach=handle.run_dir)
    console.print(f"run [bold]{handle.name}[/] in {handle.run_dir} (Ctrl-C leaves it running)")
    progress = Progress(console, handle)
    try:
        with progress.bar:
            while True:
                for ev in handle.events(timeout=0.2):
                    progress.show(ev)
                if handle.ended:
                    break
    except KeyboardInterrupt:
        console.print(f"left {handle.name} running; attach again with: tunedeck attach {handle.run_dir}")
        return 0
    return progress.result()


def run_project(run_dir: Path) -> Path:
    """The project a run was started from: its file when it still exists, else the run's snapshot."""
    import json

    from ..events import EVENTS_FILE
    from ..runs import SNAPSHOT

    try:
        with open(run_dir / EVENTS_FILE, encoding="utf-8") as fh:
            for line in fh:  # the first run_started names it (near the top)
                if '"run_started"' in line:
                    project = json.loads(line).get("project")
                    if isinstance(project, str) and Path(project).is_file():
                        return Path(project)
                    break
    except (OSError, ValueError):
        pass
    snapshot = run_dir / SNAPSHOT
    if not snapshot.is_file():
        raise UserError(f"{run_dir}: its project file is gone and the run has no {SNAPSHOT}; "
                        "use `tunedeck attach --text`")
    return snapshot
