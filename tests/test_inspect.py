"""The target-module inspector against peft itself, on meta-device models of eight families."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import warnings

import pytest

from tunedeck.core.cli import main
from tunedeck.core.errors import UserError
from tunedeck.core.inspect import inspect_config, inspect_model
from tunedeck.core.modelconfig import build_meta_model
from tunedeck.core.targets import count_trainable, targets_for

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=256)
FAMILIES = {
    "llama": dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(SMALL, num_key_value_heads=2),
    "qwen2": dict(SMALL, num_key_value_heads=2),  # biases on q, k, v
    "gemma": dict(SMALL, num_key_value_heads=1, head_dim=16),  # tied, scaled embedding subclass
    "phi3": dict(SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),  # fused qkv, gate_up
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, vocab_size=256, bos_token_id=1, eos_token_id=2),  # Conv1D
    "gpt_neox": dict(SMALL, bos_token_id=1, eos_token_id=2),  # biases everywhere
    "falcon": dict(SMALL, bos_token_id=1, eos_token_id=2),  # FalconLinear subclass, tied
}


def tiny_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **FAMILIES[family])


@pytest.fixture(scope="module")
def inspections():
    return {family: inspect_config(tiny_config(family), source=family) for family in FAMILIES}


def peft_wrap(family: str, *, quantize: bool = False, **lora):
    """(trainable, total, wrapped layer names) as peft reports them after get_peft_model."""
    from peft import LoraConfig, get_peft_model

    model = build_meta_model(tiny_config(family))
    if quantize:
        from transformers import BitsAndBytesConfig
        from transformers.integrations import replace_with_bnb_linear
        from transformers.quantizers.base import HfQuantizer

        qc = BitsAndBytesConfig(load_in_4bit=True)
        skip = HfQuantizer.get_modules_to_not_convert(model, qc.llm_int8_skip_modules, model._keep_in_fp32_modules)
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return trainable, total, set(peft_model.base_model.targeted_module_names)


def assert_same_as_peft(ins, family, targets, *, refused=False, **kw):
    choice = count_trainable(ins, targets, **kw)
    lora = {"r": kw.get("r", 16), "use_dora": kw.get("use_dora", False), "bias": kw.get("bias", "none"),
            "modules_to_save": list(kw.get("modules_to_save", ())) or None}
    trainable, total, wrapped = peft_wrap(family, target_modules=targets, **lora)
    assert (choice.trainable_params, choice.total_params) == (trainable, total), (family, targets, kw)
    assert set(choice.layers) == wrapped
    assert bool(choice.errors) == refused, choice.errors
    return choice


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_equal_peft_for_attention_all_linear_and_a_partial_pick(inspections, family):
    ins = inspections[family]
    attention = targets_for(ins, ins.presets["attention"])
    assert isinstance(attention, list) and ins.presets["attention"]
    assert_same_as_peft(ins, family, attention, r=8)
    assert_same_as_peft(ins, family, "all-linear", r=4)
    # attention of layer 0 and the MLP of layers 1-2: not whole groups, so written as a regex
    partial = [n for n in ins.presets["attention-mlp"]
               if (re.search(r"\.0\.", n) and n in ins.presets["attention"])
               or (re.search(r"\.[12]\.", n) and n not in ins.presets["attention"])]
    targets = targets_for(ins, partial)
    assert isinstance(targets, str)
    choice = assert_same_as_peft(ins, family, targets, r=16)
    assert list(choice.layers) == partial


@pytest.mark.parametrize(("family", "targets", "kw"), [
    ("llama", "all-linear", dict(use_dora=True, bias="all")),
    ("qwen2", "all-linear", dict(use_dora=True, bias="lora_only")),
    ("qwen2", ["q_proj", "k_proj", "o_proj"], dict(bias="all", modules_to_save=["lm_head"])),
    ("gpt2", ["c_attn"], dict(use_dora=True, bias="lora_only")),  # Conv1D: fan_in_fan_out
    ("gpt2", ["attn.c_proj", "mlp.c_fc"], dict(bias="all")),
    ("gpt_neox", ["query_key_value"], dict(bias="all", modules_to_save=["dense"])),  # frozen original's bias
    ("falcon", ["dense", "dense_4h_to_h"], dict(use_dora=True, bias="lora_only")),
    ("llama", ["embed_tokens", "q_proj"], dict(use_dora=True)),  # an embedding, DoRA on it
    ("gemma", ["v_proj"], dict(r=2, modules_to_save=["embed_tokens"])),  # tied embeddings
    ("gemma", ["lm_head", "v_proj"], dict(r=2, refused=True)),  # counted, but the trainer refuses it
])
def test_dora_bias_and_modules_to_save_equal_peft(inspections, family, targets, kw):
    assert_same_as_peft(inspections[family], family, targets, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_quantized_layers_are_those_transformers_quantizes_and_counts_hold(inspections, family):
    ins = inspections[family]
    quantized = {x.name for x in ins.layers if x.quantized}
    assert ins.output_layer not in quantized
    assert quantized == {x.name for x in ins.layers if x.kind != "embedding" and x.role != "output"}
    assert {x.type_in("4bit") for x in ins.layers if x.quantized} == {"Linear4bit"}
    assert {x.type_in("8bit") for x in ins.layers if x.quantized} == {"Linear8bitLt"}
    for targets, bias in (("all-linear", "none"), ("all-linear", "lora_only"), (ins.presets["attention"][:3], "all")):
        choice = count_trainable(ins, targets, r=4, bias=bias)
        trainable, _, wrapped = peft_wrap(family, quantize=True, target_modules=targets, r=4, bias=bias)
        assert choice.trainable_params == trainable and set(choice.layers) == wrapped


@pytest.mark.parametrize(("family", "extra", "remaps"), [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), True),
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), True),
    ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), False),
])
def test_moe_families_count_like_peft(family, extra, remaps):
    """peft rewrites targets for MoE layouts transformers 5 fused; those counts come from peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **SMALL, num_key_value_heads=2, **extra)
    ins = inspect_config(config)
    assert ins.peft_remaps is remaps
    assert any("experts" in m.name for m in ins.not_wrappable)  # fused 3-D expert weights: not layers
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        choice = count_trainable(ins, targets, r=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(build_meta_model(config), LoraConfig(r=4, target_modules=targets,
                                                                             task_type="CAUSAL_LM"))
        assert (choice.trainable_params, choice.total_params) == peft_model.get_nb_trainable_parameters()
        assert set(choice.layers) == set(peft_model.base_model.targeted_module_names)
        assert bool(choice.parameters) == (remaps and targets == "all-linear")
    if remaps:
        assert "peft refuses" in count_trainable(ins, "all-linear", use_dora=True).errors[0]
        assert count_trainable(ins, ["q_prj"]).errors[0].startswith('target_modules ["q_prj"] matches no layer')


def test_all_linear_leaves_out_the_output_layer_as_peft_does(inspections):
    for family, ins in inspections.items():
        assert ins.output_layer == "lm_head", family
        assert ins.output_layer not in ins.presets["all-linear"]
        linear = {x.name for x in ins.layers if x.kind != "embedding"}
        assert set(ins.presets["all-linear"]) == linear - {"lm_head"}
        assert not set(ins.presets["all-linear"]) & {x.name for x in ins.layers if x.kind == "embedding"}


def test_groups_name_the_shortest_suffix_that_selects_them(inspections):
    llama = {g.name: g for g in inspections["llama"].groups}
    assert list(llama) == ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "lm_head"]
    q = llama["q_proj"]
    assert (q.count, q.in_features, q.out_features, q.pattern) == (3, 64, 64, "model.layers.*.self_attn.q_proj")
    assert llama["k_proj"].out_features == 32 and llama["down_proj"].in_features == 128
    assert llama["q_proj"].params == 3 * 64 * 64
    lm_head = inspections["llama"].by_name["lm_head"]
    assert lm_head.tied_to == "model.embed_tokens" and lm_head.role == "output"
    # GPT-2 has c_proj in both attention and MLP: the names keep their parent to stay apart
    gpt2 = [g.name for g in inspections["gpt2"].groups]
    assert gpt2 == ["wte", "wpe", "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head"]
    c_attn = inspections["gpt2"].by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features, c_attn.bias) == ("conv1d", 64, 192, 192)
    assert {g.role for g in inspections["gpt2"].groups if g.name.startswith("attn.")} == {"attention"}
    phi3 = {g.name for g in inspections["phi3"].groups}
    assert {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"} <= phi3


def test_targets_for_round_trips_through_peft_matching(inspections):
    rng = random.Random(5)
    for family in ("llama", "gpt2", "phi3", "falcon"):
        ins = inspections[family]
        names = [x.name for x in ins.layers]
        assert targets_for(ins, ins.presets["all-linear"]) == "all-linear"
        whole = [n for n in names if n.endswith(("q_proj", "v_proj", "query_key_value", "c_attn", "qkv_proj"))]
        assert isinstance(targets_for(ins, whole), list)
        for _ in range(25):
            pick = [n for n in names if rng.random() < 0.3] or names[:1]
            targets = targets_for(ins, pick)
            assert list(count_trainable(ins, targets).layers) == pick, (family, targets)


def test_targets_for_partial_pick_reads_well_and_peft_wraps_it(inspections):
    ins = inspections["llama"]
    pick = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    targets = targets_for(ins, pick)
    assert targets == r"model\.layers\.(?:0|1)\.self_attn\.(?:q_proj|v_proj)"
    assert peft_wrap("llama", target_modules=targets)[2] == set(pick)
    assert targets_for(ins, ["model.layers.2.mlp.down_proj"]) == r"model\.layers\.2\.mlp\.down_proj"
    with pytest.raises(UserError, match="not a layer LoRA can wrap"):
        targets_for(ins, ["model.layers.0.self_attn"])
    with pytest.raises(UserError, match="no layers picked"):
        targets_for(ins, [])


def test_problems_and_warnings(inspections):
    ins = inspections["llama"]
    none = count_trainable(ins, ["q_prj"])
    assert none.trainable_params == 0
    assert none.errors == ('target_modules ["q_prj"] matches no layer of this model; its layers: embed_tokens, '
                           "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",)
    module = count_trainable(ins, ["self_attn"])
    assert "model.layers.0.self_attn (LlamaAttention) and 2 more, which LoRA cannot wrap" in module.errors[0]
    regex = count_trainable(ins, r".*\.0\..*")  # also matches the attention and MLP modules
    assert regex.errors and "cannot wrap" in regex.errors[0]
    mixed = count_trainable(ins, ["q_proj", "v_prj", "embed_tokens"], modules_to_save=["nohead"])
    assert not mixed.errors
    text = " | ".join(mixed.warnings)
    assert '"v_prj" matches no layer' in text
    assert "model.embed_tokens is an embedding" in text
    assert 'modules_to_save "nohead" matches no module' in text
    head = count_trainable(ins, ["q_proj", "lm_head"])
    assert head.trainable_params == 3 * 16 * (64 + 64) + 16 * (64 + 256)
    assert head.errors == ('target_modules ["q_proj", "lm_head"] includes the output layer lm_head: trl\'s fused '
                           "LM head reads its weight directly, so an adapter there would not train (peft's "
                           'all-linear leaves it out); train it in full with modules_to_save = ["lm_head"]',)
    assert "lm_head shares its weight with model.embed_tokens" in " | ".join(head.warnings)
    assert count_trainable(ins, None).targets == ["q_proj", "v_proj"]  # peft's default for llama
    assert inspections["phi3"].default_targets == "all-linear"  # no peft default for phi3
    assert any("no default target_modules" in n for n in inspections["phi3"].notes)


def test_adapter_size_matches_what_peft_saves(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ins = inspect_model(str(tiny_model_dir))
    cases = [dict(target_modules="all-linear"),
             dict(target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True, bias="lora_only"),
             dict(target_modules=["v_proj"], modules_to_save=["lm_head"], bias="all")]
    for i, lora in enumerate(cases):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM", **lora))
            peft_model.save_pretrained(tmp_path / str(i))
        data = (tmp_path / str(i) / "adapter_model.safetensors").read_bytes()
        header = int.from_bytes(data[:8], "little")
        tensors = len(data) - 8 - header
        choice = count_trainable(ins, lora.pop("target_modules"), r=4, **lora)
        assert choice.adapter_bytes(base_dtype_bytes=4) == tensors, lora
        assert choice.trainable_params == peft_model.get_nb_trainable_parameters()[0]


def test_an_inspection_is_plain_data_for_another_process(inspections):
    import pickle

    ins = inspections["qwen2"]
    json.dumps(ins.as_dict())
    copy = pickle.loads(pickle.dumps(ins))
    assert count_trainable(copy, "all-linear", bias="all") == count_trainable(ins, "all-linear", bias="all")


def test_config_only_sources_need_no_weights(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    tiny_config("mistral").save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    by_folder = inspect_model(str(folder))
    by_file = inspect_model(str(folder / "config.json"))
    by_relative = inspect_model("cfg", root=tmp_path)
    assert by_folder.total_params == by_file.total_params == by_relative.total_params
    assert by_folder.architecture == "MistralForCausalLM" and len(by_folder.layers) == 3 * 7 + 2


@pytest.mark.slow
def test_bundled_gguf_header_inspects_like_the_converted_default(default_model_dir):
    from tunedeck.core.models import bundled_gguf

    from_gguf = inspect_model(str(bundled_gguf()))
    converted = inspect_model(str(default_model_dir))
    assert from_gguf.total_params == converted.total_params == 134_515_008  # tied embeddings counted once
    assert [g.name for g in from_gguf.groups] == [g.name for g in converted.groups]
    assert count_trainable(from_gguf, "all-linear").trainable_params == 4_884_480


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d, "has no config.json"),
    (lambda d: _write(d / "config.json", '{"model_type": "nosuchmodel"}'),
     "unknown architecture (model_type 'nosuchmodel')"),
    (lambda d: _write(d / "config.json", json.dumps({"model_type": "custom_xyz", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}})),
     "needs the model's own code; set model.trust_remote_code = true"),
    (lambda d: _write(d / "config.json", '{"model_type": "llama", '), "config.json is not valid JSON"),
    (lambda d: _write(d / "config.json", json.dumps({**FAMILIES["phi3"], "model_type": "phi3",
                                                     "pad_token_id": 999})),
     "cannot build it from its config (AssertionError: Padding_idx must be within num_embeddings)"),
    (lambda d: _write(d / "m.gguf", "NOPE" + "x" * 100), "not a GGUF file (bad header)"),
    (lambda d: _truncated_gguf(d / "t.gguf"), "cannot read the GGUF header"),
    (lambda d: _write(d / "weights.bin", "x"), "neither a .gguf nor a config.json"),
    (lambda d: d / "missing", "no such folder or file"),
])
def test_bad_models_give_one_clear_line(tmp_path, make, message):
    target = make(tmp_path)
    with pytest.raises(UserError) as caught:
        inspect_model(str(target))
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def _write(path, text):
    path.write_text(text)
    return path.parent if path.name == "config.json" else path


