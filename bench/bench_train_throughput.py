"""Useful (non-pad) tokens per second: `tunedeck train` against two plain trl scripts, on the
same data, model, LoRA and batch, measured side by side in one run, on two data sets.

Contenders:

- tunedeck: ``tunedeck train`` on a copy of sample_data/demo.toml, as a user runs it:
  "auto" precision and batching; the run_started event's resolved precision and its
  batching layout are reported as they are, not asserted.
- recipe: the script most blog posts copy: trl's defaults (``SFTConfig``: bf16 mixed
  precision, gradient checkpointing) and every row padded to max_length
  (``pad_to_multiple_of=max_length``), the model given to ``SFTTrainer`` by path, the
  conversational rows handed to trl (labels = input_ids).
- trl_best: the best plain trl script for a CPU we could write: bf16 mixed precision, no
  gradient checkpointing, ``padding_free=True`` (the rows of a batch in one sequence,
  position_ids restarting per row: no padding at all). trl refuses padding-free without
  packing while max_length is set (it would not truncate), so rows longer than max_length
  are left out beforehand (none are, in either data set) and ``max_length=None``.
  ``assistant_only_loss=True`` is tried first, but trl 1.16 has no training chat template
  (``{% generation %}`` markers) for SmolLM2's ChatML template and refuses it, so this
  contender trains on all tokens, as the recipe does (tunedeck trains on the assistant's
  tokens only); the JSON says which it ran with. Which base weights are faster under bf16
  autocast depends on the machine (bf16 weights skip autocast's casts, fp32 weights make
  trl's CPU head cheaper to feed), so it runs twice, with bf16 and with fp32 base weights
  (``model_init_kwargs={"dtype": ...}``), and the faster run is the one compared.

Data sets (``--data``):

- demo: sample_data/python_qa.jsonl with max_length 512, as demo.toml has it (rows of
  100 to 400 tokens).
- longtail: conversations chained from the demo's Q/A pairs by bench/longtail.py (fixed
  seed, no network): lognormal turn counts, so most rows are one or two turns (~100 to
  ~300 tokens) and a few run to ~1000; max_length 1024 (``--set dataset.path=...``,
  ``--set dataset.max_length=1024``). Padding to max_length costs the most here.

All train ``--steps`` optimizer steps (default 8) of the demo's batch (4 x 2 accumulation)
on the bundled SmolLM2-135M-Instruct with LoRA r=16, alpha=32, dropout 0.05 on all linear
layers. Tokens counted are the non-pad tokens the model saw: ``attention_mask`` sums where
batches are padded, every input token where they are padding-free. The rate is taken from
the end of step ``--warmup`` (default 2) to the end of the last step, so loading and the
warm-up steps (the CPU allocator and oneDNN settling in; slower for dynamic shapes) are left
out of all. With the same seed and a random sampler the contenders draw the same rows (the
tokens columns say so). They run one after the other, so load from elsewhere on the machine
lands on whichever is running: run it on an idle machine. Goals: tunedeck >= 3x the recipe
and >= 1.3x trl_best on each data set.

    python bench/bench_train_throughput.py [--steps 8] [--warmup 2] [--data demo|longtail|both]

Prints one result line per data set and writes bench/results/train_throughput.json.
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
from typing import Any

import longtail

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
RESULTS = REPO / "bench" / "results"
TUNEDECK = str(Path(sys.executable).with_name("tunedeck"))
GOALS = {"recipe": 3.0, "trl_best": 1.3}  # tunedeck's useful tok/s over each, on each data set
MAX_LENGTH = {"demo": 512, "longtail": 1024}

COMMON = r'''
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_path, data_path, steps, out, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
weights = sys.argv[6] if len(sys.argv) > 6 else "auto"
rows = [json.loads(line) for line in open(data_path, encoding="utf-8") if line.strip()]

class Clock(TrainerCallback):
    marks = []
    def on_step_end(self, args, state, control, **kw):
        self.marks.append((state.global_step, time.time(), state.num_input_tokens_seen))

peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
'''

RECIPE = COMMON + r'''
dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
args = SFTConfig(
    output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, max_length=max_length,
    pad_to_multiple_of=max_length,               # every row padded to max_length
    use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=42,
    include_num_input_tokens_seen="non_padding", # measurement only: counts attention_mask
)                                                # bf16=True and gradient checkpointing: trl's defaults
trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=[Clock()])
assert args.bf16 and args.gradient_checkpointing
trainer.train()
print(json.dumps({"marks": Clock.marks}))
'''

TRL_BEST = COMMON + r'''
tokenizer = AutoTokenizer.from_pretrained(model_path)
# padding-free without packing does not truncate: leave out the rows longer than max_length
fits = [r for r in rows if len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) <= max_length]
dataset = Dataset.from_list([{"messages": r["messages"]} for r in fits])

def trainer(assistant_only_loss):
    args = SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05,
        bf16=True, model_init_kwargs={"dtype": weights},  # bf16 autocast on bf16 or fp32 base weights
        gradient_checkpointing=False, use_cpu=True,
        padding_free=True, max_length=None,            # one sequence per batch, no padding; rows already fit
        assistant_only_loss=assistant_only_loss,
        report_to="none", logging_steps=1, save_strategy="no", seed=42,
        include_num_input_tokens_seen="all",           # padding-free: no pad tokens, every input token is useful
    )
    return SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=[Clock()])

try:
    trainer, assistant_only = trainer(True), True
except ValueError as e:  # trl has no training chat template (with {% generation %}) for this model
    if "chat template" not in str(e):
        raise
    print(f"assistant_only_loss=True refused: {e}", file=sys.stderr)
    trainer, assistant_only = trainer(False), False
trainer.train()
print(json.dumps({"marks": Clock.marks, "assistant_only_loss": assistant_only, "rows": len(fits),
                  "left_out": len(rows) - len(fits)}))
'''


def rate(marks: list[tuple[int, float, int]], warmup: int) -> dict[str, float]:
    """Non-pad tokens per second from the end of the warm-up steps to the end of the last."""
    (_, t0, n0), (_, t1, n1) = marks[warmup - 1], marks[-1]
    return {"tokens": n1 - n0, "seconds": t1 - t0, "tokens_per_s": (n1 - n0) / (t1 - t0)}


def run_tunedeck(workdir: Path, steps: int, warmup: int, name: str, *extra: str) -> tuple[dict[str, float], dict]:
    """The rate, and what the run_started event says of precision and batching (as it says it)."""
    project = workdir / "demo.toml"
    cmd = [TUNEDECK, "train", str(project), "--run-name", name,
           "--set", "training.eval_steps=0", "--set", "dataset.eval_split=0",
           "--set", f"training.max_steps={steps}", "--set", "training.save_steps=100000", *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tunedeck train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (workdir / "runs" / name / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == "run_started")
    resolved = started.get("resolved", {})
    settings = {"precision": resolved.get("precision"),
                **{k: v for k, v in resolved.items() if "padding" in k or "packing" in k or "batching" in k}}
    batching = (started.get("data") or {}).get("batching")
    if batching is not None:
        settings["data.batching"] = batching
    marks = [(e["step"], e["time"], e["tokens"]) for e in events if e["type"] == "step"]
    return rate(marks, warmup), {**settings, "warnings": _warnings(proc.stderr)}


def run_script(workdir: Path, source: str, name: str, model: Path, data: Path, steps: int, warmup: int,
               max_length: int, *extra: str) -> tuple[dict[str, float], dict]:
    """A plain trl script (RECIPE or TRL_BEST): the rate, and what else it printed."""
    script = workdir / f"{name}.py"
    script.write_text(source, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(model), str(data), str(steps),
                           str(workdir / f"{name}-out"), str(max_length), *extra], check=False,
                          capture_output=True,
                          text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    marks = out.pop("marks")
    return rate([tuple(m) for m in marks], warmup), {**out, "warnings": _warnings(proc.stderr)}


def bench_data(name: str, workdir: Path, model: Path, tokenizer: Any, steps: int, warmup: int) -> dict[str, Any]:
    """The three contenders on one data set, one after the other."""
    max_length = MAX_LENGTH[name]
    if name == "demo":
        data = workdir / "python_qa.jsonl"
        lengths = longtail.stats([json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()
                                  if line.strip()], tokenizer)
        extra: tuple[str, ...] = ()
    else:
        data = workdir / "longtail.jsonl"
        lengths = longtail.write(data, tokenizer, budget=max_length - 24)
        extra = ("--set", f"dataset.path={json.dumps(data.name)}", "--set", f"dataset.max_length={max_length}")
    print(f"[{name}] {lengths['rows']} rows, {lengths['min']}..{lengths['max']} tokens (median {lengths['p50']}, "
          f"p90 {lengths['p90']}), max_length {max_length}", flush=True)
    t = time.time()
    ours, settings = run_tunedeck(workdir, steps, warmup, name, *extra)
    print(f"[{name}] tunedeck train ({settings['precision']}, "
          f"{(settings.get('data.batching') or {}).get('layout', '?')}): {ours['tokens_per_s']:.1f} tok/s "
          f"({time.time() - t:.0f} s)", flush=True)
    t = time.time()
    recipe, recipe_info = run_script(workdir, RECIPE, "recipe", model, data, steps, warmup, max_length)
    print(f"[{name}] recipe (bf16, checkpointing, padded to {max_length}): {recipe['tokens_per_s']:.1f} tok/s "
          f"({time.time() - t:.0f} s)", flush=True)
    variants = {}
    for weights in ("bfloat16", "float32"):
        t = time.time()
        run, info = run_script(workdir, TRL_BEST, f"trl_best_{weights}", model, data, steps, warmup, max_length,
                               weights)
        variants[weights] = (run, {**info, "weights": weights})
        print(f"[{name}] trl_best ({weights} weights, bf16 autocast, padding-free, no checkpointing, "
              f"assistant_only_loss={info['assistant_only_loss']}): {run['tokens_per_s']:.1f} tok/s "
              f"({time.time() - t:.0f} s)", flush=True)
    best, best_info = max(variants.values(), key=lambda v: v[0]["tokens_per_s"])
    best_info = {**best_info, "variants": {w: r for w, (r, _) in variants.items()}}
    ratios = {other: ours["tokens_per_s"] / r["tokens_per_s"] for other, r in (("recipe", recipe), ("trl_best", best))}
    return {"max_length": max_length, "lengths": lengths, "tunedeck": ours, "recipe": recipe, "trl_best": best,
            "ratios": ratios, "goals": GOALS, "met": {k: ratios[k] >= GOALS[k] for k in GOALS},
            "tunedeck_settings": settings, "recipe_info": recipe_info, "trl_best_info": best_info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the measure")
    parser.add_argument("--data", choices=("demo", "longtail", "both"), default="both")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    from transformers import AutoTokenizer
    from tunedeck.core.models import ensure_default_model

    model = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    names = ("demo", "longtail") if args.data == "both" else (args.data,)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        workdir = Path(tmp)
        shutil.copy(SAMPLE / "demo.toml", workdir / "demo.toml")
        shutil.copy(SAMPLE / "python_qa.jsonl", workdir / "python_qa.jsonl")
        for name in names:
            results[name] = bench_data(name, workdir, model, tokenizer, args.steps, args.warmup)
    result = {"benchmark": "train_throughput", "steps": args.steps, "warmup_steps": args.warmup, "data": results,
              "goals": GOALS, "cpu_flags": _cpu_flags(), "cpus": os.cpu_count(), "time": time.time()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name, r in results.items():
        print(f"RESULT train throughput [{name}]: tunedeck {r['tunedeck']['tokens_per_s']:.1f}, recipe "
              f"{r['recipe']['tokens_per_s']:.1f}, trl_best {r['trl_best']['tokens_per_s']:.1f} useful tok/s; "
              f"tunedeck/recipe {r['ratios']['recipe']:.2f}x (goal >= {GOALS['recipe']:g}x), "
              f"tunedeck/trl_best {r['ratios']['trl_best']:.2f}x (goal >= {GOALS['trl_best']:g}x)")
    return 0


def _warnings(stderr: str) -> list[str]:
    """The distinct warning lines of a run's stderr (trl's and transformers' say what they changed)."""
    seen: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("warnings.warn("):  # the source line Python prints under a warning
            continue
        if ("warn" in line.lower() or "refused" in line) and line[:300] not in seen:
            seen.append(line[:300])
    return seen[:20]


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]


if __name__ == "__main__":
    sys.exit(main())
