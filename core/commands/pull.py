"""`tunedeck pull REPO_ID [--revision R] [--allow-pickle] [--json]`, `tunedeck pull --dataset REPO_ID`: download from
the Hugging Face Hub, once.

A model: its safetensors weights, config, tokenizer files and chat template (never .bin or
.pt pickle weights unless --allow-pickle, and only for a repo without safetensors), into
the Hugging Face cache; then `model.source = "REPO_ID"` uses it offline. A dataset: its
data files (JSONL, JSON, CSV, Parquet, Arrow); then `dataset.path = "REPO_ID"` (with
`split` / `config` in a source table when it has several) previews and trains offline.
Prints what it fetches and the space it needs against the space free, then progress per
file and in total. Ctrl-C stops it; pulling again resumes where it stopped. Refused in
one line (exit 2): a repo that does not exist, a gated or private repo without access
(HF_TOKEN, or the token `hf auth login` saved), no network, pickle-only weights, an
architecture transformers does not know, not enough disk space.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..units import format_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a model (or --dataset) from the Hugging Face Hub into its cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="REPO_ID", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--revision", default=None, metavar="R", help="a branch, tag or commit (default: main)")
    p.add_argument("--dataset", action="store_true", help="REPO_ID is a dataset")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .bin/.pt weights when the repo has no safetensors (they can run code when loaded)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _size(n: int) -> str:
    """Pull's style: MiB below 1 GiB ("988.0 MiB"), then GiB with two decimals ("2.30 GiB")."""
    return format_bytes(n, smallest="MiB", spec=",.1f", specs={"GiB": ",.2f"})


def run(args: argparse.Namespace) -> int:
    import threading

    from ..hub import plan_pull, pull

    plan = plan_pull(args.repo, args.revision, dataset=args.dataset, allow_pickle=args.allow_pickle)
    err = sys.stderr
    if not args.json:
        fetch = plan["total"] - plan["cached"]
        print(f"{plan['repo']} ({plan['kind']}, {plan['revision'][:12]}): {len(plan['files'])} files, "
              f"{_size(plan['total'])}" + (f" ({_size(plan['cached'])} already here)" if plan["cached"] else "")
              + f"; {_size(fetch)} to fetch, {_size(plan['free'])} free", file=err, flush=True)
        if plan["skipped"]:
            print(f"left out: {', '.join(plan['skipped'][:6])}{' …' if len(plan['skipped']) > 6 else ''}", file=err)
    cancel = threading.Event()
    shown = {"file": None, "tenth": -1}

    def progress(p: dict) -> None:
        if args.json or not p.get("file"):
            return
        total = p["file_total"] or 0
        tenth = 10 * p["file_done"] // total if total else 0
        if p["file"] != shown["file"] or tenth != shown["tenth"]:
            shown.update(file=p["file"], tenth=tenth)
            overall = 100 * p["done"] // p["total"] if p["total"] else 100
            print(f"  {p['file']}: {_size(p['file_done'])} of {_size(total)} · {overall}% in all "
                  f"({p['files_done'] + 1}/{p['files_total']} files)", file=err, flush=True)

    try:
        result = pull(args.repo, args.revision, dataset=args.dataset, allow_pickle=args.allow_pickle,
                      progress=progress, cancel=cancel)
    except KeyboardInterrupt:
        print(f"{args.repo}: download stopped; pull again to resume where it stopped", file=err)
        return 130
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    key = "dataset.path" if args.dataset else "model.source"
    print(f"{result['repo']}: in {result['path']}; use it offline with {key} = \"{result['source']}\"")
    return 0
