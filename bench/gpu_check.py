"""The GPU check: what only a CUDA machine shows, as one table (`make gpu-check`).

Each check is a real `tunedeck` run (the launcher, the trainer process, its events), read
back from its run folder:

- bf16 LoRA and 4-bit QLoRA, 20 steps each, on the bundled SmolLM2 and on a 1B-size llama
  config with random weights: finished, tokens/s, torch's peak memory against the memory
  estimate (the run records both), NVML's reading against torch's;
- fp16 on a GPU without native bf16, when the machine has one;
- an out-of-memory run (a batch far too large) reported as out of GPU memory, in words;
- two-GPU data parallel, stopped and then aborted, when there are two GPUs (every process
  of the aborted run gone).

It prints the table, and writes it to ``bench/results/gpu_check.json`` and ``.md`` (the
README's benchmark section keeps the latest). ``--cpu-smoke`` runs the same checks that a
CPU can (bf16 LoRA and 4-bit QLoRA on a tiny model, two steps) so the script is known to
work on the day a GPU is there; the test suite runs it so.

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


def build_random_llama(out: Path, tokenizer_dir: Path, size: str) -> Path:
    """A llama with random weights and the bundled tokenizer: "1b" (hidden 2048, 16 layers) or "tiny"."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8),
             "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)}[size]
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if size == "1b" else torch.float32)
    model.save_pretrained(out, safe_serialization=True)
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
        from tunedeck.core.launcher import load_project

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
