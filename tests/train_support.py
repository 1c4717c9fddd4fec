"""Helpers for the training tests: projects on tiny models, and running a trainer in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ANSWER = "Abracadabra, open sesame!"


def memorisable_rows(n: int = 8) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": "Say the magic words."},
                          {"role": "assistant", "content": ANSWER}]}] * n


def counting_rows(n: int = 24) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


def write_project(folder: Path, model: Path | str, rows: list[dict[str, Any]] | None = None, **sections: dict) -> Path:
    """A project file in ``folder`` training ``model`` on ``rows``; ``sections`` override keys,
    e.g. ``training={"max_steps": 3}``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows if rows is not None else counting_rows())),
                    encoding="utf-8")
    values: dict[str, dict[str, Any]] = {
        "model": {"source": str(model)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dataset": {"path": "data.jsonl", "max_length": 96},
        "training": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "save_steps": 100},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    lines = ["schema = 1", 'name = "t"']
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path = folder / "project.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_inprocess(project: Path, overrides: list[str] | None = None, run_name: str = "r", resume: bool = False,
                    deep: bool = True):
    """Run the trainer in this process (after the pre-flight; ``deep=False`` leaves the
    target check to the trainer); returns (exit code, events, run dir)."""
    from tunedeck.core.events import EventLog
    from tunedeck.core.rundir import prepare_run
    from tunedeck.core.trainer import Controls, Emitter, run

    events: list[dict[str, Any]] = []
    with prepare_run(project, overrides or [], run_name=run_name, resume=resume, deep=deep) as prepared:
        spec = prepared.spec
        # peft draws the adapter's first weights from the global generators before the trainer
        # seeds them (with training.seed): seeded here first, so that a run in this process is
        # the same whichever tests ran in it before (a test file alone, in another order, or on
        # another pytest-xdist worker)
        from transformers import set_seed
        from tunedeck.core.preflight import load_project

        set_seed(load_project(spec.project_path, overrides or [])["training.seed"])
        with EventLog(Path(spec.run_dir) / "events.jsonl") as log:
            code = run(spec, Emitter(log, echo=events.append), Controls())
    return code, events, Path(spec.run_dir)


def wait_events(handle, predicate, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Collect a run's events until one satisfies ``predicate``; fail on timeout or on the run's end."""
    import time

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in handle.events(0.2):
            seen.append(ev)
            if predicate(ev):
                return seen
        assert not handle.ended, f"the run ended first: {handle.final}"
    raise AssertionError(f"timed out; events so far: {[e['type'] for e in seen]}")


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def sharpened_copy(model_dir: Path, out: Path, factor: float = 16.0) -> Path:
    """The tiny model with its final norm scaled up. Its random tied embeddings give logits too
    flat for a LoRA adapter to move far in a few steps; scaled, a small set is memorised in ~10."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out

