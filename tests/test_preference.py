"""Preference data (DPO / ORPO): every layout read into pairs, bad rows named, the mask of
chosen and rejected token by token through the trainer's render path, the refusals, the
memory estimate and the preview."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tunedeck.core.datafile import load_splits
from tunedeck.core.errors import UserError
from tunedeck.core.preference import Pair, render_pair, to_pair
from tunedeck.core.project import Project
from tunedeck.core.render import IGNORE, render_splits

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
Q, GOOD, BAD = "How do I reverse a list?", "```python\nxs[::-1]\n```\nSlicing.", "Use a method for that."


def project_for(tmp_path: Path, model: Path, rows: list[dict], **keys: object) -> Project:
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = Project.new("p", path=tmp_path / "p.toml")
    project.set_many([("model.source", str(model)), ("dataset.path", "prefs.jsonl"), ("training.method", "dpo"),
                      *keys.items()])
    return project


LAYOUTS = {
    "trl explicit, text": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "trl explicit, conversational": {"prompt": [{"role": "user", "content": Q}],
                                     "chosen": [{"role": "assistant", "content": GOOD}],
                                     "rejected": [{"role": "assistant", "content": BAD}]},
    "trl implicit prompt": {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
                            "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]},
    "UltraFeedback binarized": {"prompt": Q,
                                "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
                                "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}],
                                "score_chosen": 9.0, "score_rejected": 2.0},
    "UltraFeedback rated completions": {"instruction": Q, "completions": [
        {"response": "So-so.", "overall_score": 5}, {"response": GOOD, "overall_score": 9},
        {"response": BAD, "overall_score": 2}]},
    "LLaMA-Factory ShareGPT": {"conversations": [{"from": "human", "value": Q}],
                               "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
    "LLaMA-Factory Alpaca": {"instruction": Q, "input": "", "chosen": GOOD, "rejected": BAD},
    "Anthropic HH text": {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}",
                          "rejected": f"\n\nHuman: {Q}\n\nAssistant: {BAD}"},
    "StackExchange paired": {"question": Q, "response_j": GOOD, "response_k": BAD},
    "Intel orca pairs": {"system": "", "question": Q, "chosen": GOOD, "rejected": BAD},
    "Argilla": {"instruction": Q, "chosen_response": GOOD, "rejected_response": BAD},
}


@pytest.mark.parametrize("row", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_reads_as_the_same_pair(row):
    pair = to_pair(row)
    assert [(m["role"], m["content"]) for m in pair.prompt] == [("user", Q)]
    assert [(m["role"], m["content"]) for m in pair.chosen] == [("assistant", GOOD)]
    assert [(m["role"], m["content"]) for m in pair.rejected] == [("assistant", BAD)]


def test_a_multi_turn_prompt_keeps_its_turns_and_they_never_train(default_model_dir):
    from tunedeck.core.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(str(default_model_dir), Path(".")))
    row = {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "EARLIER ANSWER"}, {"role": "user", "content": Q},
                      {"role": "assistant", "content": GOOD}],
           "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "EARLIER ANSWER"}, {"role": "user", "content": Q},
                        {"role": "assistant", "content": BAD}]}
    pair = to_pair(row)
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    r = render_pair(tok, pair, max_length=512, chat_template=tok.chat_template)
    for side, answer in ((r.chosen, GOOD), (r.rejected, BAD)):
        trained = tok.decode([t for t, lab in zip(side.input_ids, side.labels) if lab != IGNORE])
        assert trained == answer + "<|im_end|>"  # the answer and its end of turn; not the earlier answer


def test_the_mask_of_chosen_and_rejected_token_by_token(tmp_path, default_model_dir):
    """What trains on each side is the answer and its end-of-turn token; the prompt part of
    both sides is the same tokens, all masked; the example holds exactly these labels."""
    from tunedeck.core.models import load_tokenizer, resolve_source

    project = project_for(tmp_path, default_model_dir, [LAYOUTS["trl explicit, text"]] * 3)
    tok = load_tokenizer(resolve_source(str(default_model_dir), Path(".")))
    rendered = render_splits(project, tok, load_splits(project), model_label="m")
    example = rendered.train[0]
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert all(lab == IGNORE for lab in labels[:first])  # the prompt
        assert all(lab == tid for tid, lab in zip(ids[first:], labels[first:]) if lab != IGNORE)
        trained = [tid for tid, lab in zip(ids, labels) if lab != IGNORE]
        assert tok.decode(trained) == answer + "<|im_end|>"
        assert ids[-1] != trained[-1] or labels[-1] != IGNORE  # ChatML's newline after <|im_end|> stays masked
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    c_first = next(i for i, lab in enumerate(example["chosen_labels"]) if lab != IGNORE)
    r_first = next(i for i, lab in enumerate(example["rejected_labels"]) if lab != IGNORE)
    assert example["chosen_input_ids"][:c_first] == example["rejected_input_ids"][:r_first]
    assert rendered.pairs.as_dict(rendered.train_stats.kept)["pairs"] == 3


def test_bad_rows_are_named_by_number_with_their_reason(tmp_path, default_model_dir):
    good = LAYOUTS["trl explicit, text"]
    rows = [good, {"prompt": Q, "chosen": GOOD, "rejected": " " + GOOD + " "}, good,
            {"prompt": Q, "chosen": GOOD}, {"prompt": Q, "chosen": "", "rejected": BAD},
            {"chosen": [{"role": "assistant", "content": GOOD}], "rejected": [{"role": "assistant", "content": BAD}]},
            good, good, good, good]
    project = project_for(tmp_path, default_model_dir, rows)
    splits = load_splits(project)
    skipped = {e.row: e.reason for e in splits.summary.skipped}
    assert set(skipped) == {2, 4, 5, 6}
    assert "the same" in skipped[2]
    assert 'missing field "rejected"' in skipped[4]
    assert "empty" in skipped[5]
    assert "no prompt" in skipped[6]
    assert all(isinstance(p, Pair) for _, p in splits.train)


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_preference_data_for_sft_names_the_method_that_trains_it(tmp_path, default_model_dir, fmt):
    rows = [LAYOUTS["LLaMA-Factory ShareGPT"]] * 3
    project = project_for(tmp_path, default_model_dir, rows, **{"training.method": "sft", "dataset.format": fmt})
    with pytest.raises(UserError) as err:
        load_splits(project)
    message = err.value.message
    assert "preference data" in message and 'training.method = "dpo"' in message
    assert "no assistant answer" not in message and "\n" not in message


def test_a_preference_method_refuses_data_without_pairs(tmp_path, default_model_dir):
    rows = [{"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}]}] * 3
    project = project_for(tmp_path, default_model_dir, rows)
    with pytest.raises(UserError, match="no chosen and rejected answers"):
        load_splits(project)
    project.set("dataset.format", "messages")
    with pytest.raises(UserError, match='set dataset.format = "preference"'):
        load_splits(project)


def test_columns_name_the_fields_of_other_tools(tmp_path, default_model_dir):
    rows = [{"query": Q, "better": GOOD, "worse": BAD}] * 3
    project = project_for(tmp_path, default_model_dir, rows,
                          **{"dataset.columns": {"prompt": "query", "chosen": "better", "rejected": "worse"}})
    (_, pair), *_ = load_splits(project).train
    assert pair.chosen[0]["content"] == GOOD and pair.rejected[0]["content"] == BAD


@pytest.mark.parametrize("keys, match", [
    ({"dataset.packing": True}, "dataset.packing"),
    ({"preference.loss_type": "ipo", "preference.label_smoothing": 0.1}, "preference.label_smoothing"),
    ({"preference.loss_type": "exo_pair"}, "label_smoothing > 0"),
])
def test_settings_that_do_not_go_together_are_refused(tmp_path, keys, match):
    project = Project.new("p", path=tmp_path / "p.toml")
    project.set("training.method", "dpo")
    with pytest.raises(UserError, match=match):
        project.set_many(list(keys.items()))


def test_the_memory_estimate_counts_both_answers(tmp_path, default_model_dir):
    from tunedeck.core.inspect import inspect_project, project_choice, project_memory

    project = project_for(tmp_path, default_model_dir, [LAYOUTS["trl explicit, text"]] * 3,
                          **{"training.batch_size": 2})
    ins = inspect_project(project)
    dpo = project_memory(project, ins, project_choice(project, ins), longest_row=200)
    project.set("training.method", "sft")
    sft = project_memory(project, ins, project_choice(project, ins), longest_row=200)
    assert dpo.activations == pytest.approx(2 * sft.activations, rel=0.01)
    assert "2 pairs × 2 answers × 200 tokens" in dpo.line()


@pytest.mark.slow
def test_preview_json_gives_both_sides_token_by_token(tmp_path, default_model_dir):
    rows = [LAYOUTS["trl explicit, text"], LAYOUTS["StackExchange paired"]]
    project = project_for(tmp_path, default_model_dir, rows)
    project.save()
    out = subprocess.run([sys.executable, "-m", "tunedeck.core", "preview", str(project.path), "--row", "2",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    row = report["row"]
    assert row["pair"] is True and row["row"] == 2
    assert [m["content"] for m in row["prompt"]][-1] == Q
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        tokens = row[side]["tokens"]
        assert "".join(t["text"] for t in tokens if t["trained"]) == answer + "<|im_end|>"
        assert row[side]["trained"] == sum(t["trained"] for t in tokens)
    pref = report["stats"]["preference"]
    assert pref["pairs"] == 2 and pref["chosen_tokens_mean"] > pref["rejected_tokens_mean"]
    assert pref["chosen_longer_percent"] == 100.0


def test_the_sample_preference_set_reads_whole_and_is_not_length_biased():
    from tunedeck.core.preview import preview_stats

    project = Project.load(SAMPLE / "prefs.toml")
    splits = load_splits(project)
    assert not splits.summary.skipped and len(splits.train) + len(splits.eval) == splits.summary.rows >= 60
    stats = preview_stats(project)
    assert stats["refusal"] is None and stats["preference"]["truncated_pairs"] == 0
    assert 30 <= stats["preference"]["chosen_longer_percent"] <= 70  # in tokens, what the model sees
