"""A stand-in for pynvml (nvidia-ml-py): the surface tunedeck uses, over GPUs described in
plain data, MIG slices included. Install it with :func:`use`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

GiB = 2**30


class NVMLError(Exception):
    pass


@dataclass
class Slice:
    uuid: str
    total: int
    used: int = 0
    instance: tuple[int, int] = (0, 0)


@dataclass
class Card:
    name: str
    uuid: str
    total: int
    used: int = 0
    cc: tuple[int, int] = (9, 0)
    util: int = 0
    temp: int = 40
    procs: list[tuple[int, int]] = field(default_factory=list)  # (pid, bytes)
    slices: list[Slice] = field(default_factory=list)  # MIG mode when any


class StandIn:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, cards: list[Card]) -> None:
        self.cards = cards

    # handles: ("card", i) or ("slice", i, j)
    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self.cards):
            raise NVMLError("invalid argument")
        return ("card", index)

    def _card(self, handle: Any) -> Card:
        return self.cards[handle[1]]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._card(handle).name

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return self._card(handle).cc

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        if handle[0] == "slice":
            return self._card(handle).slices[handle[2]].uuid
        return self._card(handle).uuid

    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]:
        mode = 1 if self._card(handle).slices else 0
        return mode, mode

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        return 7 if self._card(handle).slices else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        if index >= len(self._card(handle).slices):
            raise NVMLError("not found")
        return ("slice", handle[1], index)

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        return self._card(handle).slices[handle[2]].instance[0]

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        return self._card(handle).slices[handle[2]].instance[1]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        for i, card in enumerate(self.cards):
            if card.uuid == uuid:
                return ("card", i)
            for j, piece in enumerate(card.slices):
                if piece.uuid == uuid:
                    return ("slice", i, j)
        raise NVMLError("not found")

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if handle[0] == "slice":
            piece = self._card(handle).slices[handle[2]]
            return SimpleNamespace(total=piece.total, used=piece.used, free=piece.total - piece.used)
        card = self._card(handle)
        return SimpleNamespace(total=card.total, used=card.used, free=card.total - card.used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        if handle[0] == "slice":
            raise NVMLError("not supported")
        return SimpleNamespace(gpu=self._card(handle).util)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return self._card(handle).temp

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._card(handle).procs]


def use(monkeypatch: Any, cards: list[Card]) -> StandIn:
    """Make ``cards`` the machine's GPUs for tunedeck (NVML and the cached detection)."""
    from tunedeck.core import hardware

    stand_in = StandIn(cards)
    monkeypatch.setitem(sys.modules, "pynvml", stand_in)
    hardware.NVML.reset()
    hardware.detect.cache_clear()
    monkeypatch.delenv("TUNEDECK_DEVICE", raising=False)
    return stand_in


def forget() -> None:
    from tunedeck.core import hardware

    hardware.NVML.reset()
    hardware.detect.cache_clear()
