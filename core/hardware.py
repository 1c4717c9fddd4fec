"""What the machine has, without importing torch: NVML for GPUs, psutil for the rest.

One NVML wrapper (:data:`NVML`, initialised on first use, every query allowed to answer
"not available") and one reading of ``CUDA_VISIBLE_DEVICES`` (:func:`visible_entries`)
serve everything that looks at GPUs: the "auto" settings, the choice of GPUs for a run,
the trainer's ``system`` events, the chat engine and merge.

``CUDA_VISIBLE_DEVICES`` is read as CUDA reads it: indices, GPU UUIDs (``GPU-…``, or a
unique prefix of one), MIG device UUIDs (``MIG-…``, and the older
``MIG-GPU-<uuid>/<gi>/<ci>``), the list ending at the first entry that names nothing;
``-1`` or an empty value hides every GPU. Indices count GPUs in CUDA's order, which is the
PCI bus order NVML uses when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (tunedeck sets it for its
trainer) or when every GPU is the same model; on a box of mixed GPUs without it, numbers
are ambiguous and :attr:`Hardware.notes` says so. A MIG slice is a device of its own, with
its own memory (NVML's numbers for the whole card would be wrong for it).

Nothing here raises on a machine without NVIDIA drivers.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .precision import NO_NATIVE_BF16, cpu_auto
from .units import format_in

_UUID_PREFIX = re.compile(r"^(GPU|MIG)-", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    """A device CUDA can run on: a whole GPU, or one MIG slice of one."""

    index: int  # NVML index of the physical GPU (its parent's, for a MIG slice)
    name: str
    memory_total: int  # bytes (the slice's own, for MIG)
    compute_capability: tuple[int, int]
    uuid: str = ""  # "GPU-…", or "MIG-…" for a slice
    memory_free: int | None = None
    mig: bool = False
    parent_uuid: str = ""  # a slice's GPU
    instance: tuple[int, int] | None = None  # a slice's GPU instance and compute instance ids

    @property
    def bf16(self) -> bool:
        """Native bf16 (Ampere and newer); torch's own check also counts emulation."""
        return self.compute_capability >= (8, 0)

    @property
    def cuda_id(self) -> str:
        """How ``CUDA_VISIBLE_DEVICES`` names this device, unambiguously."""
        return self.uuid or str(self.index)

    @property
    def label(self) -> str:
        return f"GPU {self.index}" + (f" MIG {self.uuid[4:12]}" if self.mig else "")


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)  # what this process may use, in CUDA's order
    cpu_count: int = 1
    ram_total: int = 0  # bytes
    notes: tuple[str, ...] = ()  # e.g. CUDA_VISIBLE_DEVICES that names no GPU here
    # what "auto" precision picks on this CPU, and why (tunedeck.core.precision: its flags and probe)
    cpu_precision: str = "fp32"
    cpu_precision_reason: str = NO_NATIVE_BF16

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def describe(self) -> str:
        """One line; a run decides its precision for the GPUs it uses (tunedeck.core.resolve)."""
        if not self.gpus:
            return f"CPU ({self.cpu_count} cores, {format_in(self.ram_total, 'GiB', '.0f')} RAM)"
        names = ", ".join(f"{g.name} ({format_in(g.memory_total, 'GiB', '.0f')})" for g in self.gpus)
        return f"{len(self.gpus)} x GPU: {names}"


# -- NVML ----------------------------------------------------------------------------------------


