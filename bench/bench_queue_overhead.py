"""What the run's channel costs: tokens/s of a run in the trainer process with a follower
taking its events live (``start_run`` + ``RunHandle.events``), against the same run in a
plain process that only writes events.jsonl (no channel, no follower). Measured side by
side in one run.

The model is a small random llama (4 layers, hidden 256, the bundled tokenizer) logging
every step, so steps are short and the per-event cost weighs as much as it ever will.
The two kinds of run alternate (``--rounds`` each) and the medians are compared; the
machine's own noise shows in the spread, printed too. A second, direct measure emits
``--events`` step events through the trainer's emitter with a follower connected to its
channel (in another process), and the same number with no channel, and divides the
difference per event by the median step time.

    python bench/bench_queue_overhead.py [--steps 40] [--rounds 3] [--events 20000]

Prints one result line and writes bench/results/queue_overhead.json (goal: under 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

PLAIN = r'''
import sys
from pathlib import Path
from tunedeck.core.events import EventLog
from tunedeck.core.rundir import prepare_run
from tunedeck.core.trainer import Controls, Emitter, run

with prepare_run(sys.argv[1], [], run_name=sys.argv[2]) as prepared:
    spec = prepared.spec
    with EventLog(Path(spec.run_dir) / "events.jsonl") as log:
        sys.exit(run(spec, Emitter(log), Controls()))
'''


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunedeck.core.models import ensure_default_model

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_project(folder: Path, model: Path, steps: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} times {i}?"},
                          {"role": "assistant", "content": f"{i} times {i} is {i * i}. " * (1 + i % 4)}]}
            for i in range(64)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = folder / "project.toml"
    project.write_text(
        f'schema = 1\nname = "q"\n[model]\nsource = "{model}"\n[dataset]\npath = "data.jsonl"\nmax_length = 128\n'
        f"[training]\nmax_steps = {steps}\nbatch_size = 4\ngrad_accum = 1\nlogging_steps = 1\n"
        "save_steps = 100000\n", encoding="utf-8")
    return project


def steady_rate(events_file: Path) -> tuple[float, float]:
    """(non-pad tokens/s from the end of step 1 to the last step, median seconds per step)."""
    steps = [json.loads(line) for line in events_file.read_text().splitlines()]
    steps = [e for e in steps if e["type"] == "step"]
    first, last = steps[0], steps[-1]
    gaps = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]), statistics.median(gaps)


def with_listener(project: Path, name: str) -> tuple[float, float, int]:
    from tunedeck.core.launcher import start_run

    handle = start_run(project, run_name=name)
    received = 0
    while not handle.ended:
        received += len(handle.events(0.2))
    received += len(handle.events(0))
    if handle.status != "finished":
        raise SystemExit(f"the run failed: {handle.final}")
    return (*steady_rate(handle.run_dir / "events.jsonl"), received)


def without_listener(project: Path, name: str, script: Path) -> tuple[float, float]:
    proc = subprocess.run([sys.executable, str(script), str(project), name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the plain run failed:\n{proc.stderr[-3000:]}")
    return steady_rate(project.parent / "runs" / name / "events.jsonl")


FOLLOWER = r'''
import sys
from tunedeck.core.channel import Client
client = Client.connect(sys.argv[1])
print("connected", flush=True)
got, want = 0, int(sys.argv[2])
while got < want and not client.closed.is_set():
    got += len(client.events(0.5))
print(got, flush=True)
'''

FIELDS = {"loss": 1.2345, "learning_rate": 2e-4, "grad_norm": 0.5, "tokens": 123456, "tokens_per_s": 1234.5,
          "epoch": 0.5, "eta_s": 100.0, "max_steps": 1000, "mean_token_accuracy": 0.5, "entropy": 1.5}


def _emit_all(emit, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        emit("step", i, **FIELDS)
    return time.perf_counter() - start


def per_event_cost(count: int, folder: Path) -> float:
    """Seconds per event that the channel adds to the trainer's side (frame + queue for the
    follower's sender thread), with a follower in another process taking every event."""
    from tunedeck.core.channel import Server
    from tunedeck.core.events import EventLog
    from tunedeck.core.runs import write_record
    from tunedeck.core.trainer import Controls, Emitter

    plain_dir, served_dir = folder / "plain-events", folder / "served-events"
    plain_dir.mkdir()
    served_dir.mkdir()
    with EventLog(plain_dir / "events.jsonl") as log:
        emit = Emitter(log)
        emit.health.observe = lambda ev: []
        alone = _emit_all(emit, count)
    with EventLog(served_dir / "events.jsonl") as log:
        emit = Emitter(log)
        emit.health.observe = lambda ev: []
        server = Server(served_dir, log, Controls(emit).take)
        emit.server = server
        write_record(served_dir, address=server.address)
        follower = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(served_dir), str(count)],
                                    stdout=subprocess.PIPE, text=True)
        assert follower.stdout.readline().strip() == "connected"
        served = _emit_all(emit, count)
        got = int(follower.stdout.readline())
        follower.wait(60)
        server.close()
    assert got == count, got
    return max(0.0, served - alone) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        folder = Path(tmp)
        model = build_model(folder / "model")
        project = write_project(folder, model, args.steps)
        script = folder / "plain.py"
        script.write_text(PLAIN, encoding="utf-8")
        piped, plain, step_times = [], [], []
        for i in range(args.rounds):
            rate, step_s, received = with_listener(project, f"piped-{i}")
            piped.append(rate)
            step_times.append(step_s)
            rate, step_s = without_listener(project, f"plain-{i}", script)
            plain.append(rate)
            step_times.append(step_s)
            print(f"round {i + 1}: with the channel and a follower {piped[-1]:.0f} tok/s ({received} events), "
                  f"in-process without {plain[-1]:.0f} tok/s", flush=True)
        cost = per_event_cost(args.events, folder)
    step_s = statistics.median(step_times)
    events_per_step = 1.0  # logging_steps = 1; system events come every 5 s
    direct = cost * events_per_step / step_s
    end_to_end = 1 - statistics.median(piped) / statistics.median(plain)
    result = {
        "benchmark": "queue_overhead", "steps": args.steps, "rounds": args.rounds,
        "with_listener_tokens_per_s": piped, "without_listener_tokens_per_s": plain,
        "end_to_end_overhead": end_to_end, "seconds_per_event": cost, "median_step_s": step_s,
        "direct_overhead": direct, "goal": 0.02, "time": time.time(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "queue_overhead.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    spread = (max(plain) - min(plain)) / statistics.median(plain)
    print(f"RESULT queue overhead: end to end {end_to_end:+.1%} (median of {args.rounds}; run-to-run spread of the "
          f"plain runs {spread:.1%}); per event {cost * 1e6:.0f} us = {direct:.3%} of a {step_s * 1000:.0f} ms step "
          "(goal < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
