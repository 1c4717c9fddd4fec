"""`tunedeck train PROJECT.toml [--set key=value ...] [--run-name NAME] [--resume]`: train headless.

Runs the same trainer process as the app and shows its progress (step, loss, tokens/s,
ETA). Ctrl-C once stops at the end of the current step, saving a checkpoint and the
adapter; twice aborts without saving; a third time kills the trainer.

Exit 0 when the run finished (or was stopped and saved), 2 for a bad project or input,
1 when training failed, 130 when it was aborted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..cli import add_set_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a project (LoRA / QLoRA) and show its progress", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("project", help="project file")
    add_set_option(p)
    p.add_argument("--run-name", default=None, metavar="NAME",
                   help="name of the run folder under output.runs_dir (default: <project name>-<date>-<time>)")
    p.add_argument("--detach", action="store_true",
                   help="start the run in its own session and return once it has started; follow it with "
                   "`tunedeck attach RUN`")
    p.add_argument("--resume", action="store_true",
                   help="continue a run from its latest checkpoint (the newest run of this project, or --run-name)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..launcher import start_run

    console = Console(stderr=True, highlight=False)
    handle = start_run(args.project, args.overrides, run_name=args.run_name, resume=args.resume)
    console.print(f"run [bold]{handle.name}[/] in {handle.run_dir}")
    if args.detach:
        return detach(console, handle)
    return Progress(console, handle).follow()


def detach(console: Any, handle: Any) -> int:
    """Wait until the trainer has started (or refused), then leave it running and return."""
    progress = Progress(console, handle)
    try:
        while not handle.ended:
            events = handle.events(timeout=0.2)
            for ev in events:
                progress.show(ev)
            if any(ev["type"] == "run_started" for ev in events):
                break
    except KeyboardInterrupt:
        handle.abort()
        handle.wait(30)
    if handle.ended:
        return progress.result()
    handle.detach()
    console.print(f"running detached (it survives this terminal). Follow it: tunedeck attach {handle.run_dir}\n"
                  f"stop it: tunedeck attach {handle.run_dir} --stop; status: tunedeck runs {handle.run_dir.parent}")
    return 0


class Progress:
    """Draws a run's events as a progress bar and a few lines; turns Ctrl-C into stop / abort / kill."""

    def __init__(self, console: Any, handle: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

        self.console = console
        self.handle = handle
        self.interrupts = 0
        self.bar = Bar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("eta {task.fields[eta]}"),
            console=console, transient=False,
        )
        self.task = self.bar.add_task("starting", total=None, loss="-", rate="-", eta="-")

    def follow(self) -> int:
        with self.bar:
            while True:
                try:
                    for ev in self.handle.events(timeout=0.2):
                        self.show(ev)
                    if self.handle.ended:
                        for ev in self.handle.events(timeout=0):
                            self.show(ev)
                        break
                except KeyboardInterrupt:
                    self.interrupt()
        return self.result()

    def interrupt(self) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.handle.stop()
            self.console.print("[yellow]stopping at the end of this step: saving a checkpoint and the adapter "
                               "(Ctrl-C again to abort without saving)[/]")
        elif self.interrupts == 2:
            self.handle.abort()
            self.console.print("[yellow]aborting: nothing more is saved (Ctrl-C again to kill the trainer)[/]")
        else:
            self.handle.kill()

    def show(self, ev: dict[str, Any]) -> None:
        kind = ev["type"]
        if kind == "run_started":
            resumed = ev.get("resumed_from")
            where = f", resumed at step {resumed.get('step')}" if isinstance(resumed, dict) else ""
            device = ev.get("device") if isinstance(ev.get("device"), dict) else {}
            self.console.print(f"{_count(ev.get('trainable_params'))} trainable of {_count(ev.get('total_params'))} "
                               f"parameters; {ev.get('train_rows', '?')} rows, {ev.get('max_steps', '?')} steps on "
                               f"{device.get('hardware', device.get('type', ''))}{where}")
            self.bar.update(self.task, description="training", total=ev.get("max_steps"), completed=ev.get("step", 0))
        elif kind == "step":
            fields = {"loss": _num(ev.get("loss")), "rate": _num(ev.get("tokens_per_s"), "{:,.0f}"),
                      "eta": _duration(ev.get("eta_s"))}
            self.bar.update(self.task, completed=ev.get("step", 0), total=ev.get("max_steps"), **fields)
        elif kind == "eval":
            self.console.print(f"step {ev.get('step')}: eval loss {_num(ev.get('eval_loss'))}")
        elif kind == "checkpoint":
            self.console.print(f"step {ev.get('step')}: checkpoint {ev.get('path', '')}")
        elif kind == "warning":
            self.console.print(f"[yellow]warning:[/] {ev.get('message', '')}")
        elif kind == "alarm":
            hint = "Ctrl-C stops the run" if ev.get("action") == "stop" else "the run goes on"
            self.console.print(f"[bold red]alarm:[/] {ev.get('message', '')} ({hint})")
        elif kind == "finished":
            self.bar.update(self.task, description="stopped" if ev.get("stopped") else "done")
        elif kind == "failed":
            self.bar.update(self.task, description="failed")

    def result(self) -> int:
        final = self.handle.final or {}
        if self.handle.status == "finished":
            how = "stopped" if final.get("stopped") else "finished"
            self.console.print(f"[green]{how}[/] at step {final.get('step')}: loss {_num(final.get('final_loss'))}, "
                               f"{_duration(final.get('runtime_s'))}; adapter in {final.get('adapter')}")
            if final.get("stopped"):
                self.console.print(f"continue with: tunedeck train PROJECT --resume --run-name {self.handle.name}")
            return 0
        reason = final.get("reason", "the trainer ended without a report")
        print(f"tunedeck: error: {reason}", file=sys.stderr)
        if final.get("user_error"):
            return 2
        if final.get("aborted"):
            return 130
        if final.get("traceback"):
            self.console.print(f"(traceback in {self.handle.run_dir / 'events.jsonl'}; library output in "
                               f"{self.handle.run_dir / 'trainer.log'})")
        return 1


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(max(0, float(seconds))))
