"""The ``tunedeck`` command.

``tunedeck [PROJECT]`` opens the TUI; ``tunedeck COMMAND ...`` runs one screen's work
headless. Each command lives in ``tunedeck.core.commands.<name>`` with
``register(subparsers)`` and ``run(args) -> int``; command modules import nothing heavy
at module level, so ``--help`` and argument errors are instant.

Exit codes: 0 done, 2 bad project or input (one line on stderr, no traceback),
1 the work itself failed (e.g. training diverged or crashed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError

COMMANDS = ("new", "check", "models", "demo", "train", "runs", "inspect", "chat", "merge", "preview",
            "attach")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunedeck",
        description="A terminal workstation for LoRA and QLoRA fine-tuning. "
        "`tunedeck [PROJECT.toml]` opens the app; the commands below work headless.",
    )
    parser.add_argument("--version", action="version", version=f"tunedeck {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"tunedeck.core.commands.{name}")
        module.register(sub)
    return parser


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help='override a project key for this command, read as TOML: --set lora.r=8 '
        "--set 'lora.target_modules=[\"q_proj\",\"v_proj\"]' (repeatable)",
    )


def fail(message: str) -> int:
    print(f"tunedeck: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    wants_help = any(a in ("-h", "--help", "--version") for a in args_list)
    if first not in COMMANDS and not (wants_help and first is None):
        return _open_app(args_list)
    parser = build_parser()
    args = parser.parse_args(args_list)
    module = importlib.import_module(f"tunedeck.core.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        return fail(exc.message)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _open_app(args_list: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunedeck", description="Open the tunedeck app.")
    parser.add_argument("project", nargs="?", help="project file (project.toml) to open")
    args = parser.parse_args(args_list)
    try:
        from tunedeck.tui.app import run_app
    except ImportError as exc:  # pragma: no cover - a broken install
        return fail(f"the app cannot start ({exc})")
    try:
        return int(run_app(args.project) or 0)
    except UserError as exc:
        return fail(exc.message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
