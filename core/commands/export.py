"""`tunedeck export RUN --gguf --out DIR [--quant f16|bf16|q8_0|q4_0|q5_0|q4_k_m ...] [--lora]`: a run for llama.cpp,
Ollama and LM Studio.

Merges the run's adapter into its base and writes one GGUF file (the architecture's
hyperparameters, the tensors under their GGUF names, the tokenizer, the chat template the
run trained with and its stop tokens), an Ollama Modelfile next to it, and prints the
`ollama create`, `llama-cli` and `lms import` commands. --lora also writes the adapter alone
as a GGUF LoRA (llama.cpp's --lora). f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 and q5_1 are
written here; the k-quants (q4_k_m, q5_k_m, q6_k ...) by llama.cpp's quantizer where
llama-cpp-python is installed. What cannot be exported (an architecture, a rope scaling or
a tokenizer this writer does not know, a quantization it cannot write) is refused in one
line before any work. --out must be a new or empty folder. Ctrl-C cancels; nothing
half-written is left.

RUN is a run folder (runs/NAME) or a run's name in the runs folder of --project (default: ./runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..units import format_in


def register(sub: argparse._SubParsersAction) -> None:
    from ..export import QUANTS

    p = sub.add_parser("export", help="a run as GGUF for llama.cpp, Ollama and LM Studio, with a Modelfile",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder, or a run name in the project's runs folder")
    p.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the one format exported)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write (a new or empty folder)")
    p.add_argument("--quant", default="f16", choices=QUANTS, metavar="TYPE",
                   help=f"the weights' type: {', '.join(QUANTS)} (default f16)")
    p.add_argument("--lora", action="store_true", help="also write the adapter alone as a GGUF LoRA")
    p.add_argument("--cpu", action="store_true", help="merge on the CPU even with a GPU")
    p.add_argument("--project", default=None, metavar="PROJECT",
                   help="the project whose runs folder holds RUN (default: ./runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    import threading

    from ..chat import run_folder
    from ..export import check_request, export_run
    from ..quiet import library_output
    from .chat import runs_dir_for

    run_dir = run_folder(args.run, runs_dir_for(args.project))
    out = Path(args.out).expanduser()
    check_request(run_dir, out, args.quant)  # every refusal, before loading anything
    log = run_dir / "export.log"
    cancel = threading.Event()
    with library_output(log) as (_, err):  # loading bars and kernel notices go to the log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        shown: dict[str, object] = {}

        def progress(p: dict) -> None:
            if args.json:
                return
            if p["stage"] == "convert" and p["total"]:  # one line per tenth of the tensors
                tenth = 10 * p["done"] // p["total"]
                if shown.get("convert") == tenth:
                    return
                shown["convert"] = tenth
                print(f"convert: {p['done']}/{p['total']} tensors", file=err, flush=True)
                return
            print(f"{p['stage']}: {p['message']}", file=err, flush=True)

        try:
            result = export_run(run_dir, out, quant=args.quant, lora=args.lora, cpu=args.cpu, progress=progress,
                                cancel=cancel)
        except KeyboardInterrupt:
            cancel.set()
            print("export cancelled; nothing was written", file=err, flush=True)
            return 130
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    size = format_in(result["size"], "MiB", ",.1f")
    print(f"{result['gguf']}: {run_dir.name} as {result['arch']} GGUF, {result['quant']}, {size} "
          f"(library output: {log})")
    if result["lora"]:
        print(f"{result['lora']}: the adapter alone, for llama.cpp's --lora")
    print(f"{result['modelfile']}: the Ollama Modelfile")
    if result["pre_tokenizer"] is None:
        print("note: llama.cpp has no name for this tokenizer's splitting rules here; it will use its default")
    print("run it with:")
    for command in result["commands"]:
        print(f"  {command}")
    return 0
