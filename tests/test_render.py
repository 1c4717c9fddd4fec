"""Render and mask: chat template, assistant-only labels, end-of-turn training, truncation, padding."""

from __future__ import annotations

import pytest

from tunedeck.core.errors import UserError
from tunedeck.core.render import (
    IGNORE, TEMPLATES, dataset_refusal, render, render_rows, resolve_chat_template,
)

QA = [{"role": "user", "content": "How do I reverse a list?"},
      {"role": "assistant", "content": "Use `items[::-1]` or `items.reverse()`."}]
MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]

# templates of other model families, as they ship (simplified to the turn structure)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)
GENERATION_TAGS = (  # a template with {% generation %} markers: masked the same way
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def trained_pieces(tok, r) -> list[str]:
    """The trained tokens as text, one string per contiguous trained run."""
    pieces, current = [], []
    for tid, trained in r.tokens:
        if trained:
            current.append(tid)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    return pieces


def test_only_the_answer_and_its_end_of_turn_token_train(tok):
    r = render(tok, QA, max_length=256)
    assert trained_pieces(tok, r) == [QA[1]["content"] + "<|im_end|>"]
    # SmolLM2's template injects a default system prompt: rendered, never trained
    assert "You are a helpful AI assistant named SmolLM" in r.text
    # the newline after <|im_end|> closes the turn but does not train
    assert tok.decode(r.input_ids[-1:]) == "\n" and r.labels[-1] == IGNORE
    assert r.input_ids == tok(r.text, add_special_tokens=False)["input_ids"]  # one tokenization of the whole text
    assert not r.truncated and r.stop_trained


def test_eos_trains_although_it_is_also_the_pad_token(tok):
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2: <|im_end|> is eos and pad
    short = render(tok, QA, max_length=256)
    longer = render(tok, [QA[0], {"role": "assistant", "content": "Use a slice. " * 8}], max_length=256)
    eos = tok.eos_token_id
    end_of_answer = short.input_ids.index(eos, len(short.input_ids) - 3)
    assert short.labels[end_of_answer] == eos
    from tunedeck.core.batching import BatchCollator

    batch = BatchCollator(tok.pad_token_id, padding_free=False)([short.example(), longer.example()])
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(longer.input_ids))  # the longest row, not max_length
    assert batch["labels"][0, end_of_answer].item() == eos  # survives padding with the same id
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert batch["labels"][1].tolist() == longer.labels  # (its first token is a prompt's: never trained)


def test_every_assistant_turn_of_a_conversation_trains(tok):
    r = render(tok, MULTI, max_length=256)
    assert trained_pieces(tok, r) == ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]
    assert "Answer briefly." in r.text and "You are a helpful AI" not in r.text  # the row's own system turn


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>"), ("alpaca", "<|im_end|>")])
def test_named_templates(tok, name, marker):
    from copy import deepcopy

    from tunedeck.core.render import TEMPLATE_TOKENS, missing_template_tokens

    tok = deepcopy(tok)
    if missing_template_tokens(tok, name):  # as a Llama 3 tokenizer has them
        tok.add_special_tokens({"additional_special_tokens": list(TEMPLATE_TOKENS[name])})
    r = render(tok, MULTI, max_length=512, chat_template=TEMPLATES[name])
    assert trained_pieces(tok, r) == [f"Hello! How can I help?{marker}", f"It is 4.{marker}"]  # alpaca: eos


@pytest.mark.parametrize("template, marker", [(GEMMA, "<end_of_turn>"), (MISTRAL, "</s>"), (GENERATION_TAGS, "<|im_end|>")])
def test_other_families_templates(tok, template, marker):
    messages = MULTI[1:]  # these templates have no system role
    r = render(tok, messages, max_length=512, chat_template=template)
    joined = "|".join(p.replace(" ", "") for p in trained_pieces(tok, r))
    assert joined == f"Hello!HowcanIhelp?{marker}|Itis4.{marker}"
    assert "Hi there" in r.text


def test_loss_on_all_trains_every_token_but_the_first(tok):
    r = render(tok, QA, max_length=256, loss_on="all")
    assert r.labels[0] == IGNORE
    assert r.labels[1:] == r.input_ids[1:]


def test_text_rows_train_plain_text_and_eos_without_a_template(tok):
    r = render(tok, [{"role": "assistant", "content": "def add(a, b):\n    return a + b"}], max_length=256)
    assert "<|im_start|>" not in r.text
    assert r.input_ids[-1] == tok.eos_token_id and r.labels[-1] == tok.eos_token_id
    assert r.labels[1:] == r.input_ids[1:]
    assert tok.decode(r.input_ids) == "def add(a, b):\n    return a + b<|im_end|>"


def test_truncation_keeps_the_start(tok):
    full = render(tok, QA, max_length=4096)
    cut = render(tok, QA, max_length=len(full.input_ids) - 4)
    assert cut.truncated and cut.full_length == len(full.input_ids)
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.labels == full.labels[: len(cut.labels)]
    assert len(cut.offsets) == len(cut.input_ids)


def test_rows_masked_away_by_truncation_are_left_out_and_refused_when_all_are(tok):
    rows = [(1, QA), (2, MULTI)]
    examples, stats = render_rows(tok, rows, max_length=16)  # the default system prompt alone is longer
    assert examples == [] and stats.fully_masked == [1, 2] and stats.truncated == 2
    line = dataset_refusal(stats, max_length=16)
    assert "every row is fully masked" in line and "max_length = 16" in line and "\n" not in line
    examples, stats = render_rows(tok, rows, max_length=512)
    assert len(examples) == 2 and stats.kept == 2 and dataset_refusal(stats, max_length=512) is None
    assert stats.trained_tokens == sum(sum(label != IGNORE for label in e["labels"]) for e in examples)


def test_a_model_without_a_chat_template_needs_a_named_one(tok):
    from copy import deepcopy

    bare = deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError, match="has no chat template; set model.chat_template"):
        resolve_chat_template(bare, "auto")
    assert resolve_chat_template(bare, "chatml") == TEMPLATES["chatml"]
    assert resolve_chat_template(tok, "auto") == tok.chat_template


def test_a_template_that_cannot_render_a_row_is_reported_per_row(tok):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    examples, stats = render_rows(tok, [(3, MULTI)], max_length=64, chat_template=strict)
    assert examples == [] and stats.failed[0][0] == 3 and "no system" in stats.failed[0][1]
    assert "no row can be rendered (row 3" in dataset_refusal(stats, max_length=64)
