"""GGUF export: the file loads back with transformers' GGUF loader and answers as the merged
model does; its metadata carries the tokenizer, the chat template and the stop tokens; the
Modelfile; the adapter alone as a GGUF LoRA; refusals before any work; cancelling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tunedeck.core.errors import UserError
from tunedeck.core.runs import EXIT_OK

from train_support import counting_rows, sharpened_copy, train_inprocess, write_project

PROMPTS = ["What is 3 plus 3?", "What is 11 plus 11?", "Say hello."]


def build_tiny_qwen(out: Path, tokenizer_dir: Path, arch: str = "qwen2") -> Path:
    """A tiny random Qwen2 (or Qwen3: per-head query/key norms, a head size of its own) with the default tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    name = "Qwen2" if arch == "qwen2" else "Qwen3"
    # Qwen3's head size is its own (128 in the real models, and the only one transformers reads back from GGUF)
    extra = {} if arch == "qwen2" else {"head_dim": 128}
    config = getattr(transformers, f"{name}Config")(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **extra)
    torch.manual_seed(1)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(16)  # logits sharp enough for greedy decoding to mean something
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_run(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export-llama")
    model = sharpened_copy(tiny_model_dir, folder / "sharp")
    project = write_project(folder, model, counting_rows(), training={"max_steps": 3},
                            dataset={"system_prompt": "You add numbers."})
    code, events, run_dir = train_inprocess(project, run_name="llama")
    assert code == EXIT_OK, events[-1]
    return run_dir


def merged_logits(run_dir: Path, prompts: list[str]) -> tuple[list, list]:
    import torch

    from tunedeck.core.merge import merged_model

    merged = merged_model(run_dir)
    model, tok = merged.model.float().eval(), merged.tokenizer
    out = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out.append((ids, model(**ids).logits, model.generate(**ids, max_new_tokens=8, do_sample=False)))
    return out, tok


def load_back(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tok


def metadata(gguf: Path) -> dict:
    import gguf as gg

    reader = gg.GGUFReader(str(gguf))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")
            and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}


@pytest.mark.slow
def test_f16_loads_back_with_the_merged_models_logits_and_its_metadata(llama_run, tmp_path):
    import torch

    from tunedeck.core.export import export_run

    stages = []
    result = export_run(llama_run, tmp_path / "gguf", quant="f16", progress=lambda p: stages.append(p["stage"]))
    assert {"merge", "convert", "write", "done"} <= set(stages)
    gguf = Path(result["gguf"])
    assert gguf.name == "llama-f16.gguf" and result["arch"] == "llama"
    model, tok = load_back(gguf)
    expected, merged_tok = merged_logits(llama_run, PROMPTS)
    for ids, logits, _ in expected:
        with torch.no_grad():
            got = model(**ids).logits
        assert torch.allclose(got, logits, atol=2e-2 * logits.abs().max().item()), (got - logits).abs().max()
    # the tokenizer in the file tokenizes as the one that trained
    text = merged_tok.apply_chat_template([{"role": "user", "content": "12 + 7 = ?"}], tokenize=False)
    assert tok(text)["input_ids"] == merged_tok(text)["input_ids"]
    meta = metadata(gguf)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == (llama_run / "adapter" / "chat_template.jinja").read_text()
    assert meta["tokenizer.ggml.eos_token_id"] == merged_tok.eos_token_id
    # generation stops at the template's end of turn: eos itself here (SmolLM2's eos is <|im_end|>), else eot
    end = meta.get("tokenizer.ggml.eot_token_id", meta["tokenizer.ggml.eos_token_id"])
    assert end == merged_tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2


@pytest.mark.slow
def test_q8_0_gives_the_same_greedy_answers(llama_run, tmp_path):
    import torch

    from tunedeck.core.export import export_run

    gguf = Path(export_run(llama_run, tmp_path / "q8", quant="q8_0")["gguf"])
    import gguf as gg

    types = {t.name: t.tensor_type.name for t in gg.GGUFReader(str(gguf)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    model, _ = load_back(gguf)
    for ids, _, greedy in merged_logits(llama_run, PROMPTS)[0]:
        with torch.no_grad():
            assert model.generate(**ids, max_new_tokens=8, do_sample=False).tolist() == greedy.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_qwen_run_exports_and_loads_back(default_model_dir, tmp_path, arch):
    import torch

    from tunedeck.core.export import export_run

    model_dir = build_tiny_qwen(tmp_path / arch, default_model_dir, arch)
    project = write_project(tmp_path, model_dir, counting_rows(), training={"max_steps": 2})
    code, events, run_dir = train_inprocess(project, run_name="qwen")
    assert code == EXIT_OK, events[-1]
    result = export_run(run_dir, tmp_path / "gguf", quant="f16")
    assert result["arch"] == arch
    model, _ = load_back(Path(result["gguf"]))
    assert type(model).__name__ == f"Qwen{arch[-1]}ForCausalLM"
    for ids, logits, greedy in merged_logits(run_dir, PROMPTS[:2])[0]:
        with torch.no_grad():
            got = model(**ids).logits
            assert torch.allclose(got, logits, atol=2e-2 * logits.abs().max().item())
            assert model.generate(**ids, max_new_tokens=8, do_sample=False).tolist() == greedy.tolist()
    assert metadata(Path(result["gguf"]))[f"{arch}.attention.head_count"] == 4


@pytest.mark.slow
def test_the_bundled_model_end_to_end_with_its_modelfile(default_model_dir, tmp_path):
    """SmolLM2 trained a step, exported from the CLI: the GGUF answers as the merged model,
    and the Modelfile speaks ChatML with the template's own system prompt."""
    import torch

    project = write_project(tmp_path, default_model_dir, counting_rows(8),
                            training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-4},
                            dataset={"max_length": 64})
    code, events, run_dir = train_inprocess(project, run_name="smol")
    assert code == EXIT_OK, events[-1]
    out = subprocess.run([sys.executable, "-m", "tunedeck.core", "export", str(run_dir), "--gguf", "--out",
                          str(tmp_path / "gguf"), "--quant", "q8_0", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["pre_tokenizer"] == "gpt-2"  # the splitting rules of the tokenizer the run trained with
    assert result["commands"][0] == f"ollama create smol -f {tmp_path / 'gguf' / 'Modelfile'}"
    modelfile = Path(result["modelfile"]).read_text()
    assert "FROM ./smol-q8_0.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    model, _ = load_back(Path(result["gguf"]))
    for ids, _, greedy in merged_logits(run_dir, PROMPTS[:2])[0]:
        with torch.no_grad():
            assert model.generate(**ids, max_new_tokens=8, do_sample=False).tolist() == greedy.tolist()


@pytest.mark.slow
def test_the_adapter_alone_as_a_gguf_lora(llama_run, tmp_path):
    import gguf as gg
    import numpy as np
    from safetensors.numpy import load_file

    from tunedeck.core.export import export_run, permute

    result = export_run(llama_run, tmp_path / "gguf", quant="f16", lora=True)
    reader = gg.GGUFReader(result["lora"])
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    config = json.loads((llama_run / "adapter" / "adapter_config.json").read_text())
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    weights = load_file(str(llama_run / "adapter" / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert np.allclose(tensors["blk.1.attn_q.weight.lora_a"], a, atol=1e-3)
    assert np.allclose(tensors["blk.1.attn_q.weight.lora_b"], permute(b, 4, 4), atol=1e-3)  # llama.cpp's rotary layout
    assert not np.allclose(permute(b, 4, 4), b)  # the check can tell the layouts apart
    assert len([n for n in tensors if n.endswith(".lora_a")]) == len([k for k in weights if ".lora_A." in k])


def test_refusals_come_before_any_work(llama_run, tmp_path, monkeypatch):
    from tunedeck.core import export

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export.check_request(llama_run, full, "f16")
    monkeypatch.setattr(export, "llama_cpp_quantizer", lambda: None)
    with pytest.raises(UserError, match="llama-quantize MODEL-f16.gguf MODEL-q4_k_m.gguf Q4_K_M"):
        export.check_request(llama_run, tmp_path / "a", "q4_k_m")
    with pytest.raises(UserError, match="not a quantization"):
        export.check_request(llama_run, tmp_path / "b", "q3_zz")
    # a base model of an architecture the writer does not know: refused by name, nothing written
    other = tmp_path / "gpt2-run"
    shutil.copytree(llama_run, other)
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2-base"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(base)
    snapshot = (other / "project.toml").read_text()
    import re

    (other / "project.toml").write_text(re.sub(r'source = ".*"', f'source = "{base}"', snapshot, count=1))
    with pytest.raises(UserError, match="a gpt2 model, which tunedeck does not write as GGUF") as err:
        export.export_run(other, tmp_path / "c")
    assert "\n" not in err.value.message and not (tmp_path / "c").exists()


def test_the_cli_refuses_in_one_line_with_exit_2(llama_run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tunedeck.core", "export", str(llama_run), "--gguf", "--out",
                          str(tmp_path / "x"), "--quant", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr and "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "tunedeck.core", "export", str(tmp_path / "no-run"), "--gguf",
                              "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cancelling_leaves_nothing_behind(llama_run, tmp_path):
    from tunedeck.core.export import export_run

    cancel = threading.Event()

    def progress(p: dict) -> None:
        if p["stage"] == "convert" and p["done"] >= 3:
            cancel.set()

    with pytest.raises(UserError, match="cancelled"):
        export_run(llama_run, tmp_path / "gguf", progress=progress, cancel=cancel)
    assert not (tmp_path / "gguf").exists()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_llama_cpp_generates_the_same_answer_where_it_is_installed(llama_run, tmp_path):
    """Optional: llama.cpp itself (llama-cpp-python) loads the file and answers greedily as the
    merged model does. Runs where llama-cpp-python is installed (it builds llama.cpp from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tunedeck.core.export import export_run

    gguf = export_run(llama_run, tmp_path / "gguf", quant="f16")["gguf"]
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, verbose=False)
    (ids, _, greedy), = merged_logits(llama_run, PROMPTS[:1])[0]
    prompt = ids["input_ids"][0].tolist()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == 8:
            break
    assert tokens == greedy[0, len(prompt):].tolist()


@pytest.mark.slow
def test_k_quants_through_llama_cpps_quantizer_where_it_is_installed(llama_run, tmp_path):
    """Optional, as above: q4_k_m is written by llama.cpp's own quantizer."""
    pytest.importorskip("llama_cpp")
    import gguf as gg

    from tunedeck.core.export import export_run

    result = export_run(llama_run, tmp_path / "gguf", quant="q4_k_m")
    assert Path(result["gguf"]).name == "llama-q4_k_m.gguf"
    types = {t.tensor_type.name for t in gg.GGUFReader(result["gguf"]).tensors}
    # quantized by llama.cpp (rows of 64 do not split into k-quant super-blocks of 256: it picks its fallbacks)
    assert "F16" not in types and types & {"Q4_K", "Q5_0", "Q5_1", "Q4_0", "Q8_0"}
    assert not list((tmp_path / "gguf").glob("*-f16.gguf"))  # the intermediate f16 file is gone
