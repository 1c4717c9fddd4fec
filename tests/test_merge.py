"""Merge: a run's adapter folded into its base, written as a standalone model folder whose
logits equal base + adapter; QLoRA runs merge into the full-precision base."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunedeck.core.engine.server import handle
from tunedeck.core.cli import main

from train_support import memorisable_rows, sharpened_copy, train_inprocess, write_project

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Say the magic words."}]


@pytest.fixture(scope="module")
def sharp(tiny_model_dir, tmp_path_factory):
    return sharpened_copy(tiny_model_dir, tmp_path_factory.mktemp("sharp"))


def logits_pair(base_dir, adapter_dir, merged_dir, *, quantized_adapter=False):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    inputs = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():
        plain = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, str(adapter_dir))(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))(**inputs).logits
    return plain, tuned, merged


def test_merged_logits_equal_base_plus_adapter(sharp, tmp_path, capsys):
    import torch

    project = write_project(tmp_path / "p", sharp, memorisable_rows(), training={"max_steps": 4},
                            lora={"r": 8, "alpha": 16})
    code, _, run_dir = train_inprocess(project, run_name="lora")
    assert code == 0
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(out), "--cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["dtype"] == "float32"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # standalone: no peft files
    assert (out / "chat_template.jinja").read_text() == (run_dir / "adapter" / "chat_template.jinja").read_text()
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == 2 or (isinstance(eos, list) and 2 in eos)  # <|im_end|> of the template
    plain, tuned, merged = logits_pair(sharp, run_dir / "adapter", out)
    assert not torch.allclose(plain, tuned, atol=1e-3)
    assert torch.allclose(merged, tuned, atol=1e-4), (merged - tuned).abs().max()

    # an --out that is not empty is refused, one line, nothing written
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunedeck: error: --out") and "not empty" in err and "\n" not in err
    # a run without an adapter: one line
    (tmp_path / "p" / "runs" / "empty").mkdir()
    assert main(["merge", "empty", "--project", str(project), "--out", str(tmp_path / "o2")]) == 2
    assert "no adapter folder" in capsys.readouterr().err

    # the engine op streams its stages and returns the same kind of result
    messages: list[dict] = []
    reply = handle({"id": 1, "op": "merge", "args": {"run": "lora", "out": str(tmp_path / "m2"),
                                                            "cpu": True, "project_path": str(project)}},
                          emit=messages.append)
    assert reply["ok"], reply
    assert reply["result"]["out"] == str(tmp_path / "m2") and len(messages) >= 3
    assert (tmp_path / "m2" / "model.safetensors").is_file()


def test_a_qlora_run_merges_into_the_full_precision_base(sharp, tmp_path):
    import torch

    project = write_project(tmp_path / "q", sharp, memorisable_rows(),
                            quantization={"mode": "4bit", "quant_type": "nf4"}, training={"max_steps": 3})
    code, _, run_dir = train_inprocess(project, run_name="qlora")
    assert code == 0
    out = tmp_path / "merged"
    # the command itself, as a user runs it: its own lines only; the libraries' in the run's log
    done = subprocess.run([sys.executable, "-m", "tunedeck.core", "merge", str(run_dir), "--out", str(out), "--cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and done.stdout.startswith(f"{out}: qlora merged into")
    stages = done.stderr.splitlines()
    assert stages and all(line.split()[0] in {"loading", "merging", "writing", "merged"} for line in stages), stages
    assert (run_dir / "merge.log").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    plain, tuned, merged = logits_pair(sharp, run_dir / "adapter", out)
    assert not torch.allclose(plain, tuned, atol=1e-3)
    assert torch.allclose(merged, tuned, atol=1e-4), (merged - tuned).abs().max()
