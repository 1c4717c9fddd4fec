"""`tunedeck inspect MODEL_OR_PROJECT [--targets ...|--preset ...] [--r N] [--json]`: the layers LoRA can wrap.

MODEL is "default", a model folder (config.json is enough: no weights are read), a
config.json, a .gguf file or a repo id in the local Hugging Face cache; a project .toml
uses its model, its [lora] settings and its target_modules. The model is built on the
meta device, so a 70B config inspects in seconds.

Prints the layer groups, the chosen targets, the trainable parameters (what peft reports
after wrapping), the adapter's size and the estimated peak training memory on this
machine, in GiB, at the dataset's longest row (up to max_length) once its rows are
tokenized. --targets takes comma-separated names (q_proj,v_proj), "all-linear", or a regex
(anything with one of \\ * + ? ( ) [ ] { } | ^ $); without it: the project's
target_modules, else peft's default for the architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import add_set_option
from ..errors import UserError
from ..inspect import PRESETS

REGEX_CHARS = set("\\*+?()[]{}|^$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the layers LoRA can wrap and what a choice of targets trains",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_PROJECT",
                   help='"default", a model folder, config.json, .gguf file, repo id, or a project .toml')
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--targets", metavar="a,b|all-linear|REGEX", help="target_modules to count")
    pick.add_argument("--preset", choices=PRESETS,
                      help="pick a preset and print the target_modules that selects it")
    p.add_argument("--r", type=int, metavar="N", help="LoRA rank (default: the project's, else 16)")
    add_set_option(p)
    p.add_argument("--layers", action="store_true", help="list every layer, not only the groups")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def parse_targets(text: str) -> str | list[str]:
    """--targets: "all-linear", a regex (has a regex metacharacter), or comma-separated names."""
    text = text.strip()
    if text.lower() == "all-linear":
        return "all-linear"
    if REGEX_CHARS.intersection(text):
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--targets is empty; give names (q_proj,v_proj), all-linear or a regex")
    return names


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `inspect` reports, as a dict; raises UserError on bad input."""
    from ..inspect import inspect_project, project_report
    from ..targets import targets_for
    from ..project import Project

    path = Path(args.model)
    is_project = path.suffix == ".toml" and path.is_file()
    if is_project:
        project = Project.load(path)
    else:
        project = Project.new("inspect", source=args.model)
    project.apply_overrides(args.overrides)
    if args.r is not None:
        project.set("lora.r", args.r)
    ins = inspect_project(project)
    targets: str | list[str] | None = None  # None: lora.target_modules
    if args.targets is not None:
        targets, origin = parse_targets(args.targets), "--targets"
    elif args.preset is not None:
        if not ins.presets[args.preset]:
            raise UserError(f"--preset {args.preset}: no such layers in this model; its layers: "
                            + ", ".join(g.name for g in ins.groups))
        targets, origin = targets_for(ins, ins.presets[args.preset]), f"preset {args.preset}"
    elif any(o.partition("=")[0].strip() == "lora.target_modules" for o in args.overrides):
        origin = "--set"
    elif is_project:
        origin = "project"
    else:
        targets = ins.default_targets
        origin = f"peft's default for {ins.model_type}" if ins.peft_default is not None else "all-linear"
    report = project_report(project, targets=targets, inspection=ins)
    if report["errors"]:
        raise UserError(report["errors"][0])
    report["targets_from"] = origin
    if is_project:
        report["project"] = str(project.path)
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    from rich.text import Text

    from ..cli import console as cli_console

    from ..memory import MemoryEstimate
    from ..schema import toml_repr
    from ..units import format_bytes, format_count, format_gib

    console = cli_console()
    m = report["model"]
    console.print(Text.assemble((str(m["source"]), "bold"), f"  {m['architecture']} ({m['model_type']}), "
                                f"{format_count(m['params'], **_PARAMS)} params, {m['num_layers']} layers, "
                                f"hidden {m['hidden_size']}, "
                                f"vocab {m['vocab_size']}"))
    for note in m["notes"]:
        console.print(Text(f"note: {note}", style="dim"))
    rows = report["layers"] if args.layers else report["groups"]
    table = Table(show_header=True, header_style="bold", title="layers" if args.layers else "layer groups")
    table.add_column("layer" if args.layers else "group", overflow="fold")
    columns = ("in", "out", "params", "type", "role", "picked") if args.layers else (
        "count", "in", "out", "params", "type", "role", "picked")
    for col in columns:
        table.add_column(col, justify="right" if col in ("count", "in", "out", "params") else "left")
    for row in rows:
        if args.layers:
            cells = [row["name"]]
            picked = "yes" if row["picked"] else ""
        else:
            cells = [row["name"], str(row["count"])]
            picked = f"{row['picked']}/{row['count']}" if row["picked"] else ""
        cells += [_opt(row["in_features"]), _opt(row["out_features"]), format_count(row["params"], **_PARAMS),
                  row["type"], row["role"], Text(picked, style="green")]
        table.add_row(*cells)
    console.print(table)
    lora = report["lora"]
    console.print(Text.assemble(f"target_modules = {toml_repr(report['targets'])}  ",
                                (f"({report['targets_from']})", "dim")))
    extras = ["use_dora" if lora["use_dora"] else "", f"bias={lora['bias']}" if lora["bias"] != "none" else "",
              f"modules_to_save={toml_repr(lora['modules_to_save'])}" if lora["modules_to_save"] else ""]
    settings = ", ".join(["r=" + str(lora["r"])] + [e for e in extras if e])
    console.print(f"trainable {report['trainable_params']:,} of {report['total_params']:,} params "
                  f"({report['percent']:.3f}%) in {report['target_layers']} layers, {settings}")
    adapter = format_bytes(report["adapter_bytes"], smallest="KiB", specs={"GiB": ".2f"})
    console.print(f"adapter   ~{adapter} (adapter_model.safetensors)")
    mem = report["memory"]
    console.print(Text(f"memory    {MemoryEstimate.from_dict(mem).describe()}"))
    other = "activations_full" if mem["gradient_checkpointing"] else "activations_checkpointed"
    console.print(f"          activations {'without' if mem['gradient_checkpointing'] else 'with'} gradient "
                  f"checkpointing: {format_gib(mem[other])}")
    for warning in report["warnings"]:
        console.print(Text(f"warning: {warning}", style="yellow"))
    return 0


def _opt(n: int | None) -> str:
    return "mixed" if n is None else str(n)


_PARAMS: dict[str, Any] = {"spec": ".1f", "specs": {"B": ".2f"}, "smallest": "K"}  # format_count: 0.5K, 12.3M, 1.24B


