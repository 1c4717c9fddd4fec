"""`tunedeck merge RUN --out DIR [--cpu]`: a run's adapter merged into its base model.

Writes a standalone Hugging Face model folder (safetensors, config, tokenizer with the
chat template the run trained with, generation config) that loads with plain
transformers. A QLoRA run is merged into the full-precision base (loaded unquantized),
not the 4-bit one. --out must be a new or empty folder: nothing is overwritten. --cpu
merges on the CPU even when a GPU is there (large models that do not fit it).

RUN is a run folder (runs/NAME) or a run's name in the runs folder of --project
(default: ./runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a run's adapter into its base: a standalone model folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder, or a run name in the project's runs folder")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the model (a new or empty folder)")
    p.add_argument("--cpu", action="store_true", help="merge on the CPU even with a GPU")
    p.add_argument("--project", default=None, metavar="PROJECT",
                   help="the project whose runs folder holds RUN (default: ./runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from ..chat import run_folder
    from ..merge import check_out, merge_run
    from ..quiet import library_output
    from .chat import runs_dir_for

    run_dir = run_folder(args.run, runs_dir_for(args.project))
    out = Path(args.out).expanduser()
    check_out(out)  # before loading anything
    log = run_dir / "merge.log"
    with library_output(log) as (_, err):  # loading bars and kernel notices go to the log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        progress = None if args.json else (lambda message: print(message, file=err, flush=True))
        result = merge_run(run_dir, out, cpu=args.cpu, progress=progress)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"{result['out']}: {result['run']} merged into {result['base']} ({result['params']:,} parameters, "
              f"{result['dtype']}); load it with AutoModelForCausalLM.from_pretrained (library output: {log})")
    return 0
