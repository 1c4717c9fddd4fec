"""`tunedeck chat RUN --prompt TEXT [--against base|RUN] [--json]`: a run's answer next to the base model's.

RUN is a run folder (runs/NAME) or a run's name, looked up in the runs folder of
--project (default: ./runs), as `tunedeck runs` lists them. Both answers use the chat
template and system prompt the run trained with, and one copy of the base weights (the
adapter is switched off for "base"). --greedy gives the exact, repeatable answers; with
sampling, --seed makes them repeatable.

--json prints {"a": {"model", "text", "tokens_per_s", ...}, "b": {...}}: a is RUN, b the
model it is compared with.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import UserError


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
    warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notes, not ours
    from ..chat import BASE, GenSettings, run_folder, target_for

    runs_dir = runs_dir_for(args.project)
    if args.run == BASE:
        raise UserError("RUN is a run folder or name; compare base with it through --against")
    run_dir = run_folder(args.run, runs_dir)
    against = BASE if args.against == BASE else str(run_folder(args.against, runs_dir))
    settings = GenSettings.from_dict(generation_settings(args))
    targets = [target_for(str(run_dir), runs_dir=runs_dir),
               target_for(against, partner=str(run_dir), runs_dir=runs_dir)]
    if targets[0].base_path != targets[1].base_path:
        raise UserError(f"{targets[0].label} and {targets[1].label} were trained on different base models "
                        f"({targets[0].source}, {targets[1].source}); compare each with base")
    from ..chat import ChatState

    state = ChatState(device="cpu" if args.cpu else None)
    messages = [{"role": "user", "content": args.prompt}]
    answers = {}
    for key, target in zip("ab", targets):
        if not args.json:
            print(f"── {target.label} " + "─" * max(2, 60 - len(target.label)), flush=True)
            printer = _Printer()
            answer = state.answer(target, messages, settings, on_text=printer)
            print(flush=True)
            rate = f", {answer.tokens_per_s:.1f} tokens/s" if answer.tokens_per_s else ""
            print(f"({answer.tokens} tokens{rate})", file=sys.stderr, flush=True)
        else:
            answer = state.answer(target, messages, settings)
        answers[key] = answer.as_dict()
    if args.json:
        json.dump(answers, sys.stdout, indent=2)
        print()
    return 0


class _Printer:
    """Prints an answer as it is generated."""

    def __call__(self, piece: str, answer: Any) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
