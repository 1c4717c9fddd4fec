"""What the machine has, without importing torch: NVML for GPUs, /proc for the rest.

Used to resolve "auto" settings (precision, gradient checkpointing) in the CLI and the
UI. Every query may answer "not available"; nothing here raises on a machine without
NVIDIA drivers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total: int  # bytes
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)
    cpu_count: int = 1
    ram_total: int = 0  # bytes

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @property
    def bf16(self) -> bool:
        return bool(self.gpus) and all(g.bf16 for g in self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"CPU ({self.cpu_count} cores, {self.ram_total / 2**30:.0f} GiB RAM)"
        names = ", ".join(f"{g.name} ({g.memory_total / 2**30:.0f} GiB)" for g in self.gpus)
        return f"{len(self.gpus)} x GPU: {names}"


def _visible(index: int) -> bool:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return True
    wanted = [x.strip() for x in env.split(",") if x.strip()]
    return str(index) in wanted


def _nvml_gpus() -> tuple[Gpu, ...]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip() in ("", "-1"):
        return ()
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library: a CPU machine
        return ()
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            if not _visible(i):
                continue
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except Exception:
                cc = (0, 0)
            gpus.append(Gpu(i, name, int(mem), (int(cc[0]), int(cc[1]))))
    except Exception:
        return tuple(gpus)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return tuple(gpus)


def _ram_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@lru_cache(maxsize=1)
def detect() -> Hardware:
    """The machine as seen now (cached for the process)."""
    if os.environ.get("TUNEDECK_DEVICE", "").lower() == "cpu":
        gpus: tuple[Gpu, ...] = ()
    else:
        gpus = _nvml_gpus()
    return Hardware(gpus=gpus, cpu_count=os.cpu_count() or 1, ram_total=_ram_total())
