"""The memory estimate against measured peak memory of a few LoRA / QLoRA training steps.

On a CUDA machine: for each case, the model is loaded and wrapped the way tunedeck's
trainer does it (bf16 weights, or 4-bit nf4 with double quant and
``prepare_model_for_kbit_training``; LoRA on all linear layers with dropout 0.05;
trainable weights in fp32; gradient checkpointing as asked; bf16 autocast; trl's fused
LM head, as SFTTrainer uses it; AdamW), three optimizer steps run on full-length rows,
and ``torch.cuda.max_memory_allocated()`` is compared with the estimate minus its CUDA
context term (the allocator does not see the context). The goal: within 15%.

Without a GPU it runs the real thing on the CPU instead: ``tunedeck train`` on the demo
project (LoRA, fp32 as "auto" resolves on a CPU) and on a QLoRA variant (bitsandbytes
4-bit NF4), a few steps each (``--steps``, at ``--cpu-length`` tokens so that it stays
within a few minutes), and prints what each run recorded (``tunedeck runs``): the estimate
every screen shows, made at run start, against the measured peak (the trainer's resident
memory since training began, libraries included) as a ratio. ``--sanity`` adds the older
check: the peak of the bytes torch allocates on the CPU during two fp32 steps (profiler
memory events, the loaded model as the baseline) against the estimate less its weights.

    python bench/bench_memory_estimate.py [--model default] [--batch 4] [--length 1024] [--json]
        [--steps 1] [--cpu-length 64] [--sanity]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

TARGETS = "all-linear"
R = 16
DROPOUT = 0.05


def build(model_dir: str, *, mode: str, dtype: Any, device: str, checkpointing: bool) -> Any:
    """The model as tunedeck's trainer builds it (see core/trainer.py), with trl's fused head."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.utils import add_fused_lm_head

    kwargs: dict[str, Any] = {"dtype": dtype}
    if mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if mode == "none":
        model.to(device)
        if checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model.config.use_cache = False
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=DROPOUT,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    for param in model.parameters():  # the trainer keeps trainable weights in fp32
        if param.requires_grad:
            param.data = param.data.float()
    return model


def train_steps(model: Any, *, steps: int, batch: int, length: int, device: str, autocast_dtype: Any) -> None:
    """Optimizer steps on random full-length rows (AdamW's state exists from the second on)."""
    import torch

    vocab = model.get_base_model().config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, vocab, (batch, length), device=device, generator=torch.Generator(device).manual_seed(step))
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def estimate_for(model_dir: str, *, mode: str, precision: str, device: str, batch: int, length: int,
                 checkpointing: bool) -> Any:
    from tunedeck.core.inspect import estimate, inspect_model
    from tunedeck.core.targets import count_trainable

    ins = inspect_model(model_dir)
    choice = count_trainable(ins, TARGETS, r=R)
    return estimate(ins, choice, mode=mode, precision=precision, batch_size=batch, max_length=length,
                    gradient_checkpointing=checkpointing, device=device, dropout=DROPOUT)


