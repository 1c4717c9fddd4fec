"""`tunedeck demo [DIR] [--no-open]`: copy the demo project and its datasets to DIR and open it.

The demo ships inside the package (tunedeck.sample_data); a copy keeps runs and edits out
of the installed package. DIR defaults to ./tunedeck-demo; an existing copy is reused.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

from ..errors import UserError

DEMO_FILES = ("demo.toml", "python_qa.jsonl", "python_qa_alpaca.jsonl", "python_qa_sharegpt.jsonl", "README.md")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="copy the demo project to a folder and open it", description=__doc__)
    p.add_argument("dir", nargs="?", default="tunedeck-demo", help="where to put the demo (default: ./tunedeck-demo)")
    p.add_argument("--no-open", action="store_true", help="only copy the files")


def copy_demo(folder: Path) -> Path:
    """Copy the demo files into ``folder`` (existing files are kept); return the project path."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    source = resources.files("tunedeck.sample_data")
    for name in DEMO_FILES:
        target = folder / name
        if not target.exists():
            with resources.as_file(source / name) as src:
                shutil.copyfile(src, target)
    return folder / "demo.toml"


def run(args: argparse.Namespace) -> int:
    project = copy_demo(Path(args.dir))
    print(f"demo project: {project}")
    if args.no_open:
        return 0
    from ..cli import open_app

    return open_app(str(project))
