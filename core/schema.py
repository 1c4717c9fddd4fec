"""The project schema: every key of ``project.toml``, its type, default, limits and help.

One table drives everything that reads or shows a project: the validator, the CLI's
``--set``, the settings editor's fields and help lines, ``tunedeck new``. Key names are
the ones peft / trl users already know (``r``, ``alpha``, ``target_modules``,
``max_length``, ``grad_accum`` ...).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import ProjectError

SCHEMA_VERSION = 1

AUTO = "auto"


@dataclass(frozen=True)
class Field:
    """One key of a project section."""

    section: str
    name: str
    kind: str  # int | float | bool | str | choice | auto_bool | targets | split | mapping | str_list | devices
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    group: str = ""

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    def expected(self) -> str:
        """What a valid value looks like, in words."""
        if self.kind == "choice":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "auto_bool":
            return '"auto", true or false'
        if self.kind == "targets":
            return 'a list of module names such as ["q_proj", "v_proj"], a regex string, or "all-linear"'
        if self.kind == "split":
            return "a ratio in [0, 1) such as 0.05, or the path of a separate eval file"
        if self.kind == "mapping":
            return 'a table of strings such as {messages = "dialog"}'
        if self.kind == "sources":
            return ('a path, or a list of paths and tables such as [{path = "a.jsonl", weight = 2}, '
                    '{path = "b.parquet", format = "alpaca"}]')
        if self.kind == "str_list":
            return "a list of strings"
        if self.kind == "devices":
            return '"auto", a number of processes such as 2, or a list of GPU indices such as [0, 1]'
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            parts = []
            if self.min is not None:
                parts.append((">= " if self.min_inclusive else "> ") + _num(self.min))
            if self.max is not None:
                parts.append(("<= " if self.max_inclusive else "< ") + _num(self.max))
            return noun + (" " + " and ".join(parts) if parts else "")
        if self.kind == "str":
            return "a string"
        return self.kind


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _f(section: str, name: str, kind: str, default: Any, help: str, **kw: Any) -> Field:
    return Field(section=section, name=name, kind=kind, default=default, help=help, **kw)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference")
CHAT_TEMPLATES = ("auto", "chatml", "chatml-tools", "llama-3", "alpaca")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
KERNELS = ("auto", "none", "liger")
METHODS = ("sft", "dpo", "orpo")
# trl's DPO losses that compare one chosen with one rejected answer (sigmoid: the DPO paper's)
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "bco_pair", "sppo_hard", "nca_pair", "exo_pair",
              "apo_zero", "apo_down", "discopop")
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
)

FIELDS: tuple[Field, ...] = (
    _f("", "schema", "int", SCHEMA_VERSION, "Project file format version.", min=1),
    _f("", "name", "str", "", "Project name; runs are named after it."),
    # [model]
    _f("model", "source", "str", "default",
       'Base model: "default" (bundled SmolLM2-135M-Instruct), a model folder, a .gguf file, '
       "or a repo id in the local Hugging Face cache.", group="Model"),
    _f("model", "adapter", "str", "",
       "Start from a finished run's adapter (its name in runs_dir, or its folder) and train it further, e.g. DPO "
       "after SFT; empty: a new adapter from [lora].", group="Model"),
    _f("model", "trust_remote_code", "bool", False,
       "Run Python code shipped with the model. Only for models you trust.", group="Model"),
    _f("model", "allow_pickle", "bool", False,
       "Allow .bin/.pt (pickle) weights; by default only safetensors and GGUF load.", group="Model"),
    _f("model", "chat_template", "choice", "auto",
       'Chat template: "auto" uses the model\'s own; a named one for models without a template.',
       choices=CHAT_TEMPLATES, group="Model"),
    # [quantization]
    _f("quantization", "mode", "choice", "none",
       '"none" trains LoRA on full-precision weights; "4bit" / "8bit" is QLoRA (bitsandbytes).',
       choices=("none", "8bit", "4bit"), group="Quantization"),
    _f("quantization", "quant_type", "choice", "nf4",
       "4-bit data type: nf4 (normal float, the QLoRA paper's choice) or fp4.",
       choices=("nf4", "fp4"), group="Quantization"),
    _f("quantization", "double_quant", "bool", True,
       "Quantize the quantization constants too (saves ~0.4 bits per parameter).", group="Quantization"),
    _f("quantization", "compute_dtype", "choice", "auto",
       "Dtype of the matmuls on quantized weights; auto follows the training precision.",
       choices=COMPUTE_DTYPES, group="Quantization"),
    # [lora]
    _f("lora", "r", "int", 16, "LoRA rank: the adapter's inner dimension.", min=1, max=4096, group="LoRA"),
    _f("lora", "alpha", "float", 32, "LoRA alpha: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA).",
       min=0, min_inclusive=False, max=1_000_000, group="LoRA"),
    _f("lora", "dropout", "float", 0.05, "Dropout on the adapter's input.", min=0, max=1,
       max_inclusive=False, group="LoRA"),
    _f("lora", "target_modules", "targets", "all-linear",
       'Layers to adapt: names matched as suffixes (["q_proj", "v_proj"]), a regex, or "all-linear".',
       group="LoRA"),
    _f("lora", "bias", "choice", "none", "Train biases too: none, all, or only those of adapted layers.",
       choices=("none", "all", "lora_only"), group="LoRA"),
    _f("lora", "use_rslora", "bool", False, "Rank-stabilised LoRA: scale by alpha / sqrt(r).", group="LoRA"),
    _f("lora", "use_dora", "bool", False, "DoRA: weight-decomposed LoRA (slower, sometimes better).",
       group="LoRA"),
    _f("lora", "modules_to_save", "str_list", [],
       "Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).", group="LoRA"),
    # [dataset]
    _f("dataset", "path", "sources", "",
       "Training data: JSONL, JSON, CSV, Parquet, a save_to_disk folder or a dataset in the local Hugging Face "
       'cache; or a list of them, each with a weight and its own format ([{path = "a.jsonl", weight = 2}]).',
       group="Dataset"),
    _f("dataset", "format", "choice", "auto",
       'Row format; auto detects it from the fields. "preference": rows with a chosen and a rejected answer '
       "(DPO, ORPO).",
       choices=FORMATS, group="Dataset"),
    _f("dataset", "columns", "mapping", {},
       'Field names when they differ from the format\'s, e.g. {messages = "dialog"}.', group="Dataset"),
    _f("dataset", "system_prompt", "str", "",
       "System turn added to rows that have none (also used in chat).", group="Dataset"),
    _f("dataset", "eval_split", "split", 0.0,
       "Held-out share for evaluation (seeded), or the path of a separate eval file; 0 for none.",
       min=0, max=1, max_inclusive=False, group="Dataset"),
    _f("dataset", "max_length", "int", 1024, "Tokens per example; longer rows are truncated.",
       min=8, max=1_048_576, group="Dataset"),
    _f("dataset", "loss_on", "choice", "assistant",
       '"assistant" trains on answers only (prompt masked); "all" on every token.',
       choices=("assistant", "all"), group="Dataset"),
    _f("dataset", "reasoning", "choice", "train",
       'Reasoning in the rows (reasoning_content, <think>): "train" renders it through the chat template and '
       'trains on it; "drop" leaves it out.', choices=("train", "drop"), group="Dataset"),
    _f("dataset", "packing", "bool", False,
       "Pack several rows into each example of up to max_length tokens (best fit); each row still attends only "
       "to itself.", group="Dataset"),
    _f("dataset", "padding_free", "auto_bool", "auto",
       "Concatenate a batch's rows into one sequence, no padding (position_ids restart at each row); auto: where "
       "the model's attention supports it. false pads each batch to its longest row, rows grouped by length.",
       group="Dataset"),
    # [training]
    _f("training", "method", "choice", "sft",
       '"sft" learns the answers (supervised fine-tuning); "dpo" and "orpo" learn to prefer each pair\'s chosen '
       "answer over its rejected one (preference data, see [preference]).", choices=METHODS, group="Training"),
    _f("training", "epochs", "float", 3, "Passes over the training set (ignored when max_steps > 0).",
       min=0, min_inclusive=False, max=100_000, group="Training"),
    _f("training", "max_steps", "int", -1, "Stop after this many optimizer steps; -1 runs the epochs.",
       min=-1, max=10**9, group="Training"),
    _f("training", "learning_rate", "float", 2e-4, "Peak learning rate.", min=0, max=1,
       min_inclusive=False, group="Training"),
    _f("training", "lr_scheduler", "choice", "cosine", "Learning-rate schedule after warm-up.",
       choices=SCHEDULERS, group="Training"),
    _f("training", "warmup_ratio", "float", 0.03, "Share of the steps spent warming up the learning rate.",
       min=0, max=1, group="Training"),
    _f("training", "batch_size", "int", 4, "Rows per device per forward pass.", min=1, max=65536,
       group="Training"),
    _f("training", "grad_accum", "int", 4, "Forward passes per optimizer step (effective batch = batch_size x this).",
       min=1, max=65536, group="Training"),
    _f("training", "precision", "choice", "auto",
       "auto: bf16 on a GPU that supports it, else fp16; on a CPU bf16 where measured faster (native bf16), "
       "else fp32.", choices=PRECISIONS, group="Training"),
    _f("training", "gradient_checkpointing", "auto_bool", "auto",
       "Recompute activations to save memory; auto: on for GPUs, off on a CPU.", group="Training"),
    _f("training", "kernels", "choice", "auto",
       'Fused kernels on CUDA: "liger" (RMSNorm, RoPE, SwiGLU; pip install "tunedeck[gpu]"); auto: liger on a GPU '
       "where installed, none on a CPU.", choices=KERNELS, group="Training"),
    _f("training", "optim", "choice", "adamw_torch", "Optimizer (paged_/8bit variants use bitsandbytes).",
       choices=OPTIMIZERS, group="Training"),
    _f("training", "weight_decay", "float", 0.0, "AdamW weight decay.", min=0, max=1, group="Training"),
    _f("training", "max_grad_norm", "float", 1.0, "Gradient clipping norm; 0 turns clipping off.", min=0,
       group="Training"),
    _f("training", "seed", "int", 42, "Random seed (data order, eval split, adapter init).", min=0,
       max=2**32 - 1, group="Training"),
    _f("training", "logging_steps", "int", 1, "Report loss every this many steps.", min=1, max=10**9,
       group="Training"),
    _f("training", "eval_steps", "int", 0, "Evaluate every this many steps; 0 evaluates once per epoch.",
       min=0, max=10**9, group="Training"),
    _f("training", "save_steps", "int", 0, "Save a checkpoint every this many steps; 0 saves once per epoch.",
       min=0, max=10**9, group="Training"),
    _f("training", "save_total_limit", "int", 3, "Checkpoints kept; older ones are deleted.", min=1,
       max=10**6, group="Training"),
    _f("training", "devices", "devices", "auto",
       'GPUs to train on: "auto" (every visible GPU), a count, or GPU indices; on a CPU, a number of '
       "processes (gloo). Several run data parallel.", group="Training"),
    _f("training", "accelerate_config", "str", "",
       "An accelerate config file (FSDP, DeepSpeed) for a run on several GPUs; empty: plain data parallel.",
       group="Training"),
    # [preference]
    _f("preference", "beta", "float", 0.1,
       "How far the model may move from the reference (DPO) or how much the preference weighs against the "
       "answers' likelihood (ORPO); higher: closer to the reference.", min=0, min_inclusive=False, max=1000,
       group="Preference"),
    _f("preference", "loss_type", "choice", "sigmoid",
       'DPO loss (trl\'s): "sigmoid" is the DPO paper\'s; "ipo", "hinge", "robust" (with label_smoothing), '
       '"sigmoid_norm" (per-token, less length bias) and others. ORPO has its own.', choices=DPO_LOSSES,
       group="Preference"),
    _f("preference", "label_smoothing", "float", 0.0,
       "Share of pairs assumed mislabelled (conservative DPO, robust loss); 0 trusts every pair.", min=0, max=0.5,
       max_inclusive=False, group="Preference"),
    _f("preference", "sft_weight", "float", 0.0,
       "Adds the chosen answers' likelihood to the DPO loss with this weight (RPO), so the good answers are not "
       "un-learned along with the bad; 0: off.", min=0, max=100, group="Preference"),
    # [output]
    _f("output", "runs_dir", "str", "runs", "Where runs are written, relative to the project file.",
       group="Output"),
)

FIELDS_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
SECTIONS: tuple[str, ...] = ("model", "quantization", "lora", "dataset", "training", "preference", "output")
SECTION_FIELDS: dict[str, dict[str, Field]] = {
    s: {f.name: f for f in FIELDS if f.section == s} for s in SECTIONS
}
TOP_FIELDS: dict[str, Field] = {f.name: f for f in FIELDS if not f.section}


def toml_repr(value: Any) -> str:
    """A value as it would be written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_repr(v)}" for k, v in value.items()) + "}"
    return str(value)


