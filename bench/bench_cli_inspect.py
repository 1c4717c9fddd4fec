"""`tunedeck inspect PROJECT --json` against the imports it needs, in one run.

Two commands are launched alternately as fresh processes: the whole command on the demo
project, and a Python that only imports what the command imports (torch, transformers and
its llama model, peft, bitsandbytes, tunedeck's inspector). The difference of the medians
is the command's own work after start-up: reading the project and the model's config,
building the model on the meta device, listing and counting its layers, estimating memory
and printing the JSON. The goal: well under a second of work, so the command's time is
its imports.

    python bench/bench_cli_inspect.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PYTHON = sys.executable
PROJECT = Path(__file__).resolve().parent.parent / "sample_data" / "demo.toml"
IMPORTS = ("import tunedeck.core.cli, tunedeck.core.commands.inspect, tunedeck.core.inspect, torch, transformers, "
           "peft, bitsandbytes, transformers.models.llama.modeling_llama")


def launch(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    command = [PYTHON, "-m", "tunedeck.core", "inspect", str(PROJECT), "--json"]
    imports = [PYTHON, "-c", IMPORTS]
    launch(command)  # warm the file cache and the kept answers
    launch(imports)
    whole, only_imports = [], []
    for _ in range(args.repeats):
        whole.append(launch(command))
        only_imports.append(launch(imports))
    result = {"inspect_json_s": statistics.median(whole), "imports_s": statistics.median(only_imports)}
    result["work_s"] = result["inspect_json_s"] - result["imports_s"]
    result["ratio"] = result["inspect_json_s"] / result["imports_s"]
    result["goal"] = "work < 0.5 s"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tunedeck inspect --json   {result['inspect_json_s']:6.2f} s (median of {args.repeats})")
        print(f"its imports alone         {result['imports_s']:6.2f} s")
        print(f"work after the imports    {result['work_s']:6.2f} s  (goal < 0.5 s; ratio {result['ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
