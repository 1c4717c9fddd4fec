"""Users' own data as other fine-tuning tools write it: tool calls (OpenAI and ShareGPT /
LLaMA-Factory), content parts, reasoning, media refused, preference data named, several
sources with weights, and datasets from the local Hugging Face cache.

Masks are checked token by token with the bundled model's real tokenizer, through the
named ``chatml-tools`` template and through a model whose own template renders tools and
reasoning the way today's reasoning models do (tests/chat_templates.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chat_templates import THINKING_TOOLS
from tunedeck.core.conversation import Conversation, MediaError
from tunedeck.core.datafile import load_splits, to_messages
from tunedeck.core.errors import UserError
from tunedeck.core.preview import preview_row, preview_stats
from tunedeck.core.project import Project
from tunedeck.core.render import IGNORE, TEMPLATES, render

TOOLS_SCHEMA = [{"name": "get_weather", "description": "Weather of a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temp": 21})},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps(TOOLS_SCHEMA),
}
OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "You check the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21})},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": [{"type": "function", "function": TOOLS_SCHEMA[0]}],
}


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """The bundled model's tokenizer with a template that renders tools and reasoning (no weights)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("thinking-tools")
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    tok.chat_template = THINKING_TOOLS
    tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        if (default_model_dir / name).exists():
            (out / name).write_bytes((default_model_dir / name).read_bytes())
    return out


def trained_runs(tok, r) -> list[str]:
    """The trained tokens of a rendered row, as runs of text."""
    runs, current = [], ""
    for tid, label in zip(r.input_ids, r.labels):
        if label != IGNORE:
            current += tok.decode([tid])
        elif current:
            runs, current = runs + [current], ""
    return runs + ([current] if current else [])


def make_project(tmp_path: Path, model_dir: Path, data: object = "data.jsonl", **settings: object) -> Project:
    path = tmp_path / "p.toml"
    path.write_text(f'schema = 1\nname = "p"\n[model]\nsource = "{model_dir}"\n[dataset]\neval_split = 0.0\n',
                    encoding="utf-8")
    project = Project.load(path)
    project.set("dataset.path", data)
    for key, value in settings.items():
        project.set(key.replace("__", "."), value)
    return project


# -- tool calls -----------------------------------------------------------------------------


def test_sharegpt_function_call_and_observation_turns_map_onto_tool_calls_and_results():
    conv = to_messages(SHAREGPT_TOOLS, "sharegpt")
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["tool_calls"] == [{"type": "function",
                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert conv[2]["content"] == '{"temp": 21}'
    assert conv.tools == [{"type": "function", "function": TOOLS_SCHEMA[0]}]


def test_openai_tool_calls_with_string_arguments_and_tool_turns():
    conv = to_messages(OPENAI_TOOLS, "messages")
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "assistant"]
    call = conv[2]["tool_calls"][0]
    assert call["id"] == "call_1" and call["function"]["arguments"] == {"city": "Paris"}
    assert conv[2]["content"] == "" and conv[3]["tool_call_id"] == "call_1"
    assert conv.tools[0]["function"]["name"] == "get_weather"


def test_alpaca_history_and_system_columns_as_llama_factory_writes_them():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
           "history": [["2+2?", "4"]]}
    assert to_messages(row, "alpaca") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}]
    with pytest.raises(ValueError, match="question, answer"):
        to_messages({**row, "history": [["only a question"]]}, "alpaca")


def test_openais_older_function_calling_layout():
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                        {"role": "function", "name": "get_weather", "content": "cold"},
                        {"role": "assistant", "content": "Cold."}],
           "functions": TOOLS_SCHEMA}
    conv = to_messages(row, "messages")
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert conv[2]["name"] == "get_weather" and conv.tools[0]["function"]["name"] == "get_weather"


