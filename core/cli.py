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
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .errors import UserError, one_line

COMMANDS = ("new", "check", "models", "demo", "train", "runs", "inspect", "chat", "merge", "export", "pull", "preview",
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


def console(stderr: bool = False) -> Any:
    """A rich console that never reads markup from text: names, paths, roles and dataset
    content are the user's and print as they are ("[/x]" in a project name is text). Style
    with rich.text.Text, not markup strings."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False, emoji=False)


def fail(message: str) -> int:
    print(f"tunedeck: error: {' '.join(message.split())}", file=sys.stderr)
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
    return guarded(lambda: int(module.run(args) or 0))


def guarded(work: Callable[[], int]) -> int:
    """Run a command: bad input (UserError) is one line and exit 2; Ctrl-C is 130; a reader
    that went away (``| head``) ends it quietly; anything else is a bug, told in one line with
    the crash log that holds its traceback (exit 1). Never a traceback on screen."""
    try:
        code = work()
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return code
    except UserError as exc:
        return fail(exc.message)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:  # stdout's reader is gone: flushing it again at exit must not raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except RecursionError as exc:  # deep input that no reader caught: still the user's input
        return fail(one_line(exc) if str(exc) else "the input is nested too deeply to read")
    except Exception as exc:  # noqa: BLE001 - the one place that catches what is not the user's
        log = crash_log(exc)
        print(f"tunedeck: internal error: {one_line(exc)} (a bug; the traceback is in {log})", file=sys.stderr)
        return 1


def crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to the user cache; returns where."""
    import time
    import traceback

    from .paths import cache_dir

    text = "".join(traceback.format_exception(exc))
    try:
        folder = cache_dir() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(f"tunedeck {__version__}: {' '.join(sys.argv)}\n\n{text}", encoding="utf-8")
        return str(path)
    except OSError:
        return "(no crash log: the cache folder is not writable)"


def _open_app(args_list: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunedeck", description="Open the tunedeck app.")
    parser.add_argument("project", nargs="?", help="project file (project.toml) to open")
    args = parser.parse_args(args_list)
    return guarded(lambda: open_app(args.project))


def open_app(project: str | None, attach: str | os.PathLike[str] | None = None) -> int:
    """Open the TUI on ``project`` (on the Train screen following the run folder ``attach``,
    when given); its exit code. The one place the library reaches into the tui package
    (``tunedeck [PROJECT]``, ``tunedeck demo`` and ``tunedeck attach`` come through here);
    tests/test_packaging.py holds it so."""
    try:
        from tunedeck.tui.app import run_app
    except ImportError as exc:  # pragma: no cover - a broken install
        raise UserError(f"the app cannot start ({exc})") from exc
    return int(run_app(project, attach=attach) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
