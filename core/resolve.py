""""auto" settings made concrete for the machine at hand, and the checks between them.

On a CPU: fp32 and no gradient checkpointing (memory is rarely the limit for the models
that train on a CPU). On a GPU: bf16 where every visible GPU supports it, else fp16;
gradient checkpointing on.

``training.devices`` becomes the processes of the run: on a GPU machine one per chosen GPU
("auto": every visible one); on a CPU, the number asked for (1 for "auto"), over gloo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ProjectError
from .hardware import Gpu, Hardware, detect
from .project import Project

DTYPE_OF_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Resolved:
    device: str  # cpu | cuda
    precision: str  # bf16 | fp16 | fp32
    gradient_checkpointing: bool
    compute_dtype: str  # bfloat16 | float16 | float32 (for quantized layers)
    target_modules: str | list[str]
    effective_batch: int  # rows per optimizer step, over every process
    hardware: str
    processes: int = 1  # trainer processes (data parallel when more than one)
    gpus: tuple[str, ...] | None = None  # the run's CUDA_VISIBLE_DEVICES: its GPUs' UUIDs (None on a CPU)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(project: Project, hardware: Hardware | None = None) -> Resolved:
    """Concrete values for every "auto" setting; raises ProjectError when they cannot work.
    Precision is decided for the GPUs the run will use, not for every GPU of the machine."""
    hw = hardware or detect()
    label = str(project.path) if project.path else None
    chosen = choose_gpus(project["training.devices"], hw, label)
    processes = len(chosen) if chosen else (1 if project["training.devices"] == "auto"
                                            else int(project["training.devices"]))
    device = "cuda" if chosen else "cpu"
    bf16 = bool(chosen) and all(g.bf16 for g in chosen)
    precision = project["training.precision"]
    if precision == "auto":
        precision = ("bf16" if bf16 else "fp16") if device == "cuda" else "fp32"
    elif device == "cpu" and precision == "fp16":
        raise ProjectError("training.precision", '"fp16" needs a GPU (mixed precision with fp16 is not '
                           'supported on a CPU); use "auto", "fp32" or "bf16"', label)
    elif device == "cuda" and precision == "bf16" and not bf16:
        slow = ", ".join(f"{g.label} ({g.name})" for g in chosen if not g.bf16)
        raise ProjectError("training.precision", f'"bf16" is not supported by {slow} (it needs compute capability '
                           '8.0, Ampere or newer); use "auto" or "fp16"', label)
    gc = project["training.gradient_checkpointing"]
    if gc == "auto":
        gc = device == "cuda"
    compute = project["quantization.compute_dtype"]
    if compute == "auto":
        compute = DTYPE_OF_PRECISION[precision]
    mode = project["quantization.mode"]
    if mode != "none" and device == "cpu" and compute == "float16":
        raise ProjectError("quantization.compute_dtype", '"float16" is not supported on a CPU; use "auto", '
                           '"float32" or "bfloat16"', label)
    used = Hardware(gpus=tuple(chosen), cpu_count=hw.cpu_count, ram_total=hw.ram_total) if chosen else hw
    return Resolved(
        device=device,
        precision=precision,
        gradient_checkpointing=bool(gc),
        compute_dtype=compute,
        target_modules=project["lora.target_modules"],
        effective_batch=project["training.batch_size"] * project["training.grad_accum"] * processes,
        hardware=used.describe(),
        processes=processes,
        gpus=tuple(g.cuda_id for g in chosen) if chosen else None,
    )


def choose_gpus(devices: Any, hw: Hardware, label: str | None = None) -> list[Gpu]:
    """The GPUs a run uses for ``training.devices`` ([] on a CPU): "auto" every visible one,
    a count the ones with the most free memory, a list the GPUs of those NVML indices (as
    nvidia-smi numbers them). In CUDA's order."""
    if hw.device == "cpu":
        if isinstance(devices, list):
            raise ProjectError("training.devices", f"{devices} names GPUs, but this machine has none that tunedeck "
                               'can use; give a number of processes (on a CPU they train over gloo) or "auto"', label)
        return []
    visible = list(hw.gpus)
    if devices == "auto":
        chosen = visible
    elif isinstance(devices, int):
        if devices > len(visible):
            raise ProjectError("training.devices", f"{devices} GPUs asked for, {len(visible)} visible "
                               f"({hw.describe()}); lower it or use \"auto\"", label)
        roomiest = sorted(visible, key=lambda g: -(g.memory_free or 0))[:devices]
        chosen = [g for g in visible if g in roomiest]
    else:
        by_index = {g.index: g for g in visible if not g.mig}
        missing = [i for i in devices if i not in by_index]
        if missing:
            shown = ", ".join(str(i) for i in sorted(by_index)) or "MIG slices only (chosen with CUDA_VISIBLE_DEVICES)"
            raise ProjectError("training.devices", f"GPU {', '.join(map(str, missing))} is not visible here; the "
                               f"visible GPUs are {shown}", label)
        chosen = [by_index[i] for i in devices]
    if len(chosen) > 1 and any(g.mig for g in chosen):
        raise ProjectError("training.devices", "a run uses one MIG slice (CUDA gives a process one); choose one with "
                           "training.devices = 1 or CUDA_VISIBLE_DEVICES=MIG-…", label)
    return chosen
