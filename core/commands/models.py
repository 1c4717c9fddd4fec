"""`tunedeck models [--json] [PATH ...]`: list the models found on this machine.

The bundled default, folders named in the user config (``model_dirs``), paths given
here, and the local Hugging Face cache. Reads config files and headers only; offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models found on this machine", description=__doc__)
    p.add_argument("paths", nargs="*", help="extra model folders, .gguf files or folders holding them")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from ..models import list_models

    infos = list_models([Path(p) for p in args.paths])
    if args.json:
        json.dump([i.as_dict() for i in infos], sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", title="models")
    for col in ("source", "architecture", "params", "layers", "hidden", "context", "dtype", "size", "chat"):
        table.add_column(col, overflow="fold")
    for i in infos:
        if i.error:
            table.add_row(i.source, f"[red]{i.error}[/]", "", "", "", "", "", "", "")
            continue
        table.add_row(
            i.source, i.architecture, _count(i.params), str(i.layers or "?"), str(i.hidden_size or "?"),
            str(i.context_length or "?"), i.dtype + (f" ({i.quantized})" if i.quantized else ""),
            _size(i.size_bytes), "yes" if i.chat_template else "no",
        )
    Console().print(table)
    return 0


def _count(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"
