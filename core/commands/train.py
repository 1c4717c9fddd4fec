"""`tunedeck train PROJECT.toml [--set key=value ...] [--run-name NAME] [--resume]`: train headless.

Runs the same trainer process as the app and shows its progress (step, loss, tokens/s,
ETA). Ctrl-C once stops at the end of the current step, saving a checkpoint and the
adapter; twice aborts without saving; a third time kills the trainer. With
``training.devices`` above 1 the run trains data parallel in several processes.

Exit 0 when the run finished (or was stopped and saved), 2 for a bad project or input
(nothing is created), 1 when training failed, 130 when it was aborted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..cli import add_set_option
from ..errors import UserError
from ..events import ALARM, CHECKPOINT, CONTROL, EVAL, FINAL, RUN_STARTED, STEP, WARNING, finite_number
from ..runs import ABORTED, DIED, FAILED_STATUS, FINISHED_STATUS, STOPPED, final_status


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
    from ..cli import console as cli_console
    from rich.text import Text

    from ..launcher import start_run

    console = cli_console(stderr=True)
    handle = start_run(args.project, args.overrides, run_name=args.run_name, resume=args.resume)
    processes = f" ({handle.spec.processes} processes)" if handle.spec.processes > 1 else ""
    console.print(Text.assemble("run ", (handle.name, "bold"), f" in {handle.run_dir}{processes}"), soft_wrap=True)
    if args.detach:
        return detach(console, handle)
    return Progress(console, handle).follow()


def detach(console: Any, handle: Any) -> int:
    """Wait until the trainer has started (or refused), then leave it running and return."""
    from rich.text import Text

    progress = Progress(console, handle)
    try:
        while not handle.ended:
            events = handle.events(timeout=0.2)
            for ev in events:
                progress.show(ev)
            if any(ev["type"] == "run_started" for ev in events):
                break
    except KeyboardInterrupt:
        try:
            handle.abort()
        except UserError:
            pass
        handle.wait(30)
    if handle.ended:
        return progress.result()
    handle.detach()
    console.print(Text(f"running detached (it survives this terminal). Follow it: tunedeck attach {handle.run_dir}\n"
                       f"stop it: tunedeck attach {handle.run_dir} --stop; "
                       f"status: tunedeck runs {handle.run_dir.parent}"), soft_wrap=True)
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
        from rich.text import Text

        self.interrupts += 1
        try:
            if self.interrupts == 1:
                self.handle.stop()
                self.console.print(Text("stopping at the end of this step: saving a checkpoint and the adapter "
                                        "(Ctrl-C again to abort without saving)", style="yellow"))
            elif self.interrupts == 2:
                self.handle.abort()
                self.console.print(Text("aborting: nothing more is saved (Ctrl-C again to kill the trainer)",
                                        style="yellow"))
            else:
                self.handle.kill()
        except UserError as exc:  # the run ended meanwhile, or its trainer does not answer
            self.console.print(Text(f"{exc.message}", style="yellow"))

    def show(self, ev: dict[str, Any]) -> None:
        from rich.text import Text

        kind = ev["type"]
        if kind == RUN_STARTED:
            resumed = ev.get("resumed_from")
            where = f", resumed at step {resumed.get('step')}" if isinstance(resumed, dict) else ""
            device = ev.get("device") if isinstance(ev.get("device"), dict) else {}
            processes = ev.get("world_size") if isinstance(ev.get("world_size"), int) else 1
            on = f"{device.get('hardware', device.get('type', ''))}" + (f", {processes} processes" if processes > 1
                                                                        else "")
            self.console.print(Text(f"{_count(ev.get('trainable_params'))} trainable of "
                                    f"{_count(ev.get('total_params'))} parameters; {ev.get('train_rows', '?')} "
                                    f"{'pairs' if _method(ev) != 'sft' else 'rows'}, "
                                    f"{ev.get('max_steps', '?')} steps on {on}{where}"))
            how = run_layout(ev)
            if how:
                self.console.print(Text(how, style="dim"))
            self.bar.update(self.task, description="training", total=_int(ev.get("max_steps")),
                            completed=_int(ev.get("step")) or 0)
        elif kind == STEP:
            loss = _num(ev.get("loss"))
            if ev.get("reward_accuracy") is not None:  # a preference run: how well it tells the answers apart
                loss += f" acc {_num(ev.get('reward_accuracy'), '{:.2f}')} margin {_num(ev.get('reward_margin'))}"
            fields = {"loss": loss, "rate": _num(ev.get("tokens_per_s"), "{:,.0f}"), "eta": _duration(ev.get("eta_s"))}
            self.bar.update(self.task, completed=_int(ev.get("step")) or 0, total=_int(ev.get("max_steps")), **fields)
        elif kind == EVAL:
            extra = ""
            if ev.get("eval_reward_accuracy") is not None:
                extra = (f", preference accuracy {_num(ev.get('eval_reward_accuracy'), '{:.2f}')}, margin "
                         f"{_num(ev.get('eval_reward_margin'))}")
            self.console.print(f"step {ev.get('step')}: eval loss {_num(ev.get('eval_loss'))}{extra}")
        elif kind == CHECKPOINT:
            self.console.print(Text(f"step {ev.get('step')}: checkpoint {ev.get('path', '')}"))
        elif kind == WARNING:
            self.console.print(Text.assemble(("warning:", "yellow"), f" {ev.get('message', '')}"))
        elif kind == CONTROL:
            self.console.print(Text(f"step {ev.get('step')}: {ev.get('message', '')}", style="blue"))
        elif kind == ALARM:
            hint = "Ctrl-C stops the run" if ev.get("action") == "stop" else "the run goes on"
            self.console.print(Text.assemble(("alarm:", "bold red"), f" {ev.get('message', '')} ({hint})"))
        elif kind in FINAL:  # the bar's last word: done, stopped, aborted or failed
            status = final_status(ev)
            self.bar.update(self.task, description={FINISHED_STATUS: "done", DIED: FAILED_STATUS}.get(status, status))

    def result(self) -> int:
        """Print the end of the run; returns the exit code for it."""
        from rich.text import Text

        final = self.handle.final or {}
        status = self.handle.status
        if status in (FINISHED_STATUS, STOPPED):
            self.console.print(Text.assemble((status, "green"), f" at step {final.get('step')}: loss "
                                             f"{_num(final.get('final_loss'))}, {_duration(final.get('runtime_s'))}; "
                                             f"adapter in {final.get('adapter')}"), soft_wrap=True)
            if status == STOPPED:
                self.console.print(Text(f"continue with: tunedeck train {project_of(self.handle)} --resume "
                                        f"--run-name {self.handle.name}"), soft_wrap=True)
            return 0
        reason = final.get("reason", "the trainer ended without a report")
        print(f"tunedeck: error: {reason}", file=sys.stderr)
        if final.get("user_error"):
            return 2
        if status == ABORTED:
            return 130
        if final.get("traceback"):
            self.console.print(Text(f"(traceback in {self.handle.run_dir / 'events.jsonl'}; library output in "
                                    f"{self.handle.run_dir / 'trainer.log'})"))
        return 1


def project_of(handle: Any) -> str:
    """The project file a run was started from, for the commands printed; the run's own
    snapshot (which trains as is) when that file is gone."""
    from pathlib import Path

    path = getattr(getattr(handle, "spec", None), "project_path", None) or handle.project_path
    if isinstance(path, str) and Path(path).is_file():
        return path
    return str(Path(handle.run_dir) / "project.toml")


def run_layout(ev: dict[str, Any]) -> str:
    """How a run trains, from its run_started event: precision (and why, when "auto" chose it),
    the batch layout and the kernels; empty for an event without them."""
    resolved = ev.get("resolved") if isinstance(ev.get("resolved"), dict) else {}
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    parts = []
    if resolved.get("precision"):
        reason = resolved.get("precision_reason")
        parts.append(f"{resolved['precision']}" + (f" ({reason})" if reason and reason != "set in the project"
                                                   else ""))
    batching = data.get("batching") if isinstance(data.get("batching"), dict) else {}
    method = _method(ev)
    if method != "sft":
        config = ev.get("config") if isinstance(ev.get("config"), dict) else {}
        pref = config.get("preference") if isinstance(config.get("preference"), dict) else {}
        how = f"{method.upper()}, beta {pref.get('beta', '?')}"
        if method == "dpo":
            how += f", {data.get('loss') or pref.get('loss_type', '?')} loss"
        if data.get("reference"):
            how += f", against {data['reference']}"
        parts.append(how)
        if data.get("pairs"):
            pairs = data["pairs"]
            parts.append(f"answers: chosen {pairs.get('chosen_tokens_mean')} vs rejected "
                         f"{pairs.get('rejected_tokens_mean')} tokens on average")
    elif batching.get("layout"):
        layout = str(batching["layout"])
        if layout == "packed":
            layout += f" ({batching.get('rows')} rows in {batching.get('examples')} examples)"
        elif layout == "padded" and batching.get("why_padded"):
            layout += f", rows grouped by length ({batching['why_padded']})"
        parts.append(f"{layout} batches")
    if resolved.get("kernels") not in (None, "none"):
        parts.append(f"{resolved['kernels']} kernels")
    return "; ".join(parts)


def _method(ev: dict[str, Any]) -> str:
    """The training method of a run_started event (runs before it trained SFT only)."""
    config = ev.get("config") if isinstance(ev.get("config"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    method = training.get("method")
    return method if isinstance(method, str) else "sft"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "?"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    number = finite_number(value)
    return "-" if number is None else fmt.format(number)


def _duration(seconds: Any) -> str:
    number = finite_number(seconds)
    if number is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(min(max(0.0, number), 365 * 86400.0)))
