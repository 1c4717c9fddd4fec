"""The dataset preview's first row against the whole set's stats, on a 20,000-row JSONL file.

A project with the bundled model and a generated file of short conversations; the
tokenizer is loaded first (the engine keeps it), so the times are the preview itself; each
is the median of --repeats runs. The first row reads only the start of the file, so it
should cost a small fraction of the stats, which read and render every row: the goal is a
ratio (first row / stats) well under 1%.

    python bench/bench_preview.py [--rows 20000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tunedeck.core.preview import preview_row, preview_stats, project_tokenizer
    from tunedeck.core.project import Project

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for i in range(args.rows):
                fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} squared?"},
                                                  {"role": "assistant", "content": f"It is {i * i}."}]}) + "\n")
        project = Project.new("bench", source="default")
        project.set("dataset.path", str(data))
        tokenizer = project_tokenizer(project)  # warm up: the engine keeps it
        first, _ = timed(lambda: preview_row(project, tokenizer=tokenizer), args.repeats)
        last, _ = timed(lambda: preview_row(project, row=args.rows, tokenizer=tokenizer), args.repeats)
        stats_t, stats = timed(lambda: preview_stats(project, tokenizer=tokenizer), max(1, args.repeats // 2))
    results = {"rows": stats["rows"], "first_row_s": round(first, 4), "last_row_s": round(last, 4),
               "stats_s": round(stats_t, 3), "first_over_stats": round(first / stats_t, 5)}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['rows']:,} rows: first row {first * 1000:.1f} ms, last row {last * 1000:.1f} ms, "
          f"whole-set stats {stats_t:.2f} s; first row / stats = {results['first_over_stats']:.2%}")


if __name__ == "__main__":
    main()
