"""`tunedeck models [--json] [--project PROJECT.toml] [PATH ...]`: list the models found on this machine.

The bundled default, folders named in the user config (``model_dirs``), paths given
here, and the local Hugging Face cache. Reads config files and headers only; offline.
Each model gets an estimate of peak training memory, in GiB, for LoRA and QLoRA. With
``--project``: at that project's settings as resolved for this machine (precision, batch
size, max_length, rank, targets, gradient checkpointing), the estimate `tunedeck inspect`
and the app show, at the dataset's longest row (its rows are tokenized once, then kept).
Without: a generic LoRA bf16 / QLoRA 4-bit on a GPU at batch 4 x 1024 tokens, r 16 on all
linear layers, with gradient checkpointing (CUDA context included).

``--search TEXT`` asks the Hugging Face Hub instead (the one time this command uses the
network): text-generation models matching TEXT, most downloaded first, with downloads,
size, gated and license; ``tunedeck pull REPO_ID`` then downloads one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models found on this machine", description=__doc__)
    p.add_argument("paths", nargs="*", help="extra model folders, .gguf files or folders holding them")
    p.add_argument("--project", metavar="PROJECT.toml", help="estimate memory at this project's settings")
    p.add_argument("--search", metavar="TEXT", help="search the Hugging Face Hub for text-generation models")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="with --search: at most N models (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.search is not None:
        return _search(args)
    from ..memory import longest_row
    from ..models import list_models
    from ..project import Project

    project = Project.load(args.project) if args.project else None
    infos = list_models([Path(p) for p in args.paths])
    longest = longest_row(project) if project is not None else None
    found = {i.path: _estimates(i, project, longest) for i in infos}
    memory = {path: {k: v["total"] for k, v in est.items()} for path, est in found.items()}
    if args.json:
        json.dump([{**i.as_dict(), "memory": memory[i.path], "memory_estimates": found[i.path]} for i in infos],
                  sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    from rich.text import Text

    from ..cli import console as cli_console
    from ..memory import MemoryEstimate
    from ..units import format_bytes, format_count, format_gib

    first = next((est for est in found.values() if est), None)
    lora_head, qlora_head = "LoRA bf16", "QLoRA 4bit"
    if first:
        lora, qlora = MemoryEstimate.from_dict(first["lora"]), MemoryEstimate.from_dict(first["qlora"])
        lora_head, qlora_head = f"LoRA {lora.precision}", f"QLoRA {qlora.mode} {qlora.precision}"
    table = Table(show_header=True, header_style="bold", title="models")
    for col in ("source", "architecture", "params", "layers", "hidden", "context", "dtype", "size", "chat",
                lora_head, qlora_head):
        table.add_column(col, overflow="fold")
    for i in infos:
        if i.error:
            table.add_row(i.source, Text(i.error, style="red"), "", "", "", "", "", "", "", "", "")
            continue
        params = format_count(i.params, spec=".1f", specs={"B": ".2f"}, smallest="M") if i.params else "?"
        table.add_row(
            i.source, i.architecture, params, str(i.layers or "?"), str(i.hidden_size or "?"),
            str(i.context_length or "?"), i.dtype + (f" ({i.quantized})" if i.quantized else ""),
            format_bytes(i.size_bytes, largest="TiB"), "yes" if i.chat_template else "no",
            *(format_gib(memory[i.path][k]) if memory[i.path].get(k) else "?" for k in ("lora", "qlora")),
        )
    console = cli_console()
    console.print(table)
    if first:
        est = MemoryEstimate.from_dict(first["lora"])
        gc = "with" if est.gradient_checkpointing else "without"
        whose = f"{args.project}'s settings" if project is not None else "generic settings"
        console.print(Text(f"memory: estimated peak of training, in GiB, at {whose}: {est.tokens_text()}, on "
                           f"{est.device}, {gc} gradient checkpointing"))
    return 0


def _estimates(info: Any, project: Any, longest: int | None) -> dict[str, dict[str, Any]]:
    """The LoRA and QLoRA estimates of a model (MemoryEstimate.as_dict()s; {} when its config
    lacks the sizes or the project's settings cannot resolve here)."""
    from ..errors import UserError
    from ..memory import estimate_for_model

    if info.error:
        return {}
    try:
        found = estimate_for_model(info, project, longest_row=longest)
    except (ValueError, OSError, KeyError, TypeError, UserError):
        return {}
    return {k: v.as_dict() for k, v in found.items()}


def _search(args: argparse.Namespace) -> int:
    from ..hub import search_models

    found = search_models(args.search, limit=max(1, min(args.limit, 100)))
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    from rich.text import Text

    from ..cli import console as cli_console
    from ..units import format_bytes

    console = cli_console()
    if not found:
        console.print(Text(f"no text-generation model on the Hub matches {args.search!r}"))
        return 0
    table = Table(show_header=True, header_style="bold", title=f"Hub models matching {args.search!r}")
    for col in ("repo", "downloads", "size", "gated", "license"):
        table.add_column(col, overflow="fold")
    for m in found:
        size = m["size"]
        shown = "-" if not size else format_bytes(size, smallest="MiB", spec=",.0f", specs={"GiB": ",.2f"})
        table.add_row(Text(m["id"]), f"{m['downloads']:,}" if isinstance(m["downloads"], int) else "-", shown,
                      "yes" if m["gated"] else "no", Text(m["license"] or "-"))
    console.print(table)
    console.print(Text("download one with: tunedeck pull REPO_ID", style="dim"))
    return 0