class Nvml:
    """NVML, initialised on first use and kept; every query may answer None."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def lib(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._lib = pynvml
                except Exception:  # no driver or no library: a CPU machine
                    self._lib = None
        return self._lib

    def reset(self) -> None:
        """Forget the library (tests swap in a stand-in)."""
        with self._lock:
            self._lib, self._tried = None, False

    @staticmethod
    def _try(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            return None

    def devices(self) -> list[tuple[Gpu, Any]]:
        """Every device with its NVML handle: each GPU, or each MIG slice of a GPU in MIG mode,
        in NVML (PCI bus) order."""
        nv = self.lib()
        if nv is None:
            return []
        count = self._try(nv.nvmlDeviceGetCount) or 0
        out: list[tuple[Gpu, Any]] = []
        for index in range(int(count)):
            handle = self._try(nv.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            name = _text(self._try(nv.nvmlDeviceGetName, handle)) or "GPU"
            cc = self._try(nv.nvmlDeviceGetCudaComputeCapability, handle) or (0, 0)
            cc = (int(cc[0]), int(cc[1]))
            uuid = _text(self._try(nv.nvmlDeviceGetUUID, handle))
            mig = self._try(nv.nvmlDeviceGetMigMode, handle)
            if mig is not None and int(mig[0]) == 1:
                for slot in range(int(self._try(nv.nvmlDeviceGetMaxMigDeviceCount, handle) or 0)):
                    sub = self._try(nv.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
                    if sub is None:
                        continue
                    memory = self._try(nv.nvmlDeviceGetMemoryInfo, sub)
                    gi = self._try(nv.nvmlDeviceGetGpuInstanceId, sub)
                    ci = self._try(nv.nvmlDeviceGetComputeInstanceId, sub)
                    out.append((Gpu(index, name, int(memory.total) if memory else 0, cc,
                                    _text(self._try(nv.nvmlDeviceGetUUID, sub)),
                                    int(memory.free) if memory else None, mig=True, parent_uuid=uuid,
                                    instance=(int(gi), int(ci)) if gi is not None and ci is not None else None),
                                sub))
                continue
            memory = self._try(nv.nvmlDeviceGetMemoryInfo, handle)
            out.append((Gpu(index, name, int(memory.total) if memory else 0, cc, uuid,
                            int(memory.free) if memory else None), handle))
        return out

    def handle_of(self, gpu: Gpu) -> Any:
        nv = self.lib()
        if nv is None:
            return None
        if gpu.uuid:
            handle = self._try(nv.nvmlDeviceGetHandleByUUID, gpu.uuid)
            if handle is not None:
                return handle
        return None if gpu.mig else self._try(nv.nvmlDeviceGetHandleByIndex, gpu.index)

    def readings(self, gpu: Gpu, own: dict[str, int] | None = None) -> dict[str, int | None]:
        """Memory used / total, utilisation, temperature and other processes' memory of a
        device. ``own``: this process's torch memory (``reserved``), which tells it apart in
        NVML's process list when NVML's pids are not this container's."""
        out: dict[str, int | None] = dict.fromkeys(GPU_FIELDS)
        nv, handle = self.lib(), self.handle_of(gpu)
        if nv is None or handle is None:
            return out
        memory = self._try(nv.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            out["gpu_memory_used"], out["gpu_memory_total"] = int(memory.used), int(memory.total)
        rates = self._try(nv.nvmlDeviceGetUtilizationRates, handle)
        out["gpu_utilization"] = int(rates.gpu) if rates is not None else None
        temperature = self._try(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
        out["gpu_temperature"] = int(temperature) if temperature is not None else None
        procs = self._try(nv.nvmlDeviceGetComputeRunningProcesses, handle)
        if procs is not None:
            out["gpu_memory_others"] = others_memory(
                [(int(p.pid), int(p.usedGpuMemory or 0)) for p in procs], os.getpid(), (own or {}).get("reserved"))
        return out


def others_memory(procs: list[tuple[int, int]], own_pid: int, own_reserved: int | None) -> int:
    """What the other processes on a GPU hold. NVML names processes by the host's pids: in a
    container this process's pid is not among them, so it is told apart by its memory (the
    entry nearest above torch's reserved memory: the context adds a few hundred MB)."""
    if any(pid == own_pid for pid, _ in procs):
        return sum(used for pid, used in procs if pid != own_pid)
    total = sum(used for _, used in procs)
    if own_reserved:
        mine = [used for _, used in procs if used >= own_reserved]
        if mine:
            return total - min(mine)
    return total


GPU_FIELDS = ("gpu_memory_used", "gpu_memory_total", "gpu_utilization", "gpu_temperature", "gpu_memory_others")
NVML = Nvml()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


# -- CUDA_VISIBLE_DEVICES --------------------------------------------------------------------------


def visible_entries(env: dict[str, str] | os._Environ[str] | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries; None when it is not set (every GPU)."""
    raw = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def match_visible(entries: list[str] | None, devices: list[Gpu],
                  pci_order: bool = True) -> tuple[list[Gpu], list[str]]:
    """The devices CUDA makes visible for ``entries``, in their order, and notes on what
    could not be matched. ``pci_order``: whether CUDA numbers GPUs by PCI bus (as NVML)."""
    whole = [d for d in devices if not d.mig]
    if entries is None:
        return list(devices), []
    notes: list[str] = []
    if not pci_order and len({d.name for d in whole}) > 1 and any(e.lstrip("-").isdigit() for e in entries):
        notes.append("CUDA_VISIBLE_DEVICES names GPUs by number on a machine with different GPUs, and CUDA numbers "
                     "them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID: set that, or name GPUs by UUID "
                     "(nvidia-smi -L)")
    chosen: list[Gpu] = []
    for entry in entries:
        found = _match_entry(entry, devices, whole)
        if found is None:
            break  # CUDA stops at the first entry that names nothing
        if found not in chosen:
            chosen.append(found)
    if entries and not chosen and devices and entries[0] != "-1":
        shown = ", ".join(f"{d.label} {d.uuid}" for d in devices)
        notes.append(f"CUDA_VISIBLE_DEVICES={','.join(entries)} names none of this machine's GPUs ({shown}); name "
                     "them by index or by UUID (nvidia-smi -L), or unset it")
    return chosen, notes


def _match_entry(entry: str, devices: list[Gpu], whole: list[Gpu]) -> Gpu | None:
    if entry.isdigit():
        index = int(entry)
        return whole[index] if index < len(whole) else None
    legacy = re.fullmatch(r"MIG-(GPU-[0-9a-fA-F-]+)/(\d+)/(\d+)", entry)
    if legacy:  # the older form: the parent GPU's UUID, the GPU instance and the compute instance
        wanted = (int(legacy.group(2)), int(legacy.group(3)))
        found = [d for d in devices if d.mig and d.parent_uuid.lower() == legacy.group(1).lower()
                 and d.instance == wanted]
        return found[0] if found else None
    if not _UUID_PREFIX.match(entry):
        return None
    matches = [d for d in devices if d.uuid.lower().startswith(entry.lower())]
    return matches[0] if len(matches) == 1 else None


def _ram_total() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return 0


def _cpu_count() -> int:
    """Logical CPUs (psutil, as for the RAM; os.cpu_count where psutil cannot say)."""
    try:
        import psutil

        return int(psutil.cpu_count() or os.cpu_count() or 1)
    except Exception:
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def detect() -> Hardware:
    """The machine as this process sees it (cached for the process)."""
    return scan()


def scan() -> Hardware:
    """The machine as this process sees it now (free memory read afresh)."""
    cpu = cpu_auto()
    machine = {"cpu_count": _cpu_count(), "ram_total": _ram_total(), "cpu_precision": cpu.precision,
               "cpu_precision_reason": cpu.reason}
    if os.environ.get("TUNEDECK_DEVICE", "").lower() == "cpu":
        return Hardware(gpus=(), **machine)
    devices = [gpu for gpu, _ in NVML.devices()]
    entries = visible_entries()
    pci = os.environ.get("CUDA_DEVICE_ORDER", "").upper() == "PCI_BUS_ID"
    gpus, notes = match_visible(entries, devices, pci_order=pci)
    return Hardware(gpus=tuple(gpus), notes=tuple(notes), **machine)


@dataclass(frozen=True)
class Placement:
    """Where a model goes for chat or merge: ``device_map`` for transformers, and why."""

    device: str  # "cpu" | "cuda"
    device_map: Any  # {"": "cpu"} | {"": cuda index} | "auto"
    max_memory: dict[Any, int] | None
    gpu: Gpu | None
    why: str


def placement(need: int | None, *, spread: bool = True, hardware: Hardware | None = None,
              headroom: float = 1.2) -> Placement:
    """The visible GPU with the most free memory when ``need`` bytes fit on it (with
    headroom); across every GPU (``device_map="auto"``) when only their sum holds it and
    ``spread``; else the CPU. Free memory is NVML's, read now: what a run or another
    process holds is not counted as free."""
    hw = hardware or scan()
    if not hw.gpus:
        return Placement("cpu", {"": "cpu"}, None, None, "no GPU")
    free = [(g.memory_free if g.memory_free is not None else g.memory_total, i, g) for i, g in enumerate(hw.gpus)]
    room, index, gpu = max(free, key=lambda item: item[0])
    wanted = int((need or 0) * headroom)
    if not need or wanted <= room:
        return Placement("cuda", {"": index}, None, gpu, f"on {gpu.label} ({format_in(room, 'GiB', '.0f')} free)")
    total = sum(f for f, _, _ in free)
    if spread and len(free) > 1 and wanted <= total:
        budget = {i: int(f * 0.9) for f, i, _ in free}
        return Placement("cuda", "auto", budget, gpu,
                         f"spread over {len(free)} GPUs ({format_in(total, 'GiB', '.0f')} free)")
    return Placement("cpu", {"": "cpu"}, None, None,
                     f"on the CPU: it needs ~{format_in(wanted, 'GiB')} and the GPU with the most free memory, "
                     f"{gpu.label}, has {format_in(room, 'GiB')}")
