""""auto" settings made concrete for the machine at hand, and the checks between them.

Precision on a CPU: bf16 autocast where the CPU has native bf16 and a probe measured it
faster with the same loss (:mod:`tunedeck.core.precision`), else fp32. On a GPU: bf16 where
every GPU of the run supports it, else fp16. :attr:`Resolved.precision_reason` says why.
Gradient checkpointing: off on a CPU (memory is rarely the limit for the models that train
on one), on for GPUs.

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
    precision_reason: str = ""  # why this precision, in one line
    kernels: str = "none"  # none | liger: fused kernels for the model's layers (CUDA)

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
    without_bf16 = ", ".join(f"{g.label} ({g.name})" for g in chosen if not g.bf16)
    precision = project["training.precision"]
    reason = "set in the project"
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if bf16 else "fp16"
            reason = ("every GPU of the run has native bf16 (compute capability 8.0 or newer)" if bf16 else
                      f"{without_bf16} has no native bf16 (compute capability below 8.0), so fp16 with loss scaling")
        else:  # measured once per machine (tunedeck.core.precision), read with the hardware
            precision, reason = hw.cpu_precision, hw.cpu_precision_reason
    elif device == "cpu" and precision == "fp16":
        raise ProjectError("training.precision", '"fp16" needs a GPU (mixed precision with fp16 is not '
                           'supported on a CPU); use "auto", "fp32" or "bf16"', label)
    elif device == "cuda" and precision == "bf16" and not bf16:
        raise ProjectError("training.precision", f'"bf16" is not supported by {without_bf16} (it needs compute capability '
                           '8.0, Ampere or newer); use "auto" or "fp16"', label)
    if project["dataset.packing"] and project["dataset.padding_free"] is False:
        raise ProjectError("dataset.padding_free", "false pads every batch, but dataset.packing = true puts several "
                           'rows in one sequence, which needs padding-free batches; set it to "auto" or turn '
                           "packing off", label)
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
    kernels = resolve_kernels(project["training.kernels"], device, label)
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
        precision_reason=reason,
        kernels=kernels,
    )


def installed(module: str) -> bool:
    """Whether a Python package can be imported here (found, not imported)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_kernels(kernels: str, device: str, label: str | None = None) -> str:
    """``training.kernels`` made concrete: "liger" (Liger's fused RMSNorm, RoPE and SwiGLU;
    the fused cross-entropy is trl's LM head) on CUDA where it is installed, for "auto";
    "none" elsewhere. Asking for "liger" where it cannot run is refused."""
    if kernels == "none":
        return "none"
    if kernels == "liger":
        if device != "cuda":
            raise ProjectError("training.kernels", '"liger" needs a CUDA GPU (its kernels are Triton); use "auto" '
                               'or "none" on a CPU', label)
        if not installed("liger_kernel"):
            raise ProjectError("training.kernels", '"liger" needs the liger-kernel package: pip install '
                               '"tunedeck[gpu]" (make setup installs it on a machine with an NVIDIA GPU)', label)
        return "liger"
    return "liger" if device == "cuda" and installed("liger_kernel") else "none"


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