def test_a_text_turn_then_a_call_turn_is_one_assistant_turn():
    row = {"conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "Let me look."},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    conv = to_messages(row, "sharegpt")
    assert [m["role"] for m in conv] == ["user", "assistant", "tool", "assistant"]
    assert conv[1]["content"] == "Let me look." and conv[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Rome"}


@pytest.mark.parametrize("row, reason", [
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "not json"}]},
     "tool call"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "observation", "value": "r"},
                        {"from": "gpt", "value": "A"}]}, "follows no tool call"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "tools": "{oops"},
     '"tools" is a string that is not JSON'),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     "without a function name"),
])
def test_broken_tool_rows_say_what_is_wrong(row, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(row, "sharegpt")


def test_tool_rows_mask_calls_trained_results_and_prompts_masked(tok):
    for row, fmt in ((SHAREGPT_TOOLS, "sharegpt"), (OPENAI_TOOLS, "messages")):
        r = render(tok, to_messages(row, fmt), max_length=1024, chat_template=TEMPLATES["chatml-tools"],
                   parts=True)
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        assert trained_runs(tok, r) == [call, "It is 21 degrees.<|im_end|>"]
        # token by token: every trained token is in an assistant turn (its calls or answer),
        # every token of the tool result and of the schemas is masked
        by_part: dict[str, set[bool]] = {}
        for (_, trained), part in zip(r.tokens, r.parts):
            by_part.setdefault(part, set()).add(trained)
        schemas = by_part.get("tools", set()) | by_part.get("system", set())  # in a system turn of its own or not
        assert by_part["tool_result"] == {False} and schemas == {False} and by_part["user"] == {False}
        assert True in by_part["tool_call"] and True in by_part["assistant"]
        assert '"name": "get_weather"' in r.text and "<tools>" in r.text  # the schemas are rendered


def test_a_models_own_template_with_tools_and_reasoning_in_history(tok, thinking_model_dir):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(thinking_model_dir))
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I should call the tool.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "It is 21.", "reasoning_content": "The tool said 21."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "I do not know.", "reasoning_content": "No tool call this time."},
    ], "tools": TOOLS_SCHEMA}
    r = render(own, to_messages(row, "messages"), max_length=1024)
    assert trained_runs(own, r) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21.<|im_end|>",
        "<think>\nNo tool call this time.\n</think>\n\nI do not know.<|im_end|>",
    ]  # the template drops the reasoning of answers before the last question, as it does in chat
    assert "<tool_response>\n21\n</tool_response>" in r.text


def test_a_template_without_tools_refuses_the_row_naming_templates_that_render_them(tok):
    with pytest.raises(ValueError) as err:
        render(tok, to_messages(SHAREGPT_TOOLS, "sharegpt"), max_length=512)
    message = str(err.value)
    assert "does not render" in message and "chatml-tools" in message and "Qwen" in message
    assert "\n" not in message


# -- content parts and reasoning ---------------------------------------------------------------


def test_content_parts_join_in_order_with_text_or_value():
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Reverse "}, {"type": "text", "value": "[1, 2]"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "[2, 1]"}]}]}
    conv = to_messages(row, "messages")
    assert conv[0]["content"] == "Reverse [1, 2]" and conv[1]["content"] == "[2, 1]"
    with pytest.raises(ValueError, match='unknown type "widget"'):
        to_messages({"messages": [{"role": "user", "content": [{"type": "widget"}]},
                                  {"role": "assistant", "content": "A"}]}, "messages")


def test_reasoning_from_a_field_or_a_part_trains_or_drops(tok):
    field_row = {"messages": [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}]}
    part_row = {"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": [{"type": "thinking", "thinking": "Two and two."},
                                                               {"type": "text", "text": "4"}]}]}
    for row in (field_row, part_row):
        conv = to_messages(row, "messages")
        assert conv[1]["reasoning_content"] == "Two and two." and conv[1]["content"] == "4"
        r = render(tok, conv, max_length=256, chat_template=TEMPLATES["chatml-tools"])
        assert trained_runs(tok, r) == ["<think>\nTwo and two.\n</think>\n\n4<|im_end|>"]
        dropped = render(tok, conv, max_length=256, chat_template=TEMPLATES["chatml-tools"], reasoning="drop")
        assert trained_runs(tok, dropped) == ["4<|im_end|>"] and "Two and two" not in dropped.text
        with pytest.raises(ValueError, match='dataset.reasoning = "drop"'):
            render(tok, conv, max_length=256)  # the bundled model's template has no place for it
        assert "Two and two" not in render(tok, conv, max_length=256, reasoning="drop").text


