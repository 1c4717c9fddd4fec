"""Setting presets for the settings editor: the recipes users of LoRA / QLoRA reach for.

A preset is a set of key = value edits, applied through the same validator as typing
them. "Attention only" names the model's own attention layers when the engine has read
the model (``q_proj`` ... for llama-likes, ``c_attn`` and ``attn.c_proj`` for GPT-2,
``query_key_value`` and ``dense`` for GPT-NeoX); before that it falls back to the llama
names, and the summary flags any name that matches nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION = object()
"""Placeholder value: the model's attention layers."""


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    values: dict[str, Any] = field(default_factory=dict)

    def edits(self, attention: str | Sequence[str] | None = None) -> dict[str, Any]:
        """The key = value edits, with the model's attention layers filled in (``target_modules``
        that selects them: names, or a regex when names cannot select exactly them)."""
        targets = attention if isinstance(attention, str) else list(attention or LLAMA_ATTENTION)
        return {k: (targets if v is ATTENTION else v) for k, v in self.values.items()}


PRESETS: tuple[Preset, ...] = (
    Preset("LoRA, attention only",
           "Adapters on the attention projections: fewest trainable parameters.",
           {"quantization.mode": "none", "lora.target_modules": ATTENTION, "lora.use_dora": False}),
    Preset("LoRA, all linear",
           "Adapters on every linear layer but the output (peft's all-linear): the usual best quality.",
           {"quantization.mode": "none", "lora.target_modules": "all-linear", "lora.use_dora": False}),
    Preset("QLoRA 4-bit nf4",
           "Base weights in 4-bit NF4 with double quantization, LoRA on all linear layers (the QLoRA recipe).",
           {"quantization.mode": "4bit", "quantization.quant_type": "nf4", "quantization.double_quant": True,
            "lora.target_modules": "all-linear"}),
    Preset("QLoRA 8-bit",
           "Base weights in 8-bit (LLM.int8), LoRA on all linear layers: half the memory of 16-bit.",
           {"quantization.mode": "8bit", "lora.target_modules": "all-linear"}),
    Preset("DoRA",
           "Weight-decomposed LoRA on the current layers: often better at low rank, slower per step.",
           {"lora.use_dora": True}),
    Preset("rsLoRA, rank 64",
           "Rank 64 with rank-stabilised scaling (alpha / sqrt(r)), so a higher rank keeps learning.",
           {"lora.r": 64, "lora.alpha": 64, "lora.use_rslora": True}),
    Preset("Quick test run (max_steps 10)",
           "Stop after 10 optimizer steps and log each one: try the whole pipeline before a long run.",
           {"training.max_steps": 10, "training.logging_steps": 1}),
    Preset("Full run (epochs)",
           "Remove a step limit: train for training.epochs passes over the data.",
           {"training.max_steps": -1}),
)

PRESETS_BY_NAME: dict[str, Preset] = {p.name: p for p in PRESETS}
