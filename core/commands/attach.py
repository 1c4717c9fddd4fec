"""`tunedeck attach RUN [--stop | --save | --abort]`: follow a run that is going on elsewhere.

RUN is a run folder (``runs/NAME``), or a run's name in the ``runs`` folder here. The
run's history is shown from its events.jsonl, then its progress as it trains, until it
ends. Ctrl-C leaves it (the run goes on). ``--stop`` asks it to save a checkpoint and the
adapter at the end of the current step and end; ``--save`` to save a checkpoint and go
on; ``--abort`` to end at once, saving nothing. A trainer that is gone without a final
report is shown as died, and recorded so in the run's events.jsonl.
"""

from __future__ import annotations

import argparse

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attach", help="follow a running (or finished) run; stop, save or abort it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder (runs/NAME), or a run's name in ./runs")
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
