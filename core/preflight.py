"""The checks before a run: the one set of refusals a project meets before anything is created.

:func:`preflight` checks the settings against this machine, the model's files, the
dataset, an accelerate config (:func:`check_accelerate_config`), and, when ``deep``, the
target modules against the model's real layers (built on the meta device) and the rows
through its tokenizer and chat template. ``tunedeck check``, ``tunedeck train`` and the
Train screen (through the engine process, so the UI stays light) all call it. The deep
checks' answers are kept on disk (:func:`tunedeck.core.kept.kept_answer`), so an unchanged
project is not asked again.

No heavy imports at module level: the deep checks import torch and transformers when run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .kept import kept_answer, stamp
from .sources import data_stamps


def load_project(project_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The project file at ``project_path``, with ``overrides`` (``--set KEY=VALUE``) applied."""
    from .project import Project

    project = Project.load(project_path)
    project.apply_overrides(list(overrides))
    return project


@dataclass
class Preflight:
    """What the checks before a run found: the model's files, the resolved settings, the
    rows, and (after the deep checks) the parameters that will train."""

    ref: Any  # tunedeck.core.models.ModelRef
    resolved: Any  # tunedeck.core.resolve.Resolved
    splits: Any  # tunedeck.core.datafile.Splits
    counts: dict[str, int] | None = None  # trainable_params, total_params, target_layers
    notes: tuple[str, ...] = ()  # what the run should warn about (e.g. ambiguous GPU numbers)


def preflight(project: Any, *, deep: bool = True, inspection: Any = None) -> Preflight:
    """Every refusal a run can know before it starts: `tunedeck check`, `tunedeck train`
    and the Train screen call this, so a project one of them passes none refuses.

    ``deep``: also the checks that need the model's code: ``lora.target_modules`` against
    the model's layers (built on the meta device) and the rows through its tokenizer and
    chat template (a model without one, a set where no row trains). They import torch and
    transformers; the UI asks the engine process to run them, and their answers are kept
    on disk, so an unchanged project is not asked again. ``inspection``: the model's
    Inspection when the caller keeps one. Raises UserError with one line.
    """
    from .datafile import load_splits
    from .hardware import detect
    from .models import resolve_source
    from .resolve import resolve

    hardware = detect()
    if not hardware.gpus and hardware.notes:  # GPUs here, but CUDA_VISIBLE_DEVICES names none of them
        raise UserError(hardware.notes[-1])
    resolved = resolve(project, hardware)
    ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
    mode = project["quantization.mode"]
    if ref.kind == "gguf" and mode != "none":
        raise UserError(
            f'quantization.mode = "{mode}" cannot be used with a .gguf source ({ref.source}): GGUF weights are '
            "already quantized and load dequantized, not through bitsandbytes; convert the model to a safetensors "
            'folder first, or set quantization.mode = "none"'
        )
    config = project["training.accelerate_config"]
    if config:
        check_accelerate_config(project.resolve_path(config))
    project = adapter_settings(project)  # model.adapter: its own [lora] settings train
    splits = load_splits(project)
    counts = None
    if deep:
        if resolved.device == "cuda":
            check_torch_cuda(hardware)
        counts = target_counts(project, ref, inspection)
        check_rendering(project, ref, splits)
    return Preflight(ref, resolved, splits, counts, hardware.notes)


def adapter_settings(project: Any) -> Any:
    """The project as it trains: with ``model.adapter`` set, a copy whose ``[lora]`` settings
    are that adapter's (the run continues it); else the project itself. UserError (one line)
    when the adapter does not fit (:func:`tunedeck.core.chat.start_adapter`)."""
    from .chat import start_adapter
    from .project import Project

    start = start_adapter(project)
    if start is None:
        return project
    copy = Project.from_text(project.text(), project.path)
    copy.set_many([(f"lora.{k}", v) for k, v in start.lora.items()])
    return copy


