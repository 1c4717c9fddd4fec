"""Chat: one base model with runs' adapters, both panes answering at once (each as that model
alone), streaming through the engine, cancel, eval mode, broken adapters, and `tunedeck chat`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from train_support import (
    ANSWER,
    memorisable_rows,
    sharpened_copy,
    train_inprocess,
    write_project,
)
from tunedeck.core.engine.server import handle
from tunedeck.core.chat import BASE, ChatState, GenSettings, target_for
from tunedeck.core.cli import main
from tunedeck.core.engine import EngineClient, EngineError
from tunedeck.core.errors import UserError

GREEDY = {"greedy": True, "max_new_tokens": 8}
ASK = [{"role": "user", "content": "Say the magic words."}]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A run that memorised one answer, and a second adapter (random, built with peft) in a
    run folder of its own with a system prompt (its prompts are longer), both on the same
    sharpened tiny model; a DoRA adapter on it too, and an adapter on another base model."""
    root = tmp_path_factory.mktemp("chat")
    sharp = sharpened_copy(tiny_model_dir, root / "sharp")
    project = write_project(root / "project", sharp, memorisable_rows(),
                            training={"max_steps": 10}, lora={"r": 16, "alpha": 32},
                            dataset={"eval_split": 0.25, "max_length": 96})
    code, _, tuned = train_inprocess(project, run_name="tuned")
    assert code == 0
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    snapshot = (tuned / "project.toml").read_text(encoding="utf-8")
    assert snapshot.count("[dataset]\n") == 1
    made = {}
    for name, base, seed, extra in (("other", sharp, 1, {}), ("dora", sharp, 2, {"use_dora": True}),
                                    ("elsewhere", tiny_model_dir, 3, {})):
        folder = made[name] = tuned.parent / name
        folder.mkdir()
        text = snapshot.replace("[dataset]\n", '[dataset]\nsystem_prompt = "Answer in one short line."\n')
        if base != sharp:
            text, changed = re.subn(r"(?m)^source = .*$", f"source = {json.dumps(str(base))}", text)
            assert changed == 1
        (folder / "project.toml").write_text(text, encoding="utf-8")
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                          **extra))
        model.save_pretrained(str(folder / "adapter"))
        shutil.copy(tuned / "adapter" / "chat_template.jinja", folder / "adapter" / "chat_template.jinja")
    return {"project": project, "tuned": tuned, "sharp": sharp, **made}


@pytest.mark.slow
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


@pytest.mark.slow
def test_streaming_both_panes_cancel_and_death_through_the_engine(runs, tmp_path):
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        project = str(runs["project"])
        answers = {}
        for model, partner in ((BASE, str(runs["tuned"])), (str(runs["tuned"]), BASE)):
            parts: list[dict] = []
            result = client.chat(model, ASK, partner=partner, settings=GREEDY, project_path=project,
                                 on_text=parts.append)
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
        result = client.chat(str(runs["tuned"]), ASK, settings=long, cancel=cancel, on_text=first)
        assert result["cancelled"] and result["tokens"] < 200, result["tokens"]
        assert client.ping()  # plain calls still work

        # a broken run: one line back, the engine goes on
        with pytest.raises(EngineError) as err:
            client.chat(str(tmp_path), ASK, settings=GREEDY)
        assert "no such run folder" in str(err.value) and "\n" not in str(err.value)

        # death while streaming: an error, not a hang; the next request starts a new engine
        pid = client.pid
        outcome: dict = {}

        def kill_on_first(partial: dict) -> None:
            if not outcome:
                outcome["killed"] = True
                os.kill(pid, signal.SIGKILL)

        with pytest.raises(EngineError, match="stopped unexpectedly"):
            client.chat(str(runs["tuned"]), ASK, settings=long, on_text=kill_on_first)
        assert client.ping()["pid"] != pid


