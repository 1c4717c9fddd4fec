"""The engine process: its protocol, its failures, the inspector behind its ops, and counts
that equal peft's own."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tui_helpers import CPU

from tunedeck.core import engine
from tunedeck.core.engine import EngineClient, EngineError
from tunedeck.core.inspect import lora_config
from tunedeck.core.project import Project


def project_for(model_dir, **lora) -> Project:
    project = Project.new("t", source=str(model_dir))
    for key, value in lora.items():
        project.set(f"lora.{key}", value)
    return project


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One engine for the module (its first heavy request imports torch and peft)."""
    with EngineClient(log_path=tmp_path_factory.mktemp("engine") / "engine.log") as c:
        yield c


@pytest.fixture
def fresh_client(tmp_path):
    with EngineClient(log_path=tmp_path / "engine.log") as c:
        yield c


TARGETS = [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.mlp\.(up|down)_proj", "r": 4},
    {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "use_dora": True, "r": 8},
    {"target_modules": "all-linear", "bias": "all", "modules_to_save": ["lm_head"]},
]


def peft_counts(model_dir, lora: dict) -> tuple[int, int]:
    """What peft itself reports after wrapping the real model (weights loaded)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return get_peft_model(model, lora_config(lora)).get_nb_trainable_parameters()


@pytest.mark.parametrize("lora", TARGETS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_counts_equal_peft_on_the_real_model(tiny_model_dir, lora):
    project = project_for(tiny_model_dir, **lora)
    summary = engine.lora_summary(project, hardware=CPU)
    assert (summary["trainable_params"], summary["total_params"]) == peft_counts(tiny_model_dir,
                                                                                 project.values["lora"])
    assert summary["adapter_bytes"] == 4 * summary["trainable_params"]  # fp32 adapters; no biases in llama
    assert summary["errors"] == []
    assert summary["memory"]["device"] == "cpu" and summary["memory"]["total"] > 0


def test_a_pick_of_layers_becomes_targets_that_count_the_same(tiny_model_dir):
    project = project_for(tiny_model_dir)
    ins = engine.project_inspection(project)
    groups = {g.name: list(g.layers) for g in ins.groups}
    whole = engine.lora_summary(project, layers=groups["q_proj"] + groups["v_proj"])
    assert whole["targets"] == ["q_proj", "v_proj"]
    assert whole["adapted"] == {"q_proj": 2, "v_proj": 2} and whole["adapted_layers"] == 4
    partial = engine.lora_summary(project, layers=[groups["q_proj"][1], groups["down_proj"][0]])
    assert isinstance(partial["targets"], str)  # a regex selecting exactly those two layers
    assert partial["layers"] == [groups["down_proj"][0], groups["q_proj"][1]]  # model order
    values = {**project.values["lora"], "target_modules": partial["targets"]}
    assert (partial["trainable_params"], partial["total_params"]) == peft_counts(tiny_model_dir, values)


def test_groups_and_attention_targets(tiny_model_dir):
    info = engine.op_inspect(str(tiny_model_dir))
    assert [g["name"] for g in info["groups"]] == ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj", "lm_head"]
    summary = engine.lora_summary(project_for(tiny_model_dir))
    assert summary["attention_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert summary["adapted"] == {name: 2 for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj")}  # all-linear: no lm_head
    partial = engine.lora_summary(project_for(tiny_model_dir, target_modules=["q_proj", "qproj"]))
    assert partial["warnings"][0].startswith('"qproj" matches no layer; the layers: embed_tokens, q_proj')


def test_inspect_builds_on_the_meta_device(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    info = engine.op_inspect(str(tiny_model_dir))
    real = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert info["total_params"] == sum(p.numel() for p in real.parameters())
    assert info["architecture"] == "LlamaForCausalLM"
    q = next(g for g in info["groups"] if g["name"] == "q_proj")
    assert (q["count"], q["in_features"], q["out_features"], q["role"]) == (2, 64, 64, "attention")
    head = info["groups"][-1]
    assert (head["name"], head["role"]) == ("lm_head", "output")


def test_requests_through_the_process(client, tiny_model_dir):
    assert client.call("ping")["pid"] != os.getpid()
    project = project_for(tiny_model_dir, r=4)
    args = {"project_text": project.text(), "project_path": None, "hardware": engine.hardware_arg(CPU)}
    result = client.call("lora_summary", **args)
    assert result == engine.lora_summary(project, hardware=CPU)
    started = time.monotonic()
    for _ in range(5):  # the engine keeps the model's Inspection: a toggle is a count, not a build
        client.call("lora_summary", **args, layers=result["layers"][:3])
    assert (time.monotonic() - started) / 5 < 0.1


def test_a_target_that_matches_nothing_is_one_clear_line(client, tiny_model_dir):
    for targets in (["nope"], "nope.*"):
        project = project_for(tiny_model_dir, target_modules=targets)
        result = client.call("lora_summary", project_text=project.text())
        [message] = result["errors"]
        assert "\n" not in message and result["trainable_params"] == 0
        assert message.startswith("lora.target_modules ") and "matches no layer of this model" in message
        assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message


def test_refusals_match_the_trainer(client, tiny_model_dir):
    wrapped = client.call("lora_summary", project_text=project_for(tiny_model_dir, target_modules=["self_attn"]).text())
    assert "(LlamaAttention) and 1 more, which LoRA cannot wrap" in wrapped["errors"][0]
    head = client.call("lora_summary", project_text=project_for(tiny_model_dir, target_modules=["lm_head"]).text())
    assert "includes the output layer" in head["errors"][0]
    assert 'train it in full with modules_to_save = ["lm_head"]' in head["errors"][0]
    with pytest.raises(EngineError, match="no such folder or file"):
        client.call("inspect", source="does-not-exist", root=str(tiny_model_dir))


def test_bad_models_are_one_line_each(client, tmp_path):
    (tmp_path / "no-config").mkdir()
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "wizzle", "hidden_size": 8}')
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(
        '{"model_type": "wizzle2", "auto_map": {"AutoConfig": "configuration_w.WConfig"}}')
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00trunc")
    expected = {
        "no-config": "has no config.json",
        "unknown": "unknown architecture (model_type 'wizzle')",
        "remote": "set model.trust_remote_code = true only if you trust it",
        "corrupt.gguf": "cannot read the GGUF header",
    }
    for source, words in expected.items():
        with pytest.raises(EngineError) as err:
            client.call("inspect", source=source, root=str(tmp_path))
        assert words in str(err.value) and "\n" not in str(err.value)
    assert client.call("ping")  # still serving


def test_lora_config_is_the_projects_lora_section(tiny_model_dir):
    project = project_for(tiny_model_dir, r=8, alpha=16, dropout=0.1, target_modules=["q_proj"], bias="lora_only",
                          use_rslora=True, use_dora=True, modules_to_save=["lm_head"])
    config = lora_config(project.values["lora"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules, config.bias) == (
        8, 16, 0.1, {"q_proj"}, "lora_only")
    assert (config.use_rslora, config.use_dora, config.modules_to_save, config.task_type) == (
        True, True, ["lm_head"], "CAUSAL_LM")


def test_unknown_requests_and_bad_arguments_are_error_replies(client):
    with pytest.raises(EngineError, match="unknown engine request 'fly'"):
        client.call("fly")
    with pytest.raises(EngineError) as err:
        client.call("ping", unexpected=1)
    assert "TypeError" in str(err.value) and "\n" not in str(err.value)
    assert client.call("ping")  # still serving


def test_concurrent_callers_each_get_their_reply(fresh_client):
    results: list[object] = []

    def ask() -> None:
        results.append(fresh_client.call("ping", timeout=60)["pid"])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 8 and len(set(results)) == 1


def test_death_is_reported_not_a_hang_and_the_engine_restarts(fresh_client, tiny_model_dir):
    first = fresh_client.call("ping")["pid"]
    outcome: dict[str, BaseException | None] = {}

    def slow_request() -> None:  # imports torch in the engine: seconds
        try:
            fresh_client.call("inspect", source=str(tiny_model_dir))
            outcome["error"] = None
        except EngineError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    os.kill(first, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive()
    assert "stopped unexpectedly (signal 9)" in str(outcome["error"])
    assert fresh_client.call("ping")["pid"] != first


def test_cancel_timeout_and_close(fresh_client, tiny_model_dir):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(EngineError, match="cancelled"):
        fresh_client.call("inspect", source=str(tiny_model_dir), cancel=cancel)
    with pytest.raises(EngineError, match="did not answer 'inspect' within 0.2 s"):
        fresh_client.call("inspect", source=str(tiny_model_dir), timeout=0.2)
    errors: list[str] = []
    thread = threading.Thread(target=lambda: errors.append(_error_of(fresh_client, str(tiny_model_dir))))
    thread.start()
    time.sleep(0.3)
    fresh_client.close()
    thread.join(10)
    assert errors == ["the engine was closed"]
    assert not fresh_client.running
    with pytest.raises(EngineError, match="closed"):
        fresh_client.call("ping")


def _error_of(client: EngineClient, source: str) -> str:
    try:
        client.call("inspect", source=source)
    except EngineError as exc:
        return str(exc)
    return "answered"


def test_streaming_calls_on_plain_ops(fresh_client):
    """stream() on a plain op is a call with no partials; errors come back as with call()."""
    partials: list[dict] = []
    assert fresh_client.stream("ping", on_partial=partials.append)["pid"] == fresh_client.call("ping")["pid"]
    assert partials == []
    with pytest.raises(EngineError, match="unknown engine request 'fly'"):
        fresh_client.stream("fly")
    assert fresh_client.call("ping")  # still serving


def test_handle_runs_streaming_ops_with_emit_and_cancel(monkeypatch):
    seen: list[dict] = []

    def counting(emit, cancel, upto: int) -> dict:
        for i in range(upto):
            if cancel.is_set():
                return {"stopped_at": i}
            emit({"i": i})
            if i == 2:
                cancel.set()
        return {"stopped_at": upto}

    monkeypatch.setitem(engine.STREAMS, "count", counting)
    reply = engine.handle({"id": 7, "op": "count", "args": {"upto": 10}}, emit=seen.append, cancel=threading.Event())
    assert reply == {"id": 7, "ok": True, "result": {"stopped_at": 3}} and seen == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert engine.handle({"id": 8, "op": "ping"})["ok"]  # plain ops as before