def _bad(fld: Field, value: Any, source: str | None, extra: str = "") -> ProjectError:
    shown = toml_repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ProjectError(fld.key, f"{shown} is not valid: expected {fld.expected()}{extra}", source)


def check_value(fld: Field, value: Any, source: str | None = None) -> Any:
    """Validate one value for ``fld``; return it normalised, or raise ProjectError."""
    kind = fld.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(fld, value, source)
        return value
    if kind == "auto_bool":
        if isinstance(value, bool) or value == AUTO:
            return value
        raise _bad(fld, value, source)
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(fld, value, source)
        if kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise _bad(fld, value, source)
                value = int(value)
        else:
            if math.isnan(value) or math.isinf(value):
                raise _bad(fld, value, source)
            value = float(value) if isinstance(value, float) else value
        _check_range(fld, value, source)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _bad(fld, value, source)
        return value
    if kind == "choice":
        if not isinstance(value, str) or value not in fld.choices:
            extra = ""
            if isinstance(value, str):
                close = difflib.get_close_matches(value, fld.choices, n=1)
                extra = f' (did you mean "{close[0]}"?)' if close else ""
            raise _bad(fld, value, source, extra)
        return value
    if kind == "targets":
        if isinstance(value, str):
            if not value.strip():
                raise _bad(fld, value, source)
            if value.lower() != "all-linear":
                try:  # peft full-matches a string against module names: it must be a regex
                    re.compile(value)
                except (re.error, RecursionError, OverflowError) as exc:
                    raise ProjectError(fld.key, f"{toml_repr(value)[:60]} is not a valid regular expression "
                                       f"({str(exc).splitlines()[0][:80]}); give layer names as a list, e.g. "
                                       '["q_proj", "v_proj"], or "all-linear"', source) from None
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
            return list(value)
        raise _bad(fld, value, source)
    if kind == "str_list":
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return list(value)
        raise _bad(fld, value, source)
    if kind == "devices":
        if value == AUTO:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024:
            return value
        if (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1024
                                                      for v in value) and len(set(value)) == len(value)):
            return list(value)
        raise _bad(fld, value, source)
    if kind == "split":
        if isinstance(value, str):
            if not value.strip():
                raise _bad(fld, value, source)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(fld, value, source)
        value = float(value)
        _check_range(fld, value, source)
        return value
    if kind == "sources":
        if isinstance(value, str):
            return value
        from .sources import parse_sources

        try:
            parse_sources(value, None, fld.key)
        except ValueError as exc:
            raise ProjectError(fld.key, f"{toml_repr(value)[:60]} is not valid: {exc}", source) from None
        return _copy(value)
    if kind == "mapping":
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()
        ):
            return dict(value)
        raise _bad(fld, value, source)
    raise AssertionError(f"unknown field kind {kind}")


