"""Target modules: which layers a choice of ``target_modules`` selects, and what it trains.

A choice is matched against an :class:`~tunedeck.core.inspect.Inspection` by peft's own
matcher (``peft.tuners.tuners_utils.check_target_module_exists``, with "all-linear" expanded
by peft's ``_maybe_include_all_linear_layers``) and counted in closed form, giving what
``get_peft_model(model, LoraConfig(...)).get_nb_trainable_parameters()`` reports
(``tests/test_inspect.py`` holds the two equal across eight families). :func:`targets_for`
goes the other way: the ``target_modules`` that selects exactly a pick of layers.

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
out features, and peft reports a 4-bit layer's parameters unpacked.

One exception to the closed form: for MoE families whose layout transformers 5 changed
(Mixtral, Qwen3-MoE, DeepSeek-V3, ...), peft rewrites ``target_modules`` before matching
and adapts the fused expert weights through ``target_parameters``. For those, counting
asks peft itself, on a fresh meta-device model (``Inspection.peft_remaps``).

Everything here works on the inspection's plain data, without the model (but for the MoE
families above). Importing this module imports neither torch nor peft; the functions do,
when called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import UserError, first_line
from .memory import LoraFootprint
from .modelconfig import build_meta_model, quiet_libraries

if TYPE_CHECKING:
    from .inspect import Group, Inspection, Layer

ALL_LINEAR = "all-linear"
# peft saves the base embedding matrices with the adapter when one of these is targeted
# (peft.utils.constants.EMBEDDING_LAYER_NAMES, save_embedding_layers="auto")
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


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
    with quiet_libraries():
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
        with quiet_libraries():
            peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    except ValueError as exc:
        return f"peft refuses target_modules {_targets_text(targets)}: {first_line(exc)}"
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
    with quiet_libraries():
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
