"""The target-module inspector: every layer LoRA can wrap, and what a choice of targets trains.

A model is built from its config on the meta device: no weights are read and no memory
is used, so a 70B config inspects about as fast as a 135M one. Its layers are listed
with their shapes and grouped by name; a choice of ``target_modules`` is matched by
peft's own matcher (``peft.tuners.tuners_utils.check_target_module_exists``, with
"all-linear" expanded by peft's ``_maybe_include_all_linear_layers``) and counted in
closed form, giving what ``get_peft_model(model, LoraConfig(...)).get_nb_trainable_parameters()``
reports (``tests/test_inspect.py`` holds the two equal across eight families).

Trainable parameters, per wrapped layer with ``in`` inputs and ``out`` outputs::

    LoRA              r x (in + out)    lora_A (r x in) and lora_B (out x r). transformers'
                                        Conv1D (GPT-2) stores its weight as (in, out); peft
                                        wraps it with fan_in_fan_out = True. An embedding
                                        counts r x (num_embeddings + embedding_dim).
    DoRA              + out             the magnitude vector
    bias "all"        + every bias of the model, except those inside modules_to_save
                                        (peft freezes the original module there)
    bias "lora_only"  + the biases of the wrapped layers
    modules_to_save   + the parameters of each named module (peft trains a full copy)

Quantization changes no count: bitsandbytes' Linear4bit / Linear8bitLt keep their in and
out features, and peft reports a 4-bit layer's parameters unpacked. Which layers
bitsandbytes would quantize comes from transformers' own ``replace_with_bnb_linear``,
run on the meta model.

One exception to the closed form: for MoE families whose layout transformers 5 changed
(Mixtral, Qwen3-MoE, DeepSeek-V3, ...), peft rewrites ``target_modules`` before matching
and adapts the fused expert weights through ``target_parameters``. For those, counting
asks peft itself, on a fresh meta-device model (``Inspection.peft_remaps``).

Everything returned is plain data (dataclasses of ints and strings, no torch objects):
the engine process builds an :class:`Inspection` once and answers each toggle of the
Modules screen with :func:`count_trainable` and :func:`targets_for` without the model
(only for the MoE families above does it keep the transformers config, to rebuild one).
Importing this module imports neither torch nor peft; the functions do, when called.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import UserError
from .memory import (
    ArchInfo, LoraFootprint, MemoryEstimate, ModelShape, WeightSplit, arch_from_config, estimate_memory,
    estimate_project,
)

ALL_LINEAR = "all-linear"
PRESETS = ("attention", "attention-mlp", ALL_LINEAR)  # keys of Inspection.presets
# peft saves the base embedding matrices with the adapter when one of these is targeted
# (peft.utils.constants.EMBEDDING_LAYER_NAMES, save_embedding_layers="auto")
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
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


@dataclass(frozen=True)
class Choice:
    """What one choice of target modules trains."""

    targets: str | list[str]
    layers: tuple[str, ...]  # the wrapped layers, in model order
    r: int
    use_dora: bool
    bias: str
    modules_to_save: tuple[str, ...]
    lora_params: int
    dora_params: int
    bias_params: int
    modules_to_save_params: int
    trainable_params: int  # = peft's get_nb_trainable_parameters()[0]
    total_params: int  # = peft's get_nb_trainable_parameters()[1]: the base plus what LoRA adds
    input_features: int  # sum of in_features over the wrapped layers
    saved_frozen_params: int  # frozen base tensors peft also writes into the adapter file (embeddings, biases)
    parameters: tuple[str, ...]  # fused expert weights peft adapts directly (peft_remaps architectures)
    errors: tuple[str, ...]  # training would refuse: peft raises, or the output layer is targeted
    warnings: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def adapter_bytes(self, base_dtype_bytes: int = 2) -> int:
        """Size of the tensors in ``adapter_model.safetensors`` as tunedeck's trainer saves it
        (the file adds a small JSON header).

        Every trainable tensor is fp32 (peft upcasts adapters; the trainer upcasts trainable
        biases and modules_to_save copies). Frozen base tensors peft saves alongside (the
        embedding matrices when an embedding is targeted, frozen biases with bias="all")
        keep the base dtype: ``base_dtype_bytes`` is 2 for bf16/fp16, 4 for fp32 and for
        QLoRA, whose unquantized weights peft upcasts.
        """
        return 4 * self.trainable_params + base_dtype_bytes * self.saved_frozen_params

    def footprint(self, dropout: float = 0.05) -> LoraFootprint:
        return LoraFootprint(trainable_params=self.trainable_params, layers=len(self.layers),
                             input_features=self.input_features, r=self.r, dropout=dropout)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["percent"] = self.percent
        return out


# -- quiet imports and builds -----------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library chatter (bitsandbytes kernel notices, transformers config warnings)."""
    bnb = logging.getLogger("bitsandbytes")
    level = bnb.level
    bnb.setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        bnb.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else exc.__class__.__name__
    return text[:200]