def _check_range(fld: Field, value: float, source: str | None) -> None:
    if fld.min is not None and (value < fld.min or (not fld.min_inclusive and value == fld.min)):
        raise _bad(fld, value, source)
    if fld.max is not None and (value > fld.max or (not fld.max_inclusive and value == fld.max)):
        raise _bad(fld, value, source)


# names users copy from transformers / peft / trl / bitsandbytes code, and ours
ALIASES: dict[str, str] = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target": "target_modules",
    "targets": "target_modules",
    "lr": "learning_rate",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "lr_scheduler_type": "lr_scheduler",
    "warmup": "warmup_ratio",
    "load_in_4bit": "mode",
    "load_in_8bit": "mode",
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "torch_dtype": "precision",
    "dtype": "precision",
    "bf16": "precision",
    "fp16": "precision",
    "optimizer": "optim",
    "completion_only_loss": "loss_on",
    "assistant_only_loss": "loss_on",
    "output_dir": "runs_dir",
    "model_name_or_path": "source",
    "model_name": "source",
    "data_path": "path",
}


def unknown_key(name: str, known: list[str], where: str, source: str | None) -> ProjectError:
    alias = ALIASES.get(name.lower())
    close = [alias] if alias in known else difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(known)}"
    key = f"{where}.{name}" if where else name
    return ProjectError(key, f"unknown key{hint}", source)


