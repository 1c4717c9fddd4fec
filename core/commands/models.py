"""`tunedeck models [--json] [PATH ...]`: list the models found on this machine.

The bundled default, folders named in the user config (``model_dirs``), paths given
here, and the local Hugging Face cache. Reads config files and headers only; offline.
Each model gets an estimate of peak training memory for LoRA (bf16) and QLoRA (4-bit) at
the batch size, max_length, rank and targets of ``--project`` (else the defaults), on a
GPU (gradient checkpointing on, CUDA context included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models found on this machine", description=__doc__)
    p.add_argument("paths", nargs="*", help="extra model folders, .gguf files or folders holding them")
    p.add_argument("--project", metavar="PROJECT.toml", help="estimate memory at this project's settings")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from ..models import list_models

    infos = list_models([Path(p) for p in args.paths])
    settings = _settings(args.project) if args.project else {}
    memory = {i.path: _estimates(i, settings) for i in infos}
    if args.json:
        json.dump([{**i.as_dict(), "memory": memory[i.path]} for i in infos], sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    from rich.text import Text

    from ..cli import console as cli_console

    table = Table(show_header=True, header_style="bold", title="models")
    for col in ("source", "architecture", "params", "layers", "hidden", "context", "dtype", "size", "chat",
                "LoRA bf16", "QLoRA 4bit"):
        table.add_column(col, overflow="fold")
    for i in infos:
        if i.error:
            table.add_row(i.source, Text(i.error, style="red"), "", "", "", "", "", "", "", "", "")
            continue
        table.add_row(
            i.source, i.architecture, _count(i.params), str(i.layers or "?"), str(i.hidden_size or "?"),
            str(i.context_length or "?"), i.dtype + (f" ({i.quantized})" if i.quantized else ""),
            _size(i.size_bytes), "yes" if i.chat_template else "no",
            *(_size(memory[i.path][k]) if memory[i.path].get(k) else "?" for k in ("lora", "qlora")),
        )
    cli_console().print(table)
    return 0


def _settings(project_path: str) -> dict:
    from ..project import Project

    project = Project.load(project_path)
    return {"batch_size": project["training.batch_size"], "max_length": project["dataset.max_length"],
            "r": project["lora.r"], "targets": project["lora.target_modules"]}


def _estimates(info, settings: dict) -> dict[str, int]:
    """Peak-memory estimates in bytes ({} when the config lacks the sizes)."""
    from ..memory import estimate_for_model

    if info.error:
        return {}
    try:
        found = estimate_for_model(info, **settings)
    except (ValueError, OSError, KeyError, TypeError):
        return {}
    return {k: int(v.total) for k, v in found.items()}


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
