"""`tunedeck new PROJECT.toml [--model SRC] [--dataset PATH]`: write a starter project."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..project import Project


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("new", help="write a starter project file", description=__doc__)
    p.add_argument("project", help="path of the project file to create (e.g. myrun.toml)")
    p.add_argument("--model", default="default", metavar="SRC",
                   help='"default" (bundled SmolLM2-135M-Instruct), a model folder, a .gguf file or a repo id')
    p.add_argument("--dataset", default="", metavar="PATH", help="training data file")
    p.add_argument("--name", default=None, help="project name (default: the file name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def create(path: Path, *, model: str = "default", dataset: str = "", name: str | None = None,
           force: bool = False) -> Project:
    """Write a starter project at ``path`` (model and dataset paths made relative to it)."""
    from ..project import Project

    path = Path(path)
    if path.suffix != ".toml":
        raise UserError(f"{path}: project files end in .toml (e.g. {path.with_suffix('.toml').name})")
    if path.is_symlink():
        raise UserError(f"{path}: a symbolic link{'' if path.exists() else ' to nothing'}; give the path of a new "
                        "project file (nothing is written through a link)")
    if path.is_dir():
        raise UserError(f"{path}: a folder; give the path of a project file inside it, e.g. {path / 'project.toml'}")
    if path.exists() and not force:
        raise UserError(f"{path}: already exists; pick another name or pass --force")
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: not a regular file; pick another name")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{path.absolute().parent}: no such folder; create it first")
    folder = path.resolve().parent
    if dataset:
        ds = Path(dataset).resolve()
        if not ds.exists():
            raise UserError(f"--dataset {dataset}: no such file")
        dataset = os.path.relpath(ds, folder)
    if model != "default" and Path(model).exists():
        model = os.path.relpath(Path(model).resolve(), folder)
    project = Project.new(name or path.stem, source=model, dataset=dataset, path=path)
    project.save()
    return project


def run(args: argparse.Namespace) -> int:
    path = Path(args.project)
    create(path, model=args.model, dataset=args.dataset, name=args.name, force=args.force)
    print(f"wrote {path}; next: tunedeck check {path}")
    return 0
