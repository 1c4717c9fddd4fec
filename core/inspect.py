"""The target-module inspector: every layer LoRA can wrap in a model, and a project's report.

A model is built from its config on the meta device (:mod:`tunedeck.core.modelconfig`): no
weights are read and no memory is used, so a 70B config inspects about as fast as a 135M
one. Its layers are listed with their shapes and grouped by name. Which layers bitsandbytes
would quantize comes from transformers' own ``replace_with_bnb_linear``, run on the meta
model; whether peft rewrites the targets of the architecture (fused MoE experts of the
transformers 5 layout) from peft's own conversion (``Inspection.peft_remaps``). What a
choice of ``target_modules`` trains is :mod:`tunedeck.core.targets`.

Everything returned is plain data (dataclasses of ints and strings, no torch objects):
the engine process builds an :class:`Inspection` once and answers each toggle of the
Modules screen with :func:`~tunedeck.core.targets.count_trainable` and
:func:`~tunedeck.core.targets.targets_for` without the model (only for the MoE families
above does it keep the transformers config, to rebuild one). A project's side is here too:
what its ``[lora]`` settings train (:func:`project_choice`), its memory estimate
(:func:`project_memory`) and the report of ``tunedeck inspect`` (:func:`project_report`).
Importing this module imports neither torch nor peft; the functions do, when called.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import UserError
from .memory import (
    ArchInfo, MemoryEstimate, ModelShape, WeightSplit, arch_from_config, estimate_memory, estimate_project,
)
from .modelconfig import build_meta_model, load_config, quiet_libraries
from .targets import ALL_LINEAR, Choice, count_trainable

PRESETS = ("attention", "attention-mlp", ALL_LINEAR)  # keys of Inspection.presets
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "experts", "moe")


# -- the data ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer LoRA can wrap."""

    name: str  # model.layers.3.self_attn.q_proj
    group: str  # the name of its Group
    type: str  # class of the unquantized module: Linear, Conv1D, FalconLinear, Embedding, ...
    kind: str  # linear | conv1d | embedding
    role: str  # attention | mlp | output | embedding | other
    in_features: int  # an embedding's num_embeddings
    out_features: int  # an embedding's embedding_dim
    params: int  # weight + bias
    bias: int  # bias elements (0: no bias)
    quantized: bool  # bitsandbytes quantizes it in 4-/8-bit mode
    tied_to: str = ""  # the layer whose weight it shares (tie_word_embeddings)

    def type_in(self, mode: str) -> str:
        """The class the trainer's model has for this layer under quantization ``mode``."""
        if self.quantized and mode == "4bit":
            return "Linear4bit"
        if self.quantized and mode == "8bit":
            return "Linear8bitLt"
        return self.type


@dataclass(frozen=True)
class Group:
    """Layers with the same name up to their layer indices (q_proj x 30)."""

    name: str  # shortest name suffix selecting exactly these layers, else the pattern
    pattern: str  # model.layers.*.self_attn.q_proj
    suffix: bool  # `name` works as a target_modules entry
    role: str
    kind: str
    type: str
    count: int
    in_features: int | None  # None when the layers differ
    out_features: int | None
    params: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class OtherModule:
    """A module holding weight matrices that LoRA cannot wrap by name (e.g. fused MoE experts)."""

    name: str
    type: str
    params: int


