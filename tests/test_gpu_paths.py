"""The paths that run only on a GPU box, decided without one: a stand-in NVML (GPUs, MIG
slices, other processes), CUDA_VISIBLE_DEVICES as CUDA reads it, the choice of GPUs and
precision, the trainer's readings, placement for chat and merge, and the refusals the
pre-flight owes a GPU user. What only a real GPU shows is in bench/gpu_check.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nvml_stand_in import GiB, Card, Slice, forget, use
from tunedeck.core.errors import ProjectError, UserError
from tunedeck.core.hardware import Gpu, Hardware, detect, match_visible, others_memory, placement, visible_entries
from tunedeck.core.project import Project
from tunedeck.core.resolve import resolve

A100 = "NVIDIA A100-SXM4-80GB"
V100 = "Tesla V100-SXM2-16GB"


@pytest.fixture
def gpus(monkeypatch):
    """Install GPUs: ``gpus(cards, visible=..., order=...)``."""

    def install(cards, visible=None, order=None):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        if order is None:
            monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
        else:
            monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
        return use(monkeypatch, cards)

    yield install
    forget()


def box() -> list[Card]:
    """A mixed box: an A100 with room, a V100 (no native bf16), an A100 split into MIG slices."""
    return [
        Card(A100, "GPU-aaaa1111-0000", 80 * GiB, used=60 * GiB, cc=(8, 0)),
        Card(V100, "GPU-bbbb2222-0000", 16 * GiB, used=1 * GiB, cc=(7, 0)),
        Card(A100, "GPU-cccc3333-0000", 80 * GiB, cc=(8, 0), slices=[
            Slice("MIG-dddd4444-0000", 20 * GiB, instance=(1, 0)), Slice("MIG-eeee5555-0000", 40 * GiB, 5 * GiB,
                                                                         instance=(2, 0))]),
    ]


def project(text: str = "") -> Project:
    return Project.from_text(f"schema = 1\n[training]\n{text}\n")


def test_cuda_visible_devices_is_read_as_cuda_reads_it(gpus):
    gpus(box())
    hw = detect()
    assert [g.uuid for g in hw.gpus] == ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "MIG-dddd4444-0000",
                                         "MIG-eeee5555-0000"]
    slice_ = hw.gpus[3]
    assert slice_.mig and slice_.memory_total == 40 * GiB and slice_.memory_free == 35 * GiB  # its own, not the card's
    devices = list(hw.gpus)
    assert [g.uuid for g in match_visible(["GPU-bbbb"], devices)[0]] == ["GPU-bbbb2222-0000"]  # a unique prefix
    assert [g.uuid for g in match_visible(["MIG-eeee5555-0000"], devices)[0]] == ["MIG-eeee5555-0000"]
    assert [g.uuid for g in match_visible(["MIG-GPU-cccc3333-0000/2/0"], devices)[0]] == ["MIG-eeee5555-0000"]
    assert [g.index for g in match_visible(["1", "0"], devices)[0]] == [1, 0]  # CUDA's order is the list's
    assert [g.index for g in match_visible(["1", "nonsense", "0"], devices)[0]] == [1]  # CUDA stops at a bad entry
    assert match_visible([], devices)[0] == [] and match_visible(["-1"], devices) == ([], [])
    chosen, notes = match_visible(["GPU-ffff"], devices)
    assert chosen == [] and "names none of this machine's GPUs" in notes[0] and "nvidia-smi -L" in notes[0]
    _, notes = match_visible(["0"], devices, pci_order=False)  # an A100 and a V100: numbers are ambiguous
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in notes[0]
    assert visible_entries({"CUDA_VISIBLE_DEVICES": " 0, GPU-x ,"}) == ["0", "GPU-x"] and visible_entries({}) is None


def test_a_cuda_visible_devices_that_names_no_gpu_is_refused_not_trained_on_the_cpu(gpus, tmp_path):
    from tui_helpers import write_project

    from tunedeck.core.preflight import preflight

    gpus(box(), visible="GPU-0123456789")
    assert detect().gpus == ()
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=GPU-0123456789 names none of this machine's GPUs"):
        preflight(Project.load(write_project(tmp_path)), deep=False)


def test_gpus_are_chosen_by_free_memory_and_precision_by_the_chosen_ones(gpus):
    gpus(box()[:2], order="PCI_BUS_ID")  # an A100 with 20 GiB free, a V100 with 15 GiB free
    one = resolve(project("devices = 1"))
    assert one.gpus == ("GPU-aaaa1111-0000",) and one.precision == "bf16"  # not fp16 for the V100 it does not use
    v100 = resolve(project("devices = [1]"))
    assert v100.gpus == ("GPU-bbbb2222-0000",) and v100.precision == "fp16"
    with pytest.raises(ProjectError, match=r'"bf16" is not supported by GPU 1 \(Tesla V100'):
        resolve(project('devices = [1]\nprecision = "bf16"'))
    both = resolve(project('devices = "auto"'))
    assert both.processes == 2 and both.precision == "fp16"
    with pytest.raises(ProjectError, match="GPU 5 is not visible here"):
        resolve(project("devices = [0, 5]"))


def test_a_run_uses_one_mig_slice(gpus):
    gpus(box()[2:])
    assert resolve(project("devices = 1")).gpus == ("MIG-eeee5555-0000",)  # the slice with the most free memory
    with pytest.raises(ProjectError, match="a run uses one MIG slice"):
        resolve(project('devices = "auto"'))


def test_the_trainer_sees_its_gpus_by_uuid_and_in_pci_order(gpus):
    from tunedeck.core.launcher import trainer_env
    from tunedeck.core.rundir import RunSpec

    gpus(box()[:2])
    spec = RunSpec(run_dir="r", name="r", resume=False, project_path="p", processes=2,
                   gpus=resolve(project('devices = "auto"')).gpus)
    env = trainer_env(spec, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa1111-0000,GPU-bbbb2222-0000"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_system_readings_follow_the_trainers_own_gpu_and_tell_other_processes_apart(gpus, monkeypatch):
    from tunedeck.core.events import system_fields

    cards = box()[:2]
    cards[0].procs = [(os.getpid(), 50 * GiB), (4242, 10 * GiB)]
    cards[1].procs = [(99999, 9 * GiB)]
    gpus(cards, visible="GPU-bbbb2222-0000,GPU-aaaa1111-0000")  # CUDA's device 0 is the V100 here
    fields = system_fields(1, 40 * GiB, torch_reserved=45 * GiB, torch_allocated=38 * GiB)
    assert (fields["gpu_memory_used"], fields["gpu_memory_total"]) == (60 * GiB, 80 * GiB)
    assert fields["gpu_memory_others"] == 10 * GiB and fields["torch_allocated"] == 38 * GiB
    assert [g["uuid"] for g in fields["gpus"]] == ["GPU-bbbb2222-0000", "GPU-aaaa1111-0000"]
    assert system_fields(0, None)["gpu_memory_total"] == 16 * GiB
    # in a container NVML names this process by the host's pid: it is the entry that holds its memory
    assert others_memory([(777, 46 * GiB), (4242, 10 * GiB)], own_pid=12, own_reserved=45 * GiB) == 10 * GiB
    assert others_memory([(777, 46 * GiB)], own_pid=777, own_reserved=None) == 0


def test_the_memory_alarm_counts_what_torch_holds_not_its_cache():
    from tunedeck.core.health import Health

    cached = {"type": "system", "step": 5, "gpu_memory_used": 78 * GiB, "gpu_memory_total": 80 * GiB,
              "torch_allocated": 30 * GiB, "gpu_memory_others": 2 * GiB}
    assert Health().observe(cached) == []  # NVML says 97% used, most of it torch's cache
    full = {**cached, "torch_allocated": 75 * GiB}
    [alarm] = Health().observe(full)
    assert alarm.kind == "gpu_memory_full" and "96% full" in alarm.message


def test_the_preflight_refuses_a_gpu_this_torch_cannot_use(gpus, tmp_path):
    from tui_helpers import write_project

    from tunedeck.core.preflight import preflight

    gpus(box()[:1])
    import torch

    assert not torch.cuda.is_available()  # the CPU build of torch on this machine: what a user gets by mistake
    with pytest.raises(UserError) as refused:
        preflight(Project.load(write_project(tmp_path)))
    line = refused.value.message
    assert f"torch {torch.__version__}" in line and "cannot use it" in line and "TUNEDECK_DEVICE=cpu" in line
    assert "\n" not in line


def test_a_trainer_started_by_hand_as_one_process_trains_on_one_gpu(gpus, monkeypatch, tmp_path):
    from tui_helpers import write_project

    from tunedeck.core.trainer import one_process_devices

    gpus(box()[:2])
    path = write_project(tmp_path)
    with pytest.raises(UserError, match=r"training.devices asks for 2 processes and this is one.*torchrun"):
        one_process_devices(str(path), [])
    one_process_devices(str(path), ["training.devices=1"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa1111-0000"  # before CUDA starts: no DataParallel
    assert [g.uuid for g in detect().gpus] == ["GPU-aaaa1111-0000"]


def test_chat_and_merge_go_where_there_is_room():
    big = Gpu(0, A100, 80 * GiB, (8, 0), "GPU-a", memory_free=20 * GiB)
    roomy = Gpu(1, V100, 16 * GiB, (7, 0), "GPU-b", memory_free=15 * GiB)
    hw = Hardware(gpus=(big, roomy))
    assert placement(10 * GiB, hardware=hw).device_map == {"": 0}  # the most free memory
    spread = placement(25 * GiB, hardware=hw)
    assert spread.device_map == "auto" and spread.max_memory == {0: int(18 * GiB), 1: int(13.5 * GiB)}
    cpu = placement(25 * GiB, hardware=hw, spread=False)  # merge keeps the model on one device
    assert cpu.device == "cpu" and "needs ~30.0 GiB" in cpu.why and "GPU 0, has 20.0 GiB" in cpu.why
    assert placement(1, hardware=Hardware()).device == "cpu"


def test_chat_takes_the_precision_training_would(gpus, monkeypatch):
    import torch

    from tunedeck.core import chat, models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models, "describe", lambda ref: SimpleNamespace(params=1_000_000_000))
    state = chat.ChatState()
    gpus([Card(V100, "GPU-v", 16 * GiB, cc=(7, 0))])  # torch counts bf16 emulation as supported here
    assert state._place(None) == (torch.float16, {"": 0}, None)
    gpus([Card(A100, "GPU-a", 80 * GiB, cc=(8, 0))])
    assert state._place(None) == (torch.bfloat16, {"": 0}, None)
    gpus([Card(A100, "GPU-a", 80 * GiB, used=79 * GiB, cc=(8, 0))])  # no room: the CPU, in fp32
    assert state._place(None) == (torch.float32, {"": "cpu"}, None) and "on the CPU" in state.placed


def test_accelerate_configs_that_shard_the_model_are_refused_in_the_preflight(tmp_path):
    from tunedeck.core.preflight import check_accelerate_config

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 8\n")
    with pytest.raises(UserError, match="uses FSDP, which shards the model"):
        check_accelerate_config(fsdp)
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n")
    with pytest.raises(UserError, match="uses DeepSpeed ZeRO-3"):
        check_accelerate_config(zero3)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    by_file = tmp_path / "file.yaml"
    by_file.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n")
    with pytest.raises(UserError, match="ZeRO-3"):
        check_accelerate_config(by_file)
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n")
    check_accelerate_config(zero2)
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [unclosed\n")
    with pytest.raises(UserError, match="is not a readable accelerate config"):
        check_accelerate_config(broken)


def test_moe_models_look_for_unused_parameters_under_ddp():
    from tunedeck.core.finetune import is_moe

    assert is_moe(SimpleNamespace(num_local_experts=8, num_experts_per_tok=2))
    assert is_moe(SimpleNamespace(n_routed_experts=64))
    assert not is_moe(SimpleNamespace(hidden_size=64)) and not is_moe(SimpleNamespace(num_experts=1))


def test_out_of_gpu_memory_says_so_with_the_estimate_and_what_to_do(tmp_path):
    from tui_helpers import write_project

    from tunedeck.core.rundir import write_snapshot
    from tunedeck.core.trainer import failure_of

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    write_snapshot(Project.load(write_project(tmp_path)), run_dir)
    spec = SimpleNamespace(run_dir=str(run_dir), project_path=str(tmp_path / "demo.toml"))
    kind, reason = failure_of(RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), spec, 12)
    assert kind == "out_of_memory" and reason.startswith("out of GPU memory at step 12 (batch 4 x 1024 tokens; "
                                                         "estimated ~")
    for advice in ("training.batch_size", "dataset.max_length", "gradient_checkpointing", '"4bit"'):
        assert advice in reason


def test_system_fields_without_nvml_say_not_available(monkeypatch):
    from tunedeck.core.events import system_fields

    monkeypatch.setitem(sys.modules, "pynvml", None)  # no library: import fails
    forget()
    try:
        fields = system_fields(0, None)
        assert fields["gpu_memory_used"] is None and fields["gpus"] == []
    finally:
        forget()


@pytest.mark.slow
def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """bench/gpu_check.py, the script to run the day a GPU is here, is exercised on the CPU
    (bf16 LoRA, 4-bit QLoRA, a too-large batch, tunedeck against a plain trl script) so that
    it works when it is needed."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = json.loads((tmp_path / "gpu_check.json").read_text())
    results = {row["check"]: row["result"] for row in table["rows"]}
    assert results == {"bf16 LoRA": "ok", "4-bit QLoRA": "ok", "fp16 on a GPU without bf16": "skipped",
                       "out of memory reported": "skipped", "two-GPU data parallel": "skipped",
                       "throughput vs trl": "ok"}, table["rows"]
    assert "| check | model | result | detail |" in (tmp_path / "gpu_check.md").read_text()