def validate_tree(data: dict[str, Any], source: str | None = None) -> dict[str, dict[str, Any]]:
    """Validate a parsed project (plain dicts) and return every value, defaults filled in.

    The result maps section -> key -> value, with top-level keys under section "".
    """
    out: dict[str, dict[str, Any]] = {"": {}}
    for name, value in data.items():
        if name in SECTION_FIELDS:
            if not isinstance(value, dict):
                raise ProjectError(name, f"expected a table [{name}], got {toml_repr(value)}", source)
            continue
        fld = TOP_FIELDS.get(name)
        if fld is None:
            raise unknown_key(name, list(TOP_FIELDS) + list(SECTIONS), "", source)
        out[""][name] = check_value(fld, value, source)
    for section, fields in SECTION_FIELDS.items():
        table = data.get(section, {})
        values: dict[str, Any] = {}
        for name, value in table.items():
            fld = fields.get(name)
            if fld is None:
                raise unknown_key(name, list(fields), section, source)
            values[name] = check_value(fld, value, source)
        for name, fld in fields.items():
            values.setdefault(name, _copy(fld.default))
        out[section] = values
    for name, fld in TOP_FIELDS.items():
        out[""].setdefault(name, _copy(fld.default))
    schema = out[""]["schema"]
    if schema > SCHEMA_VERSION:
        raise ProjectError("schema", f"{schema} is newer than this tunedeck reads ({SCHEMA_VERSION}); upgrade tunedeck",
                           source)
    _cross_checks(out, source)
    return out