def target_counts(project: Any, ref: Any, inspection: Any = None) -> dict[str, int]:
    """What ``[lora]`` trains on the project's model, or its refusal (UserError): peft's
    matching on the model built on the meta device (:func:`tunedeck.core.inspect.project_counts`)."""
    from .inspect import project_counts

    if inspection is not None:  # the engine keeps the model's inspection: nothing to save
        return project_counts(project, inspection)
    lora = ("target_modules", "r", "use_dora", "bias", "modules_to_save")
    key = {"model": stamp(ref.path if ref.path.is_file() else ref.path / "config.json"),
           "trust": project["model.trust_remote_code"], "lora": {k: project[f"lora.{k}"] for k in lora}}
    return kept_answer("targets", key, lambda: project_counts(project),
                       code=("inspect.py", "targets.py", "modelconfig.py"), keep_refusal=_about_the_settings)


def check_rendering(project: Any, ref: Any, splits: Any) -> None:
    """The rows through the model's tokenizer and chat template, as the trainer renders
    them (:func:`tunedeck.core.render.render_splits`, stopping at the first row that trains):
    refuses a model without a chat template for chat rows, and a set where no row trains."""

    def render() -> dict[str, bool]:
        from .models import load_tokenizer
        from .render import render_splits

        tokenizer = load_tokenizer(ref, trust_remote_code=project["model.trust_remote_code"])
        render_splits(project, tokenizer, splits, model_label=f"model {ref.display}", until_one_trains=True)
        return {"ok": True}

    model = stamp(ref.path)  # a folder: its files but the weights
    data = [data_stamps(project)]
    if isinstance(project["dataset.eval_split"], str):
        data.append(stamp(project.resolve_path(project["dataset.eval_split"])))
    key = {"model": model, "data": data, "trust": project["model.trust_remote_code"],
           "template": project["model.chat_template"], "dataset": project.values["dataset"],
           "seed": project["training.seed"], "method": project["training.method"]}
    kept_answer("rendering", key, render, code=("render.py", "datafile.py", "conversation.py", "sources.py",
                                                "preference.py"), keep_refusal=_about_the_settings)


def _about_the_settings(exc: UserError) -> bool:
    """A refusal about the project's settings is kept; one about a file that could not be
    read just now is asked again."""
    return re.search(r"\b(lora|dataset|model|training|preference)\.[a-z_]+", exc.message) is not None


def check_accelerate_config(path: Path) -> None:
    """An accelerate config tunedeck can train with: readable, and not sharding the model
    (FSDP, DeepSpeed ZeRO-3), which the LoRA / QLoRA set-up does not support: adapters kept in
    fp32 on a bf16 base (FSDP wants one dtype per flat parameter) and QLoRA's 4-bit weights
    placed per GPU at load time. Raises UserError with one line."""
    import json as _json

    import yaml

    key = "training.accelerate_config"
    if not path.is_file():
        raise UserError(f"{key}: {path} is not a file; write one with `accelerate config --config_file FILE`, or "
                        "leave it empty for plain data parallel")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{key}: {path} is not a readable accelerate config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path} is not an accelerate config (a YAML mapping, as `accelerate config` writes)")
    kind = str(data.get("distributed_type") or "").upper()
    stage = None
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") if isinstance(data.get("deepspeed_config"), dict) else {}
        stage = ds.get("zero_stage")
        file = ds.get("deepspeed_config_file")
        if stage is None and isinstance(file, str):
            try:
                stage = _json.loads((path.parent / file).read_text(encoding="utf-8"))["zero_optimization"]["stage"]
            except (OSError, ValueError, KeyError, TypeError):
                stage = None
    if kind == "FSDP" or stage == 3:
        what = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO-3"
        raise UserError(f"{key}: {path} uses {what}, which shards the model over the GPUs; tunedeck's LoRA and "
                        "QLoRA set-up does not support that yet (fp32 adapters on a bf16 base, 4-bit weights placed "
                        "per GPU); use DeepSpeed ZeRO-1 or ZeRO-2, or plain data parallel (leave it empty)")


def check_torch_cuda(hardware: Any) -> None:
    """NVML sees a GPU: can torch use it? (a CPU build of torch, or a driver too old for its CUDA)"""
    import torch

    if torch.cuda.is_available():
        return
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build, without CUDA"
    gpu = hardware.gpus[0]
    raise UserError(f"{gpu.label} ({gpu.name}) is here, but torch {torch.__version__} ({built}) cannot use it; install "
                    "the CUDA build of torch that matches the driver (`nvidia-smi` shows the driver's CUDA version; "
                    "e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128), or train on the CPU "
                    "with TUNEDECK_DEVICE=cpu")
