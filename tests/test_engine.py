"""The engine process: its protocol, its failures, the inspector behind its ops, and counts
that equal peft's own."""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time

import pytest

from tui_helpers import CPU

from tunedeck.core.engine import ops, server
from tunedeck.core.engine import EngineCalls, EngineClient, EngineError
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
    summary = ops.lora_summary(project, hardware=CPU)
    assert (summary["trainable_params"], summary["total_params"]) == peft_counts(tiny_model_dir,
                                                                                 project.values["lora"])
    assert summary["adapter_bytes"] == 4 * summary["trainable_params"]  # fp32 adapters; no biases in llama
    assert summary["errors"] == []
    assert summary["memory"]["device"] == "cpu" and summary["memory"]["total"] > 0


def test_a_pick_of_layers_becomes_targets_that_count_the_same(tiny_model_dir):
    project = project_for(tiny_model_dir)
    ins = ops.project_inspection(project)
    groups = {g.name: list(g.layers) for g in ins.groups}
    whole = ops.lora_summary(project, layers=groups["q_proj"] + groups["v_proj"])
    assert whole["targets"] == ["q_proj", "v_proj"]
    assert whole["adapted"] == {"q_proj": 2, "v_proj": 2} and whole["adapted_layers"] == 4
    partial = ops.lora_summary(project, layers=[groups["q_proj"][1], groups["down_proj"][0]])
    assert isinstance(partial["targets"], str)  # a regex selecting exactly those two layers
    assert partial["layers"] == [groups["down_proj"][0], groups["q_proj"][1]]  # model order
    values = {**project.values["lora"], "target_modules": partial["targets"]}
    assert (partial["trainable_params"], partial["total_params"]) == peft_counts(tiny_model_dir, values)


def test_groups_and_attention_targets(tiny_model_dir):
    info = ops.op_inspect(str(tiny_model_dir))
    assert [g["name"] for g in info["groups"]] == ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj", "lm_head"]
    summary = ops.lora_summary(project_for(tiny_model_dir))
    assert summary["attention_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert summary["adapted"] == {name: 2 for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj")}  # all-linear: no lm_head
    partial = ops.lora_summary(project_for(tiny_model_dir, target_modules=["q_proj", "qproj"]))
    assert partial["warnings"][0].startswith('"qproj" matches no layer; the layers: embed_tokens, q_proj')


