"""Chat: one base model with runs' adapters, streaming through the engine, cancel, eval mode,
broken adapters, and `tunedeck chat`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading

import pytest

from tunedeck.core import engine
from tunedeck.core.chat import BASE, ChatState, GenSettings, target_for
from tunedeck.core.cli import main
from tunedeck.core.engine import EngineClient, EngineError
from tunedeck.core.errors import UserError

from train_support import ANSWER, memorisable_rows, sharpened_copy, train_inprocess, write_project

pytestmark = pytest.mark.slow

GREEDY = {"greedy": True, "max_new_tokens": 8}
ASK = [{"role": "user", "content": "Say the magic words."}]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A run that memorised one answer, and a second adapter (random, built with peft) in a
    run folder of its own, both on the same sharpened tiny model."""
    root = tmp_path_factory.mktemp("chat")
    sharp = sharpened_copy(tiny_model_dir, root / "sharp")
    project = write_project(root / "project", sharp, memorisable_rows(),
                            training={"max_steps": 10}, lora={"r": 16, "alpha": 32},
                            dataset={"eval_split": 0.25, "max_length": 96})
    code, _, tuned = train_inprocess(project, run_name="tuned")
    assert code == 0
    other = tuned.parent / "other"
    other.mkdir()
    shutil.copy(tuned / "project.toml", other / "project.toml")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(sharp)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(other / "adapter"))
    shutil.copy(tuned / "adapter" / "chat_template.jinja", other / "adapter" / "chat_template.jinja")
    return {"project": project, "tuned": tuned, "other": other, "sharp": sharp}


def test_base_and_tuned_answer_differently_on_one_copy_of_the_weights(runs):
    state = ChatState(device="cpu")
    settings = GenSettings.from_dict(GREEDY)
    tuned = target_for(str(runs["tuned"]))
    base = target_for(BASE, partner=str(runs["tuned"]))
    assert base.template_file == tuned.template_file  # base answers with the template the run trained with
    pieces: list[str] = []
    answer = state.answer(tuned, ASK, settings, on_text=lambda piece, a: pieces.append(piece))
    assert answer.text.startswith(ANSWER[:6]) and "".join(pieces) == answer.text and len(pieces) > 1
    assert answer.tokens == 8 and answer.tokens_per_s
    plain = state.answer(base, ASK, settings)
    assert not plain.text.startswith(ANSWER[:6])

    # "base" is the adapter switched off: the same tokens as the model loaded alone
    import torch
    from transformers import AutoModelForCausalLM

    alone = AutoModelForCausalLM.from_pretrained(str(runs["sharp"]), dtype=torch.float32)
    tok = state.tokenizer
    text = tok.apply_chat_template(ASK, chat_template=state.template(base), tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    out = alone.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=state.stop_ids(state.template(base)))
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == plain.text

    # a second run's adapter loads by name onto the same base: no second model
    model = state.model
    other = state.answer(target_for(str(runs["other"])), ASK, settings)
    assert state.model is model and sorted(state.model.peft_config) == ["run1", "run2"]
    assert other.text != answer.text
    assert state.answer(tuned, ASK, settings).text == answer.text  # switching back: the same answer
    assert state.answer(base, ASK, settings).text == plain.text


