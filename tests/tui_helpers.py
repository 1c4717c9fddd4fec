"""Helpers for the app's tests: a small project on disk, stand-in engines, waiting for workers."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from tunedeck.core import engine
from tunedeck.core.engine import EngineError
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


class InProcessEngine:
    """The engine's ops, run in the test's own process (the functions the engine process runs),
    one request at a time as the engine process serves them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._serving = threading.Lock()

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        self.calls.append(op)
        with self._serving:
            reply = engine.handle({"id": 0, "op": op, "args": args})
        if reply["ok"]:
            return reply["result"]
        raise EngineError(reply["error"])

    def close(self, timeout: float = 0.0) -> None:
        pass


class SilentEngine:
    """An engine that never answers (until the request is cancelled): "computing..." stays."""

    def call(self, op: str, *, timeout: float | None = None, cancel: threading.Event | None = None,
             **args: Any) -> dict[str, Any]:
        (cancel or threading.Event()).wait(30)
        raise EngineError(f"engine request {op!r} cancelled")

    def close(self, timeout: float = 0.0) -> None:
        pass


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
