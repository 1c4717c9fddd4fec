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
from .hardware import Hardware, detect
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
    gpus: tuple[int, ...] | None = None  # NVML indices of the GPUs the run uses (None on a CPU)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(project: Project, hardware: Hardware | None = None) -> Resolved:
    """Concrete values for every "auto" setting; raises ProjectError when they cannot work."""
    hw = hardware or detect()
    label = str(project.path) if project.path else None
    precision = project["training.precision"]
    if precision == "auto":
        precision = ("bf16" if hw.bf16 else "fp16") if hw.device == "cuda" else "fp32"
    elif hw.device == "cpu" and precision == "fp16":
        raise ProjectError("training.precision", '"fp16" needs a GPU (mixed precision with fp16 is not '
                           'supported on a CPU); use "auto", "fp32" or "bf16"', label)
    elif hw.device == "cuda" and precision == "bf16" and not hw.bf16:
        raise ProjectError("training.precision", '"bf16" is not supported by this GPU; use "auto" or "fp16"', label)
    gc = project["training.gradient_checkpointing"]
    if gc == "auto":
        gc = hw.device == "cuda"
    compute = project["quantization.compute_dtype"]
    if compute == "auto":
        compute = DTYPE_OF_PRECISION[precision]
    mode = project["quantization.mode"]
    if mode != "none" and hw.device == "cpu" and compute == "float16":
        raise ProjectError("quantization.compute_dtype", '"float16" is not supported on a CPU; use "auto", '
                           '"float32" or "bfloat16"', label)
    processes, gpus = _devices(project["training.devices"], hw, label)
    return Resolved(
        device=hw.device,
        precision=precision,
        gradient_checkpointing=bool(gc),
        compute_dtype=compute,
        target_modules=project["lora.target_modules"],
        effective_batch=project["training.batch_size"] * project["training.grad_accum"] * processes,
        hardware=hw.describe(),
        processes=processes,
        gpus=gpus,
    )


def _devices(devices: Any, hw: Hardware, label: str | None) -> tuple[int, tuple[int, ...] | None]:
    """(processes, GPU indices) for ``training.devices`` on this machine."""
    if hw.device == "cpu":
        if isinstance(devices, list):
            raise ProjectError("training.devices", f"{devices} names GPUs, but this machine has none that tunedeck "
                               'can use; give a number of processes (on a CPU they train over gloo) or "auto"', label)
        return (1 if devices == "auto" else int(devices)), None
    visible = [g.index for g in hw.gpus]
    if devices == "auto":
        chosen = visible
    elif isinstance(devices, int):
        if devices > len(visible):
            raise ProjectError("training.devices", f"{devices} GPUs asked for, {len(visible)} visible "
                               f"({hw.describe()}); lower it or use \"auto\"", label)
        chosen = visible[:devices]
    else:
        missing = [i for i in devices if i not in visible]
        if missing:
            raise ProjectError("training.devices", f"GPU {', '.join(map(str, missing))} is not visible here; the "
                               f"visible GPUs are {', '.join(map(str, visible))}", label)
        chosen = list(devices)
    return len(chosen), tuple(chosen)