# -- refused honestly -------------------------------------------------------------------------------


def test_an_images_column_is_refused_naming_it(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([{"messages": [{"role": "user", "content": "<image>What is this?"},
                               {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"]}] * 3)
    project = make_project(tmp_path, default_model_dir)
    with pytest.raises(UserError) as err:
        load_splits(project)
    assert 'column "images"' in err.value.message and "text only" in err.value.message
    with pytest.raises(UserError, match='column "images"'):
        preview_stats(project)


def test_an_image_part_is_refused_also_after_the_first_rows(tmp_path, default_model_dir, write_jsonl):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    picture = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                                          {"type": "text", "text": "What is it?"}]},
                            {"role": "assistant", "content": "A dog."}]}
    write_jsonl([good] * 250 + [picture])
    project = make_project(tmp_path, default_model_dir)
    with pytest.raises(UserError) as err:
        load_splits(project)
    assert "row 251" in err.value.message and "image" in err.value.message
    with pytest.raises(MediaError):
        to_messages(picture, "messages")


@pytest.mark.parametrize("row, hint", [
    ({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}, 'columns = {completion = "chosen"}'),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}],
      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad."}]},
     'columns = {messages = "chosen"}'),
    ({"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "Good."},
      "rejected": {"from": "gpt", "value": "Bad."}}, "ShareGPT"),
    ({"instruction": "Q?", "input": "", "chosen": "Good.", "rejected": "Bad."}, 'columns = {output = "chosen"}'),
    ({"question": "Q?", "response_j": "Good.", "response_k": "Bad."}, "response_j"),
    ({"prompt": "Q?", "completion": "Good.", "label": True}, "KTO"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad."}], "label": False},
     "KTO"),
    ({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad.", "messages": [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}]}, "preference data"),
])
def test_preference_data_is_named_as_such(tmp_path, default_model_dir, write_jsonl, row, hint):
    write_jsonl([row] * 3)
    project = make_project(tmp_path, default_model_dir)
    with pytest.raises(UserError) as err:
        load_splits(project)
    assert "preference data" in err.value.message and hint in err.value.message
    assert "\n" not in err.value.message


def test_following_the_preference_hint_trains_on_the_chosen_answers(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}] * 3)
    project = make_project(tmp_path, default_model_dir, dataset__format="prompt_completion",
                           dataset__columns={"completion": "chosen"})
    splits = load_splits(project)
    assert [m[-1]["content"] for _, m in splits.train] == ["Good."] * 3