@dataclass
class Inspection:
    """A model's layers as LoRA sees them. Plain data: picklable, usable without the model."""

    source: str
    model_type: str
    architecture: str  # the model class, e.g. LlamaForCausalLM
    arch: ArchInfo
    total_params: int  # every parameter once (tied weights once), as peft counts them
    bias_params: int
    layers: list[Layer]
    groups: list[Group]
    presets: dict[str, list[str]]  # preset -> layer names
    peft_default: str | list[str] | None  # peft's target_modules for this model_type
    output_layer: str | None
    input_embedding: str | None
    not_wrappable: list[OtherModule]
    notes: list[str]
    # what peft's matching and counting need: every module by name, in model order
    module_types: dict[str, str] = field(repr=False)
    module_params: dict[str, int] = field(repr=False)
    module_biases: dict[str, int] = field(repr=False)
    all_linear: list[str] = field(repr=False)
    # peft rewrites targets for this architecture (fused MoE experts): counts come from peft itself
    peft_remaps: bool = False
    config: Any = field(default=None, repr=False)  # the transformers config, to rebuild the meta model
    trust_remote_code: bool = False

    @property
    def default_targets(self) -> str | list[str]:
        """peft's default for the architecture, else "all-linear"."""
        return self.peft_default if self.peft_default is not None else ALL_LINEAR

    @cached_property
    def by_name(self) -> dict[str, Layer]:
        """Every layer by its full name."""
        return {layer.name: layer for layer in self.layers}

    def as_dict(self) -> dict[str, Any]:
        """The public view (JSON-able): model, groups, layers, presets."""
        return {
            "source": self.source, "model_type": self.model_type, "architecture": self.architecture,
            "arch": self.arch.as_dict(), "total_params": self.total_params, "bias_params": self.bias_params,
            "groups": [asdict(g) for g in self.groups], "layers": [asdict(layer) for layer in self.layers],
            "presets": self.presets, "peft_default": self.peft_default, "output_layer": self.output_layer,
            "input_embedding": self.input_embedding, "not_wrappable": [asdict(m) for m in self.not_wrappable],
            "notes": self.notes,
        }


# -- inspecting ---------------------------------------------------------------------


def inspect_model(source: str, *, root: Path | None = None, trust_remote_code: bool = False) -> Inspection:
    """Inspect ``source`` ("default", a model folder, a config.json, a .gguf file or a repo
    id in the local HF cache); relative paths against ``root``. Raises UserError on bad input."""
    config, display = load_config(source, root=root, trust_remote_code=trust_remote_code)
    return inspect_config(config, source=display, trust_remote_code=trust_remote_code)


def inspect_config(config: Any, *, source: str = "config", trust_remote_code: bool = False) -> Inspection:
    """Inspect the model a transformers config describes (built on the meta device)."""
    model = build_meta_model(config, display=source, trust_remote_code=trust_remote_code)
    with quiet_libraries():
        return _inspect(model, config, source, trust_remote_code)


