"""Helpers for the app's tests: a small project on disk, stand-in engines, waiting for workers."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from textual import events
from textual.keys import _character_to_key

from tunedeck.core.engine import EngineCalls, EngineError
from tunedeck.core.engine.server import handle
from tunedeck.core.hardware import Hardware

# a fixed machine, so "auto" resolves the same everywhere (snapshots)
CPU = Hardware(gpus=(), cpu_count=2, ram_total=8 * 2**30)

PROJECT_TOML = """\
# a small project for the app's tests
schema = 1
name = "demo"

[model]
source = "tiny-llama"   # a model folder next to this file

[quantization]
mode = "none"

[lora]
r = 16
alpha = 32
target_modules = "all-linear"

[dataset]
path = "data.jsonl"
eval_split = 0.0

[training]
epochs = 1
learning_rate = 0.0002
"""

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def write_tiny_model(folder: Path) -> Path:
    """A 2-layer llama folder: config.json and zero weights in safetensors (no torch needed)."""
    import numpy as np
    from safetensors.numpy import save_file

    c = TINY_CONFIG
    hidden, inter, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // 2
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], hidden),
                                          "model.norm.weight": (hidden,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c, indent=2), encoding="utf-8")
    save_file({name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    return folder


def write_project(folder: Path, text: str = PROJECT_TOML, rows: int = 12) -> Path:
    """``demo.toml`` with ``data.jsonl`` (``rows`` good rows and one bad) and the tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                      {"role": "assistant", "content": str(2 * i)}]}) for i in range(rows)]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_tiny_model(folder / "tiny-llama")
    path = folder / "demo.toml"
    path.write_text(text, encoding="utf-8")
    return path


class InProcessEngine(EngineCalls):
    """The engine's ops, run in the test's own process (the functions the engine process runs),
    one request at a time as the engine process serves them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._serving = threading.Lock()

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        self.calls.append(op)
        with self._serving:
            reply = handle({"id": 0, "op": op, "args": args})
        if reply["ok"]:
            return reply["result"]
        raise EngineError(reply["error"])

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        """A streaming op: partials go to ``on_partial``, the caller's cancel reaches the op."""
        self.calls.append(op)
        with self._serving:
            reply = handle({"id": 0, "op": op, "args": args}, emit=on_partial or (lambda p: None),
                                  cancel=cancel)
        if reply["ok"]:
            return reply["result"]
        raise EngineError(reply["error"])

    def close(self, timeout: float = 0.0) -> None:
        pass


class SilentEngine(EngineCalls):
    """An engine that never answers (until the request is cancelled): "computing..." stays."""

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        (cancel or threading.Event()).wait(30)
        raise EngineError(f"engine request {op!r} cancelled")

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        return self.call(op, timeout=timeout, cancel=cancel, **args)

    def close(self, timeout: float = 0.0) -> None:
        pass


def make_app(path: Path | None, engine: Any = None) -> Any:
    """The app on the project file at ``path`` (the start screen for None), with a stand-in
    engine that never answers unless one is given, on a 2-core CPU."""
    from tunedeck.core.project import Project
    from tunedeck.tui.app import TunedeckApp

    return TunedeckApp(Project.load(path) if path else None, engine=engine or SilentEngine(), hardware=CPU)


async def edit(pilot: Any, key: str, *keys: str) -> None:
    """Open setting ``key`` in the Settings screen's editor, replace its text with ``keys``."""
    await pilot.app.screen.edit_field(key)
    await pilot.pause()
    await pilot.press(*keys)
    await pilot.pause()


async def settle(pilot: Any, timeout: float = 30.0) -> None:
    """Wait until no worker is running and the debounce timers have fired (requests to a
    SilentEngine, and dialogs waiting for an answer, are left running)."""
    app = pilot.app
    skip = {"dialogs"} | ({"summary", "inspect", "count", "pick"} if isinstance(app.engine, SilentEngine) else set())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await pilot.pause(0.4)  # the summary request is debounced
    while loop.time() < deadline:
        busy = [w for w in app.workers if w.is_running and w.group not in skip]
        if not busy:
            await pilot.pause()
            return
        await pilot.pause(0.05)
    raise AssertionError(f"workers still running: {busy}")