def test_sampling_is_repeatable_with_a_seed(runs):
    state = ChatState(device="cpu")
    tuned = target_for(str(runs["tuned"]))
    sampled = GenSettings.from_dict({"temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 7, "max_new_tokens": 12})
    assert state.answer(tuned, ASK, sampled).text == state.answer(tuned, ASK, sampled).text


def test_bad_generation_settings_are_one_line():
    with pytest.raises(UserError, match=r"top_p = 3: must be between 0 and 1"):
        GenSettings.from_dict({"top_p": 3})
    with pytest.raises(UserError, match="unknown"):
        GenSettings.from_dict({"beams": 3})


def test_missing_or_broken_adapters_are_one_clear_line(runs, tmp_path):
    broken = {}
    for name in ("no-adapter", "no-config", "bad-weights", "not-a-run"):
        folder = runs["tuned"].parent / f"broken-{name}"  # next to the run: its relative paths hold
        shutil.copytree(runs["tuned"], folder)
        broken[name] = folder
    shutil.rmtree(broken["no-adapter"] / "adapter")
    (broken["no-config"] / "adapter" / "adapter_config.json").unlink()
    (broken["bad-weights"] / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    (broken["not-a-run"] / "project.toml").unlink()
    expected = {"no-adapter": "no adapter folder", "no-config": "adapter_config.json is missing",
                "bad-weights": "does not load onto", "not-a-run": "not a tunedeck run folder"}
    state = ChatState(device="cpu")
    for name, words in expected.items():
        with pytest.raises(UserError) as err:
            state.answer(target_for(str(broken[name])), ASK, GenSettings.from_dict(GREEDY))
        assert words in err.value.message and "\n" not in err.value.message, err.value.message
    assert state.answer(target_for(str(runs["tuned"])), ASK, GenSettings.from_dict(GREEDY)).text  # still answers
    for folder in broken.values():
        shutil.rmtree(folder)
    with pytest.raises(UserError, match="no such run folder in"):
        target_for("nope", runs_dir=runs["tuned"].parent)


def test_streaming_both_panes_cancel_and_death_through_the_engine(runs, tmp_path):
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        project = str(runs["project"])
        answers = {}
        for model, partner in ((BASE, str(runs["tuned"])), (str(runs["tuned"]), BASE)):
            parts: list[dict] = []
            result = client.stream("chat", model=model, partner=partner, messages=ASK, settings=GREEDY,
                                   project_path=project, on_partial=parts.append)
            assert "".join(p["text"] for p in parts) == result["text"] and len(parts) > 1
            assert parts[-1]["tokens"] == result["tokens"] == 8 and result["tokens_per_s"] > 0
            answers[result["model"]] = result["text"]
        assert answers["tuned"].startswith(ANSWER[:6]) and answers["base"] != answers["tuned"]

        # Esc: the cancel reaches the engine while it generates; it stops within a token or so
        cancel = threading.Event()
        seen: list[int] = []

        def first(partial: dict) -> None:
            seen.append(partial["tokens"])
            cancel.set()

        long = {"greedy": True, "max_new_tokens": 3000, "min_new_tokens": 3000}
        result = client.stream("chat", model=str(runs["tuned"]), messages=ASK, settings=long, cancel=cancel,
                               on_partial=first)
        assert result["cancelled"] and result["tokens"] < 200, result["tokens"]
        assert client.call("ping")  # plain calls still work

        # a broken run: one line back, the engine goes on
        with pytest.raises(EngineError) as err:
            client.stream("chat", model=str(tmp_path), messages=ASK, settings=GREEDY)
        assert "no such run folder" in str(err.value) and "\n" not in str(err.value)

        # death while streaming: an error, not a hang; the next request starts a new engine
        pid = client.pid
        outcome: dict = {}

        def kill_on_first(partial: dict) -> None:
            if not outcome:
                outcome["killed"] = True
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(EngineError, match="stopped unexpectedly"):
            client.stream("chat", model=str(runs["tuned"]), messages=ASK, settings=long, on_partial=kill_on_first)
        assert client.call("ping")["pid"] != pid


def test_eval_mode_answers_the_eval_split_with_the_reference(runs, tmp_path):
    partials: list[dict] = []
    reply = engine.handle({"id": 1, "op": "chat_eval", "args": {
        "models": [BASE, str(runs["tuned"])], "settings": GREEDY, "project_path": str(runs["project"])}},
        emit=partials.append)
    assert reply["ok"], reply
    items = reply["result"]["items"]
    assert len(items) == 2 == reply["result"]["total"] and [p["index"] for p in partials] == [0, 1]
    for item in items:
        assert item["reference"] == ANSWER and item["messages"][-1]["role"] == "user"
        base, tuned = item["answers"]
        assert (base["model"], tuned["model"]) == ("base", "tuned") and tuned["text"].startswith(ANSWER[:6])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say the magic words.\n\nHello\n")
    reply = engine.handle({"id": 2, "op": "chat_eval", "args": {
        "models": [str(runs["tuned"]), str(runs["other"])], "settings": GREEDY, "prompts_file": str(prompts),
        "project_path": str(runs["project"])}})
    assert reply["ok"] and [i["reference"] for i in reply["result"]["items"]] == [None, None]


def test_cli_chat_json_and_text(runs, capsys, monkeypatch):
    monkeypatch.chdir(runs["project"].parent)  # ./runs holds the runs: names work as in `tunedeck runs`
    assert main(["chat", "tuned", "--prompt", "Say the magic words.", "--json", "--greedy",
                 "--max-new-tokens", "8", "--cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"a", "b"}
    assert out["a"]["model"] == "tuned" and out["b"]["model"] == "base"
    assert out["a"]["text"].startswith(ANSWER[:6]) and out["b"]["text"] != out["a"]["text"]
    assert all(isinstance(out[k]["tokens_per_s"], float) for k in "ab")
    assert main(["chat", str(runs["tuned"]), "--prompt", "Say the magic words.", "--against", "other",
                 "--greedy", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    assert "── tuned" in text and "── other" in text
    assert main(["chat", "missing", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunedeck: error: run 'missing': no such run folder in runs") and "\n" not in err
    assert main(["chat", "tuned", "--prompt", "x", "--top-p", "7"]) == 2
    assert "top_p = 7.0: must be between 0 and 1" in capsys.readouterr().err