def test_cli_names_preference_data_with_exit_2(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([{"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}] * 3)
    project = make_project(tmp_path, default_model_dir)
    project.save()
    result = subprocess.run([sys.executable, "-m", "tunedeck.core", "check", str(project.path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "preference data" in lines[0] and "Traceback" not in result.stderr


# -- several sources ---------------------------------------------------------------------------------


def qa(i: int, tag: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} question {i}"},
                         {"role": "assistant", "content": f"{tag} answer {i}"}]}


def test_several_files_mix_by_weight_each_with_its_format(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([qa(i, "chat") for i in range(10)], "chat.jsonl")
    write_jsonl([{"instruction": f"task {i}", "output": f"done {i}"} for i in range(20)], "alpaca.jsonl")
    project = make_project(tmp_path, default_model_dir, [
        {"path": "chat.jsonl", "weight": 2},
        {"path": "alpaca.jsonl", "weight": 0.5, "format": "alpaca"},
    ])
    splits = load_splits(project)
    texts = [m[0]["content"] for _, m in splits.train]
    assert sum(t.startswith("chat") for t in texts) == 20  # every chat row twice
    tasks = [t for t in texts if t.startswith("task")]
    assert len(tasks) == 10 and len(set(tasks)) == 10  # a seeded half of the alpaca rows, each once
    assert [s.train_rows for s in splits.sources] == [20, 10]
    assert [round(s.share, 3) for s in splits.sources] == [0.667, 0.333]
    assert [s.summary.format for s in splits.sources] == ["messages", "alpaca"]
    again = load_splits(project)
    assert [m[0]["content"] for _, m in again.train] == texts  # seeded: the same rows every time

    stats = preview_stats(project)
    assert [(s["rows"], s["usable"], s["train_rows"], s["share"]) for s in stats["sources"]] == [
        (10, 10, 20, 0.6667), (20, 20, 10, 0.3333)]
    row = preview_row(project, index=12)
    assert row["source"]["path"] == "alpaca.jsonl" and row["row"] == 3 and row["format"] == "alpaca"


def test_eval_rows_are_held_out_before_weights_so_none_leaks(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([qa(i, "a") for i in range(20)], "a.jsonl")
    write_jsonl([qa(i, "b") for i in range(20)], "b.jsonl")
    project = make_project(tmp_path, default_model_dir, [{"path": "a.jsonl", "weight": 3}, "b.jsonl"],
                           dataset__eval_split=0.25)
    splits = load_splits(project)
    held = {m[0]["content"] for _, m in splits.eval}
    trained = {m[0]["content"] for _, m in splits.train}
    assert len(held) == 10 and not held & trained
    stats = preview_stats(project)  # the Dataset screen's shares: the trainer's mix, eval rows left out
    assert [(s["train_rows"], s["share"]) for s in stats["sources"]] == [
        (info.train_rows, round(info.share, 4)) for info in splits.sources]
    assert len(splits.train) == 3 * sum(1 for t in trained if t.startswith("a")) + sum(
        1 for t in trained if t.startswith("b"))


@pytest.mark.parametrize("value, message", [
    ([{"path": "a.jsonl", "weight": 0}], "weight"),
    ([{"path": "a.jsonl", "wieght": 2}], "unknown key 'wieght'"),
    ([{"weight": 2}], "has no path"),
    ([{"path": "a.jsonl", "format": "chatml"}], "format"),
    ([3], "must be a path or a table"),
])
def test_bad_source_entries_get_one_line(tmp_path, value, message):
    path = tmp_path / "p.toml"
    from tunedeck.core.schema import toml_repr

    path.write_text(f'schema = 1\n[dataset]\npath = {toml_repr(value)}\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        Project.load(path)
    assert message in err.value.message and "\n" not in err.value.message


def test_a_source_list_survives_the_run_snapshot(tmp_path, default_model_dir, write_jsonl):
    from tunedeck.core.rundir import write_snapshot

    write_jsonl([qa(i, "a") for i in range(4)], "a.jsonl")
    project = make_project(tmp_path, default_model_dir, [{"path": "a.jsonl", "weight": 2}, "a.jsonl"])
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    snap = Project.load(write_snapshot(project, run_dir))
    assert snap["dataset.path"] == [{"path": "../../a.jsonl", "weight": 2}, "../../a.jsonl"]
    assert len(load_splits(snap).train) == 12


# -- the local Hugging Face cache -----------------------------------------------------------------


def test_a_dataset_in_the_hub_cache_loads_by_name_offline(tmp_path, default_model_dir, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "hub"
    snap = hub / "datasets--someone--tiny-chat" / "snapshots" / ("a" * 40)
    (snap / "data").mkdir(parents=True)
    (hub / "datasets--someone--tiny-chat" / "refs").mkdir()
    (hub / "datasets--someone--tiny-chat" / "refs" / "main").write_text("a" * 40)
    for split, n in (("train", 6), ("test", 2)):
        table = pa.Table.from_pylist([qa(i, split) for i in range(n)])
        pq.write_table(table, snap / "data" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    project = make_project(tmp_path, default_model_dir, "someone/tiny-chat")
    assert [m[0]["content"] for _, m in load_splits(project).train] == [f"train question {i}" for i in range(6)]
    project.set("dataset.path", [{"path": "someone/tiny-chat", "split": "test"}])
    assert len(load_splits(project).train) == 2
    project.set("dataset.path", "someone/not-here")
    with pytest.raises(UserError) as err:
        load_splits(project)
    assert "no dataset someone/not-here in the local Hugging Face cache" in err.value.message


def test_a_dataset_in_the_datasets_arrow_cache_loads_by_name(tmp_path, default_model_dir, monkeypatch):
    import pyarrow as pa

    cache = tmp_path / "datasets"
    folder = cache / "someone___arrow-chat" / "default" / "0.0.0" / "abc123"
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist([qa(i, "arrow") for i in range(5)])
    with pa.OSFile(str(folder / "arrow-chat-train.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:  # as datasets writes its cache
            writer.write_table(table)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    project = make_project(tmp_path, default_model_dir, "someone/arrow-chat")
    assert len(load_splits(project).train) == 5
    assert preview_row(project)["messages"][0]["content"] == "arrow question 0"


def test_a_save_to_disk_folder_among_the_sources(tmp_path, default_model_dir, write_jsonl):
    from datasets import Dataset

    Dataset.from_list([qa(i, "saved") for i in range(3)]).save_to_disk(str(tmp_path / "saved"))
    write_jsonl([qa(i, "file") for i in range(2)], "file.jsonl")
    project = make_project(tmp_path, default_model_dir, ["saved", "file.jsonl"])
    assert sorted(m[0]["content"].split()[0] for _, m in load_splits(project).train) == ["file"] * 2 + ["saved"] * 3


def test_conversations_survive_pickling_with_their_tools():
    import pickle

    conv = to_messages(SHAREGPT_TOOLS, "sharegpt")
    back = pickle.loads(pickle.dumps(conv))
    assert isinstance(back, Conversation) and back == conv and back.tools == conv.tools


@pytest.mark.slow
def test_a_run_trains_on_tool_rows_with_the_rendered_labels(tiny_model_dir, tmp_path):
    """The trainer takes tool rows end to end; a batch is exactly their render()."""
    from train_support import train_inprocess, write_project

    project = write_project(tmp_path, tiny_model_dir, [SHAREGPT_TOOLS] * 4, dataset={"max_length": 256},
                            training={"max_steps": 2})
    (tmp_path / "openai.jsonl").write_text((json.dumps(OPENAI_TOOLS) + "\n") * 4, encoding="utf-8")
    edited = Project.load(project)
    edited.set("model.chat_template", "chatml-tools")
    edited.set("dataset.path", ["data.jsonl", "openai.jsonl"])  # one ShareGPT file, one OpenAI file
    edited.save()
    code, events, run_dir = train_inprocess(project)
    assert code == 0, [e for e in events if e["type"] in ("failed", "warning")]
    started = next(e for e in events if e["type"] == "run_started")
    assert started["data"]["train"]["kept"] == 8, started["data"]
    assert started["data"]["train"]["failed"] == 0
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(run_dir / "adapter"))
    assert saved.chat_template == TEMPLATES["chatml-tools"]  # chat renders what trained


def test_an_answer_with_weight_0_is_context_not_trained(tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey.", "weight": 0},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 1}]}
    r = render(tok, to_messages(row, "messages"), max_length=256)
    assert trained_runs(tok, r) == ["4<|im_end|>"] and "Hey." in r.text


def test_the_tool_calling_sample_renders_every_row_with_its_calls_trained():
    sample = Path(__file__).resolve().parent.parent / "sample_data" / "tools.toml"
    project = Project.load(sample)
    stats = preview_stats(project)
    assert stats["rows"] == stats["usable"] == 24 and stats["skipped_count"] == 0 and stats["refusal"] is None
    row = preview_row(project)
    trained_parts = {t["part"] for t in row["tokens"] if t["trained"]}
    assert trained_parts == {"tool_call", "assistant"}
    assert all(not t["trained"] for t in row["tokens"] if t["part"] in ("tool_result", "tools", "user"))


# -- fuzzing: whatever the turns hold, a reason or a conversation that renders ------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(max_size=10)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=6)
PART = st.one_of(TEXT, JSONISH, st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "thinking", "reasoning", "image_url", "input_audio", "odd", None]),
     "text": st.one_of(TEXT, st.none()), "value": st.one_of(TEXT, JSONISH)}))
CALL = st.one_of(JSONISH, st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["f", "get_weather"]), JSONISH),
         "arguments": st.one_of(st.just('{"a": 1}'), st.just("{bad"), JSONISH)})}))
FUZZ_TURN = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system", "function_call", "observation", "ipython", 7]),
     "content": st.one_of(TEXT, st.lists(PART, max_size=3), JSONISH)},
    optional={"tool_calls": st.one_of(st.lists(CALL, max_size=2), JSONISH), "reasoning_content": JSONISH,
              "weight": JSONISH})