class PanesEngine(InProcessEngine):
    """The in-process engine with a stand-in for the Chat screen's ``chat_panes``: each pane's
    answer is ``answers[model name]`` (else "an answer from NAME"), streamed a word at a
    time to every pane in turn, as one batch streams its rows. With ``hold`` set, the stream
    stops half-way (``halfway`` is set) until ``go`` is set or the request is cancelled, so a
    test can look at both panes mid-answer."""

    def __init__(self, answers: dict[str, str] | None = None, *, hold: bool = False) -> None:
        super().__init__()
        self.answers = answers or {}
        self.hold = hold
        self.halfway = threading.Event()
        self.go = threading.Event()
        self.requests: list[dict[str, Any]] = []

    def stream(self, op: str, *, on_partial: Any = None, timeout: float | None = None,
               cancel: threading.Event | None = None, **args: Any) -> dict[str, Any]:
        self.calls.append(op)
        if op != "chat_panes":
            raise EngineError(f"unknown engine request {op!r}")
        self.requests.append(args)
        cancel = cancel or threading.Event()
        names = ["base" if p["model"] == "base" else Path(p["model"]).name for p in args["panes"]]
        words = [self.answers.get(name, f"an answer from {name}").split(" ") for name in names]
        texts, tokens = [""] * len(names), [0] * len(names)
        steps = max(len(w) for w in words)
        for step in range(steps):
            if self.hold and step == steps // 2:
                self.halfway.set()
                while not (self.go.is_set() or cancel.is_set()):
                    self.go.wait(0.05)
            if cancel.is_set():
                break
            for pane, pieces in enumerate(words):
                if step < len(pieces):
                    piece = (" " if step else "") + pieces[step]
                    texts[pane] += piece
                    tokens[pane] += 1
                    if on_partial is not None:
                        on_partial({"pane": pane, "text": piece, "tokens": tokens[pane], "tokens_per_s": 10.0})
        answers = [{"model": name, "text": text, "tokens": count, "seconds": 0.1, "tokens_per_s": 10.0 * bool(count),
                    "cancelled": cancel.is_set()} for name, text, count in zip(names, texts, tokens)]
        return {"answers": answers, "errors": [None] * len(names), "together": True}


def write_run(runs_dir: Path, name: str, *, status: str = "finished", steps: int = 10, loss: float | None = 0.5,
              adapter: bool = True, started: float = 1_700_000_000.0) -> Path:
    """A run folder as the trainer leaves it, for the run lists: its events (``status``:
    finished, stopped, failed, died or running) and, with ``adapter``, an adapter config."""
    from tunedeck.core.runs import write_record

    folder = runs_dir / name
    folder.mkdir(parents=True)
    events: list[dict[str, Any]] = [{"type": "run_started", "time": started, "step": 0, "max_steps": steps}]
    if loss is not None:
        events.append({"type": "step", "time": started + 1, "step": steps, "loss": loss})
    end = started + 2
    if status in ("finished", "stopped"):
        events.append({"type": "finished", "time": end, "step": steps, "stopped": status == "stopped"})
    elif status == "failed":
        events.append({"type": "failed", "time": end, "step": steps if loss is not None else 0,
                       "reason": "out of memory"})
    elif status == "running":
        import os

        write_record(folder, pid=os.getpid())
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    if adapter:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")
    return folder


# -- keys as a terminal read delivers them ----------------------------------------------------


def burst(app: Any, *keys: str) -> None:
    """Keys delivered the way a terminal read delivers them: all queued at once, none handled
    before the next arrives (``pilot.press`` waits for the app to go idle after each key)."""
    for key in keys:
        event = events.Key(_character_to_key(key) if len(key) == 1 and not key.isalnum() else key,
                           key if len(key) == 1 else None)
        event.set_sender(app)
        app._driver.send_message(event)


async def drain(pilot: Any) -> None:
    """Let the app handle what a :func:`burst` queued."""
    for _ in range(5):
        await pilot.pause(0.05)
