"""Key-press latency of the Train screen while the followed run reports 0, 1,000 and 10,000 events/s.

The real app runs headless (``App.run_test``) on a small project in a temporary folder, with
a stand-in engine (it answers every request with an error at once: the Train screen needs no
engine) and a fixed machine. The Train screen (key ``5``) follows a scripted run handle: its
``events(timeout)`` returns the events due at the set rate since the previous call (steps,
with an eval, checkpoint, warning and system event mixed in), so the app's own follower
thread folds them into its ``RunView`` and the screen redraws on its own timer, as with a
real trainer. Each condition (idle = the same handle at 0 events/s, then 1k, then 10k
events/s) runs for ``--seconds``; during it ``tab`` and ``shift+tab`` are pressed in turn
every 100 ms (focus moves: the focused widget is drawn differently, so each press changes
the screen).

Latency of one press: from just before the key is sent to the first frame the compositor
hands to the driver after the key was handled. The key is sent as the driver's input thread
sends it (``driver.send_message(events.Key(...))``), not with ``pilot.press``: that one waits
until the process's CPU time stops advancing (``textual._wait.wait_for_idle``), which never
happens while the follower thread folds events, so it would time its own 1 s cap rather than
the app. "Handled" is the screen's ``focused`` reactive changing (watched); "painted" is the
first call after that of ``App._display`` (wrapped here), which is where textual 8.2 delivers
each composed frame (``Screen._compositor.render_update`` → ``App._display``) — the honest
"on screen" moment.
Headless, the driver does not write the frame to a terminal, so the time to encode the
segments as escape codes is not counted (a few ms at 120x40). A frame already painted while
the key was being handled cannot be (the screen only changes once focus has moved).

Also reported: the events the app actually folded per second (``view.events_seen`` over the
condition), and the UI process's resident memory at the start and end of each condition
(the ``RunView`` keeps at most ``2 * POINTS`` points per series and ``LOG_LINES`` log lines,
so memory must not grow with the number of events). tracemalloc is left out on purpose: it
slows every allocation several times and would distort the latencies being measured.

Goal: p99 key latency under 100 ms in every condition; ratios p99(1k)/p99(idle),
p99(10k)/p99(idle) and memory growth 10k vs idle are printed. Always exits 0.

Two diagnostics show what the app does to stay under the goal. ``--no-footer`` removes
the screen's footer: textual's own Footer rebuilds all its key widgets whenever the active
bindings change, which every focus move does (tunedeck's footer rebuilds only when the keys
shown change). ``--default-gc`` leaves Python's garbage collector as it comes: a full
collection walks every object of the app and pauses the UI for about 100 ms, which alone
breaks the goal even at idle; the app (``tunedeck``, and this bench) freezes what start-up
made and runs full collections in quiet moments (``tunedeck.tui.gc_tuning.GC_THRESHOLDS``).
Results are also written to ``bench/results/dashboard.json``.

    python bench/bench_dashboard.py [--seconds 10] [--rates 0,1000,10000] [--no-footer] [--default-gc] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tunedeck.core.runs import ENDED

GOAL_MS = 100.0
PRESS_EVERY_S = 0.1

PROJECT_TOML = """\
schema = 1
name = "bench"

[model]
source = "tiny-llama"

[quantization]
mode = "none"

[lora]
r = 16
alpha = 32
target_modules = "all-linear"

[dataset]
path = "data.jsonl"
eval_split = 0.0