def _truncated_gguf(path):
    from tunedeck.core.models import bundled_gguf

    with open(bundled_gguf(), "rb") as fh:
        path.write_bytes(fh.read(100_000))
    return path


# -- the command ---------------------------------------------------------------------


def test_inspect_json_on_the_tiny_model(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir), "--json", "--targets", "q_proj,v_proj", "--r", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] == ["q_proj", "v_proj"] and report["targets_from"] == "--targets"
    assert report["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32)) == 3584
    assert report["total_params"] == report["model"]["params"] + 3584
    assert isinstance(report["trainable_params"], int) and isinstance(report["total_params"], int)
    groups = {g["name"]: g for g in report["groups"]}
    assert groups["q_proj"]["picked"] == 2 and groups["k_proj"]["picked"] == 0
    assert len(report["layers"]) == 2 * 7 + 2
    assert {x["name"] for x in report["layers"] if x["picked"]} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert report["memory"]["total"] > report["memory"]["weights"] > 0


def test_inspect_json_on_the_default_model_uses_peft_default(default_model_dir, capsys):
    assert main(["inspect", "default", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["source"] == "default (SmolLM2-135M-Instruct)"
    assert report["targets"] == ["q_proj", "v_proj"] and report["targets_from"] == "peft's default for llama"
    assert report["trainable_params"] == 30 * 16 * ((576 + 576) + (576 + 192)) == 921_600
    assert report["total_params"] == 134_515_008 + 921_600
    assert report["presets"]["all-linear"] == [x["name"] for x in report["layers"]
                                               if x["role"] in ("attention", "mlp")]
    assert main(["inspect", "default", "--preset", "attention-mlp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] == "all-linear"


def test_check_params_reports_the_inspectors_count(tiny_model_dir, tmp_path, write_jsonl, capsys):
    data = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    project = tmp_path / "p.toml"
    assert main(["new", str(project), "--model", str(tiny_model_dir), "--dataset", str(data)]) == 0
    capsys.readouterr()
    overrides = ["--set", 'lora.target_modules=["o_proj","gate_proj"]', "--set", "lora.use_dora=true"]
    assert main(["check", str(project), "--json", "--params", *overrides]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(project), "--json", *overrides]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["targets_from"] == "--set"
    assert checked["trainable_params"] == inspected["trainable_params"] == 2 * (16 * (128 + 192) + 64 + 128)
    assert checked["total_params"] == inspected["total_params"]
    assert main(["inspect", str(project), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets_from"] == "project"
    assert main(["check", str(project), "--params", "--set", 'lora.target_modules=["nope"]']) == 2
    assert "lora.target_modules [\"nope\"] matches no layer" in capsys.readouterr().err


def test_inspect_human_output_and_bad_targets(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["inspect", str(tiny_model_dir), "--preset", "attention", "--layers"]) == 0
    out = capsys.readouterr().out
    assert 'target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]' in out
    assert "model.layers.1.self_attn.o_proj" in out and "trainable" in out
    assert "memory    ~" in out and " GiB on " in out and "(at max_length)" in out  # a bare model: no dataset
    assert main(["inspect", str(tiny_model_dir), "--targets", "q_prj"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunedeck: error: target_modules [\"q_prj\"] matches no layer") and "\n" not in err
    assert main(["inspect", str(tiny_model_dir), "--targets", r"model\.layers\.0\..*"]) == 2
    assert "which LoRA cannot wrap" in capsys.readouterr().err
    assert main(["inspect", str(tiny_model_dir), "--r", "0"]) == 2
    assert "lora.r: 0 is not valid" in capsys.readouterr().err


def test_modules_import_nothing_heavy():
    code = ("import sys\nimport tunedeck.core.commands.inspect, tunedeck.core.inspect, tunedeck.core.memory\n"
            "print([m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
