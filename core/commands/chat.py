"""`tunedeck chat RUN --prompt TEXT [--against base|RUN] [--json]`: a run's answer next to the base model's.

RUN is a run folder (runs/NAME) or a run's name, looked up in the runs folder of
--project (default: ./runs), as `tunedeck runs` lists them. Both answers use the chat
template and system prompt the run trained with, and one copy of the base weights (the
adapter is switched off for "base"). --greedy gives the exact, repeatable answers; with
sampling, --seed makes them repeatable.

Both answers are generated at once, as one batch on the one base model (each the same
as that model gives alone); RUN's answer is printed as it comes, the other's when RUN's is
complete. Two runs on different base models answer one after the other.

--json prints {"a": {"model", "text", "tokens_per_s", ...}, "b": {...}}: a is RUN, b the
model it is compared with.

What the libraries print while they load and generate (loading bars, warnings) goes to
chat.log in the logs folder of the user cache dir, not to the terminal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserError
from ..paths import cache_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="answer a prompt with a run's adapter and with the base model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder, or a run name in the project's runs folder")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--against", default="base", metavar="base|RUN",
                   help="what to compare with: base (default) or another run")
    p.add_argument("--project", default=None, metavar="PROJECT",
                   help="the project whose runs folder holds RUN (default: ./runs)")
    add_generation_options(p)
    p.add_argument("--cpu", action="store_true", help="generate on the CPU even with a GPU")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--greedy", action="store_true", help="always the likeliest token (exact comparisons)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    names = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed")
    values: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.greedy:
        values["greedy"] = True
    return values


def runs_dir_for(project: str | None) -> Path:
    if project is None:
        return Path("runs")
    from .runs import runs_dir_of

    return runs_dir_of(project)


def run(args: argparse.Namespace) -> int:
    from ..chat import BASE, GenSettings, run_folder, target_for

    runs_dir = runs_dir_for(args.project)
    if args.run == BASE:
        raise UserError("RUN is a run folder or name; compare base with it through --against")
    run_dir = run_folder(args.run, runs_dir)
    against = BASE if args.against == BASE else str(run_folder(args.against, runs_dir))
    settings = GenSettings.from_dict(generation_settings(args))
    messages = [{"role": "user", "content": args.prompt}]
    from ..quiet import library_output

    with library_output(cache_dir() / "logs" / "chat.log") as (out, err):
        from ..chat import ChatState

        targets = [target_for(str(run_dir), runs_dir=runs_dir),
                   target_for(against, partner=str(run_dir), runs_dir=runs_dir)]
        state = ChatState(device="cpu" if args.cpu else None)
        printer = None if args.json else _Printer(out, targets)
        result = state.answer_all([(target, messages) for target in targets], settings,
                                  on_text=None if printer is None else printer.piece)
        problem = next((e for e in result.errors if e is not None), None)
        if problem is not None:
            raise UserError(problem)
        answers = {key: answer.as_dict() for key, answer in zip("ab", result.answers) if answer is not None}
        if printer is not None:
            printer.done(result.answers, err)
        else:
            json.dump(answers, out, indent=2)
            out.write("\n")
            out.flush()
    return 0


class _Printer:
    """Prints the answers as they are generated: the first pane's live, the second's (which
    comes at the same time) once the first is complete."""

    def __init__(self, out: TextIO, targets: list[Any]) -> None:
        self.out = out
        self.labels = [t.label for t in targets]
        self.held = ""
        self.header(0)

    def header(self, index: int) -> None:
        label = self.labels[index]
        self.out.write(f"── {label} " + "─" * max(2, 60 - len(label)) + "\n")
        self.out.flush()

    def piece(self, index: int, piece: str, answer: Any) -> None:
        if index == 0:
            self.out.write(piece)
            self.out.flush()
        else:
            self.held += piece

    def done(self, answers: list[Any], err: TextIO) -> None:
        for index, answer in enumerate(answers):
            if index:
                self.header(index)
                self.out.write(self.held)
            self.out.write("\n")
            self.out.flush()
            rate = f", {answer.tokens_per_s:.1f} tokens/s" if answer.tokens_per_s else ""
            err.write(f"({answer.tokens} tokens{rate})\n")
            err.flush()