def _inspect(model: Any, config: Any, source: str, trust_remote_code: bool) -> Inspection:
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    modules.pop("", None)
    output = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    output_name = next((n for n, m in modules.items() if m is output), None) if output is not None else None
    input_name = next((n for n, m in modules.items() if m is inputs), None) if inputs is not None else None

    owner: dict[int, str] = {}  # weight tensor -> the first module holding it (ties)
    layers: list[dict[str, Any]] = []
    others: list[OtherModule] = []
    for name, module in modules.items():
        if isinstance(module, torch.nn.Embedding):
            kind, n_in, n_out = "embedding", module.num_embeddings, module.embedding_dim
        elif isinstance(module, Conv1D):
            kind, (n_in, n_out) = "conv1d", tuple(module.weight.shape)
        elif isinstance(module, torch.nn.Linear):
            kind, n_in, n_out = "linear", module.in_features, module.out_features
        else:
            own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if own:
                others.append(OtherModule(name, type(module).__name__, sum(p.numel() for p in own)))
            continue
        weight = module.weight
        tied_to = owner.setdefault(id(weight), name)
        bias = getattr(module, "bias", None)
        layers.append(dict(
            name=name, type=type(module).__name__, kind=kind, role=_role(name, kind, name == output_name),
            in_features=int(n_in), out_features=int(n_out),
            params=sum(p.numel() for p in module.parameters(recurse=False)),
            bias=bias.numel() if isinstance(bias, torch.Tensor) else 0,
            tied_to="" if tied_to == name else tied_to,
        ))

    all_linear = _maybe_include_all_linear_layers(LoraConfig(target_modules=ALL_LINEAR), model).target_modules
    all_linear_names = [n for n in modules if n in all_linear]
    module_types = {n: type(m).__name__ for n, m in modules.items()}
    module_params = {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()}
    module_biases = {n: b for n, m in modules.items()
                     if (b := sum(p.numel() for k, p in m.named_parameters() if k.rsplit(".", 1)[-1] == "bias"))}
    total = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for k, p in model.named_parameters() if k.rsplit(".", 1)[-1] == "bias")
    remaps, quantized = _peft_and_bnb(model, config, trust_remote_code)  # last: it may replace modules of `model`

    ungrouped = [Layer(group="", quantized=d["name"] in quantized, **d) for d in layers]
    groups = _groups(ungrouped, list(modules))
    group_of = {n: g.name for g in groups for n in g.layers}
    final_layers = [replace(layer, group=group_of[layer.name]) for layer in ungrouped]
    presets = {
        "attention": [x.name for x in final_layers if x.role == "attention"],
        "attention-mlp": [x.name for x in final_layers if x.role in ("attention", "mlp")],
        ALL_LINEAR: all_linear_names,
    }
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type)
    notes = []
    if remaps:
        notes.append("peft adapts this architecture's fused MoE experts itself (transformers 5 layout); "
                     "counts come from peft")
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        notes.append(f"the checkpoint is quantized ({method or 'unknown method'}): counts are the same; "
                     "the memory estimate follows quantization.mode")
    if default is None:
        notes.append(f'peft has no default target_modules for model_type {config.model_type!r}; "all-linear" is used')
    if others:
        notes.append(f"{len(others)} module(s) hold weights LoRA cannot wrap by name "
                     f"(e.g. {others[0].name}, {others[0].type})")
    return Inspection(
        source=source, model_type=str(config.model_type), architecture=type(model).__name__,
        arch=arch_from_config(config.to_dict()), total_params=int(total), bias_params=int(biases),
        layers=final_layers, groups=groups, presets=presets,
        peft_default=sorted(default) if isinstance(default, (list, set, tuple)) else default,
        output_layer=output_name, input_embedding=input_name, not_wrappable=others, notes=notes,
        module_types=module_types, module_params=module_params, module_biases=module_biases,
        all_linear=all_linear_names, peft_remaps=remaps, config=config if remaps else None,
        trust_remote_code=trust_remote_code,
    )


def _role(name: str, kind: str, is_output: bool) -> str:
    if is_output:
        return "output"
    if kind == "embedding":
        return "embedding"
    parents = name.lower().split(".")[:-1]
    if any("attn" in p or "attention" in p for p in parents):
        return "attention"
    if any(any(word in p for word in _MLP_PARTS) for p in parents):
        return "mlp"
    return "other"


def _peft_and_bnb(model: Any, config: Any, trust_remote_code: bool) -> tuple[bool, set[str]]:
    """Whether peft remaps the targets of this model, and the layers bitsandbytes quantizes:
    the two questions that cost most of an inspection (peft's conversion table is built for
    every architecture; the quantized copy of the model is built module by module), kept on
    disk per model class and config (:func:`tunedeck.core.kept.kept_answer`), so a fresh
    ``tunedeck inspect`` answers them at once. A model with remote code is asked every time."""
    from .kept import kept_answer

    def ask() -> dict[str, Any]:
        remaps = _peft_remaps(model)
        return {"remaps": remaps, "quantized": sorted(_bnb_quantized(model))}  # replaces modules of `model`

    if trust_remote_code:
        answer = ask()
    else:
        key = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": config.to_dict()}
        answer = kept_answer("peft-bnb", key, ask, code=("inspect.py",))
    return bool(answer["remaps"]), set(answer["quantized"])


def _peft_remaps(model: Any) -> bool:
    """Whether peft rewrites target_modules for this model before matching: asked of peft's
    own conversion (``convert_peft_config_for_transformers``) with an "all-linear" probe."""
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    probe = LoraConfig(target_modules=ALL_LINEAR)
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return probe.target_modules != ALL_LINEAR or bool(probe.target_parameters)


