"""Training batches: padding-free, packed and padded layouts keep tunedeck's labels and give
the padded batch's loss; the compact LM head gives transformers' own loss."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from train_support import write_project
from tunedeck.core.batching import (
    IGNORE,
    BatchCollator,
    logit_transform,
    pack,
    padding_free_problem,
    use_rows_attention,
)

VOCAB = 96


def tiny_model(arch: str, seed: int = 0):
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation="sdpa", tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    model.config.use_cache = False  # as the trainer sets it: with a cache, transformers reads no row boundaries
    return model.float().eval()


def rows_of(lengths: list[int], seed: int = 1) -> list[dict[str, list[int]]]:
    """Rows with a masked prompt (the first third) and a trained answer."""
    import random

    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        prompt = n // 3
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_padding_free_batch_has_the_padded_batchs_loss(arch):
    import torch
    from tunedeck.core.batching import add_compact_head

    model = tiny_model(arch)
    rows = rows_of([7, 31, 12, 20, 5])
    padded = BatchCollator(0, padding_free=False)(rows)
    free = BatchCollator(0, padding_free=True)(rows)
    assert free["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))  # not one pad token
    assert "attention_mask" not in free
    with torch.no_grad():
        reference = model(**padded).loss.item()  # transformers' own loss on the padded batch
        free_loss = model(**free).loss.item()  # transformers' own loss, rows packed
        # the same tokens with positions running on: rows attend to the rows before them
        leaked = model(input_ids=free["input_ids"], labels=free["labels"]).loss.item()
        add_compact_head(model)
        compact = model(**free, compact_head=True).loss.item()
        assert use_rows_attention(model, max_length=256)  # sdpa row by row, as the trainer runs it
        rows_free = BatchCollator(0, padding_free=True, varlen_kwargs=True)(rows)
        by_rows = model(**rows_free, compact_head=True).loss.item()
        without_bounds = model(**free, compact_head=True).loss.item()  # no cu_seq_lens: one causal sequence
    assert abs(free_loss - reference) < 1e-4
    assert abs(compact - reference) < 1e-4
    assert abs(by_rows - reference) < 1e-4
    assert abs(without_bounds - reference) > 1e-3
    assert abs(leaked - reference) > 1e-3  # the comparison can tell rows apart


def test_rows_attention_stays_off_where_it_would_differ():
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=64, attn_implementation="sdpa"))
    assert not use_rows_attention(windowed, max_length=256)  # rows longer than the window would see past it
    assert use_rows_attention(windowed, max_length=64)
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not use_rows_attention(eager, max_length=256)


def test_the_gradients_agree_too():
    from tunedeck.core.batching import add_compact_head

    rows = rows_of([9, 25, 14])
    grads = []
    for padding_free in (False, True):
        model = tiny_model("llama", seed=3).train()
        add_compact_head(model)
        batch = BatchCollator(0, padding_free=padding_free)(rows)
        loss = model(**batch, compact_head=padding_free).loss
        loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max().item() < 1e-4 * max(1.0, grads[0].abs().max().item())


def test_no_row_is_trained_from_the_end_of_the_row_before():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    free = BatchCollator(0, padding_free=True)(rows)
    assert free["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert free["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    padded = BatchCollator(0, padding_free=False)(rows)
    assert padded["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert rows[0]["labels"] == [5, 6, 7]  # the examples themselves are left as they were


def test_flash_attention_gets_the_row_boundaries():
    rows = [{"input_ids": [1] * 4, "labels": [1] * 4, "seq_lengths": [3, 1]}, {"input_ids": [2] * 5}]
    batch = BatchCollator(0, padding_free=True, varlen_kwargs=True)(rows)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 9]
    assert batch["max_length_q"] == 5
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4]]


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=60), st.integers(64, 200))
def test_packing_keeps_every_row_whole_and_each_example_within_max_length(lengths, max_length):
    rows = [{"input_ids": [i % 90 + 1] * n, "labels": [IGNORE] + [i] * (n - 1)} for i, n in enumerate(lengths)]
    packed = pack(rows, max_length)
    assert all(len(p["input_ids"]) <= max_length and sum(p["seq_lengths"]) == len(p["input_ids"]) for p in packed)
    pieces = []
    for p in packed:
        start = 0
        for n in p["seq_lengths"]:
            pieces.append((tuple(p["input_ids"][start:start + n]), tuple(p["labels"][start:start + n])))
            start += n
    assert sorted(pieces) == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)
    # best fit: no two examples would fit together in one
    sizes = sorted(len(p["input_ids"]) for p in packed)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_length
    assert pack(rows, max_length) == packed  # the same every time


def test_the_compact_head_in_chunks_gives_the_same_loss_and_gradient(monkeypatch):
    import torch
    from tunedeck.core import batching

    torch.manual_seed(0)
    states = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16)
    targets = torch.randint(0, VOCAB, (40,))
    whole = batching.compact_cross_entropy(states, weight, None, targets, 1.0, 30.0)
    whole[0].backward()
    grad = states.grad.clone()
    states.grad = None
    monkeypatch.setattr(batching, "CHUNK_ELEMENTS", VOCAB * 7)  # 6 chunks of 7 rows (the last of 5)
    chunked = batching.compact_cross_entropy(states, weight, None, targets, 1.0, 30.0)
    chunked[0].backward()
    assert abs(chunked[0].item() - whole[0].item()) < 1e-4
    assert abs(chunked[1].item() - whole[1].item()) < 1e-3 and chunked[2].item() == whole[2].item()
    assert torch.allclose(states.grad, grad, atol=1e-5)
    expected = torch.nn.functional.cross_entropy(torch.tanh(states @ weight.T / 30) * 30, targets, reduction="sum")
    assert abs(whole[0].item() - expected.item()) < 1e-3


def test_logit_scales_are_read_as_the_models_apply_them():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert logit_transform(LlamaConfig()) == (1.0, None)
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(CohereConfig(logit_scale=0.0625))[0] == 0.0625
    assert logit_transform(GraniteConfig(logits_scaling=8.0))[0] == 1 / 8


def test_a_batch_with_nothing_to_train_backpropagates_zero():
    from tunedeck.core.batching import add_compact_head

    model = tiny_model("llama").train()
    add_compact_head(model)
    batch = BatchCollator(0, padding_free=True)([{"input_ids": [3, 4, 5], "labels": [IGNORE] * 3}])
    out = model(**batch, compact_head=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.tokens.item() == 0


@pytest.mark.parametrize("config, words", [
    ({"model_type": "mamba", "state_size": 16}, "state"),
    ({"model_type": "jamba", "layer_types": ["mamba", "full_attention"]}, "state"),
    ({"model_type": "qwen3_next", "layer_types": ["linear_attention", "full_attention"]}, "linear_attention"),
    ({"model_type": "qwen2_vl", "text_config": {"model_type": "qwen2_vl_text",
                                                "rope_parameters": {"mrope_section": [16, 24, 24]}}}, "3-D"),
])
def test_models_that_cannot_take_packed_rows_are_named(config, words):
    problem = padding_free_problem(config)
    assert problem and words in problem


def test_common_decoders_take_packed_rows():
    for config in ({"model_type": "llama"}, {"model_type": "qwen2", "layer_types": ["full_attention"] * 2},
                   {"model_type": "gemma2", "layer_types": ["sliding_attention", "full_attention"]}):
        assert padding_free_problem(config) is None
    from tunedeck.core.batching import model_padding_free_problem

    assert model_padding_free_problem(tiny_model("qwen2")) is None


def _batching(project_path: Path, model, rows):
    from tunedeck.core.finetune import Run
    from tunedeck.core.project import Project

    info: dict = {}
    stub = SimpleNamespace(project=Project.load(project_path))
    out = Run._batching(stub, model, rows, None, info)
    return out, info["batching"]


def test_a_model_without_packed_rows_trains_on_padded_batches(tmp_path, tiny_model_dir):
    from transformers import MambaConfig, MambaForCausalLM
    from tunedeck.core.errors import UserError

    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=4))
    rows = rows_of([5, 9, 30])
    project = write_project(tmp_path / "a", tiny_model_dir)
    (_, _, padding_free), layout = _batching(project, mamba, rows)
    assert not padding_free and layout["layout"] == "padded" and "state" in layout["why_padded"]
    packed = write_project(tmp_path / "b", tiny_model_dir, dataset={"packing": True})
    with pytest.raises(UserError) as err:
        _batching(packed, mamba, rows)
    assert "dataset.packing = true" in str(err.value) and "\n" not in str(err.value)


def _trainer(project: Path):
    """The real trainer for ``project``, built as a run builds it (no step taken)."""
    from tunedeck.core.finetune import Run
    from tunedeck.core.rundir import prepare_run
    from tunedeck.core.trainer import Controls, Emitter

    prepared = prepare_run(project, [], run_name="b", resume=False, deep=False)
    with prepared:
        run = Run(prepared.spec, Emitter(None), Controls())
        trainer, _ = run.build()
    return trainer, run


def _rows_of_batch(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    ids, labels, pos = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(starts, starts[1:])]


def test_the_trainers_packed_batches_hold_renders_labels(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    from tunedeck.core.render import render

    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why " * (i % 7)},
                          {"role": "assistant", "content": f"Answer {i}. " + "because " * (i % 5)}]} for i in range(30)]
    project = write_project(tmp_path, tiny_model_dir, rows, dataset={"packing": True, "max_length": 128})
    trainer, run = _trainer(project)
    assert run.callback.data_info["batching"]["layout"] == "packed"
    mixed = run.resolved.precision != "fp32"  # under autocast the adapters take bf16 input as it comes
    lora_layers = [m for m in trainer.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and all(m.cast_input_dtype_enabled is not mixed for m in lora_layers)
    seen = []
    for batch in trainer.get_train_dataloader():
        assert set(batch) >= {"input_ids", "labels", "position_ids"} and "attention_mask" not in batch
        seen.extend(_rows_of_batch(batch))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    expected = []
    for r in rows:
        rendered = render(tok, r["messages"], max_length=128).example()
        labels = [IGNORE] + list(rendered["labels"][1:])  # nothing predicts a row's first token
        expected.append((tuple(rendered["input_ids"]), tuple(labels)))
    assert sorted(seen) == sorted(expected)
    assert any(l != IGNORE for _, labels in expected for l in labels)  # answers train
    assert sum(1 for _, labels in expected for l in labels if l == IGNORE) > len(rows)  # prompts do not


def test_padded_batches_group_rows_of_similar_length(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "q " * (1 + (i * 37) % 60)},
                          {"role": "assistant", "content": "a"}]} for i in range(64)]
    project = write_project(tmp_path, tiny_model_dir, rows, dataset={"padding_free": False, "max_length": 256})
    trainer, run = _trainer(project)
    assert run.callback.data_info["batching"]["layout"] == "padded"
    def pad_share(batches) -> float:
        masks = [b["attention_mask"] for b in batches]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)

    grouped = pad_share(list(trainer.get_train_dataloader()))
    examples = list(trainer.train_dataset)
    collate = BatchCollator(0, padding_free=False)
    in_order = pad_share([collate(examples[i:i + 4]) for i in range(0, len(examples), 4)])
    assert in_order > 0.2  # the lengths vary: batches in the data's order pad a lot
    assert grouped < in_order / 2


def test_the_train_command_says_how_a_run_trains():
    from tunedeck.core.commands.train import run_layout

    started = {"resolved": {"precision": "bf16", "kernels": "none",
                            "precision_reason": "this CPU has AVX512-BF16: bf16 measured 2.1x as fast as fp32"},
               "data": {"batching": {"layout": "packed", "rows": 204, "examples": 69, "why_padded": None}}}
    line = run_layout(started)
    assert line == ("bf16 (this CPU has AVX512-BF16: bf16 measured 2.1x as fast as fp32); "
                    "packed (204 rows in 69 examples) batches")
    padded = {"resolved": {"precision": "fp32", "precision_reason": "set in the project", "kernels": "liger"},
              "data": {"batching": {"layout": "padded", "why_padded": "mamba has recurrent (state-space) layers"}}}
    assert run_layout(padded) == ("fp32; padded, rows grouped by length (mamba has recurrent (state-space) layers) "
                                  "batches; liger kernels")
    assert run_layout({}) == "" and run_layout({"resolved": "junk", "data": None}) == ""
