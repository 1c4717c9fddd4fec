"""Useful (non-pad) tokens per second: `tunedeck train` on the demo project against the recipe
most blog posts copy, on the same data, model, LoRA and batch, measured side by side in one run.

- tunedeck: ``tunedeck train sample_data/demo.toml`` (a copy in a temporary folder), as a
  user runs it: "auto" precision (fp32 on a CPU, no gradient checkpointing), rows rendered
  once and padded per batch to the longest row.
- recipe: a plain script with trl's defaults (``SFTConfig``: bf16 mixed precision, gradient
  checkpointing) and every row padded to max_length 512 (``pad_to_multiple_of=512``), the
  model given to ``SFTTrainer`` by path, the conversational rows handed to trl.

Both train ``--steps`` optimizer steps (default 8) of the demo's batch (4 x 2 accumulation)
on the bundled SmolLM2-135M-Instruct. Tokens counted are the non-pad tokens the model saw
(``attention_mask`` sums); the rate is taken from the end of step ``--warmup`` (default 2)
to the end of the last step, so loading and the warm-up steps (the CPU allocator and
oneDNN settling in; slower for dynamic shapes) are left out of both.

A third run, tunedeck with ``--set training.precision=bf16``, shows what the precision
choice alone does on this CPU (CPUs with AVX512-BF16 or AMX run bf16 matmuls fast).

    python bench/bench_train_throughput.py [--steps 6]

Prints one result line and writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
RESULTS = REPO / "bench" / "results"
TUNEDECK = str(Path(sys.executable).with_name("tunedeck"))

RECIPE = r'''
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

model_path, data_path, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(line) for line in open(data_path, encoding="utf-8") if line.strip()]
dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])

class Clock(TrainerCallback):
    marks = []
    def on_step_end(self, args, state, control, **kw):
        self.marks.append((state.global_step, time.time(), state.num_input_tokens_seen))

args = SFTConfig(
    output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=512,
    pad_to_multiple_of=512,                      # every row padded to max_length
    use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=42,
    include_num_input_tokens_seen="non_padding", # measurement only: counts attention_mask
)                                                # bf16=True and gradient checkpointing: trl's defaults
peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=[Clock()])
assert args.bf16 and args.gradient_checkpointing
trainer.train()
print(json.dumps({"marks": Clock.marks}))
'''


def rate(marks: list[tuple[int, float, int]], warmup: int) -> dict[str, float]:
    """Non-pad tokens per second from the end of the warm-up steps to the end of the last."""
    (_, t0, n0), (_, t1, n1) = marks[warmup - 1], marks[-1]
    return {"tokens": n1 - n0, "seconds": t1 - t0, "tokens_per_s": (n1 - n0) / (t1 - t0)}


def run_tunedeck(workdir: Path, steps: int, warmup: int, name: str, *extra: str) -> dict[str, float]:
    project = workdir / "demo.toml"
    cmd = [TUNEDECK, "train", str(project), "--run-name", name,
           "--set", "training.eval_steps=0", "--set", "dataset.eval_split=0",
           "--set", f"training.max_steps={steps}", "--set", "training.save_steps=100000", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tunedeck train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (workdir / "runs" / name / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "run_started")
    assert not started["resolved"]["gradient_checkpointing"]
    marks = [(e["step"], e["time"], e["tokens"]) for e in events if e["type"] == "step"]
    return rate(marks, warmup)


def run_recipe(workdir: Path, model: Path, steps: int, warmup: int) -> dict[str, float]:
    script = workdir / "recipe.py"
    script.write_text(RECIPE, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(model), str(workdir / "python_qa.jsonl"), str(steps),
                           str(workdir / "recipe-out")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"the recipe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])["marks"]
    return rate([tuple(m) for m in marks], warmup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the measure")
    args = parser.parse_args()
    from tunedeck.core.models import ensure_default_model

    model = ensure_default_model()
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        workdir = Path(tmp)
        shutil.copy(SAMPLE / "demo.toml", workdir / "demo.toml")
        shutil.copy(SAMPLE / "python_qa.jsonl", workdir / "python_qa.jsonl")
        t = time.time()
        ours = run_tunedeck(workdir, args.steps, args.warmup, "auto")
        print(f"tunedeck train (auto = fp32): {ours['tokens_per_s']:.1f} tok/s ({time.time() - t:.0f} s)", flush=True)
        t = time.time()
        recipe = run_recipe(workdir, model, args.steps, args.warmup)
        print(f"recipe (bf16, checkpointing, padded to 512): {recipe['tokens_per_s']:.1f} tok/s "
              f"({time.time() - t:.0f} s)", flush=True)
        t = time.time()
        bf16 = run_tunedeck(workdir, args.steps, args.warmup, "bf16", "--set", "training.precision=bf16")
        print(f"tunedeck train, precision bf16: {bf16['tokens_per_s']:.1f} tok/s ({time.time() - t:.0f} s)",
              flush=True)
    ratio = ours["tokens_per_s"] / recipe["tokens_per_s"]
    result = {"benchmark": "train_throughput", "steps": args.steps, "warmup_steps": args.warmup, "tunedeck": ours,
              "recipe": recipe, "tunedeck_bf16": bf16, "ratio": ratio,
              "ratio_bf16": bf16["tokens_per_s"] / recipe["tokens_per_s"], "goal": 10.0,
              "cpu_flags": _cpu_flags(), "cpus": os.cpu_count(), "time": time.time()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"RESULT train throughput: tunedeck {ours['tokens_per_s']:.1f} vs recipe {recipe['tokens_per_s']:.1f} "
          f"useful tok/s = {ratio:.2f}x (goal >= 10x); tunedeck with bf16: {result['ratio_bf16']:.2f}x")
    return 0


def _cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="ascii") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]


if __name__ == "__main__":
    sys.exit(main())
