"""`tunedeck check` on the demo project, against starting the command line at all.

The check runs the whole pre-flight of a run (settings, model files, dataset, the target
modules against the model's layers). Its answer about the targets is kept on disk, so
a check of an unchanged project does not import torch to ask again: measured here, the
second check of the demo project against `python -m tunedeck.core --version` (the cost
of starting the command at all), side by side, median of five each. Goal: under 5x.

    python bench/bench_check.py
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 5.0


def timed(args: list[str], cwd: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    return statistics.median(times)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-check-") as tmp:
        folder = Path(tmp)
        for name in ("demo.toml", "python_qa.jsonl"):
            shutil.copy(REPO / "sample_data" / name, folder / name)
        check = [sys.executable, "-m", "tunedeck.core", "check", "demo.toml"]
        first = timed(check, folder, repeats=1)
        warm = timed(check, folder)
        start_only = timed([sys.executable, "-m", "tunedeck.core", "--version"], folder)
    ratio = warm / start_only
    result = {"benchmark": "check", "first_s": first, "warm_s": warm, "start_s": start_only, "ratio": ratio,
              "goal": GOAL, "time": time.time()}
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"RESULT check of the demo project: {warm:.2f} s warm ({first:.2f} s the first time), {ratio:.1f}x "
          f"starting the command ({start_only:.2f} s) (goal < {GOAL:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