# -- finding and reading a config -------------------------------------------------


@dataclass(frozen=True)
class _ConfigSource:
    display: str
    folder: Path
    config_file: Path | None = None  # a bare config.json path
    gguf_file: str | None = None  # a GGUF file in `folder`


def _locate(source: str, root: Path | None) -> _ConfigSource:
    """Where a model's config is. Lighter than models.resolve_source: no weights needed."""
    from . import models

    source = source.strip()
    if not source:
        raise UserError('model: empty; give "default", a model folder, a config.json, a .gguf file or a repo id')
    if source == "default":
        ref = models.resolve_source("default")
        if ref.converted:
            return _ConfigSource(ref.display, ref.path)
        return _ConfigSource(ref.display, ref.path.parent, gguf_file=ref.gguf_file)
    path = Path(source).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            models.check_gguf(path)
            return _ConfigSource(source, path.parent, gguf_file=path.name)
        if path.suffix.lower() == ".json":
            return _ConfigSource(source, path.parent, config_file=path)
        raise UserError(f"model {source}: a file but neither a .gguf nor a config.json")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model {source}: {path} has no config.json; give a Hugging Face model folder")
        return _ConfigSource(source, path)
    if models.REPO_ID.match(source):
        snapshot = models.hub_snapshot(source)
        if snapshot is not None:
            return _ConfigSource(source, snapshot)
        raise UserError(f"model {source}: not a folder here and not in the local Hugging Face cache "
                        "(nothing is downloaded); `tunedeck models` lists the models found")
    raise UserError(f"model {source}: no such folder or file")