FUZZ_ROW = st.fixed_dictionaries({"messages": st.lists(FUZZ_TURN, max_size=5)},
                                 optional={"tools": st.one_of(JSONISH, st.just('[{"name": "f"}]'))})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(FUZZ_ROW, st.sampled_from(["chatml-tools", "auto"]), st.sampled_from(["train", "drop"]))
def test_fuzzed_tool_rows_give_a_reason_or_render_with_a_consistent_mask(tok, row, template, reasoning):
    try:
        conv = to_messages(row, "messages")
    except ValueError as exc:
        assert str(exc).strip() and "\n" not in str(exc)
        return
    assert conv[-1]["role"] == "assistant"
    try:
        r = render(tok, conv, max_length=512, chat_template=None if template == "auto" else TEMPLATES[template],
                   reasoning=reasoning, parts=True)
    except ValueError as exc:
        assert str(exc).strip()
        return
    assert len(r.input_ids) == len(r.labels) == len(r.parts)
    assert all(label in (IGNORE, tid) for tid, label in zip(r.input_ids, r.labels))
    assert not any(t for (_, t), p in zip(r.tokens, r.parts) if p in ("tool_result", "user"))


def test_the_settings_field_takes_a_path_as_typed_or_a_list_of_sources():
    from tunedeck.core.schema import field_for
    from tunedeck.tui.session import format_value, parse_text

    fld = field_for("dataset.path")
    assert parse_text(fld, "my data.jsonl") == "my data.jsonl"
    value = parse_text(fld, '[{path = "a.jsonl", weight = 2}, "b.jsonl"]')
    assert value == [{"path": "a.jsonl", "weight": 2}, "b.jsonl"]
    assert parse_text(fld, format_value(fld, value)) == value


@pytest.mark.parametrize("row, kind", [
    ({"prompt": [{"role": "user", "content": "Solve 2+2."}]}, "prompt-only data"),
    ({"prompt": "Solve 2+2.", "id": 7}, "prompt-only data"),
    ({"prompt": "Q", "completions": ["step 1", "step 2"], "labels": [True, False]}, "step-wise supervision"),
])
def test_data_without_answers_is_named(tmp_path, default_model_dir, write_jsonl, row, kind):
    write_jsonl([row] * 2)
    with pytest.raises(UserError) as err:
        load_splits(make_project(tmp_path, default_model_dir))
    assert kind in err.value.message and "no answer to fine-tune on" in err.value.message


def test_a_prompt_with_an_answer_under_another_name_is_offered_the_mapping(tmp_path, default_model_dir, write_jsonl):
    write_jsonl([{"prompt": "Q?", "target": "A."}] * 2)
    with pytest.raises(UserError) as err:
        load_splits(make_project(tmp_path, default_model_dir))
    assert "cannot tell the format" in err.value.message and "dataset.columns" in err.value.message
