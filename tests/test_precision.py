""""auto" precision: measured on a CPU, decided per GPU, and said why; training.kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tunedeck.core import precision
from tunedeck.core.errors import ProjectError
from tunedeck.core.hardware import Gpu, Hardware
from tunedeck.core.project import Project
from tunedeck.core.resolve import resolve, resolve_kernels


def project_of(text: str = "") -> Project:
    return Project.from_text("schema = 1\n" + text)

EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2690 v4\nflags\t\t: fpu sse avx avx2\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
FAST = {"version": precision.PROBE_VERSION, "bf16": True, "speedup": 2.4, "loss_gap": 0.0004}
SLOW = {"version": precision.PROBE_VERSION, "bf16": False, "speedup": 0.9, "loss_gap": 0.0004}
DIFFERENT = {"version": precision.PROBE_VERSION, "bf16": False, "speedup": 2.4, "loss_gap": 0.2}


def test_native_bf16_is_read_from_the_cpu_flags():
    assert precision.bf16_flags(EPYC) == ["avx512_bf16"]
    assert precision.bf16_flags(SAPPHIRE) == ["amx_bf16"]
    assert precision.bf16_flags(GRAVITON3) == ["bf16"]
    assert precision.bf16_flags(OLD_XEON) == [] and precision.bf16_flags("") == []


@pytest.mark.parametrize("cpuinfo, probe, expected, words", [
    (OLD_XEON, None, "fp32", "no native bf16"),
    ("", None, "fp32", "no native bf16"),
    (EPYC, None, "bf16", "first run confirms"),
    (EPYC, FAST, "bf16", "2.4x as fast"),
    (SAPPHIRE, FAST, "bf16", "AMX-BF16"),
    (GRAVITON3, FAST, "bf16", "BF16"),
    (EPYC, SLOW, "fp32", "only 0.9x"),
    (EPYC, DIFFERENT, "fp32", "differed from fp32 by 20%"),
])
def test_auto_says_what_it_picks_and_why(cpuinfo, probe, expected, words):
    choice = precision.cpu_auto(cpuinfo, probe)
    assert choice.precision == expected
    assert words in choice.reason and "\n" not in choice.reason


def test_a_broken_probe_file_reads_as_not_measured(tmp_path):
    path = tmp_path / "p.json"
    for text in ("{not json", json.dumps({"version": precision.PROBE_VERSION}), json.dumps([1]),
                 json.dumps({**FAST, "version": 0})):
        path.write_text(text)
        assert precision.cached_probe(path) is None
    path.write_text(json.dumps(FAST))
    assert precision.cached_probe(path) == FAST


def test_the_probe_measures_once_per_machine(tmp_path, monkeypatch):
    """For real on this CPU: with native bf16 the probe runs (a few seconds) and is kept; the
    next call reads it. Without, there is nothing to measure."""
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(tmp_path))
    path = precision.probe_path()
    assert path.is_relative_to(tmp_path)
    answer = precision.ensure_probe()
    if not precision.bf16_flags():
        assert answer is None and not path.exists()
        assert precision.cpu_auto().precision == "fp32"
        return
    assert answer["speedup"] > 0 and len(answer["losses_fp32"]) == len(answer["losses_bf16"]) > 1
    assert answer["loss_gap"] < precision.MAX_LOSS_GAP  # bf16 autocast trains the same on any CPU with it
    kept = path.stat().st_mtime_ns
    assert precision.ensure_probe() == answer and path.stat().st_mtime_ns == kept
    assert precision.cpu_auto().measured and precision.cpu_auto().precision == ("bf16" if answer["bf16"] else "fp32")


def test_a_cache_folder_that_cannot_be_written_leaves_auto_to_the_flags(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("TUNEDECK_CACHE_DIR", str(blocked))  # its "probes" folder cannot be made
    assert precision.ensure_probe() is None  # no error, nothing measured
    expected = "bf16" if precision.bf16_flags() else "fp32"
    assert precision.cpu_auto().precision == expected and not precision.cpu_auto().measured


def test_the_screens_read_the_answer_without_torch():
    code = ("import sys; from tunedeck.core.resolve import resolve; from tunedeck.core.project import Project; "
            "r = resolve(Project.from_text('schema = 1')); print(r.precision, bool(r.precision_reason), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["True", "False"] and out[0] in ("bf16", "fp32")


def _gpu(index: int, cc: tuple[int, int], name: str) -> Gpu:
    return Gpu(index=index, name=name, memory_total=80 * 2**30, compute_capability=cc, uuid=f"GPU-{index}")


def test_on_gpus_auto_is_bf16_where_every_gpu_has_it_and_says_which_has_not():
    project = project_of()
    both = Hardware(gpus=(_gpu(0, (9, 0), "H100"), _gpu(1, (8, 0), "A100")), cpu_count=8, ram_total=2**36)
    r = resolve(project, both)
    assert r.precision == "bf16" and "native bf16" in r.precision_reason
    mixed = Hardware(gpus=(_gpu(0, (9, 0), "H100"), _gpu(1, (7, 5), "T4")), cpu_count=8, ram_total=2**36)
    r = resolve(project, mixed)
    assert r.precision == "fp16" and "GPU 1 (T4)" in r.precision_reason and "H100" not in r.precision_reason
    assert resolve(project_of('[training]\nprecision = "fp32"'), both).precision_reason == \
        "set in the project"


def test_kernels_resolve_per_device(monkeypatch):
    from tunedeck.core import resolve as resolve_module

    monkeypatch.setattr(resolve_module, "installed", lambda module: False)
    assert resolve_kernels("auto", "cpu") == "none" and resolve_kernels("auto", "cuda") == "none"
    with pytest.raises(ProjectError, match=r"tunedeck\[gpu\]"):
        resolve_kernels("liger", "cuda")
    monkeypatch.setattr(resolve_module, "installed", lambda module: module == "liger_kernel")
    assert resolve_kernels("auto", "cuda") == "liger" and resolve_kernels("none", "cuda") == "none"
    assert resolve_kernels("auto", "cpu") == "none"
    with pytest.raises(ProjectError, match="needs a CUDA GPU"):
        resolve_kernels("liger", "cpu")


def test_packing_with_padded_batches_is_refused_in_one_line():
    project = project_of("[dataset]\npacking = true\npadding_free = false")
    with pytest.raises(ProjectError) as err:
        resolve(project, Hardware(cpu_count=2, ram_total=2**34))
    assert "dataset.padding_free" in str(err.value) and "\n" not in str(err.value)


def test_the_memory_estimate_knows_the_heads_and_kernels():
    from tunedeck.core.memory import (
        ArchInfo,
        LoraFootprint,
        WeightSplit,
        estimate_memory,
    )

    arch = ArchInfo(model_type="llama", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                    head_dim=128, vocab_size=128256, gated_mlp=True)
    weights = WeightSplit(total=8_000_000_000, quantizable=7_000_000_000)
    lora = LoraFootprint(trainable_params=40_000_000, layers=224, input_features=4096 * 224, r=16, dropout=0.0)
    common = dict(batch_size=4, max_length=2048, gradient_checkpointing=False, device="cuda")
    plain = estimate_memory(arch, weights, lora, **common)
    liger = estimate_memory(arch, weights, lora, kernels="liger", **common)
    assert liger.activations < plain.activations and liger.lm_head == plain.lm_head
    cpu = estimate_memory(arch, weights, lora, **{**common, "device": "cpu"})
    logits = 4 * 2048 * arch.vocab_size * 4  # what full fp32 logits would take
    assert cpu.lm_head < logits / 4  # the compact head builds a chunk of them at a time
