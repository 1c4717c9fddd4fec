"""The GPU check: what only a CUDA machine shows, as one table (`make gpu-check`).

Each check is a real `tunedeck` run (the launcher, the trainer process, its events), read
back from its run folder:

- bf16 LoRA and 4-bit QLoRA, 20 steps each, on the bundled SmolLM2 and on a 1B-size llama
  config with random weights: finished, tokens/s, torch's peak memory against the memory
  estimate (the run records both), NVML's reading against torch's;
- fp16 on a GPU without native bf16, when the machine has one;
- an out-of-memory run (a batch far too large) reported as out of GPU memory, in words;
- two-GPU data parallel, stopped and then aborted, when there are two GPUs (every process
  of the aborted run gone);
- throughput against the best plain trl script, on the 1B and on an 8B-size llama config
  (hidden 4096, 32 layers, 8 kv heads) with random weights: the demo's rows
  (sample_data/python_qa.jsonl) repeated, max_length 1024, LoRA r=16 alpha=32 on all linear
  layers, batch 8, no accumulation, one GPU each, ``--steps`` steps. tunedeck runs as a user
  runs it: precision "auto" and the defaults (bf16, padding-free batches, its loss head,
  training.kernels auto: Liger where installed); its tokens/s from its step events and its
  peak from its system events (torch's peak since training began). The trl script
  (``TRL_BEST``, in a subprocess on the same GPU): ``SFTTrainer`` given the model's path with
  bf16 weights, flash-attention 2 where flash_attn imports (sdpa otherwise),
  ``SFTConfig(bf16=True, padding_free=True, max_length=None, ...)``, gradient checkpointing
  as tunedeck resolved it (run_started's resolved), the same LoRA, batch, learning rate and
  schedule, tokens counted with ``include_num_input_tokens_seen="all"``; it reports
  (step, time, tokens) at each step and ``torch.cuda.max_memory_allocated()`` (reset when
  training begins). Rates are taken from the end of step 3 to the end of the last step.
  Goals: tunedeck >= 1.5x trl's tokens/s, and tunedeck's peak memory <= trl's; a row that
  misses either is a FAIL.

The random models are written tensor by tensor from a meta-device model (2 GiB safetensors
shards), so the 8B one (13.4 GiB in bf16) needs a shard's worth of RAM, not the model's.

It prints the table, and writes it to ``bench/results/gpu_check.json`` and ``.md`` (the
README's benchmark section keeps the latest; the JSON rows carry each check's numbers).
``--cpu-smoke`` runs the same checks that a CPU can (bf16 LoRA and 4-bit QLoRA on a tiny
model, and the throughput check's code path on it: two steps, the trl script in fp32 or bf16
as tunedeck resolved the CPU's precision; a smoke run of the script, not a measurement) so
the script is known to work on the day a GPU is there; the test suite runs it so.

    python bench/gpu_check.py [--steps 20] [--out bench/results] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


#: llama shapes for models with random weights (the bundled tokenizer's vocabulary)
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}
SHARD_BYTES = 2 * GiB


def build_random_llama(out: Path, tokenizer_dir: Path, size: str) -> Path:
    """A llama with random weights and the bundled tokenizer (a shape of LLAMA_SHAPES): bf16
    safetensors for "1b" and "8b", fp32 for "tiny". The model is built on the meta device (no
    memory) for its tensor names and shapes, and each tensor is then drawn on the CPU and
    written shard by shard (2 GiB shards, with the index transformers reads), so the 8B one
    takes a shard's worth of RAM, not the model's (twice over, as building and then saving a
    real model would). Initialised as transformers does: normal(0, initializer_range), norms 1."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **LLAMA_SHAPES[size])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = dict(model.named_parameters())  # tied weights once, by their first name
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name in unique or name not in params]
    del model
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size_of = [0]
    item = torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        nbytes = item * int(torch.Size(shape).numel())
        if shards[-1] and size_of[-1] + nbytes > SHARD_BYTES:
            shards.append([])
            size_of.append(0)
        shards[-1].append((name, shape))
        size_of[-1] += nbytes
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards):
        drawn: dict[str, Any] = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                drawn[name] = torch.ones(shape, dtype=dtype)
            elif name.endswith(".bias"):
                drawn[name] = torch.zeros(shape, dtype=dtype)
            else:
                drawn[name] = torch.empty(shape, dtype=dtype).normal_(0.0, config.initializer_range,
                                                                      generator=generator)
            weight_map[name] = file
        save_file(drawn, str(out / file), metadata={"format": "pt"})
        del drawn
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size_of)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_project(folder: Path, model: Path | str, *, steps: int, rows: list[dict[str, Any]] | None = None,
                  **sections: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = rows or [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(64)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    values: dict[str, dict[str, Any]] = {
        "model": {"source": str(model)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "dataset": {"path": "data.jsonl", "max_length": 512},
        "training": {"max_steps": steps, "batch_size": 4, "grad_accum": 1, "learning_rate": 2e-4,
                     "logging_steps": 1, "save_steps": 100_000},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    lines = ["schema = 1", 'name = "gpu-check"']
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path = folder / "project.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train(project: Path, name: str, overrides: list[str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """One run through tunedeck's launcher; what its events say."""
    from tunedeck.core.errors import UserError
    from tunedeck.core.events import read_events
    from tunedeck.core.launcher import start_run

    started = time.monotonic()
    try:
        handle = start_run(project, overrides or [], run_name=name)
    except UserError as exc:
        return {"status": "refused", "reason": exc.message, "events": []}
    status = handle.wait(timeout)
    events = read_events(handle.run_dir / "events.jsonl")
    return {"status": status, "reason": (handle.final or {}).get("reason", ""), "events": events, "handle": handle,
            "seconds": time.monotonic() - started}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    events = run["events"]
    started = next((e for e in events if e["type"] == "run_started"), {})
    steps = [e for e in events if e["type"] == "step"]
    systems = [e for e in events if e["type"] == "system"]
    rates = [e["tokens_per_s"] for e in steps[1:] if e.get("tokens_per_s")]
    peak = max((e.get("torch_peak_memory") or 0 for e in systems), default=0) or None
    nvml = max((e.get("gpu_memory_used") or 0 for e in systems), default=0) or None
    reserved = max((e.get("torch_reserved") or 0 for e in systems), default=0) or None
    return {"precision": (started.get("resolved") or {}).get("precision"), "steps": len(steps),
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None, "torch_peak": peak,
            "nvml_used": nvml, "torch_reserved": reserved,
            "device": (started.get("device") or {}).get("hardware")}


def estimate(project: Path, overrides: list[str]) -> int | None:
    try:
        from tunedeck.core.inspect import project_report
        from tunedeck.core.preflight import load_project

        return int(project_report(load_project(project, overrides))["memory"]["total"])
    except Exception:  # noqa: BLE001 - the check stands without it
        return None


def row(check: str, model: str, result: str, detail: str = "", **numbers: Any) -> dict[str, Any]:
    return {"check": check, "model": model, "result": result, "detail": detail, **numbers}


def training_check(check: str, model_label: str, project: Path, name: str, overrides: list[str],
                   gpu: bool) -> dict[str, Any]:
    run = train(project, name, overrides)
    s = summary(run)
    if run["status"] != "finished":
        return row(check, model_label, "FAIL", f"{run['status']}: {run['reason']}")
    est = estimate(project, overrides)
    detail = [f"{s['precision']}", f"{s['steps']} steps"]
    if s["tokens_per_s"]:
        detail.append(f"{s['tokens_per_s']:,.0f} tok/s")
    numbers: dict[str, Any] = {"tokens_per_s": s["tokens_per_s"], "precision": s["precision"]}
    if gpu and s["torch_peak"]:
        detail.append(f"peak {s['torch_peak'] / GiB:.2f} GiB")
        numbers["torch_peak"] = s["torch_peak"]
        if est:
            detail.append(f"estimate {est / GiB:.2f} GiB ({est / s['torch_peak']:.2f}x)")
            numbers["estimate"] = est
        if s["nvml_used"] and s["torch_reserved"]:
            ok = s["nvml_used"] >= s["torch_reserved"]
            detail.append(f"NVML {s['nvml_used'] / GiB:.2f} GiB >= torch reserved "
                          f"{s['torch_reserved'] / GiB:.2f} GiB: {'yes' if ok else 'NO'}")
            if not ok:
                return row(check, model_label, "FAIL", "; ".join(detail), **numbers)
    return row(check, model_label, "ok", "; ".join(detail), **numbers)


def out_of_memory_check(folder: Path, model: Path, label: str) -> dict[str, Any]:
    long_rows = [{"messages": [{"role": "user", "content": "word " * 1500},
                               {"role": "assistant", "content": "answer " * 1500}]} for _ in range(512)]
    project = write_project(folder / "oom", model, steps=2, rows=long_rows, dataset={"max_length": 4096})
    run = train(project, "oom", ["training.batch_size=512", "training.gradient_checkpointing=false"])
    final = next((e for e in reversed(run["events"]) if e["type"] == "failed"), {})
    if final.get("failure") == "out_of_memory" and "out of GPU memory" in final.get("reason", ""):
        return row("out of memory reported", label, "ok", final["reason"][:160])
    return row("out of memory reported", label, "FAIL", f"{run['status']}: {run['reason'][:200]}")


def data_parallel_check(project: Path) -> dict[str, Any]:
    import psutil

    from tunedeck.core.launcher import start_run

    handle = start_run(project, ["training.devices=2", "training.max_steps=100000"], run_name="ddp")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not any(e["type"] == "step" for e in handle.events(0.5)):
        if handle.ended:
            return row("two-GPU data parallel", "bundled", "FAIL", f"ended: {handle.final}")
    handle.stop()
    stopped = handle.wait(300)
    second = start_run(project, ["training.devices=2", "training.max_steps=100000"], run_name="ddp-abort")
    while time.monotonic() < deadline and not any(e["type"] == "step" for e in second.events(0.5)):
        if second.ended:
            return row("two-GPU data parallel", "bundled", "FAIL", f"ended: {second.final}")
    root = psutil.Process(second._process.pid)
    procs = [root, *root.children(recursive=True)]
    second.abort()
    aborted = second.wait(120)
    time.sleep(5)
    alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    ok = stopped == "stopped" and aborted == "aborted" and not alive
    return row("two-GPU data parallel", "bundled", "ok" if ok else "FAIL",
               f"stop: {stopped}; abort: {aborted}; processes left: {alive or 'none'}")


# -- throughput against the best plain trl script ------------------------------------------------

TP_BATCH = 8
TP_MAX_LENGTH = 1024
TP_WARMUP = 3  # steps left out of the rate (loading, compiling, the allocator settling in)
TP_GOAL = 1.5  # tunedeck's tok/s over trl's; and tunedeck's peak memory no more than trl's

#: the best plain trl script we could write for a GPU: the model by path in bf16 with
#: flash-attention 2 where flash_attn imports (sdpa otherwise), padding-free batches (rows of
#: the demo fit max_length, so trl's max_length=None truncates nothing; longer ones would be
#: left out), gradient checkpointing as tunedeck resolved it, the same LoRA, batch and steps.
#: It prints, as its last line, (step, time, tokens) at each logged step (the point where
#: tunedeck writes its step events) and torch's peak memory since training began (reset at
#: on_train_begin, as tunedeck's trainer does).
TRL_BEST = r"""
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

o = json.loads(sys.argv[1])
cuda = torch.cuda.is_available() and not o["use_cpu"]
attn = "sdpa"
if cuda:
    try:
        import flash_attn  # noqa: F401
        attn = "flash_attention_2"
    except Exception:
        pass
tokenizer = AutoTokenizer.from_pretrained(o["model"])
rows = [json.loads(line) for line in open(o["data"], encoding="utf-8") if line.strip()]
fits = [r for r in rows if len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
        <= o["max_length"]]
dataset = Dataset.from_list([{"messages": r["messages"]} for r in fits])

class Clock(TrainerCallback):
    marks = []
    def on_train_begin(self, args, state, control, **kw):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.time(), state.num_input_tokens_seen))

bf16 = o["precision"] == "bf16"
args = SFTConfig(
    output_dir=o["out"], max_steps=o["steps"], per_device_train_batch_size=o["batch"], gradient_accumulation_steps=1,
    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
    bf16=bf16, model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32", "attn_implementation": attn},
    activation_checkpointing=o["gradient_checkpointing"],  # transformers 5's name of gradient_checkpointing
    padding_free=True, max_length=None,                    # one sequence per batch, no padding; rows already fit
    use_cpu=o["use_cpu"], report_to="none", logging_steps=1, save_strategy="no", seed=42, disable_tqdm=True,
    include_num_input_tokens_seen="all",                   # padding-free: every input token is a real one
)
assert args.gradient_checkpointing == o["gradient_checkpointing"]
peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=o["model"], args=args, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config, callbacks=[Clock()])
trainer.train()
print(json.dumps({"marks": Clock.marks, "peak": int(torch.cuda.max_memory_allocated()) if cuda else None,
                  "attention": str(trainer.model.config._attn_implementation), "precision": o["precision"],
                  "gradient_checkpointing": bool(args.gradient_checkpointing), "rows": len(fits),
                  "left_out": len(rows) - len(fits)}))
"""


def rate(marks: list[tuple[int, float, int]], warmup: int) -> float | None:
    """Tokens per second from the end of step ``warmup`` to the end of the last step."""
    if len(marks) <= warmup:
        return None
    (_, t0, n0), (_, t1, n1) = marks[warmup - 1], marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def demo_rows(needed: int) -> list[dict[str, Any]]:
    """The demo's rows (sample_data/python_qa.jsonl) repeated: at least ``needed`` of them, twice over at least."""
    text = (REPO / "sample_data" / "python_qa.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows * (max(needed, 1) // len(rows) + 2)


def run_trl(workdir: Path, model: Path, data: Path, *, steps: int, precision: str, gradient_checkpointing: bool,
            use_cpu: bool, gpus: list[str] | None, timeout: float = 3600) -> dict[str, Any]:
    """TRL_BEST in a subprocess, on the GPU tunedeck's run had (CUDA_VISIBLE_DEVICES): what it printed, or
    ``{"error": ...}``."""
    import subprocess

    script = workdir / "trl_best.py"
    script.write_text(TRL_BEST, encoding="utf-8")
    opts = {"model": str(model), "data": str(data), "steps": steps, "out": str(workdir / "trl-out"),
            "batch": TP_BATCH, "max_length": TP_MAX_LENGTH, "precision": precision,
            "gradient_checkpointing": gradient_checkpointing, "use_cpu": use_cpu}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        proc = subprocess.run([sys.executable, str(script), json.dumps(opts)], check=False, capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=workdir)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " / ".join(tail)[-400:]}
    return json.loads(lines[-1])


def throughput_check(folder: Path, label: str, model: Path, *, steps: int, warmup: int, gpu: bool) -> dict[str, Any]:
    """`tunedeck train` as a user runs it (precision "auto", default settings) against TRL_BEST on the
    demo rows repeated, max_length 1024, LoRA r=16 on all linear layers, batch 8, one GPU each: tokens/s
    after the warm-up steps (goal: tunedeck >= 1.5x) and torch's peak memory (goal: tunedeck's no more)."""
    check = "throughput vs trl"
    project = write_project(folder, model, steps=steps, rows=demo_rows(steps * TP_BATCH),
                            dataset={"max_length": TP_MAX_LENGTH},
                            training={"batch_size": TP_BATCH, "grad_accum": 1, "devices": 1})
    run = train(project, "throughput")
    if run["status"] != "finished":
        return row(check, label, "FAIL", f"tunedeck {run['status']}: {run['reason']}")
    events = run["events"]
    started = next((e for e in events if e["type"] == "run_started"), {})
    resolved = started.get("resolved") or {}
    data_info = started.get("data") or {}
    s = summary(run)
    ours = rate([(e["step"], e["time"], e["tokens"]) for e in events if e["type"] == "step"], warmup)
    precision, checkpointing = resolved.get("precision"), bool(resolved.get("gradient_checkpointing"))
    ours_settings = {"precision": precision, "gradient_checkpointing": checkpointing,
                     "kernels": resolved.get("kernels"), "batching": (data_info.get("batching") or {}).get("layout"),
                     "loss": data_info.get("loss"), "attention": data_info.get("attention")}
    if precision not in ("bf16", "fp32"):
        return row(check, label, "skipped", f"tunedeck chose {precision}; the trl script runs bf16 (or fp32 on a "
                   "CPU) only", tunedeck_tokens_per_s=ours, tunedeck_settings=ours_settings)
    theirs = run_trl(folder, model, project.parent / "data.jsonl", steps=steps, precision=precision,
                     gradient_checkpointing=checkpointing, use_cpu=resolved.get("device") != "cuda",
                     gpus=list(resolved.get("gpus") or []) or None)
    if "error" in theirs:
        return row(check, label, "FAIL", f"trl script: {theirs['error']}", tunedeck_tokens_per_s=ours,
                   tunedeck_settings=ours_settings)
    trl_rate = rate([tuple(m) for m in theirs.pop("marks")], warmup)
    ours_peak, trl_peak = s["torch_peak"], theirs.pop("peak", None)
    ratio = ours / trl_rate if ours and trl_rate else None
    memory_ok = ours_peak <= trl_peak if ours_peak and trl_peak else None
    estimate_total = (started.get("memory_estimate") or {}).get("total")
    numbers = {"tunedeck_tokens_per_s": ours, "trl_tokens_per_s": trl_rate, "ratio": ratio, "goal_ratio": TP_GOAL,
               "tunedeck_peak": ours_peak, "trl_peak": trl_peak, "memory_estimate": estimate_total,
               "steps": steps, "warmup_steps": warmup, "batch_size": TP_BATCH, "max_length": TP_MAX_LENGTH,
               "tunedeck_settings": ours_settings, "trl_settings": theirs}

    def gib(value: int | None) -> str:
        return f"{value / GiB:.2f} GiB" if value else "n/a"

    speed = f"{ratio:.2f}x" if ratio else "n/a"
    detail = [f"tunedeck {ours or 0:,.0f} vs trl {trl_rate or 0:,.0f} tok/s: {speed} (goal >= {TP_GOAL:g}x)",
              f"peak {gib(ours_peak)} vs {gib(trl_peak)} (goal: tunedeck <= trl)",
              (f"tunedeck {precision}, {ours_settings['batching']}, kernels {ours_settings['kernels']}, "
               f"{ours_settings['loss']}, {ours_settings['attention']}"),
              f"trl {theirs.get('precision')}, padding-free, {theirs.get('attention')}",
              f"checkpointing {'on' if checkpointing else 'off'} (both)"]
    if not gpu:
        return row(check, label, "ok" if ratio else "FAIL",
                   f"smoke run ({steps} steps on a CPU), not a measurement: " + "; ".join(detail), **numbers)
    met = ratio is not None and ratio >= TP_GOAL and memory_ok is True
    return row(check, label, "ok" if met else "FAIL", "; ".join(detail if met else ["goal missed", *detail]),
               **numbers)


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [f"GPU check on {machine} ({time.strftime('%Y-%m-%d')})", "",
             "| check | model | result | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['check']} | {r['model']} | {r['result']} | {r['detail']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="the checks a CPU can run, on a tiny model")
    args = parser.parse_args()
    from tunedeck.core.hardware import detect
    from tunedeck.core.models import ensure_default_model

    hw = detect()
    gpu = bool(hw.gpus) and not args.cpu_smoke
    if not gpu and not args.cpu_smoke:
        print("no CUDA GPU here (NVML sees none): nothing to check; --cpu-smoke runs what a CPU can")
        return 0
    if args.cpu_smoke:
        os.environ["TUNEDECK_DEVICE"] = "cpu"
        detect.cache_clear()
    steps = 2 if args.cpu_smoke else args.steps
    rows: list[dict[str, Any]] = []
    bundled = ensure_default_model()
    with tempfile.TemporaryDirectory(prefix="tunedeck-gpu-check-") as tmp:
        folder = Path(tmp)
        models: list[tuple[str, Path]]
        if args.cpu_smoke:
            models = [("tiny", build_random_llama(folder / "tiny", bundled, "tiny"))]
        else:
            models = [("bundled SmolLM2-135M", bundled), ("1B random", build_random_llama(folder / "1b", bundled, "1b"))]
        for label, model in models:
            project = write_project(folder / label.split()[0], model, steps=steps)
            rows.append(training_check("bf16 LoRA", label, project, "bf16-lora", ["training.precision=bf16"], gpu))
            rows.append(training_check("4-bit QLoRA", label, project, "qlora",
                                       ["quantization.mode=4bit", "quantization.compute_dtype=bfloat16"], gpu))
        first_model, first_project = models[0][1], folder / models[0][0].split()[0] / "project.toml"
        old = [g for g in hw.gpus if not g.bf16] if gpu else []
        if old:
            rows.append(training_check("fp16 on a GPU without bf16", models[0][0], first_project, "fp16",
                                       [f"training.devices=[{old[0].index}]"], gpu))
        else:
            rows.append(row("fp16 on a GPU without bf16", models[0][0], "skipped",
                            "every GPU here has bf16" if gpu else "needs a GPU"))
        if gpu:
            rows.append(out_of_memory_check(folder, first_model, models[0][0]))
        else:
            rows.append(row("out of memory reported", models[0][0], "skipped", "needs a GPU (a CPU run would take "
                            "the machine's RAM); the message is tested without one"))
        if gpu and len([g for g in hw.gpus if not g.mig]) >= 2:
            rows.append(data_parallel_check(first_project))
        else:
            rows.append(row("two-GPU data parallel", models[0][0], "skipped", "needs two GPUs"))
        # throughput against trl: the 1B and the 8B (built now, when the other checks are done) on a GPU,
        # the tiny model on a CPU; the bundled model is left out (too small for the GPU to be the limit)
        sizes: list[tuple[str, str]] = [("1B random", "1b"), ("8B random", "8b")] if gpu else [("tiny", "tiny")]
        for label, size in sizes:
            built = dict(models).get(label) or build_random_llama(folder / size, bundled, size)
            rows.append(throughput_check(folder / f"throughput-{size}", label, built, steps=steps,
                                         warmup=max(1, min(TP_WARMUP, steps - 1)), gpu=gpu))
    machine = hw.describe() if gpu else "CPU (smoke run)"
    table = markdown(rows, machine)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"machine": machine, "time": time.time(), "rows": rows},
                                                        indent=2) + "\n", encoding="utf-8")
    (args.out / "gpu_check.md").write_text(table, encoding="utf-8")
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
