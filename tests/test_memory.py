"""The memory estimate: its activation term against what autograd really saves, its weight
term by quantization mode, and the config-only estimate the Models list uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tunedeck.core.inspect import estimate, inspect_config, weight_split
from tunedeck.core.memory import (
    CUDA_CONTEXT,
    NF4_BYTES,
    NF4_DQ_BYTES,
    approx_lora,
    approx_weights,
    arch_from_config,
    estimate_for_model,
)
from tunedeck.core.targets import count_trainable

SHAPE = dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
             num_hidden_layers=3, vocab_size=512)
BATCH, LENGTH = 2, 128


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPE)
    return config, inspect_config(config)


def saved_activation_bytes(model, input_ids, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of the
    backbone (no LM head), parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model.get_base_model().model(input_ids=input_ids)
    return sum(seen.values())


@pytest.mark.parametrize(("precision", "dropout", "targets", "checkpointing"), [
    ("fp32", 0.05, "all-linear", False),
    ("bf16", 0.05, "all-linear", False),
    ("bf16", 0.0, "all-linear", False),
    ("bf16", 0.05, ["q_proj", "v_proj"], False),
    ("fp32", 0.05, "all-linear", True),
    ("bf16", 0.05, "all-linear", True),
])
def test_activations_match_what_autograd_saves(llama, precision, dropout, targets, checkpointing):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, ins = llama
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules=targets))
    model.train()
    measured = saved_activation_bytes(model, torch.randint(0, 512, (BATCH, LENGTH)), autocast=precision == "bf16")

    choice = count_trainable(ins, targets, r=8)
    est = estimate(ins, choice, precision=precision, batch_size=BATCH, max_length=LENGTH,
                   gradient_checkpointing=checkpointing, device="cpu", dropout=dropout)
    tokens, h, layers = BATCH * LENGTH, SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    one_layer = (est.activations_full - tokens * (4 * h + 4)) / layers
    if checkpointing:  # what stays saved; the one layer recomputed in backward comes on top
        assert est.activations_checkpointed - one_layer == pytest.approx(measured, rel=0.02)
    else:
        assert est.activations_full == pytest.approx(measured, rel=0.12)
        assert est.activations_full >= measured  # errs on the safe side


def test_weights_by_quantization_mode(llama):
    _, ins = llama
    choice = count_trainable(ins, "all-linear", r=8)
    split = weight_split(ins)
    linear = sum(x.params for x in ins.layers if x.kind == "linear" and x.name != "lm_head")
    assert split.total == ins.total_params and split.quantizable == linear
    common = dict(batch_size=1, max_length=16)
    bf16 = estimate(ins, choice, mode="none", precision="bf16", **common)
    assert bf16.weights == 2 * ins.total_params
    assert estimate(ins, choice, mode="none", precision="fp32", **common).weights == 4 * ins.total_params
    rest = ins.total_params - split.quantizable
    nf4 = estimate(ins, choice, mode="4bit", **common)
    assert nf4.weights == int(split.quantizable * NF4_DQ_BYTES + rest * 4)
    assert estimate(ins, choice, mode="4bit", double_quant=False, **common).weights == int(
        split.quantizable * NF4_BYTES + rest * 4)
    assert estimate(ins, choice, mode="8bit", **common).weights == split.quantizable + rest * 4
    assert bf16.adapter == 16 * choice.trainable_params
    assert bf16.context == CUDA_CONTEXT and estimate(ins, choice, device="cpu", **common).context == 0
    assert bf16.total == bf16.weights + bf16.adapter + bf16.activations + bf16.lm_head + bf16.context


def test_arch_from_config_reads_each_familys_names():
    gpt2 = arch_from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                             "vocab_size": 50257})
    assert (gpt2.intermediate_size, gpt2.num_kv_heads, gpt2.head_dim, gpt2.gated_mlp) == (3072, 12, 64, False)
    falcon = arch_from_config({"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32,
                               "num_attention_heads": 71, "multi_query": True, "vocab_size": 65024})
    assert falcon.num_kv_heads == 1 and falcon.intermediate_size == 4 * 4544
    gemma = arch_from_config({"text_config": {"model_type": "gemma3_text", "hidden_size": 640,
                              "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                              "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144}})
    assert (gemma.q_dim, gemma.kv_dim, gemma.gated_mlp) == (1024, 256, True)
    with pytest.raises(ValueError, match="no hidden_size"):
        arch_from_config({"model_type": "llama"})


def test_config_only_estimate_is_close_to_the_inspected_one(default_model_dir):
    from tunedeck.core.inspect import inspect_model
    from tunedeck.core.models import describe, resolve_source

    info = describe(resolve_source("default"))
    quick = estimate_for_model(info, batch_size=4, max_length=1024, r=16)
    ins = inspect_model(str(default_model_dir))
    exact = estimate(ins, count_trainable(ins, "all-linear", r=16), batch_size=4, max_length=1024)
    assert quick["lora"].weights == exact.weights  # header param count: exact
    assert quick["lora"].total == pytest.approx(exact.total, rel=0.02)
    assert approx_lora(ins.arch, r=16).trainable_params == count_trainable(ins, "all-linear").trainable_params
    assert quick["qlora"].weights < quick["lora"].weights  # (its fp32 residual stream costs more activations)


@pytest.mark.slow
def test_config_only_estimate_imports_no_torch(default_model_dir):
    from tunedeck.core.models import bundled_gguf

    code = (
        "import json, sys\nfrom pathlib import Path\n"
        "from tunedeck.core.memory import estimate_for_model\nfrom tunedeck.core.models import ModelInfo\n"
        f"out = {{}}\nfor kind, path in (('dir', {str(default_model_dir)!r}), ('gguf', {str(bundled_gguf())!r})):\n"
        "    est = estimate_for_model(ModelInfo(source=kind, kind=kind, path=path), batch_size=2, max_length=512)\n"
        "    out[kind] = [est['lora'].total, est['qlora'].total]\n"
        "out['heavy'] = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\nprint(json.dumps(out))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["dir"] == out["gguf"]  # the GGUF header gives the same shape as config.json


def test_a_70b_config_gives_textbook_numbers():
    arch = arch_from_config({"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
                             "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
                             "vocab_size": 128256, "tie_word_embeddings": False})
    split = approx_weights(arch)
    assert split.total == 70_553_706_496 - 80 * 2 * 8192 - 8192  # exact but for the norms
    from tunedeck.core.memory import estimate_memory

    lora = approx_lora(arch, r=16)
    qlora = estimate_memory(arch, split, lora, mode="4bit", batch_size=1, max_length=512)
    assert 35 * 2**30 < qlora.weights < 45 * 2**30  # ~0.52 byte per linear weight, fp32 embeddings
    assert 40 * 2**30 < qlora.total < 48 * 2**30  # the QLoRA paper fits 65B in a 48 GB GPU at this size
    assert estimate_memory(arch, split, lora, mode="none", batch_size=1, max_length=512).weights == 2 * split.total


# -- one estimate for a project, everywhere ------------------------------------------------

DEMO = Path(__file__).resolve().parent.parent / "sample_data" / "demo.toml"


def test_the_demo_project_gets_one_number_from_every_command_and_screen(default_model_dir, capsys):
    from tunedeck.core.cli import main
    from tunedeck.core.engine.ops import lora_summary
    from tunedeck.core.hardware import detect
    from tunedeck.core.memory import estimate_for_model, known_longest_row, longest_row
    from tunedeck.core.units import format_gib
    from tunedeck.core.models import describe, resolve_source
    from tunedeck.core.preview import preview_stats
    from tunedeck.core.project import Project

    project = Project.load(DEMO)
    longest = preview_stats(project)["longest"]
    assert 0 < longest < project["dataset.max_length"]  # the demo's rows are shorter than max_length

    assert main(["inspect", str(DEMO), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["memory"]
    assert main(["models", "--project", str(DEMO), "--json"]) == 0
    listed = next(m for m in json.loads(capsys.readouterr().out) if m["source"] == "default")
    summary = lora_summary(project)["memory"]
    screen = estimate_for_model(describe(resolve_source("default")), project, hardware=detect(),
                                longest_row=known_longest_row(project))["lora"]  # what the Models screen runs

    totals = {inspected["total"], listed["memory"]["lora"], summary["total"], screen.total}
    assert len(totals) == 1  # config-only counts equal the meta-built ones for this model
    assert listed["memory_estimates"]["lora"] == inspected == summary == screen.as_dict()
    # the project's settings as resolved here, at the longest row
    assert (inspected["seq_length"], inspected["longest_row"]) == (longest, longest) == (longest_row(project),) * 2
    assert inspected["precision"] == (detect().cpu_precision if detect().device == "cpu" else inspected["precision"])
    assert inspected["batch_size"] == project["training.batch_size"]
    assert format_gib(inspected["total"]).endswith(" GiB")


@pytest.mark.slow
def test_the_cli_text_says_gib_and_the_batch(default_model_dir):
    from tunedeck.core.memory import longest_row
    from tunedeck.core.units import format_gib
    from tunedeck.core.project import Project

    longest = longest_row(Project.load(DEMO))
    env = {**os.environ, "COLUMNS": "250"}
    texts = {}
    for args in (["models", "--project", str(DEMO)], ["inspect", str(DEMO)]):
        done = subprocess.run([sys.executable, "-m", "tunedeck.core", *args], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        texts[args[0]] = done.stdout
    models_json = subprocess.run([sys.executable, "-m", "tunedeck.core", "models", "--project", str(DEMO), "--json"],
                                 capture_output=True, text=True, env=env, timeout=300)
    total = next(m for m in json.loads(models_json.stdout) if m["source"] == "default")["memory"]["lora"]
    for name, text in texts.items():
        assert f"~{format_gib(total)}" in text or f" {format_gib(total)} " in text, (name, text)
        assert f"batch 4 × {longest} tokens (the longest row)" in text, (name, text)
        assert " GB" not in text and " MB" not in text
    assert "GiB" in format_gib(total) and format_gib(total) == f"{total / 2**30:.2f} GiB"


def test_format_gib_is_the_one_unit():
    from tunedeck.core.units import format_gib

    assert format_gib(0) == "0.00 GiB"
    assert format_gib(1.5 * 2**30) == "1.50 GiB"
    assert format_gib(9.994 * 2**30) == "9.99 GiB"
    assert format_gib(9.996 * 2**30) == "10.0 GiB"  # no "10.00" next to "10.1"
    assert format_gib(123.45 * 2**30) == "123.5 GiB"


def test_the_batch_is_estimated_at_the_longest_row_and_says_so(llama):
    from tunedeck.core.memory import MemoryEstimate, estimate_vs_peak
    from tunedeck.core.units import format_gib

    _, ins = llama
    choice = count_trainable(ins, "all-linear", r=8)
    common = dict(batch_size=4, max_length=512, device="cpu", precision="fp32", gradient_checkpointing=False)
    unknown = estimate(ins, choice, **common)
    short = estimate(ins, choice, longest_row=301, **common)
    long = estimate(ins, choice, longest_row=900, **common)
    packed = estimate(ins, choice, longest_row=301, packing=True, **common)
    assert unknown.seq_length == long.seq_length == packed.seq_length == 512 and short.seq_length == 301
    assert short.activations == pytest.approx(unknown.activations * 301 / 512, rel=1e-6)
    assert short.weights == unknown.weights and short.total < unknown.total == long.total == packed.total
    assert "batch 4 × 301 tokens (the longest row)" in short.line()
    assert "batch 4 × 512 tokens (at max_length)" in unknown.line()
    assert "batch 4 × 512 tokens (max_length: the longest row, 900 tokens, is truncated)" in long.line()
    assert "(max_length: rows are packed)" in packed.line()
    assert short.line().startswith(f"~{format_gib(short.total)} on cpu: LoRA fp32, batch 4 × 301")
    assert MemoryEstimate.from_dict({**short.as_dict(), "unknown": 1}) == short
    assert estimate_vs_peak(short.total, 5 * 2**30) == f"estimated {format_gib(short.total)} · measured peak 5.00 GiB"
    assert estimate_vs_peak(None, None) == "" and estimate_vs_peak(2**30, None) == "estimated 1.00 GiB"


def test_the_longest_row_is_kept_for_the_ui_and_read_without_a_tokenizer(tmp_path, default_model_dir):
    from tunedeck.core import memory
    from tunedeck.core.preview import preview_stats
    from tunedeck.core.project import Project

    rows = [{"messages": [{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "ok"}]}
            for n in (3, 40, 7)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "p.toml"
    path.write_text('schema = 1\nname = "p"\n[model]\nsource = "default"\n[dataset]\npath = "data.jsonl"\n',
                    encoding="utf-8")
    project = Project.load(path)
    assert memory.known_longest_row(project) is None  # nothing tokenized these rows yet
    longest = memory.longest_row(project)
    assert longest == preview_stats(project)["longest"] > 40
    memory._longest.clear()  # another process: only the disk knows
    code = ("import json, sys\nfrom tunedeck.core.memory import known_longest_row\n"
            "from tunedeck.core.project import Project\n"
            f"print(json.dumps([known_longest_row(Project.load({str(path)!r})),"
            " sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [longest, []]
    with (tmp_path / "data.jsonl").open("a", encoding="utf-8") as fh:  # a changed file: not known any more
        fh.write(json.dumps(rows[0]) + "\n")
    assert memory.known_longest_row(project) is None
    empty = Project.load(path)
    empty.set("dataset.path", "")
    assert memory.longest_row(empty) is None  # no dataset: the estimate stays at max_length


@pytest.mark.slow
def test_a_run_records_its_estimate_and_measured_peak(tmp_path, tiny_model_dir):
    from train_support import train_inprocess, write_project

    from tunedeck.core.inspect import inspect_project, project_choice, project_memory
    from tunedeck.core.memory import known_longest_row
    from tunedeck.core.units import format_gib
    from tunedeck.core.project import Project
    from tunedeck.core.runs import run_info

    project_path = write_project(tmp_path / "p", tiny_model_dir)
    code, events, run_dir = train_inprocess(project_path)
    assert code == 0
    [started] = [e for e in events if e["type"] == "run_started"]
    recorded = started["memory_estimate"]
    project = Project.load(project_path)
    longest = known_longest_row(project)  # the run kept the longest row it rendered
    assert longest == started["data"]["train"]["longest"] and recorded["longest_row"] == longest
    ins = inspect_project(project)
    assert recorded == project_memory(project, ins, project_choice(project, ins), longest_row=longest).as_dict()
    info = run_info(run_dir)
    assert info.memory_estimate == recorded["total"]
    assert info.memory_peak and info.memory_peak_source in ("rss", "torch")
    assert info.memory == f"estimated {format_gib(recorded['total'])} · measured peak {format_gib(info.memory_peak)}"
    system = [e for e in events if e["type"] == "system"]
    assert info.memory_peak == max(e["torch_peak_memory"] or e["rss_peak"] or e["rss"] for e in system)

    done = subprocess.run([sys.executable, "-m", "tunedeck.core", "runs", str(project_path)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "250"}, timeout=120)
    assert done.returncode == 0 and info.memory in done.stdout
    as_json = subprocess.run([sys.executable, "-m", "tunedeck.core", "runs", str(project_path), "--json"],
                             capture_output=True, text=True, timeout=120)
    [row] = json.loads(as_json.stdout)
    for key in ("name", "status", "step", "max_steps", "final_loss", "duration_s", "adapter", "checkpoints"):
        assert key in row  # the --json shape keeps its keys; the memory ones are added
    assert (row["memory_estimate"], row["memory_peak"], row["memory"]) == (info.memory_estimate, info.memory_peak,
                                                                          info.memory)
