"""Preference training for real: DPO on the bundled model and the sample preference set,
DPO after an SFT run's adapter, QLoRA DPO and ORPO on the CPU, and what the trainer refuses."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tunedeck.core.runs import EXIT_OK, EXIT_USER_ERROR

from train_support import of_type, sharpened_copy, train_inprocess, write_project

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def pair_rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"Numbers can be added in many ways, {i} among them."} for i in range(n)]


def dpo_project(folder: Path, model_dir: Path, adapter: str = "", **sections: dict) -> Path:
    sections.setdefault("training", {})
    sections["training"] = {"method": "dpo", "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3,
                            **sections["training"]}
    path = write_project(folder, model_dir, pair_rows(), **sections)
    if adapter:
        from tunedeck.core.project import Project

        project = Project.load(path)
        project.set("model.adapter", adapter)
        project.save()
    return path


@pytest.mark.slow
def test_dpo_on_the_bundled_model_learns_the_sample_preferences(default_model_dir, tmp_path):
    """Code-first answers preferred over vague ones: the preference accuracy rises above
    chance and the margin grows within a few steps; the adapter loads in plain peft."""
    shutil.copy(SAMPLE / "python_qa_prefs.jsonl", tmp_path / "prefs.jsonl")
    project = tmp_path / "prefs.toml"
    text = (SAMPLE / "prefs.toml").read_text(encoding="utf-8").replace("python_qa_prefs.jsonl", "prefs.jsonl")
    project.write_text(text, encoding="utf-8")
    overrides = ["training.max_steps=6", "training.batch_size=2", "training.grad_accum=1",
                 "training.learning_rate=1e-4", "training.warmup_ratio=0", "training.lr_scheduler=constant",
                 "dataset.eval_split=0", "training.save_steps=100", "dataset.max_length=256"]
    code, events, run_dir = train_inprocess(project, overrides)
    assert code == EXIT_OK, of_type(events, "failed")
    steps = of_type(events, "step")
    assert len(steps) == 6
    # a new adapter starts at the reference (the base, adapter off): the DPO loss is log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    accuracy = [s["reward_accuracy"] for s in steps]
    margins = [s["reward_margin"] for s in steps]
    assert sum(accuracy[-3:]) / 3 > 0.5, accuracy
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 and margins[-1] > 0, margins
    for key in ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected"):
        assert all(math.isfinite(s[key]) for s in steps), key
    started = of_type(events, "run_started")[0]
    assert started["config"]["training"]["method"] == "dpo"
    assert started["data"]["reference"] == "the base model (adapter disabled)"
    assert started["memory_estimate"]["method"] == "dpo"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run_dir / "adapter"
    assert not (adapter / "ref").exists()
    tok = AutoTokenizer.from_pretrained(str(adapter))
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I reverse a list?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(str(default_model_dir))
    with torch.no_grad():
        before = base(**prompt).logits
        after = PeftModel.from_pretrained(base, str(adapter))(**prompt).logits
    assert not torch.allclose(before, after, atol=1e-4)


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_dpo_continues_an_sft_runs_adapter_against_it(tiny_model_dir, tmp_path):
    sft = write_project(tmp_path, tiny_model_dir, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        training={"max_steps": 2})
    code, events, sft_dir = train_inprocess(sft, run_name="sft")
    assert code == EXIT_OK, of_type(events, "failed")
    project = dpo_project(tmp_path / "dpo", tiny_model_dir, adapter=str(sft_dir))
    code, events, run_dir = train_inprocess(project, run_name="dpo")
    assert code == EXIT_OK, of_type(events, "failed")
    started = of_type(events, "run_started")[0]
    assert started["data"]["reference"] == "the adapter it started from (frozen copy)"
    # the snapshot trains the SFT adapter's own settings, from its folder
    from tunedeck.core.project import Project

    snap = Project.load(run_dir / "project.toml")
    assert snap["lora.r"] == 4 and sorted(snap["lora.target_modules"]) == ["q_proj", "v_proj"]
    assert snap.resolve_path(snap["model.adapter"]) == (sft_dir / "adapter").resolve()
    # at the start the policy is the reference (both the SFT adapter): the DPO loss is log 2
    assert of_type(events, "step")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    before, after = adapter_weights(sft_dir / "adapter"), adapter_weights(run_dir / "adapter")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)  # trained further
    assert not (run_dir / "adapter" / "ref").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run_dir / "adapter"))

    # resumed for more steps: the same starting adapter and settings are accepted, from the checkpoint
    code, events, _ = train_inprocess(project, ["training.max_steps=3"], run_name="dpo", resume=True)
    assert code == EXIT_OK, of_type(events, "failed")
    assert [e["step"] for e in of_type(events, "step")] == [3]
    from tunedeck.core.errors import UserError
    from tunedeck.core.rundir import prepare_run

    with pytest.raises(UserError, match="training.method"):
        prepare_run(project, ["training.method=orpo", "training.max_steps=5"], run_name="dpo", resume=True)


@pytest.mark.slow
def test_qlora_dpo_trains_on_the_cpu(tiny_model_dir, tmp_path):
    project = dpo_project(tmp_path, tiny_model_dir, quantization={"mode": "4bit"})
    code, events, run_dir = train_inprocess(project)
    assert code == EXIT_OK, of_type(events, "failed")
    assert all("reward_accuracy" in s and math.isfinite(s["loss"]) for s in of_type(events, "step"))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_orpo_trains_without_a_reference_on_the_answers_only(tiny_model_dir, tmp_path):
    project = dpo_project(tmp_path, tiny_model_dir, training={"method": "orpo", "max_steps": 2},
                          preference={"beta": 0.2})
    code, events, run_dir = train_inprocess(project)
    assert code == EXIT_OK, of_type(events, "failed")
    started = of_type(events, "run_started")[0]
    assert started["data"]["reference"] is None and started["data"]["loss"] == "orpo"
    step = of_type(events, "step")[0]
    for key in ("nll_loss", "log_odds_ratio", "reward_accuracy", "reward_margin", "logps_chosen"):
        assert math.isfinite(step[key]), key
    # loss = NLL of the chosen answers - beta * mean log-sigmoid(log odds ratio)
    assert step["loss"] == pytest.approx(step["nll_loss"] - 0.2 * step["log_odds_ratio"], rel=1e-3)
    # ORPO's log-probs are per token: an answer's mean, well above a summed log-prob
    assert -20 < step["logps_chosen"] < 0


def test_the_orpo_loss_counts_only_the_answers(tiny_model_dir, tmp_path):
    """ORPO's NLL term is the chosen answers' trained tokens (tunedeck's mask), not the
    prompt as trl's ORPOTrainer has it; the odds ratio compares per-token mean log-probs."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tunedeck.core.preftrain import PairCollator, preference_trainer_class

    model = AutoModelForCausalLM.from_pretrained(str(sharpened_copy(tiny_model_dir, tmp_path / "sharp")))
    add_fused_lm_head(model)
    model.eval()
    prompt, good, bad = [11, 12, 13, 14, 15, 16], [21, 22, 23], [31, 32]
    batch = PairCollator(0)([{"chosen_input_ids": prompt + good, "chosen_labels": [-100] * 6 + good,
                              "rejected_input_ids": prompt + bad, "rejected_labels": [-100] * 6 + bad}])
    assert batch["completion_mask"].tolist() == [[0] * 6 + [1] * 3, [0] * 6 + [1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 9, [1] * 8 + [0]]
    stub = SimpleNamespace(model=model, beta=0.5, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                           accelerator=SimpleNamespace(gather_for_metrics=lambda x: x), _total_train_tokens=0)
    orpo = preference_trainer_class()._orpo_loss
    with torch.no_grad():
        loss = orpo(stub, model, batch, False)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), dim=-1)

    def mean_logp(row: int, ids: list[int], start: int) -> torch.Tensor:
        return torch.stack([logp[row, start + k - 1, t] for k, t in enumerate(ids)]).mean()

    chosen, rejected = mean_logp(0, good, 6), mean_logp(1, bad, 6)
    nll_answers = -chosen
    nll_with_prompt = -mean_logp(0, prompt[1:] + good, 1)
    assert stub._metrics["eval"]["nll_loss"][0] == pytest.approx(float(nll_answers), rel=1e-4)
    assert abs(float(nll_with_prompt) - float(nll_answers)) > 1e-2  # the check can tell them apart
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    expected = nll_answers - 0.5 * torch.nn.functional.logsigmoid(log_odds)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert stub._metrics["eval"]["logps/chosen"][0] == pytest.approx(float(chosen),
                                                                                                  rel=1e-4)


@pytest.mark.parametrize("adapter, expected", [
    ("no-such-run", "no such run folder"),
])
def test_an_adapter_that_cannot_be_continued_is_refused_in_one_line(tiny_model_dir, tmp_path, adapter, expected):
    project = dpo_project(tmp_path, tiny_model_dir, adapter=adapter)
    out = subprocess.run([sys.executable, "-m", "tunedeck.core", "check", str(project)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == EXIT_USER_ERROR
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.adapter" in lines[0] and expected in lines[0], out.stderr


def test_an_adapter_of_another_base_model_is_refused(tiny_model_dir, default_model_dir, tmp_path):
    sft = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1})
    code, _, sft_dir = train_inprocess(sft, run_name="sft")
    assert code == EXIT_OK
    project = dpo_project(tmp_path / "other", default_model_dir, adapter=str(sft_dir))
    from tunedeck.core.errors import UserError
    from tunedeck.core.preflight import load_project, preflight

    with pytest.raises(UserError, match="trained an adapter for") as err:
        preflight(load_project(project), deep=False)
    assert "\n" not in err.value.message
    assert json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