[training]
epochs = 1
learning_rate = 0.0002
"""

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "torch_dtype": "float32"}


def write_project(folder: Path) -> Path:
    """The project TOML, a few rows of data and a tiny model folder (config and zero weights)."""
    import numpy as np
    from safetensors.numpy import save_file

    rows = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                     {"role": "assistant", "content": str(2 * i)}]}) for i in range(12)]
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    model = folder / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    save_file({"model.embed_tokens.weight": np.zeros((128, 32), dtype=np.float32)}, str(model / "model.safetensors"))
    path = folder / "bench.toml"
    path.write_text(PROJECT_TOML, encoding="utf-8")
    return path


class NoEngine:
    """An engine stand-in that answers every request with an error at once."""

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        from tunedeck.core.engine import EngineError

        raise EngineError(f"no engine in this benchmark ({op})")

    def close(self, timeout: float = 0.0) -> None:
        pass


class ScriptedRun:
    """A run handle whose ``events`` returns the events due at ``rate`` per second since the last call."""

    def __init__(self, name: str, run_dir: Path, rate: float) -> None:
        self.name, self.run_dir, self.rate = name, run_dir, rate
        self.status = "running"
        self.delivered = 0
        self._start = time.monotonic()
        self._first = True

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def _event(self, n: int, now: float) -> dict[str, Any]:
        if n % 500 == 499:
            return {"type": "eval", "time": now, "step": n, "eval_loss": 1.0 + 1.0 / (1 + n / 1000)}
        if n % 1000 == 998:
            return {"type": "checkpoint", "time": now, "step": n, "path": f"{self.run_dir}/checkpoint-{n}"}
        if n % 300 == 297:
            return {"type": "warning", "time": now, "step": n, "message": f"a warning at step {n}"}
        if n % 200 == 101:
            return {"type": "system", "time": now, "step": n, "gpus": [], "rss": 2**30, "ram_used": 4 * 2**30,
                    "ram_total": 8 * 2**30, "cpu_percent": 50.0}
        return {"type": "step", "time": now, "step": n, "loss": 1.2 + 0.5 / (1 + n / 500) + (n % 7) * 0.01,
                "learning_rate": 2e-4, "grad_norm": 1.1 + (n % 5) * 0.1, "tokens_per_s": 1800.0,
                "epoch": n / 1e6, "eta_s": 30.0, "max_steps": 10**9}

    def events(self, timeout: float | None = None) -> list[dict[str, Any]]:
        now_wall = time.time()
        if self._first:
            self._first = False
            return [{"type": "run_started", "time": now_wall, "step": 0, "device": {"type": "cpu"},
                     "trainable_params": 1000, "max_steps": 10**9}]
        if self.ended:
            return []
        if self.rate <= 0:
            time.sleep(timeout or 0)
            return []
        due = int((time.monotonic() - self._start) * self.rate)
        if due <= self.delivered:  # wait for the next one (as a real reader waits on its file)
            time.sleep(min(timeout or 0, (self.delivered + 1 - due) / self.rate))
            due = int((time.monotonic() - self._start) * self.rate)
        out = [self._event(n, now_wall) for n in range(self.delivered + 1, due + 1)]
        self.delivered = max(self.delivered, due)
        return out

    def stop(self) -> None:
        self.status = "finished"

    save_now = detach = lambda self: None

    def abort(self) -> None:
        self.status = "failed"


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


async def run_condition(pilot: Any, frames: dict[str, Any], root: Path, rate: int, seconds: float) -> dict[str, Any]:
    from textual import events

    from tunedeck.tui.training import RunView

    app = pilot.app
    run_dir = root / "runs" / f"rate-{rate}"
    run_dir.mkdir(parents=True)
    handle = ScriptedRun(f"rate-{rate}", run_dir, rate)
    view = RunView(handle.name, handle.run_dir)
    app.post_message(app.RunFollowed(handle, view, started_here=False))
    await pilot.pause(1.0)  # followed; the first redraws done
    rss_start, seen_start, t_start = rss(), view.events_seen, time.monotonic()
    latencies: list[float] = []
    to_handled: list[float] = []  # key sent -> focus moved (the rest is waiting for the frame)
    keys = ("tab", "shift+tab")
    end = t_start + seconds
    i = 0
    while time.monotonic() < end:
        frames["handled"].clear()
        frames["painted"].clear()
        key = events.Key(keys[i % 2], None)
        key.set_sender(app)
        t0 = time.perf_counter()
        app._driver.send_message(key)  # as the driver's input thread does
        try:
            await asyncio.wait_for(frames["painted"].wait(), 2.0)
            latencies.append(frames["time"] - t0)
            to_handled.append(frames["handled_at"] - t0)
        except asyncio.TimeoutError:  # nothing changed on screen: counted as 2 s
            latencies.append(2.0)
        i += 1
        await asyncio.sleep(max(0.0, PRESS_EVERY_S - (time.perf_counter() - t0)))
    elapsed = time.monotonic() - t_start
    seen = view.events_seen - seen_start
    rss_end = rss()
    handle.status = "finished"
    await pilot.pause(0.6)
    ms = [x * 1000 for x in latencies]
    return {"rate": rate, "presses": len(ms), "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(pct(ms, 0.99), 2), "max_ms": round(max(ms), 2),
            "handled_p50_ms": round(statistics.median(to_handled) * 1000, 2) if to_handled else None,
            "handled_p99_ms": round(pct(to_handled, 0.99) * 1000, 2) if to_handled else None,
            "folded_per_s": round(seen / elapsed, 1), "delivered": handle.delivered,
            "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth_mib": round((rss_end - rss_start) / 2**20, 2),
            "loss_points": len(view.loss.xs), "log_lines": len(view.log)}


async def bench(rates: list[int], seconds: float, no_footer: bool = False,
                default_gc: bool = False) -> list[dict[str, Any]]:
    from tunedeck.core.hardware import Hardware
    from tunedeck.core.project import Project
    from tunedeck.tui.app import TunedeckApp

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = Project.load(write_project(root))
        app = TunedeckApp(project, engine=NoEngine(), hardware=Hardware(gpus=(), cpu_count=2, ram_total=8 * 2**30))
        app.tune_gc = not default_gc  # as `tunedeck` runs it (run_app)
        frames: dict[str, Any] = {"handled": asyncio.Event(), "painted": asyncio.Event(), "time": 0.0,
                                   "handled_at": 0.0}
        display = app._display

        def hooked(screen: Any, renderable: Any) -> None:
            display(screen, renderable)
            if renderable is not None and frames["handled"].is_set() and not frames["painted"].is_set():
                frames["time"] = time.perf_counter()
                frames["painted"].set()

        app._display = hooked  # type: ignore[method-assign]
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.5)
            await pilot.press("5")
            await pilot.pause(0.5)

            def handled(_: Any) -> None:
                frames["handled_at"] = time.perf_counter()
                frames["handled"].set()

            app.screen.watch(app.screen, "focused", handled, init=False)
            if no_footer:  # diagnosis: the footer recomposes its keys on every focus change
                await app.screen.query("Footer").remove()
            for rate in rates:
                results.append(await run_condition(pilot, frames, root, rate, seconds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="0,1000,10000")
    parser.add_argument("--no-footer", action="store_true",
                        help="remove the screen's footer first (to see what its redraw on each key costs)")
    parser.add_argument("--default-gc", action="store_true",
                        help="leave Python's garbage collector as it comes (to see what the app's tuning buys)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    results = asyncio.run(bench(rates, args.seconds, args.no_footer, args.default_gc))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "dashboard.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results))
        return
    print(f"Train screen, {args.seconds:g} s per condition, a key every {PRESS_EVERY_S * 1000:.0f} ms "
          f"({os.cpu_count()} CPUs, maybe shared); key p50 = key sent -> focus moved, before the frame")
    print(f"{'events/s':>9} {'folded/s':>9} {'presses':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'key p50':>8} "
          f"{'RSS start':>10} {'RSS end':>9} {'growth':>8} {'points':>6} {'log':>4}")
    for r in results:
        print(f"{r['rate']:>9,} {r['folded_per_s']:>9,.0f} {r['presses']:>7} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['max_ms']:>8.1f} {r['handled_p50_ms'] or 0:>8.1f} {r['rss_start_mib']:>8.1f}Mi {r['rss_end_mib']:>7.1f}Mi "
              f"{r['rss_growth_mib']:>6.2f}Mi {r['loss_points']:>6} {r['log_lines']:>4}")
    for r in results:
        ok = r["p99_ms"] < GOAL_MS
        print(f"goal: p99 key latency under {GOAL_MS:.0f} ms at {r['rate']:,} events/s: "
              f"{r['p99_ms']:.1f} ms {'PASS' if ok else 'FAIL'}")
    by_rate = {r["rate"]: r for r in results}
    idle = by_rate.get(0)
    if idle:
        for rate in (1000, 10000):
            if rate in by_rate:
                print(f"p99({rate // 1000}k) / p99(idle) = {by_rate[rate]['p99_ms'] / idle['p99_ms']:.2f}")
        if 10000 in by_rate:
            growth = by_rate[10000]["rss_growth_mib"], idle["rss_growth_mib"]
            ratio = growth[0] / growth[1] if growth[1] > 0.05 else float("nan")
            print(f"RSS growth 10k vs idle: {growth[0]:.2f} MiB vs {growth[1]:.2f} MiB (ratio {ratio:.2f}; "
                  "nan when idle grew under 0.05 MiB)")


if __name__ == "__main__":
    main()
