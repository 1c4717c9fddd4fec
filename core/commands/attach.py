"""`tunedeck attach RUN [--text] [--stop | --save | --abort]`: follow a run that goes on elsewhere.

RUN is a run folder (``runs/NAME``), or a run's name in the ``runs`` folder here. In a
terminal it opens the app's Train screen on the run (its project, from the run's
snapshot when the project file has moved): the history from events.jsonl, then live, with
the controls. ``--text`` (or output that is not a terminal) prints the history and the
progress instead, until the run ends; Ctrl-C leaves it (the run goes on). ``--stop`` asks
the run to save a checkpoint and the adapter at the end of the current step and end;
``--save`` to save a checkpoint and go on; ``--abort`` to end at once, saving nothing.
Each returns once the trainer has taken the request; ``--wait`` then follows the run to
its end (and exits with its code). A trainer that is gone without a final report is shown
as died, and recorded so in the run's events.jsonl; a run on another host is "unknown".
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
    p.add_argument("--wait", action="store_true", help="with --stop, --save or --abort: follow the run to its end")


def run(args: argparse.Namespace) -> int:
    from ..cli import console as cli_console
    from rich.text import Text

    from ..launcher import attach
    from .train import Progress, project_of

    handle = attach(args.run, runs_dir="runs")
    console = cli_console(stderr=True)
    if args.control is not None:
        message = handle.control(args.control)  # returns once the trainer has taken it
        console.print(Text(f"{handle.name}: {message}"))
        if not args.wait:
            if args.control == "stop":
                console.print(Text(f"follow it to its end: tunedeck attach {handle.run_dir}; then continue it with: "
                                   f"tunedeck train {project_of(handle)} --resume --run-name {handle.name}"),
                              soft_wrap=True)
            return 0
    elif args.wait:
        raise UserError("--wait goes with --stop, --save or --abort")
    if not args.text and args.control is None and sys.stdout.isatty() and sys.stdin.isatty():
        from ..cli import open_app

        handle.detach()
        return open_app(str(run_project(handle.run_dir)), attach=handle.run_dir)
    console.print(Text.assemble("run ", (handle.name, "bold"), f" in {handle.run_dir} (Ctrl-C leaves it running)"),
                  soft_wrap=True)
    progress = Progress(console, handle)
    try:
        with progress.bar:
            while True:
                for ev in handle.events(timeout=0.2):
                    progress.show(ev)
                if handle.ended:
                    break
    except KeyboardInterrupt:
        handle.detach()
        console.print(Text(f"left {handle.name} running; attach again with: tunedeck attach {handle.run_dir}"),
                      soft_wrap=True)
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