def test_inspect_builds_on_the_meta_device(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    info = ops.op_inspect(str(tiny_model_dir))
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
    args = {"project_text": project.text(), "project_path": None, "hardware": ops.hardware_arg(CPU)}
    result = client.call("lora_summary", **args)
    assert result == ops.lora_summary(project, hardware=CPU)
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


@pytest.mark.slow
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

    monkeypatch.setitem(ops.STREAMS, "count", counting)
    reply = server.handle({"id": 7, "op": "count", "args": {"upto": 10}}, emit=seen.append, cancel=threading.Event())
    assert reply == {"id": 7, "ok": True, "result": {"stopped_at": 3}} and seen == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert server.handle({"id": 8, "op": "ping"})["ok"]  # plain ops as before


# -- lanes: a long job never holds up a quick request -----------------------------------------


class _Served:
    """:func:`server.serve` on two real pipes in a thread of this process (the loop the engine
    process runs), with a reader that files replies by request id."""

    def __init__(self) -> None:
        import multiprocessing as mp

        self.requests_out, self.requests_in = mp.Pipe(duplex=False)
        self.replies_out, self.replies_in = mp.Pipe(duplex=False)
        self.replies: dict[int, list[dict]] = {}
        self.answered = threading.Condition()
        self.loop = threading.Thread(target=server.serve, args=(self.requests_out, self.replies_in, ""), daemon=True)
        self.loop.start()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                reply = self.replies_out.recv()
            except (EOFError, OSError):
                return
            with self.answered:
                self.replies.setdefault(reply["id"], []).append(reply)
                self.answered.notify_all()

    def send(self, request_id: int, op: str, **args) -> None:
        self.requests_in.send({"id": request_id, "op": op, "args": args})

    def final(self, request_id: int, timeout: float = 10.0) -> dict | None:
        with self.answered:
            self.answered.wait_for(lambda: any("partial" not in r for r in self.replies.get(request_id, [])),
                                   timeout)
            return next((r for r in self.replies.get(request_id, []) if "partial" not in r), None)

    def close(self) -> None:
        self.requests_in.send(None)
        self.loop.join(5)


def test_a_long_job_does_not_hold_up_inspect_and_preview(monkeypatch):
    """A merge (or an export) runs on the models lane: a quick request sent after it is
    answered while it runs; a chat request waits for its turn behind it, in order; a
    request cancelled while it waits is answered "cancelled" without running."""
    go, started, ran = threading.Event(), threading.Event(), []

    def slow_merge(emit, cancel, run: str, out: str, cpu: bool = False, project_path: str | None = None) -> dict:
        started.set()
        emit({"message": "merging"})
        go.wait(10)
        ran.append("merge")
        return {"out": out}

    def chat(emit, cancel, model: str, messages: list, **kw) -> dict:
        ran.append(f"chat {model}")
        return {"model": model}

    monkeypatch.setitem(ops.STREAMS, "merge", slow_merge)
    monkeypatch.setitem(ops.STREAMS, "chat", chat)
    monkeypatch.setitem(ops.OPS, "inspect", lambda source, root=None, trust_remote_code=False: {"source": source})
    served = _Served()
    try:
        served.send(1, "merge", run="r", out="o")
        assert started.wait(10)
        served.send(2, "chat", model="first", messages=[])
        served.send(3, "chat", model="cancelled", messages=[])
        served.requests_in.send({"cancel": 3})
        served.send(4, "inspect", source="m")
        assert served.final(4) == {"id": 4, "ok": True, "result": {"source": "m"}}  # while the merge runs
        assert served.final(1, timeout=0.2) is None and ran == []
        go.set()
        assert served.final(1)["result"] == {"out": "o"}
        assert served.final(2)["result"] == {"model": "first"}
        assert served.final(3) == {"id": 3, "ok": False, "error": "engine request 'chat' cancelled"}
        assert ran == ["merge", "chat first"]  # in order on their lane; the cancelled one never ran
        assert served.replies[1][0] == {"id": 1, "ok": True, "partial": {"message": "merging"}}
    finally:
        go.set()
        served.close()
    assert not served.loop.is_alive()


# -- typed calls, and the fakes that stand in for the engine ------------------------------------


class _Recorder(EngineCalls):
    """A transport that records what each typed call would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []

    def call(self, op, *, timeout=None, cancel=None, **args):
        self.sent.append(("call", op, args))
        return {}

    def stream(self, op, *, on_partial=None, timeout=None, cancel=None, **args):
        self.sent.append(("stream", op, args))
        return {}

    def close(self, timeout=2.0):
        pass


def _typed_calls() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(EngineCalls).items()
            if callable(fn) and not name.startswith("_") and name not in ("call", "stream", "close")}


def _sample(parameter: inspect.Parameter):
    return {"str": "x", "str | None": "x", "list[dict[str, Any]]": [], "list[str]": [], "Sequence[str]": (),
            "int": 1}.get(str(parameter.annotation), "x")


def test_every_op_has_one_typed_call_whose_arguments_the_op_takes():
    recorder = _Recorder()
    for name, sig in _typed_calls().items():
        required = {p.name: _sample(p) for p in sig.parameters.values()
                    if p.name != "self" and p.default is inspect.Parameter.empty}
        getattr(recorder, name)(**required)
    sent_ops = [op for _, op, _ in recorder.sent]
    assert sorted(sent_ops) == sorted({**ops.OPS, **ops.STREAMS})  # every op once, no typed call to nowhere
    for how, op, args in recorder.sent:
        fn = (ops.STREAMS if how == "stream" else ops.OPS)[op]
        extra = {"emit": None, "cancel": None} if how == "stream" else {}
        inspect.signature(fn).bind(**extra, **args)  # TypeError if the call and the op disagree


def test_the_fake_engines_keep_the_real_clients_interface():
    from test_tui_dataset_pairs import PairEngine
    from test_tui_dataset_tools import HeldStatsEngine
    from test_tui_export import ExportEngine
    from test_tui_hub import HubEngine
    from tui_helpers import InProcessEngine, PanesEngine, SilentEngine

    for fake in (InProcessEngine, SilentEngine, PanesEngine, PairEngine, HeldStatsEngine, ExportEngine, HubEngine):
        assert issubclass(fake, EngineCalls), fake
        assert not inspect.isabstract(fake), fake  # every part of the transport is there
        for name in ("call", "stream", "close"):
            assert _shape(getattr(fake, name)) == _shape(getattr(EngineClient, name)), (fake, name)


def _shape(fn) -> list[tuple[str, object]]:
    """A function's parameters: names and kinds (how a caller passes them)."""
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
