"""The dataset preview on a big JSONL file, and rendering a dataset once for training.

Part 1, a big file (default 1 GiB of chat rows, generated in a temp folder) and one ten
times smaller, side by side: the time to the first row (``preview_row`` with the tokenizer
already loaded, as the engine keeps it), the time to the first progress partial of the
whole-set stats and their rows per second (as the engine runs them, writing the render
cache; the pass is stopped after --stats-seconds, 0 reads the whole file), and a full pass of the held-out split (``held_out_positions``: every
row read, no tokenizer). Each is measured in a process of its own forked after the
tokenizer is loaded, sampling its resident memory: the peak over the start (the process
with the tokenizer) is what the work itself took. Flat memory: the big file's peaks are
close to the small file's, not ten times them.

Part 2, a --rows file (default 20,000 short rows): the first row against the whole-set
stats (the first row reads only the start of the file: a ratio well under 1%), and the
render cache: the stats pass without it, writing it, and reading it back; the trainer's
render of the set (``render_splits``) fresh against reading the rows the stats wrote.

    python bench/bench_preview.py [--size-mb 1024] [--stats-seconds 60] [--rows 20000]
                                  [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from timing import timed

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer crosses fork()

WORDS = ("model token gradient layer adapter batch loss epoch rank alpha weight bias matrix vector prompt answer "
         "sequence length memory cache kernel device tensor float integer schedule warmup decay optimizer").split()


def write_chat(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Chat rows (one to three exchanges, about 1 KB a row, each different) up to ``size_bytes``; rows written."""
    rng = random.Random(seed)
    blocks = [json.dumps(" ".join(rng.choices(WORDS, k=rng.randint(20, 90))))[1:-1] for _ in range(997)]
    written = rows = 0
    with open(path, "w", encoding="utf-8", buffering=8 << 20) as fh:
        lines: list[str] = []
        while written < size_bytes:
            turns = []
            for t in range(1 + rows % 3):
                q, a = blocks[(rows * 7 + t) % 997], blocks[(rows * 13 + 5 * t + 1) % 997]
                turns.append(f'{{"role": "user", "content": "Question {rows}.{t}: {q}"}}, '
                             f'{{"role": "assistant", "content": "Answer {rows}.{t}: {a} {a}"}}')
            line = '{"messages": [' + ", ".join(turns) + "]}\n"
            lines.append(line)
            written += len(line)
            rows += 1
            if len(lines) >= 4096:
                fh.write("".join(lines))
                lines.clear()
        fh.write("".join(lines))
    return rows


def write_short(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} squared?"},
                                              {"role": "assistant", "content": f"It is {i * i}."}]}) + "\n")