def _bnb_quantized(model: Any) -> set[str]:
    """Names of the layers transformers' bitsandbytes integration would quantize.

    Runs transformers' own ``replace_with_bnb_linear`` with the skip list its quantizer
    computes (output layer, tied weights, ``_keep_in_fp32_modules``); on the meta device
    this costs nothing. The 8-bit skip list is the same. Modifies ``model``.
    """
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    before = {n: type(m) for n, m in model.named_modules()}
    qc = BitsAndBytesConfig(load_in_4bit=True)
    skip = HfQuantizer.get_modules_to_not_convert(model, qc.llm_int8_skip_modules, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    return {n for n, m in model.named_modules() if n in before and type(m) is not before[n]}


def _pattern(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def _groups(layers: list[Layer], module_names: list[str]) -> list[Group]:
    by_pattern: dict[str, list[Layer]] = {}
    for layer in layers:
        by_pattern.setdefault(_pattern(layer.name), []).append(layer)
    groups = []
    for pattern, members in by_pattern.items():
        names = {m.name for m in members}
        name, suffix = pattern, False
        parts = pattern.split(".")
        for k in range(1, len(parts) + 1):
            if parts[-k] == "*":
                break
            candidate = ".".join(parts[-k:])
            hits = {n for n in module_names if n == candidate or n.endswith("." + candidate)}
            if hits == names:
                name, suffix = candidate, True
                break
        ins, outs = {m.in_features for m in members}, {m.out_features for m in members}
        first = members[0]
        groups.append(Group(
            name=name, pattern=pattern, suffix=suffix, role=first.role, kind=first.kind, type=first.type,
            count=len(members), in_features=ins.pop() if len(ins) == 1 else None,
            out_features=outs.pop() if len(outs) == 1 else None, params=sum(m.params for m in members),
            layers=tuple(m.name for m in members),
        ))
    return groups


# -- memory -----------------------------------------------------------------------------


def weight_split(ins: Inspection) -> WeightSplit:
    """All parameters, and the weights bitsandbytes would quantize."""
    return WeightSplit(total=ins.total_params,
                       quantizable=sum(x.params - x.bias for x in ins.layers if x.quantized))


def model_shape(ins: Inspection, choice: Choice, dropout: float = 0.05) -> ModelShape:
    """The exact :class:`~tunedeck.core.memory.ModelShape` of ``choice`` on the inspected model."""
    return ModelShape(ins.arch, weight_split(ins), choice.footprint(dropout))


def estimate(
    ins: Inspection,
    choice: Choice,
    *,
    mode: str = "none",
    precision: str = "bf16",
    batch_size: int = 4,
    max_length: int = 1024,
    gradient_checkpointing: bool = True,
    device: str = "cuda",
    double_quant: bool = True,
    dropout: float = 0.05,
    longest_row: int | None = None,
    packing: bool = False,
    kernels: str = "none",
) -> MemoryEstimate:
    """Peak training memory of ``choice`` at explicit settings (see :mod:`tunedeck.core.memory`
    for the formula); a project's estimate is :func:`project_memory`."""
    shape = model_shape(ins, choice, dropout)
    return estimate_memory(shape.arch, shape.weights, shape.lora, mode=mode, precision=precision,
                           batch_size=batch_size, max_length=max_length,
                           gradient_checkpointing=gradient_checkpointing, device=device, double_quant=double_quant,
                           longest_row=longest_row, packing=packing, kernels=kernels)


def project_memory(project: Any, ins: Inspection, choice: Choice, *, hardware: Any = None,
                   longest_row: int | None = None) -> MemoryEstimate:
    """The project's estimate (:func:`tunedeck.core.memory.estimate_project`) with the exact
    counts of ``choice`` on the inspected model."""
    return estimate_project(project, model_shape(ins, choice, project["lora.dropout"]), hardware=hardware,
                            longest_row=longest_row)


# -- a project ----------------------------------------------------------------------------


def lora_config(values: dict[str, Any]) -> Any:
    """peft's ``LoraConfig`` for a project's ``[lora]`` values (``Project.values["lora"]``):
    the one place tunedeck builds it, for the trainer and anything else that wraps a model."""
    from peft import LoraConfig

    return LoraConfig(
        r=values["r"],
        lora_alpha=values["alpha"],
        lora_dropout=values["dropout"],
        target_modules=values["target_modules"],
        bias=values["bias"],
        use_rslora=values["use_rslora"],
        use_dora=values["use_dora"],
        modules_to_save=list(values["modules_to_save"]) or None,
        task_type="CAUSAL_LM",
    )


def inspect_project(project: Any) -> Inspection:
    """Inspect a :class:`~tunedeck.core.project.Project`'s model."""
    return inspect_model(project["model.source"], root=project.root,
                         trust_remote_code=project["model.trust_remote_code"])


def project_choice(project: Any, ins: Inspection, targets: str | list[str] | None = None) -> Choice:
    """What the project's [lora] settings train (``targets`` overrides ``lora.target_modules``)."""
    lora = project.values["lora"]
    return count_trainable(ins, lora["target_modules"] if targets is None else targets, r=lora["r"],
                           use_dora=lora["use_dora"], bias=lora["bias"], modules_to_save=lora["modules_to_save"])


def project_counts(project: Any, inspection: Inspection | None = None) -> dict[str, int]:
    """``trainable_params`` and ``total_params`` of a project, as peft will report them
    after wrapping, and ``target_layers``. Raises UserError when training would refuse."""
    choice = project_choice(project, inspection or inspect_project(project))
    if choice.errors:
        raise UserError(f"lora.{choice.errors[0]}")
    return {"trainable_params": choice.trainable_params, "total_params": choice.total_params,
            "target_layers": len(choice.layers)}


def project_report(project: Any, *, targets: str | list[str] | None = None, hardware: Any = None,
                   inspection: Inspection | None = None, longest_row: int | None | bool = True) -> dict[str, Any]:
    """The inspector's view of a project: its model's layers, what its [lora] settings
    train and the estimated peak memory on this machine. Plain JSON-able dict.

    ``targets`` overrides ``lora.target_modules``. ``longest_row``: the dataset's longest
    tokenized row, or True to find it (:func:`tunedeck.core.memory.longest_row`: renders the
    rows once, then kept), False for the estimate at max_length. Raises UserError when the
    model cannot be inspected or the settings cannot work together; problems with the
    targets are in ``errors``.
    """
    from .memory import longest_row as find_longest

    ins = inspection or inspect_project(project)
    lora = project.values["lora"]
    choice = project_choice(project, ins, targets)
    mode = project["quantization.mode"]
    longest = find_longest(project) if longest_row is True else (longest_row or None)
    memory = project_memory(project, ins, choice, hardware=hardware, longest_row=longest)
    base_bytes = 4 if mode != "none" or memory.precision == "fp32" else 2
    by_name = ins.by_name
    chosen = set(choice.layers)
    return {
        "model": {"source": ins.source, "model_type": ins.model_type, "architecture": ins.architecture,
                  **ins.arch.as_dict(), "params": ins.total_params, "notes": ins.notes},
        "groups": [{**asdict(g), "layers": list(g.layers), "picked": sum(n in chosen for n in g.layers),
                    "type": by_name[g.layers[0]].type_in(mode)} for g in ins.groups],
        "layers": [{**asdict(x), "type": x.type_in(mode), "picked": x.name in chosen} for x in ins.layers],
        "presets": ins.presets,
        "peft_default": ins.peft_default,
        "not_wrappable": [asdict(m) for m in ins.not_wrappable],
        "targets": choice.targets,
        "target_layers": len(choice.layers),
        "trainable_params": choice.trainable_params,
        "total_params": choice.total_params,
        "percent": choice.percent,
        "breakdown": {"lora": choice.lora_params, "dora": choice.dora_params, "bias": choice.bias_params,
                      "modules_to_save": choice.modules_to_save_params},
        "adapter_bytes": choice.adapter_bytes(base_bytes),
        "lora": {"r": choice.r, "use_dora": choice.use_dora, "bias": choice.bias,
                 "modules_to_save": list(choice.modules_to_save), "dropout": lora["dropout"]},
        "memory": memory.as_dict(),
        "errors": list(choice.errors),
        "warnings": list(choice.warnings),
    }