def _cross_checks(v: dict[str, dict[str, Any]], source: str | None) -> None:
    """Rules between keys that can be checked without looking at the machine."""
    method = v["training"]["method"]
    if method != "sft" and v["dataset"]["packing"]:
        raise ProjectError("dataset.packing", f"true packs rows for supervised fine-tuning, but training.method = "
                           f'"{method}" trains on pairs (a chosen and a rejected answer each); set packing = false',
                           source)
    pref = v["preference"]  # read by DPO; ORPO reads beta; SFT none (the trainer says what it ignores)
    if method != "dpo":
        pass
    elif pref["label_smoothing"] and pref["loss_type"] not in ("sigmoid", "robust", "exo_pair"):
        raise ProjectError("preference.label_smoothing", f'applies to the "sigmoid", "robust" and "exo_pair" '
                           f'losses, not "{pref["loss_type"]}"', source)
    elif pref["loss_type"] == "exo_pair" and not pref["label_smoothing"]:
        raise ProjectError("preference.loss_type", '"exo_pair" needs preference.label_smoothing > 0 (e.g. 0.001)',
                           source)
    steps = v["training"]["eval_steps"]
    if steps > 0 and v["dataset"]["eval_split"] == 0.0:
        raise ProjectError("training.eval_steps", f"{steps} asks for evaluation but there is no eval set; "
                           "set dataset.eval_split (e.g. 0.05) or eval_steps = 0", source)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def field_for(key: str) -> Field:
    """The field for a dotted key path, with a did-you-mean when it is unknown."""
    fld = FIELDS_BY_KEY.get(key)
    if fld is not None:
        return fld
    section, _, name = key.rpartition(".")
    if section in SECTION_FIELDS:
        raise unknown_key(name, list(SECTION_FIELDS[section]), section, None)
    close = difflib.get_close_matches(key, list(FIELDS_BY_KEY), n=1, cutoff=0.6)
    hint = f'; did you mean "{close[0]}"?' if close else "; keys look like lora.r or training.learning_rate"
    raise ProjectError(key, f"unknown key{hint}")
