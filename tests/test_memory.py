"""The memory estimate: its activation term against what autograd really saves, its weight
term by quantization mode, and the config-only estimate the Models list uses."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from tunedeck.core.inspect import count_trainable, estimate, inspect_config, weight_split
from tunedeck.core.memory import (
    CUDA_CONTEXT,
    NF4_BYTES,
    NF4_DQ_BYTES,
    approx_lora,
    approx_weights,
    arch_from_config,
    estimate_for_model,
)

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