def test_eval_mode_answers_the_eval_split_with_the_reference(runs, tmp_path):
    partials: list[dict] = []
    reply = handle({"id": 1, "op": "chat_eval", "args": {
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
    reply = handle({"id": 2, "op": "chat_eval", "args": {
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


# -- both panes at once ------------------------------------------------------------------------------

SAMPLED = {"temperature": 1.3, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.2, "seed": 11,
           "max_new_tokens": 16}
LONGER = [{"role": "user", "content": "Say the magic words."}, {"role": "assistant", "content": "Not yet."},
          {"role": "user", "content": "Now say them, all of them, slowly."}]


def both(state, pairs, settings, **kwargs):
    """answer_all on (model, partner, messages) triples, and each pane's streamed pieces."""
    asks = [(target_for(model, partner=partner), messages) for model, partner, messages in pairs]
    pieces: dict[int, list[str]] = {i: [] for i in range(len(asks))}
    order: list[int] = []

    def on_text(index, piece, answer):
        pieces[index].append(piece)
        order.append(index)

    result = state.answer_all(asks, settings, on_text=on_text, **kwargs)
    return asks, result, pieces, order


@pytest.mark.slow
@pytest.mark.parametrize("settings", [GREEDY | {"max_new_tokens": 24}, SAMPLED], ids=["greedy", "seeded"])
def test_both_panes_answer_at_once_each_as_that_model_alone(runs, settings):
    state = ChatState(device="cpu")
    gen = GenSettings.from_dict(settings)
    tuned, other = str(runs["tuned"]), str(runs["other"])
    cases = [
        [(BASE, tuned, ASK), (tuned, BASE, ASK)],  # base against a run: the same prompt
        [(tuned, other, ASK), (other, tuned, ASK)],  # run against run: other's system prompt pads tuned's row
        [(BASE, tuned, LONGER), (tuned, BASE, ASK)],  # conversations of different lengths
        [(other, None, ASK), (other, None, LONGER)],  # one adapter on both rows
    ]
    for pairs in cases:
        asks, result, pieces, order = both(state, pairs, gen)
        assert result.together and result.errors == [None, None]
        lengths = set()
        for index, (target, messages) in enumerate(asks):
            alone = state.answer(target, messages, gen)
            answer = result.answers[index]
            assert answer.text == alone.text and answer.tokens == alone.tokens, (pairs[index], answer, alone)
            assert answer.model == target.label and "".join(pieces[index]) == answer.text
            assert answer.tokens_per_s and answer.seconds > 0
            lengths.add(len(state._row(index, target, messages, gen).prompt))
        # the two panes stream together: their pieces interleave, not one pane after the other
        first_b, last_a = order.index(1), len(order) - 1 - order[::-1].index(0)
        assert first_b < last_a, order
        if pairs is cases[1] or pairs is cases[2]:
            assert len(lengths) == 2  # left padding was needed


@pytest.mark.slow
def test_a_row_that_ends_leaves_the_batch_and_the_other_goes_on_as_alone(runs, monkeypatch):
    """Each row stops at its own stop ids: here "," ends an answer too, which the run's
    answer has early and base's has not; base then goes on alone in the batch."""
    state = ChatState(device="cpu")
    gen = GenSettings.from_dict(GREEDY | {"max_new_tokens": 24})
    stop_ids = ChatState.stop_ids
    state.prepare(target_for(str(runs["tuned"])))
    comma = state.tokenizer.convert_tokens_to_ids(",")
    assert isinstance(comma, int) and comma != state.tokenizer.unk_token_id
    monkeypatch.setattr(ChatState, "stop_ids", lambda self, template: [*stop_ids(self, template), comma])
    tuned = str(runs["tuned"])
    for pairs in ([(BASE, tuned, ASK), (tuned, BASE, ASK)], [(tuned, BASE, ASK), (BASE, tuned, LONGER)]):
        asks, result, _, _ = both(state, pairs, gen)
        assert result.together
        run = next(a for a in result.answers if a.model == "tuned")
        base = next(a for a in result.answers if a.model == "base")
        assert run.text.startswith(ANSWER[:6]) and run.tokens < 8 and base.tokens == 24
        assert run.seconds < base.seconds  # its tokens/s counts to its own last token
        for index, (target, messages) in enumerate(asks):
            alone = state.answer(target, messages, gen)
            assert (result.answers[index].text, result.answers[index].tokens) == (alone.text, alone.tokens)


@pytest.mark.slow
def test_esc_stops_both_answers_within_a_token(runs):
    state = ChatState(device="cpu")
    cancel = threading.Event()
    long = GenSettings.from_dict({"greedy": True, "max_new_tokens": 3000, "min_new_tokens": 3000})
    asks = [(target_for(BASE, partner=str(runs["tuned"])), ASK), (target_for(str(runs["tuned"])), ASK)]
    seen: list[int] = []

    def on_text(index, piece, answer):
        seen.append(index)
        if len(seen) >= 6:
            cancel.set()

    result = state.answer_all(asks, long, cancel=cancel, on_text=on_text)
    assert result.together
    for answer in result.answers:
        assert answer.cancelled and 0 < answer.tokens < 20, answer
    # what each pane had is the start of its answer alone
    short = GenSettings.from_dict({"greedy": True, "max_new_tokens": 40, "min_new_tokens": 40})
    for (target, messages), answer in zip(asks, result.answers):
        assert state.answer(target, messages, short).text.startswith(answer.text)


@pytest.mark.slow
def test_a_run_on_another_base_or_with_dora_answers_one_after_the_other(runs):
    state = ChatState(device="cpu")
    gen = GenSettings.from_dict(GREEDY)
    tuned = str(runs["tuned"])
    for other in ("elsewhere", "dora"):
        pairs = [(tuned, None, ASK), (str(runs[other]), None, ASK)]
        asks, result, pieces, order = both(state, pairs, gen)
        assert not result.together and result.errors == [None, None], result
        assert order == sorted(order, key=lambda i: order.index(i))  # one pane's pieces, then the other's
        assert len(set(order[:len(pieces[order[0]])])) == 1
        for index, (target, messages) in enumerate(asks):
            assert result.answers[index].text == state.answer(target, messages, gen).text
            assert "".join(pieces[index]) == result.answers[index].text
    assert target_for(str(runs["elsewhere"])).base_path != target_for(tuned).base_path


def test_a_pane_that_cannot_answer_leaves_the_other_answering_through_the_engine(runs, tmp_path):
    reply = handle({"id": 1, "op": "chat_panes", "args": {
        "panes": [{"model": BASE, "messages": ASK}, {"model": str(tmp_path / "gone"), "messages": ASK}],
        "settings": GREEDY, "project_path": str(runs["project"])}})
    assert reply["ok"], reply
    result = reply["result"]
    assert result["answers"][1] is None and "no such run folder" in result["errors"][1]
    assert "\n" not in result["errors"][1]
    assert result["errors"][0] is None and result["answers"][0]["tokens"] == 8


@pytest.mark.slow
def test_both_panes_stream_together_through_the_engine(runs, tmp_path):
    with EngineClient(log_path=tmp_path / "engine.log") as client:
        partials: list[dict] = []
        panes = [{"model": BASE, "messages": ASK}, {"model": str(runs["tuned"]), "messages": ASK}]
        result = client.chat_panes(panes, settings=GREEDY | {"max_new_tokens": 12}, project_path=str(runs["project"]),
                                   on_text=partials.append)
        assert result["together"] and result["errors"] == [None, None]
        order = [p["pane"] for p in partials]
        assert order.index(1) < len(order) - 1 - order[::-1].index(0), order  # interleaved
        for pane, answer in enumerate(result["answers"]):
            mine = [p for p in partials if p["pane"] == pane]
            assert "".join(p["text"] for p in mine) == answer["text"] and mine[-1]["tokens"] == answer["tokens"]
            assert answer["tokens_per_s"] > 0
        alone = client.chat(str(runs["tuned"]), ASK, settings=GREEDY | {"max_new_tokens": 12},
                            project_path=str(runs["project"]))
        assert alone["text"] == result["answers"][1]["text"]


@pytest.mark.slow
def test_cli_chat_prints_no_library_noise(runs, tmp_path):
    """The real command in a fresh process: its output is the answers, and the libraries'
    loading bars and warnings are in the log."""
    env = {**os.environ, "TUNEDECK_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "120"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    command = [sys.executable, "-m", "tunedeck.core", "chat", "tuned", "--prompt", "Say the magic words.",
               "--greedy", "--max-new-tokens", "8", "--cpu"]

    # the two fresh processes (--json and text) run at the same time, each with a cache dir
    # (and so a chat.log) of its own
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=runs["project"].parent, env={**env, "TUNEDECK_CACHE_DIR": str(tmp_path / cache)})
             for args, cache in (([*command, "--json"], "cache"), (command, "cache-text"))]

    def outcome(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        stdout, stderr = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    try:
        as_json, as_text = [outcome(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()

    done = as_json
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = json.loads(done.stdout)
    assert out["a"]["model"] == "tuned" and out["a"]["text"].startswith(ANSWER[:6])
    log = (tmp_path / "cache" / "logs" / "chat.log").read_text(encoding="utf-8")
    assert log.strip()  # what the libraries said went here (loading bars, warnings)

    done = as_text
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"(\(\d+ tokens(, [\d.]+ tokens/s)?\)\n){2}", done.stderr), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("── tuned ") and lines[1].startswith(ANSWER[:6])
    assert any(line.startswith("── base ") for line in lines[2:])
    assert "Loading" not in done.stdout and "arn" not in done.stdout  # no bars, no warnings

    done = subprocess.run([sys.executable, "-m", "tunedeck.core", "chat", "nope", "--prompt", "x"],
                          capture_output=True, text=True, check=False, cwd=runs["project"].parent, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tunedeck: error: run 'nope'") and done.stderr.count("\n") == 1