class Sampler:
    """This process's resident memory, sampled every few milliseconds: the start and the peak."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.start_rss = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` in a forked process (a fresh heap over the parent's), with its memory peak."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def target() -> None:
        sampler = Sampler()
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{exc.__class__.__name__}: {exc}"}
        sampler.stop()
        out.update(rss_start_mb=sampler.start_rss / 2**20, rss_peak_mb=sampler.peak / 2**20,
                   rss_growth_mb=(sampler.peak - sampler.start_rss) / 2**20)
        send.send(out)

    child = ctx.Process(target=target)
    child.start()
    out = receive.recv()
    child.join()
    if "error" in out:
        raise SystemExit(f"benchmark step failed: {out['error']}")
    return out


def big_file_steps(project: Any, tokenizer: Any, repeats: int, stats_seconds: float) -> dict[str, Any]:
    from tunedeck.core.preview import held_out_positions, preview_row, preview_stats

    def first_row() -> dict[str, Any]:
        t, row = timed(lambda: preview_row(project, tokenizer=tokenizer), repeats)
        return {"seconds": t, "tokens": len(row["tokens"])}

    def stats() -> dict[str, Any]:
        cancel = threading.Event()
        start = time.perf_counter()
        first: list[float] = []

        def progress(partial: dict[str, Any]) -> None:
            if not first:
                first.append(time.perf_counter() - start)
            if stats_seconds and time.perf_counter() - start >= stats_seconds:
                cancel.set()

        # as the engine runs it: the rows rendered are added to the render cache as the pass goes
        result = preview_stats(project, tokenizer=tokenizer, progress=progress, cancel=cancel, cache=True)
        seconds = time.perf_counter() - start
        return {"first_partial_s": first[0] if first else None, "rows": result["rows"], "seconds": seconds,
                "rows_per_s": result["rows"] / seconds, "done": result["done"]}

    def held() -> dict[str, Any]:
        start = time.perf_counter()
        answer = held_out_positions(project, start=0, stop=100)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "rows": answer["rows"], "rows_per_s": answer["rows"] / seconds,
                "eval_rows": answer["eval_rows"]}

    # the held-out split first: a finished stats pass keeps it, and it would be read back
    return {"first_row": in_child(first_row), "held_out": in_child(held), "stats": in_child(stats)}


def cache_steps(project: Any, tokenizer: Any, repeats: int) -> dict[str, Any]:
    from tunedeck.core.datafile import load_splits
    from tunedeck.core.preview import preview_row, preview_stats
    from tunedeck.core.render import render_splits
    from tunedeck.core.rendercache import RowCache, cache_path

    with open(project.resolve_path(project["dataset.path"]), encoding="utf-8") as fh:
        rows = sum(1 for _ in fh)
    first, _ = timed(lambda: preview_row(project, tokenizer=tokenizer), repeats)
    last, _ = timed(lambda: preview_row(project, row=rows, tokenizer=tokenizer), repeats)
    plain, stats = timed(lambda: preview_stats(project, tokenizer=tokenizer, cache=False), 1)
    path = cache_path(project)
    path.unlink(missing_ok=True)
    writing, written = timed(lambda: preview_stats(project, tokenizer=tokenizer, cache=True), 1)
    reading, read = timed(lambda: preview_stats(project, tokenizer=tokenizer, cache=True), 1)
    assert stats == written == read, "the stats differ with the cache"
    splits = load_splits(project)
    fresh_t, fresh = timed(lambda: render_splits(project, tokenizer, splits, model_label="m"), 1)

    def cached_render() -> Any:
        cache = RowCache(path, repeats=True)
        out = render_splits(project, tokenizer, splits, model_label="m", cache=cache)
        assert cache.read and not cache.rendered, "the trainer's render did not read the cache"
        return out

    cached_t, cached = timed(cached_render, 1)
    assert cached.train == fresh.train and cached.eval == fresh.eval, "the cached rows differ"
    return {"rows": stats["rows"], "first_row_s": first, "last_row_s": last, "stats_s": plain,
            "first_over_stats": first / plain, "stats_writing_cache_s": writing, "stats_from_cache_s": reading,
            "train_render_fresh_s": fresh_t, "train_render_from_cache_s": cached_t,
            "cache_file_mb": path.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="the big file's size (the small one: a tenth)")
    parser.add_argument("--stats-seconds", type=float, default=60,
                        help="stop the big files' stats pass after this long (0: read the whole file)")
    parser.add_argument("--rows", type=int, default=20000, help="rows of the render-cache comparison's file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-preview-") as tmp:
        folder = Path(tmp)
        from tunedeck.core.models import ensure_default_model

        model = ensure_default_model()  # from the user's cache, before the cache moves to the temp folder
        os.environ["TUNEDECK_CACHE_DIR"] = str(folder / "cache")  # this run's render caches and held-out splits
        from tunedeck.core.preview import project_tokenizer
        from tunedeck.core.project import Project

        def project_for(path: Path) -> Any:
            project = Project.new("bench", source=str(model))
            project.set("dataset.path", str(path))
            project.set("dataset.eval_split", 0.05)
            return project

        sizes = {"big": int(args.size_mb * 2**20), "small": int(args.size_mb * 2**20 / 10)}
        results: dict[str, Any] = {"size_mb": args.size_mb, "stats_seconds": args.stats_seconds}
        files: dict[str, Any] = {}
        for name, size in sizes.items():
            path = folder / f"{name}.jsonl"
            start = time.perf_counter()
            rows = write_chat(path, size)
            files[name] = {"path": path, "rows": rows, "mb": path.stat().st_size / 2**20,
                           "written_s": time.perf_counter() - start}
        tokenizer = project_tokenizer(project_for(files["big"]["path"]))  # loaded once, as the engine keeps it
        for name in sizes:
            project = project_for(files[name]["path"])
            steps = big_file_steps(project, tokenizer, args.repeats, args.stats_seconds)
            results[name] = {"rows": files[name]["rows"], "mb": round(files[name]["mb"], 1), **steps}
        short = folder / "short.jsonl"
        write_short(short, args.rows)
        results["cache"] = cache_steps(project_for(short), tokenizer, args.repeats)

    big, small = results["big"], results["small"]
    for step in ("first_row", "stats", "held_out"):
        results[f"{step}_growth_big_over_small"] = (big[step]["rss_growth_mb"] / small[step]["rss_growth_mb"]
                                                    if small[step]["rss_growth_mb"] > 0.5 else None)
    if args.json:
        print(json.dumps(results, default=float))
        return
    report(results)


def report(r: dict[str, Any]) -> None:
    big, small, cache = r["big"], r["small"], r["cache"]

    def first_partial(step: dict[str, Any]) -> str:
        seconds = step["first_partial_s"]
        return f"{seconds:.2f} s" if seconds is not None else "none (done sooner)"

    def passed(step: dict[str, Any]) -> str:
        return f"{step['rows_per_s']:,.0f} ({step['rows']:,} rows{'' if step['done'] else ', stopped'})"

    def mem(step: dict[str, Any]) -> str:
        return f"+{step['rss_growth_mb']:.0f} MB (peak {step['rss_peak_mb']:.0f} / start {step['rss_start_mb']:.0f})"

    rows = [
        ("file", f"{big['mb']:.0f} MB, {big['rows']:,} rows", f"{small['mb']:.0f} MB, {small['rows']:,} rows"),
        ("first row", f"{big['first_row']['seconds'] * 1000:.0f} ms", f"{small['first_row']['seconds'] * 1000:.0f} ms"),
        ("  memory", mem(big["first_row"]), mem(small["first_row"])),
        ("stats: first partial", first_partial(big["stats"]), first_partial(small["stats"])),
        ("stats: rows/s", passed(big["stats"]), passed(small["stats"])),
        ("  memory", mem(big["stats"]), mem(small["stats"])),
        ("held-out split (all rows)", f"{big['held_out']['seconds']:.1f} s, {big['held_out']['rows_per_s']:,.0f} rows/s",
         f"{small['held_out']['seconds']:.1f} s, {small['held_out']['rows_per_s']:,.0f} rows/s"),
        ("  memory", mem(big["held_out"]), mem(small["held_out"])),
    ]
    width = max(len(a) for a, _, _ in rows) + 2
    col = max(len(b) for _, b, _ in rows) + 2
    print(f"{'':{width}}{'big file':{col}}small file (a tenth)")
    for a, b, c in rows:
        print(f"{a:{width}}{b:{col}}{c}")
    growth = ", ".join(f"{s.replace('_', ' ')} {r[f'{s}_growth_big_over_small']:.2f}x"
                       if r[f"{s}_growth_big_over_small"] is not None else f"{s.replace('_', ' ')} (under 0.5 MB)"
                       for s in ("first_row", "stats", "held_out"))
    print(f"memory growth, big over small file: {growth}")
    print()
    print(f"{cache['rows']:,} short rows: first row {cache['first_row_s'] * 1000:.1f} ms, last row "
          f"{cache['last_row_s'] * 1000:.1f} ms, whole-set stats {cache['stats_s']:.2f} s; "
          f"first row / stats = {cache['first_over_stats']:.2%}")
    print(f"  stats writing the render cache {cache['stats_writing_cache_s']:.2f} s "
          f"({cache['stats_writing_cache_s'] / cache['stats_s']:.2f}x the plain pass), reading it "
          f"{cache['stats_from_cache_s']:.2f} s ({cache['stats_s'] / cache['stats_from_cache_s']:.1f}x faster); "
          f"file {cache['cache_file_mb']:.1f} MB")
    print(f"  the trainer's render: fresh {cache['train_render_fresh_s']:.2f} s, from the cache "
          f"{cache['train_render_from_cache_s']:.2f} s "
          f"({cache['train_render_fresh_s'] / cache['train_render_from_cache_s']:.1f}x faster)")


if __name__ == "__main__":
    sys.exit(main())