def run_cuda(model_dir: str, batch: int, length: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for mode, checkpointing in (("none", True), ("none", False), ("4bit", True)):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = build(model_dir, mode=mode, dtype=torch.bfloat16, device="cuda", checkpointing=checkpointing)
        train_steps(model, steps=3, batch=batch, length=length, device="cuda", autocast_dtype=torch.bfloat16)
        measured = torch.cuda.max_memory_allocated()
        del model
        est = estimate_for(model_dir, mode=mode, precision="bf16", device="cuda", batch=batch, length=length,
                           checkpointing=checkpointing)
        predicted = est.total - est.context
        rows.append({"mode": mode, "gradient_checkpointing": checkpointing, "measured": measured,
                     "estimated": predicted, "ratio": predicted / measured, "estimate": est.as_dict()})
    return rows


def run_cpu_sanity(model_dir: str, batch: int, length: int) -> dict[str, Any]:
    """Peak bytes torch allocates on the CPU during fp32 training steps, above the loaded model."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = build(model_dir, mode="none", dtype=torch.float32, device="cpu", checkpointing=False)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps(model, steps=2, batch=batch, length=length, device="cpu", autocast_dtype=None)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    allocated = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        allocated += nbytes
        peak = max(peak, allocated)
    est = estimate_for(model_dir, mode="none", precision="fp32", device="cpu", batch=batch, length=length,
                       checkpointing=False)
    predicted = est.total - est.weights
    return {"measured": peak, "estimated": predicted, "ratio": predicted / peak, "estimate": est.as_dict()}


def run_cpu_trainer(steps: int, length: int) -> list[dict[str, Any]]:
    """The demo project and its QLoRA variant through ``tunedeck train`` (one process per
    run, as the app starts it); what each run recorded, from ``run_info``."""
    from tunedeck.core.runs import run_info

    demo = Path(__file__).resolve().parent.parent / "sample_data"
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        folder = Path(tmp)
        for name in ("demo.toml", "python_qa.jsonl"):
            shutil.copy(demo / name, folder / name)
        common = [f"training.max_steps={steps}", "training.grad_accum=1", "training.eval_steps=0",
                  "dataset.eval_split=0.0", "training.save_steps=1000", f"dataset.max_length={length}"]
        for case, extra in (("LoRA (demo)", []), ("QLoRA 4bit nf4", ['quantization.mode="4bit"'])):
            command = [sys.executable, "-m", "tunedeck.core", "train", str(folder / "demo.toml"),
                       "--run-name", "qlora" if extra else "lora"]
            for item in common + extra:
                command += ["--set", item]
            began = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True)
            info = run_info(folder / "runs" / ("qlora" if extra else "lora"))
            if done.returncode != 0 or info.memory_estimate is None or info.memory_peak is None:
                raise SystemExit(f"{case}: the run did not record both figures (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            events = [json.loads(line) for line in (folder / "runs" / info.name / "events.jsonl").open()]
            started = next(e for e in events if e["type"] == "run_started")
            rows.append({"case": case, "estimated": info.memory_estimate, "measured": info.memory_peak,
                         "measured_of": info.memory_peak_source, "ratio": info.memory_estimate / info.memory_peak,
                         "estimate": started["memory_estimate"], "seconds": time.monotonic() - began})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help='"default" or a model folder (safetensors)')
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1,
                        help="training steps of each CPU run (the first already holds the optimizer state)")
    parser.add_argument("--cpu-length", type=int, default=64, help="dataset.max_length of the CPU runs")
    parser.add_argument("--sanity", action="store_true", help="also the CPU check of torch's allocations")
    parser.add_argument("--cpu-batch", type=int, default=2, help="batch of the CPU sanity check")
    parser.add_argument("--sanity-length", type=int, default=128, help="row length of the CPU sanity check")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from tunedeck.core.memory import MemoryEstimate
    from tunedeck.core.units import format_gib
    from tunedeck.core.models import ensure_default_model

    model_dir = str(ensure_default_model()) if args.model == "default" else args.model
    import torch

    if torch.cuda.is_available():
        rows = run_cuda(model_dir, args.batch, args.length)
        if args.json:
            print(json.dumps({"device": torch.cuda.get_device_name(0), "cases": rows}, indent=2))
            return 0
        print(f"{torch.cuda.get_device_name(0)}, {args.model}, batch {args.batch} x {args.length}, "
              f"LoRA r={R} on {TARGETS}:")
        for row in rows:
            kind = "LoRA bf16" if row["mode"] == "none" else f"QLoRA {row['mode']}"
            gc_text = "with" if row["gradient_checkpointing"] else "without"
            print(f"  {kind:11s} {gc_text:7s} checkpointing: measured peak {format_gib(row['measured']):>10}, "
                  f"estimated {format_gib(row['estimated']):>10} ({row['ratio']:.2f}x)")
        return 0
    print("no CUDA GPU here: the GPU comparison needs a CUDA machine; on this CPU, the runs' own records:")
    rows = run_cpu_trainer(args.steps, args.cpu_length)
    sanity = run_cpu_sanity(model_dir, args.cpu_batch, args.sanity_length) if args.sanity else None
    if args.json:
        print(json.dumps({"device": "cpu", "runs": rows, "cpu_sanity_check": sanity}, indent=2))
        return 0
    batch = MemoryEstimate.from_dict(rows[0]["estimate"]).tokens_text()
    print(f"demo project, {args.steps} steps each, dataset.max_length = {args.cpu_length} ({batch}), CPU, "
          "no gradient checkpointing:")
    print(f"  {'case':16s} {'estimated':>10} {'measured peak':>14} {'estimated / measured':>21}")
    for row in rows:
        print(f"  {row['case']:16s} {format_gib(row['estimated']):>10} {format_gib(row['measured']):>14} "
              f"{row['ratio']:>20.2f}x   ({row['seconds']:.0f} s)")
    print("  measured peak: the trainer's resident memory since training began (libraries included)")
    if sanity is not None:
        print(f"CPU sanity check: {args.model}, fp32, batch {args.cpu_batch} x {args.sanity_length}, no "
              f"checkpointing: torch allocated at most {format_gib(sanity['measured'])} above the loaded model; "
              f"the estimate less its weights is {format_gib(sanity['estimated'])} ({sanity['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
