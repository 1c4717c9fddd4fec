"""`tunedeck check PROJECT.toml [--set key=value ...] [--json]`: validate a project.

Runs the pre-flight of a run (the schema, the settings against this machine, the model's
files, the dataset, the target modules against the model's layers) and prints the resolved
settings ("auto" made concrete for this machine). Exit 0 when the project can train, 2
when not: `tunedeck train` refuses exactly what this refuses.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import add_set_option
from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a project and print its resolved settings", description=__doc__)
    p.add_argument("project", help="project file")
    add_set_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--params", action="store_true",
                   help="also print the trainable parameters, as peft will count them")


def collect(project_path: str, overrides: list[str], params: bool = False) -> dict[str, Any]:
    """Everything `check` reports, as a dict; raises UserError on the first problem."""
    from ..preflight import preflight
    from ..models import describe
    from ..project import Project

    project = Project.load(project_path)
    project.apply_overrides(overrides)
    found = preflight(project)  # the same checks a run makes before it starts
    ref, resolved, splits = found.ref, found.resolved, found.splits
    model = describe(ref)
    if model.error:
        raise UserError(f"model {ref.display}: {model.error}")
    summary = splits.summary
    if splits.eval_path is not None:
        eval_info: dict[str, Any] = {"path": str(splits.eval_path), "rows": len(splits.eval)}
    else:
        eval_info = {"ratio": project["dataset.eval_split"], "rows": len(splits.eval)}
    sources = {f"{s}.{k}": project.source_of(f"{s}.{k}") for s, vals in project.as_dict().items()
               if isinstance(vals, dict) for k in vals}
    report: dict[str, Any] = {
        "project": str(project.path),
        "name": project.name,
        "model": {"source": project["model.source"], "kind": ref.kind, "path": str(ref.path),
                  "architecture": model.architecture, "params": model.params, "dtype": model.dtype,
                  "chat_template": model.chat_template, "note": model.note},
        "dataset": {"path": summary.path, "format": summary.format, "rows": summary.rows,
                    "usable": summary.good, "skipped": [{"row": e.row, "reason": e.reason} for e in summary.skipped],
                    "trailing_question_dropped": summary.trimmed,
                    "sources": [info.as_dict() for info in splits.sources],
                    "eval": eval_info},
        "resolved": resolved.as_dict(),
        "settings": project.as_dict(),
        "sources": sources,
    }
    if params and found.counts is not None:
        report.update(found.counts)
    return report


def run(args: argparse.Namespace) -> int:
    report = collect(args.project, args.overrides, params=args.params)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
        return 0
    from rich.text import Text

    from ..cli import console as cli_console
    from rich.table import Table

    console = cli_console()
    m, d, r = report["model"], report["dataset"], report["resolved"]
    console.print(Text.assemble((report["name"], "bold"), f"  {report['project']}"))
    params = f"{m['params'] / 1e6:,.1f}M params" if m["params"] else "params unknown"
    console.print(f"model    {m['source']}: {m['architecture']}, {params}, {m['dtype']}"
                  + (f" ({m['note']})" if m["note"] else ""))
    console.print(f"dataset  {d['path']}: {d['format']}, {d['usable']} rows"
                  + (f", {len(d['skipped'])} skipped" if d["skipped"] else ""))
    if len(d.get("sources") or []) > 1:
        for src in d["sources"]:
            console.print(f"         {src['path']}: {src['usable']} of {src['rows']} rows ({src['format']}), "
                          f"weight {src['weight']:g}, {100 * src['share']:.1f}% of the training mix")
    for e in d["skipped"][:5]:
        console.print(Text(f"         row {e['row']}: {e['reason']}", style="yellow"))
    if len(d["skipped"]) > 5:
        console.print(Text(f"         ... and {len(d['skipped']) - 5} more", style="yellow"))
    table = Table(title="resolved settings", show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("value")
    table.add_column("from")
    auto = {"training.precision": r["precision"], "training.gradient_checkpointing": r["gradient_checkpointing"],
            "quantization.compute_dtype": r["compute_dtype"], "training.devices": f"{r['processes']} process(es)",
            "training.kernels": r.get("kernels", "none")}
    overridden = {o.partition("=")[0].strip() for o in args.overrides}
    for section, values in report["settings"].items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            full = f"{section}.{key}"
            origin = "--set" if full in overridden else report["sources"][full]
            shown = json.dumps(value) if not isinstance(value, str) else value
            if full in auto and value == "auto":
                shown = f"auto -> {auto[full]}"
            table.add_row(full, shown, origin)
    console.print(table)
    processes = f"; {r['processes']} processes (data parallel)" if r.get("processes", 1) > 1 else ""
    console.print(f"device   {r['hardware']}{processes}; effective batch {r['effective_batch']}")
    if r.get("precision_reason"):
        console.print(f"precision {r['precision']}: {r['precision_reason']}")
    if "trainable_params" in report:
        console.print(f"lora     {report['trainable_params']:,} trainable of {report['total_params']:,} params "
                      f"in {report['target_layers']} layers")
    if d.get("trailing_question_dropped"):
        dropped = d["trailing_question_dropped"]
        console.print(Text(f"         {len(dropped)} row(s) end with a question after the last answer: it is "
                           f"dropped, the rest trains (first: row {dropped[0]})", style="yellow"))
    console.print(Text.assemble(("ok", "green"), ": the project is valid"))
    return 0
