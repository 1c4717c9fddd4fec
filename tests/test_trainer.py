"""The trainer on tiny random models, in this process: learning, the adapter, QLoRA, refusals."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from tunedeck.core.errors import UserError
from tunedeck.core.rundir import prepare_run
from tunedeck.core.runs import EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR

from train_support import ANSWER, memorisable_rows, of_type, sharpened_copy, train_inprocess, write_project


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory):
    return sharpened_copy(tiny_model_dir, tmp_path_factory.mktemp("sharp"))


@pytest.mark.slow
def test_loss_falls_and_the_adapter_loads_in_plain_peft(sharp_model, tmp_path):
    project = write_project(tmp_path, sharp_model, memorisable_rows(),
                            training={"max_steps": 10, "logging_steps": 1}, lora={"r": 16, "alpha": 32})
    code, events, run_dir = train_inprocess(project)
    assert code == EXIT_OK, of_type(events, "failed")
    losses = [e["loss"] for e in of_type(events, "step")]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], losses

    started = of_type(events, "run_started")[0]
    assert started["trainable_params"] > 0 and started["total_params"] > started["trainable_params"]
    from tunedeck.core.hardware import detect

    assert started["max_steps"] == 10 and started["resolved"]["precision"] == detect().cpu_precision
    assert {"torch", "transformers", "peft", "trl"} <= set(started["versions"])
    step = of_type(events, "step")[-1]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch", "eta_s"):
        assert step[key] is not None, key
    assert of_type(events, "system")[0]["rss"] > 0
    finished = events[-1]
    assert finished["type"] == "finished" and finished["step"] == 10 and finished["tokens"] > 0
    # what the file says is what the emitter sent
    on_disk = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in on_disk] == ["launched"] + [e["type"] for e in events]  # launched: the session
    assert json.loads((run_dir / "env.json").read_text())["versions"]["peft"]
    # the snapshot trains as is: overrides applied, paths relative to the run folder
    from tunedeck.core.project import Project

    snapshot = Project.load(run_dir / "project.toml")
    assert snapshot["dataset.path"] == "../../data.jsonl" and snapshot["training.max_steps"] == 10
    assert snapshot.resolve_path(snapshot["dataset.path"]) == tmp_path / "data.jsonl"

    adapter = run_dir / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (adapter / name).is_file(), name
    assert not (adapter / "training_args.bin").exists()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say the magic words."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(str(sharp_model))
    with torch.no_grad():
        before = base(**prompt).logits
    tuned = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        after = tuned(**prompt).logits
    assert not torch.allclose(before, after, atol=1e-4)
    # it learned the answer: greedy decoding starts with it
    out = tuned.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(ANSWER[:4])


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [True, False])
def test_the_trainer_trains_on_exactly_the_rendered_labels(tiny_model_dir, tmp_path, padding_free):
    """trl neither re-masks, re-truncates nor re-pads: a batch is render()'s rows, one after
    the other (padding-free) or padded to the longest (padded)."""
    from tunedeck.core.events import EventLog
    from tunedeck.core.finetune import Run
    from tunedeck.core.render import IGNORE, render
    from tunedeck.core.trainer import Controls, Emitter

    multi = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "b?"}, {"role": "assistant", "content": "second one"}]}
    rows = [multi, {"messages": [{"role": "user", "content": "long " * 60}, {"role": "assistant", "content": "x"}]}]
    project = write_project(tmp_path, tiny_model_dir, rows, dataset={"max_length": 64, "padding_free": padding_free},
                            training={"batch_size": 2})
    spec = prepare_run(project, run_name="labels").spec
    with EventLog(tmp_path / "ev.jsonl") as log:
        trainer, _ = Run(spec, Emitter(log), Controls()).build()
    tok = trainer.processing_class
    expected = [render(tok, row["messages"], max_length=64) for row in rows]
    assert expected[1].truncated  # the long prompt is cut at 64 tokens; its answer with it
    assert all(e.labels[0] == IGNORE for e in expected)  # a row starts with its prompt
    want = sorted((e.input_ids, e.labels) for e in expected if e.n_trained)
    batch = next(iter(trainer.get_train_dataloader()))
    if padding_free:
        assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(len(i) for i, _ in want))
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0] + [batch["input_ids"].shape[1]]
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        got = sorted((ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:]))
    else:
        got = sorted((b[m.bool()].tolist(), label[m.bool()].tolist()) for b, label, m
                     in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]))
        # dynamic padding: the batch is as long as its longest row, pads are -100
        assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in expected if e.n_trained)
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert got == want


@pytest.mark.slow
def test_qlora_4bit_trains_on_the_cpu(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir, quantization={"mode": "4bit", "quant_type": "nf4"},
                            training={"max_steps": 2})
    code, events, run_dir = train_inprocess(project)
    assert code == EXIT_OK, of_type(events, "failed")
    assert len(of_type(events, "step")) == 2
    assert all(math.isfinite(e["loss"]) for e in of_type(events, "step"))
    assert of_type(events, "run_started")[0]["config"]["quantization"]["mode"] == "4bit"
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.float32"}  # fp32 adapter weights, not trl's bf16 cast


@pytest.mark.slow
@pytest.mark.parametrize("overrides, before, line", [
    (['lora.target_modules=["query", "value"]'],
     'lora.target_modules ["query", "value"] matches no layer of this model; its layers: embed_tokens, q_proj',
     'lora.target_modules = ["query", "value"] matches no module of this model; its linear layers are: '
     "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"),
    (['lora.target_modules=["lm_head"]'], "includes the output layer lm_head", "includes the output layer (lm_head)"),
    (["dataset.max_length=12"], "every row is fully masked after truncation to dataset.max_length = 12 tokens",
     "every row is fully masked after truncation to dataset.max_length = 12 tokens"),
])
def test_refusals_found_by_the_trainer(tiny_model_dir, tmp_path, overrides, before, line):
    project = write_project(tmp_path, tiny_model_dir, training={"max_steps": 1})
    if before is not None:  # the pre-flight refuses it, before any folder exists
        with pytest.raises(UserError) as refused:
            prepare_run(project, overrides, run_name="never")
        assert before in refused.value.message and "\n" not in refused.value.message
        assert not (tmp_path / "runs").exists()
    # and the trainer itself, should it be given such a run
    code, events, run_dir = train_inprocess(project, overrides, deep=False)
    assert code == EXIT_USER_ERROR
    failed = events[-1]
    assert failed["type"] == "failed" and failed["user_error"] is True and failed["traceback"] is None
    assert line in failed["reason"] and "\n" not in failed["reason"]
    assert not of_type(events, "run_started") and not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_a_model_without_a_chat_template_is_refused(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    project = write_project(tmp_path / "p", bare, training={"max_steps": 1})
    with pytest.raises(UserError, match="has no chat template; set model.chat_template"):
        prepare_run(project, run_name="never")  # the pre-flight knows it, before any folder
    assert not (tmp_path / "p" / "runs").exists()
    code, events, _ = train_inprocess(project, deep=False)  # and the trainer itself
    assert code == EXIT_USER_ERROR and "has no chat template; set model.chat_template" in events[-1]["reason"]
    code, events, _ = train_inprocess(project, ["model.chat_template=chatml"], run_name="named")
    assert code == EXIT_OK
    assert (tmp_path / "p" / "runs" / "named" / "adapter" / "chat_template.jinja").read_text().startswith(
        "{% for message in messages %}{{ '<|im_start|>'")


def test_zero_trainable_parameters_are_refused():
    from tunedeck.core.finetune import check_trainable

    with pytest.raises(UserError, match="leaves no trainable parameter"):
        check_trainable(0, ["q_proj"])
    check_trainable(10, ["q_proj"])


def test_refusals_found_before_starting(tiny_model_dir, tmp_path, write_jsonl):
    from tunedeck.core.models import bundled_gguf

    project = write_project(tmp_path, tiny_model_dir)
    empty = write_jsonl([], name="empty.jsonl")
    cases = [
        (["training.precision=fp16"], '"fp16" needs a GPU'),
        ([f"dataset.path={empty}"], "has no rows"),
        ([f"model.source={bundled_gguf()}", "quantization.mode=4bit"], "cannot be used with a .gguf source"),
        (["dataset.eval_split=0.99"], "24 usable row(s) leave nothing to train on"),
    ]
    for overrides, line in cases:
        with pytest.raises(UserError) as info:
            prepare_run(project, overrides, run_name="never")
        assert line in info.value.message and "\n" not in info.value.message
    assert not (tmp_path / "runs" / "never").exists()
    prepare_run(project, [], run_name="once").release()
    with pytest.raises(UserError, match="already exists; pick another --run-name, or pass --resume"):
        prepare_run(project, [], run_name="once")
    with pytest.raises(UserError, match="has no checkpoint to resume from"):
        prepare_run(project, [], run_name="once", resume=True)
    with pytest.raises(UserError, match="use letters, digits"):
        prepare_run(project, [], run_name="../escape")
    (tmp_path / "runs" / "once" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "runs" / "once" / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="is at step 3 already and training.max_steps = 3; resume with more steps"):
        prepare_run(project, [], run_name="once", resume=True)


def test_nan_losses_warn_and_three_in_a_row_end_the_run():
    from tunedeck.core.finetune import NAN_LIMIT, EventsCallback

    sent = []

    def emit(kind, step=None, **fields):
        sent.append({"type": kind, **fields})

    emit.warn = lambda message: sent.append({"type": "warning", "message": message})
    run = SimpleNamespace(emit=emit, controls=None)
    cb = EventsCallback(run, {})
    state = SimpleNamespace(global_step=1, num_input_tokens_seen=10, max_steps=10)
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    cb.on_log(None, state, control, logs={"loss": 2.0})
    for i in range(NAN_LIMIT):
        state.global_step += 1
        cb.on_log(None, state, control, logs={"loss": float("nan") if i % 2 else float("inf")})
        assert control.should_training_stop == (i == NAN_LIMIT - 1)
    warnings = [e["message"] for e in sent if e["type"] == "warning"]
    assert len(warnings) == NAN_LIMIT and "the loss is inf at step 2" in warnings[0]
    assert cb.diverged and not control.should_save and cb.last_loss == 2.0


def test_a_crash_is_reported_with_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    from tunedeck.core import finetune

    def broken(self):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(finetune.Run, "_model", broken)
    project = write_project(tmp_path, tiny_model_dir)
    code, events, _ = train_inprocess(project)
    assert code == EXIT_FAILED
    failed = events[-1]
    assert failed["reason"] == "RuntimeError: boom" and "Traceback" in failed["traceback"]
    assert failed["user_error"] is False and failed["failure"] == "crash"


@pytest.mark.slow
def test_resume_without_a_name_picks_the_newest_run_with_a_checkpoint(tiny_model_dir, tmp_path):
    project = write_project(tmp_path, tiny_model_dir)
    for name, step in (("t-20260101-000000", 4), ("t-20260102-000000", None), ("other-20260103-000000", 2)):
        prepare_run(project, [], run_name=name).release()
        if step:
            checkpoint = tmp_path / "runs" / name / "checkpoints" / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text("{}")
    spec = prepare_run(project, ["training.max_steps=10"], resume=True).spec
    assert spec.name == "t-20260101-000000" and spec.resume