def load_config(source: str, *, root: Path | None = None, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(transformers config, display name) of ``source``: "default", a model folder, a
    config.json, a .gguf file or a repo id in the local HF cache. Reads no weights."""
    where = _locate(source, root)
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if where.gguf_file:
        kwargs["gguf_file"] = where.gguf_file
    target = str(where.config_file or where.folder)
    if not where.gguf_file:
        from .models import config_problem

        raw = where.config_file or where.folder / "config.json"
        try:
            problem = config_problem(json.loads(raw.read_bytes().decode("utf-8-sig")))
        except (OSError, ValueError, RecursionError):
            problem = None  # transformers says what is wrong with it
        if problem:
            raise UserError(f"model {where.display}: {problem}")
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError, KeyError, RecursionError) as exc:
        raise _config_error(where, exc) from None
    except Exception as exc:  # corrupt GGUFs and configs whose values no model has fail any way they like
        if not where.gguf_file:
            raise UserError(f"model {where.display}: config.json describes no model this transformers can build "
                            f"({_first_line(exc)})") from None
        raise UserError(f"model {where.display}: cannot read the GGUF header ({_first_line(exc)}); "
                        "the file may be corrupt or incomplete") from None
    return config, where.display


def _config_error(where: _ConfigSource, exc: Exception) -> UserError:
    msg = _first_line(exc)
    if "trust_remote_code" in str(exc) or "custom code" in msg:
        return UserError(f"model {where.display}: its config needs the model's own code; set "
                         "model.trust_remote_code = true only if you trust it")
    unknown = re.search(r"model type `([^`]*)`", msg)
    if unknown or "Unrecognized model" in msg:
        kind = f"model_type {unknown.group(1)!r}" if unknown else "its model_type"
        return UserError(f"model {where.display}: unknown architecture ({kind}): this transformers does not "
                         "know it; upgrade transformers, or set model.trust_remote_code = true if the "
                         "model ships its own code")
    if "not a valid JSON" in msg:
        return UserError(f"model {where.display}: config.json is not valid JSON")
    if where.gguf_file:
        return UserError(f"model {where.display}: cannot read the GGUF header ({msg}); the file may be corrupt")
    return UserError(f"model {where.display}: cannot read its config ({msg})")


def build_meta_model(config: Any, *, display: str = "model", trust_remote_code: bool = False) -> Any:
    """The causal LM of ``config`` on the meta device: every layer and shape, no memory.

    ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``, which leaves
    tied input and output embeddings untied (and so counts them twice).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        msg = _first_line(exc)
        if "Unrecognized configuration class" in msg:
            raise UserError(f"model {display}: {type(config).__name__} is not a causal language model") from None
        raise UserError(f"model {display}: cannot build it from its config ({msg})") from None
    except Exception as exc:  # model constructors assert on inconsistent config values in many ways
        raise UserError(f"model {display}: cannot build it from its config "
                        f"({exc.__class__.__name__}: {_first_line(exc)})") from None


# -- inspecting ---------------------------------------------------------------------


def inspect_model(source: str, *, root: Path | None = None, trust_remote_code: bool = False) -> Inspection:
    """Inspect ``source`` ("default", a model folder, a config.json, a .gguf file or a repo
    id in the local HF cache); relative paths against ``root``. Raises UserError on bad input."""
    config, display = load_config(source, root=root, trust_remote_code=trust_remote_code)
    return inspect_config(config, source=display, trust_remote_code=trust_remote_code)


def inspect_config(config: Any, *, source: str = "config", trust_remote_code: bool = False) -> Inspection:
    """Inspect the model a transformers config describes (built on the meta device)."""
    model = build_meta_model(config, display=source, trust_remote_code=trust_remote_code)
    with _quiet():
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


# -- matching and counting ----------------------------------------------------------


def _match(ins: Inspection, targets: str | list[str], modules_to_save: Iterable[str] = ()) -> list[str]:
    """Every module name peft's matcher selects for ``targets`` (wrappable or not)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    expanded: str | list[str] = targets
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        expanded = ins.all_linear
    config = LoraConfig(target_modules=expanded, modules_to_save=list(modules_to_save) or None)
    return [name for name in ins.module_types if check_target_module_exists(config, name)]


def count_trainable(
    ins: Inspection,
    targets: str | list[str] | None = None,
    *,
    r: int = 16,
    use_dora: bool = False,
    bias: str = "none",
    modules_to_save: Iterable[str] = (),
) -> Choice:
    """What ``LoraConfig(target_modules=targets, r=r, use_dora=use_dora, bias=bias,
    modules_to_save=modules_to_save)`` trains on the inspected model.

    ``targets``: a list of names (exact or suffix on a "." boundary), a regex string (full
    match), "all-linear", or None for peft's default for the architecture. Problems that
    make training refuse (nothing matched, a matched module LoRA cannot wrap, an adapter on
    the output layer, which trl's fused LM head would bypass) are returned in ``errors``,
    not raised, so a screen can show them while the user picks; the counts are peft's
    either way. modules_to_save names match as peft matches them: by name ending.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be none, all or lora_only, not {bias!r}")
    if targets is None:
        targets = ins.default_targets
    if isinstance(targets, (list, tuple)):
        targets = list(targets)
    saved_names = tuple(modules_to_save)
    with _quiet():
        matched = _match(ins, targets, saved_names)
    by_name = ins.by_name
    wrapped = [by_name[n] for n in matched if n in by_name]
    unwrappable = [n for n in matched if n not in by_name]

    lora = sum(r * (x.in_features + x.out_features) for x in wrapped)
    dora = sum(x.out_features for x in wrapped) if use_dora else 0
    saved_modules = [n for n in ins.module_types if any(n.endswith(m) for m in saved_names)]
    saved_params = sum(ins.module_params[n] for n in saved_modules)
    if bias == "all":
        bias_params = ins.bias_params - sum(ins.module_biases.get(n, 0) for n in saved_modules)
    elif bias == "lora_only":
        bias_params = sum(x.bias for x in wrapped)
    else:
        bias_params = 0
    frozen_saved = ins.bias_params - bias_params if bias == "all" else 0
    if _embeddings_saved(ins, targets):
        frozen_saved += sum(ins.module_params[n] for n in {ins.input_embedding, ins.output_layer} if n)

    trainable = lora + dora + bias_params + saved_params
    total = ins.total_params + lora + dora + saved_params
    parameters: tuple[str, ...] = ()
    refusal = ""
    if ins.peft_remaps:
        counted = _count_with_peft(ins, targets, r=r, use_dora=use_dora, bias=bias, modules_to_save=saved_names)
        if isinstance(counted, str):
            refusal = counted
        else:
            trainable, total, names, parameters = counted
            wrapped = [layer for layer in ins.layers if layer.name in names]
            unwrappable = []
            lora = trainable - dora - bias_params - saved_params
    errors, notes = _problems(ins, targets, wrapped, unwrappable, bool(parameters), saved_names, saved_modules)
    if refusal and not (errors and "not found in the base model" in refusal):  # ours lists the layer names
        errors = [refusal]
    return Choice(
        targets=targets, layers=tuple(x.name for x in wrapped), r=r, use_dora=use_dora, bias=bias,
        modules_to_save=saved_names, lora_params=lora, dora_params=dora, bias_params=bias_params,
        modules_to_save_params=saved_params, trainable_params=trainable, total_params=total,
        input_features=sum(x.in_features for x in wrapped), saved_frozen_params=frozen_saved,
        parameters=parameters, errors=tuple(errors), warnings=tuple(notes),
    )


def _count_with_peft(ins: Inspection, targets: str | list[str], *, r: int, use_dora: bool, bias: str,
                     modules_to_save: tuple[str, ...]) -> tuple[int, int, set[str], tuple[str, ...]] | str:
    """(trainable, total, wrapped module names, adapted parameters) from peft itself, or its refusal."""
    from peft import LoraConfig, get_peft_model

    model = build_meta_model(ins.config, display=ins.source, trust_remote_code=ins.trust_remote_code)
    config = LoraConfig(r=r, target_modules=targets, use_dora=use_dora, bias=bias,
                        modules_to_save=list(modules_to_save) or None, task_type="CAUSAL_LM")
    try:
        with _quiet():
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    except ValueError as exc:
        return f"peft refuses target_modules {_targets_text(targets)}: {_first_line(exc)}"
    trainable, total = peft_model.get_nb_trainable_parameters()
    tuner = peft_model.base_model
    return trainable, total, set(tuner.targeted_module_names), tuple(tuner.targeted_parameter_names)


def _embeddings_saved(ins: Inspection, targets: str | list[str]) -> bool:
    """peft's save_embedding_layers="auto": a listed embedding name, or a regex matching one."""
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return False
        embeddings = [n for n in ins.module_types if re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", n)]
        return any(re.fullmatch(targets, n) for n in embeddings)
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _targets_text(targets: str | list[str]) -> str:
    if isinstance(targets, str):
        return f'"{targets}"'
    return "[" + ", ".join(f'"{t}"' for t in targets) + "]"


def _layer_names(ins: Inspection) -> str:
    """The names target_modules can use, on one line: q_proj, k_proj, ..., lm_head."""
    return ", ".join(g.name for g in ins.groups)


def _problems(ins: Inspection, targets: str | list[str], wrapped: list[Layer], unwrappable: list[str],
              adapts_parameters: bool, saved_names: tuple[str, ...],
              saved_modules: list[str]) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    notes: list[str] = []
    shown = _targets_text(targets)
    if unwrappable:
        first = unwrappable[0]
        more = f" and {len(unwrappable) - 1} more" if len(unwrappable) > 1 else ""
        errors.append(f"target_modules {shown} matches {first} ({ins.module_types[first]}){more}, which LoRA "
                      f"cannot wrap; name layers instead: {_layer_names(ins)}")
    elif not wrapped and not adapts_parameters:
        errors.append(f"target_modules {shown} matches no layer of this model; its layers: {_layer_names(ins)}")
    if isinstance(targets, list) and wrapped and not adapts_parameters:
        for target in targets:
            if not any(n == target or n.endswith("." + target) for n in ins.module_types):
                notes.append(f'"{target}" matches no layer; the layers: {_layer_names(ins)}')
    for layer in wrapped:
        if layer.role == "output":
            errors.append(f"target_modules {shown} includes the output layer {layer.name}: trl's fused LM head "
                          "reads its weight directly, so an adapter there would not train (peft's all-linear "
                          f'leaves it out); train it in full with modules_to_save = ["{layer.name}"]')
        elif layer.kind == "embedding":
            notes.append(f"{layer.name} is an embedding ({layer.in_features} x {layer.out_features}); peft "
                         "then also saves the full embedding matrices with the adapter")
        if layer.tied_to:
            notes.append(f"{layer.name} shares its weight with {layer.tied_to} (tie_word_embeddings); "
                         "merging such an adapter unties them")
    for name in saved_names:
        if not any(n.endswith(name) for n in saved_modules):
            notes.append(f'modules_to_save "{name}" matches no module')
    return errors, notes


# -- writing a choice the way peft reads it ---------------------------------------------


def targets_for(ins: Inspection, layers: Iterable[str]) -> str | list[str]:
    """``target_modules`` that selects exactly ``layers`` (names of :class:`Layer`).

    "all-linear" when the pick is peft's all-linear set; a list of group names when every
    picked group is whole; else a regex (full match) naming the picked layer indices. The
    result is checked by matching it back with peft's matcher.
    """
    chosen = set(layers)
    by_name = ins.by_name
    unknown = sorted(chosen - set(by_name))
    if unknown:
        raise UserError(f"{unknown[0]}: not a layer LoRA can wrap in this model")
    if not chosen:
        raise UserError("no layers picked; pick at least one")
    candidates: list[str | list[str]] = []
    if chosen == set(ins.all_linear):
        candidates.append(ALL_LINEAR)
    picked = [g for g in ins.groups if chosen.intersection(g.layers)]
    if all(g.suffix and chosen.issuperset(g.layers) for g in picked):
        candidates.append([g.name for g in picked])
    candidates.append(_regex(picked, chosen))
    ordered = [layer.name for layer in ins.layers if layer.name in chosen]
    candidates.append("|".join(re.escape(n) for n in ordered))  # always exact
    with _quiet():
        for candidate in candidates:
            if _match(ins, candidate) == ordered:
                return candidate
    raise AssertionError("the full-name regex selects exactly its names")  # pragma: no cover


def _regex(groups: list[Group], chosen: set[str]) -> str:
    """One regex for the picked layers: per group, its pattern with the picked layer
    indices; groups sharing a parent and the same indices are merged (q_proj|v_proj)."""
    merged: dict[str, list[str]] = {}
    for g in groups:
        picked = [n for n in g.layers if n in chosen]
        parts = g.pattern.split(".")
        stars = parts.count("*")
        if len(picked) == len(g.layers):
            index = r"\d+"
        elif stars == 1:
            star = parts.index("*")
            indices = [str(i) for i in sorted({int(n.split(".")[star]) for n in picked})]
            index = indices[0] if len(indices) == 1 else "(?:" + "|".join(indices) + ")"
        else:
            for n in picked:
                merged.setdefault(re.escape(n), [])
            continue
        prefix = r"\.".join(index if p == "*" else re.escape(p) for p in parts[:-1])
        merged.setdefault(prefix, []).append(re.escape(parts[-1]))
    pieces = []
    for prefix, lasts in merged.items():
        if not lasts:
            pieces.append(prefix)
            continue
        last = lasts[0] if len(lasts) == 1 else "(?:" + "|".join(lasts) + ")"
        pieces.append(f"{prefix}\\.{last}" if prefix else last)
    return "|".join(pieces)


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
