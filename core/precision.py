"""What "auto" precision means on a CPU: bf16 autocast where it is measured to be fast and
to train the same, fp32 elsewhere.

bf16 matmuls are fast on CPUs with native bf16 instructions (x86 AVX512-BF16 or AMX, Arm's
BF16 extension) and slow everywhere else, where they are emulated. The instructions alone
do not settle it (a library build may not use them), so the trainer measures once per
machine (:func:`ensure_probe`): a small stack of linear layers, forward and backward, timed
in fp32 and under bf16 autocast, and a tiny model trained a few steps both ways from the
same start, whose losses must agree. The answer is kept in the cache folder, keyed by the
CPU and the torch version, and read from there by everything else (:func:`cpu_auto`), so
the screens say what a run will use without importing torch.

Before the first probe on a machine, a CPU with the instructions is expected to pick bf16;
the run's ``run_started`` event records what it really used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import cache_dir

PROBE_VERSION = 1
MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much on the probe's matmuls
MAX_LOSS_GAP = 0.03  # and the losses of a few steps agree within this share
X86_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_FLAGS = ("bf16",)  # the "Features" line of an Arm CPU
NO_NATIVE_BF16 = ("this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16), so bf16 would be emulated and "
                  "slow")


@dataclass(frozen=True)
class CpuPrecision:
    """What "auto" picks on this CPU and why, in one line."""

    precision: str  # bf16 | fp32
    reason: str
    measured: bool  # the probe has run on this machine


@functools.cache
def read_cpuinfo() -> str:
    """This machine's /proc/cpuinfo (empty elsewhere); read once, here only. It is the CPU's
    feature flags and model name, which psutil does not report."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _field(cpuinfo: str, *names: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in names:
            return value.strip()
    return ""


def bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 instructions this CPU announces (empty: none, or not Linux)."""
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(_field(info, "flags").split())
    features = set(_field(info, "features").split())
    return [f for f in X86_FLAGS if f in flags] + [f for f in ARM_FLAGS if f in features]


def cpu_name(cpuinfo: str | None = None) -> str:
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    return _field(info, "model name", "cpu model", "hardware") or platform.processor() or platform.machine()


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def probe_path(cpuinfo: str | None = None) -> Path:
    """Where this machine's answer is kept: one file per CPU model, flags and torch version."""
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    key = "|".join([cpu_name(info), ",".join(bf16_flags(info)), _torch_version(), str(PROBE_VERSION)])
    return cache_dir() / "probes" / f"precision-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def cached_probe(path: Path | None = None) -> dict[str, Any] | None:
    """The probe's answer on this machine, or None before it has run (or when the file is unreadable)."""
    try:
        data = json.loads((path or probe_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != PROBE_VERSION or not isinstance(data.get("bf16"), bool):
        return None
    return data


def cpu_auto(cpuinfo: str | None = None, probe: dict[str, Any] | None | bool = True) -> CpuPrecision:
    """What "auto" picks on this CPU, and why. ``probe``: the probe's answer (True: read the
    cached one); torch is not imported."""
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = bf16_flags(info)
    if not flags:
        return CpuPrecision("fp32", NO_NATIVE_BF16, measured=False)
    shown = ", ".join(f.upper().replace("_", "-") for f in flags)
    answer = cached_probe(probe_path(info)) if probe is True else probe
    if not answer:
        return CpuPrecision("bf16", f"this CPU has {shown}; the first run confirms bf16 with a short probe "
                            "(fp32 if it is not faster or trains differently)", measured=False)
    speedup, gap = answer.get("speedup", 0.0), answer.get("loss_gap", 1.0)
    if answer["bf16"]:
        return CpuPrecision("bf16", f"this CPU has {shown}: bf16 measured {speedup:.1f}x as fast as fp32, with "
                            f"the same loss over a few steps (gap {gap * 100:.2g}%)", measured=True)
    why = (f"bf16 measured only {speedup:.1f}x as fast as fp32" if speedup < MIN_SPEEDUP
           else f"the loss of a few bf16 steps differed from fp32 by {gap * 100:.2g}%")
    return CpuPrecision("fp32", f"this CPU has {shown}, but {why}", measured=True)


# -- the probe (imports torch; the trainer runs it) ------------------------------------------


def ensure_probe(path: Path | None = None) -> dict[str, Any] | None:
    """The probe's answer, measured now when this machine has none (a few seconds, once).
    Processes of one run wait for each other on a lock, so they all read the same answer.
    None on a CPU without native bf16 (nothing to measure)."""
    info = read_cpuinfo()
    if not bf16_flags(info):
        return None
    path = path or probe_path(info)
    answer = cached_probe(path)
    if answer is not None:
        return answer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _Lock(path.with_suffix(".lock"))
    except OSError:  # a cache folder that cannot be written: "auto" goes by the CPU's flags
        return None
    with lock:
        answer = cached_probe(path)
        if answer is None:
            answer = run_probe()
            answer.update(cpu=cpu_name(info), flags=bf16_flags(info), torch=_torch_version())
            from .project import atomic_write_text

            try:
                atomic_write_text(path, json.dumps(answer, indent=2) + "\n")
            except OSError:
                pass
    return answer


class _Lock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Any = open(path, "a+")  # noqa: SIM115 - held until __exit__; raises OSError here, not later

    def __enter__(self) -> _Lock:
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()  # closing releases the lock


def run_probe(repeats: int = 6) -> dict[str, Any]:
    """Measure bf16 autocast against fp32 on this CPU: the speed of a transformer-sized
    block of matmuls (forward and backward), and the losses of a tiny model trained a few
    steps from the same start."""
    import torch

    t0 = time.time()
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    width, hidden, tokens = 512, 1536, 256
    block = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, width))
    block.requires_grad_(False)  # frozen, like a LoRA base: only the input's gradient flows
    x = torch.randn(tokens, width, requires_grad=True)

    def timed(bf16: bool) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = block(x)
                y = block(y)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    timed(True), timed(False)  # warm-up: oneDNN picks its kernels
    fp32_s, bf16_s = timed(False), timed(True)
    losses = {bf16: _few_steps(torch, bf16) for bf16 in (False, True)}
    gap = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses[False], losses[True], strict=True))
    speedup = fp32_s / bf16_s if bf16_s > 0 else 0.0
    return {"version": PROBE_VERSION, "bf16": speedup >= MIN_SPEEDUP and gap <= MAX_LOSS_GAP,
            "speedup": round(speedup, 3), "loss_gap": round(gap, 5), "fp32_s": fp32_s, "bf16_s": bf16_s,
            "losses_fp32": losses[False], "losses_bf16": losses[True], "threads": threads,
            "seconds": round(time.time() - t0, 2), "time": time.time(), "pid": os.getpid()}


def _few_steps(torch: Any, bf16: bool, steps: int = 8) -> list[float]:
    """The losses of a tiny next-token model trained ``steps`` steps (Adam), from seed 0."""
    gen = torch.Generator().manual_seed(0)
    vocab, width, n = 256, 128, 512
    data = torch.randint(0, vocab, (n + 1,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width), torch.nn.LayerNorm(width),
                                torch.nn.Linear(width, vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(data[:-1])
        loss = torch.nn.functional.cross_entropy(logits.float(), data[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses
