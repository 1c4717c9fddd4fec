"""Peak training memory of a LoRA / QLoRA run, estimated from the model's shape.

Pure arithmetic on config values: no torch import, so the UI process can call it for
every row of the Models list. :mod:`tunedeck.core.inspect` feeds it exact counts from a
model built on the meta device; :func:`estimate_for_model` feeds it counts derived from
``config.json`` (or a GGUF header) alone.

Every screen and command gets its number from one function, :func:`estimate_project`: the
project's settings as resolved for this machine (:func:`project_settings`: precision,
quantization mode, batch size, max_length, packing, gradient checkpointing, device) applied
to a :class:`ModelShape` (exact counts from the meta-built model, or config-only counts),
and printed with one formatter, :func:`tunedeck.core.units.format_gib`.

The formula (bytes; ``N = batch_size x S`` tokens, ``L`` decoder layers, hidden
size ``h``, intermediate size ``i``, ``nh`` query heads and ``nkv`` key/value heads of
width ``hd`` (``hq = nh*hd``, ``kvd = nkv*hd``), vocabulary ``V``, ``T`` trainable
parameters, ``a`` bytes per activation element: 2 under bf16/fp16 autocast, 4 in fp32)::

    weights       none: P x (2 for bf16/fp16, 4 for fp32)
                  4bit: Q x (0.5 + 1/64 + 4/(64*256))   nf4/fp4 codes + double-quantized absmax
                        Q x (0.5 + 4/64)                 without double quant
                        + (P - Q) x 4
                  8bit: Q x 1 + (P - Q) x 4
                  Q: parameters of the linear layers bitsandbytes quantizes (all but the
                  output layer and what is tied to it); the rest (embeddings, norms, biases,
                  the output layer) stays unquantized, and peft's
                  prepare_model_for_kbit_training casts it to fp32.
    adapter       T x 4 (weights: peft keeps adapters in fp32) + T x 4 (gradients)
                  + T x 8 (AdamW exp_avg and exp_avg_sq, fp32)
    activations   per token and decoder layer (tensors autograd saves for the backward):
                    norms      2 x (4h + 4)            RMSNorm/LayerNorm save an fp32 input and 1/rms
                    attention  a x (2 hq + 2 kvd) + 4 nh   q, k, v, output, fp32 logsumexp
                                                      (SDPA / flash: no S x S matrix)
                    mlp        a x 3i gated (gate, up, act(gate)); a x 2i otherwise
                    lora       per wrapped layer: a x in (its input, as lora_A's matmul saves
                               it) + m x in with dropout > 0 (the dropout mask: 1 byte on CUDA,
                               4 on a CPU) + a x r (lora_B's input)
                  without gradient checkpointing: N x (L x layer + 4h + 4)   (4h + 4: the final norm)
                  with it: N x (L x h x b + 4h + 4) + N x layer   each layer keeps only its input
                           (b bytes: 2 for bf16/fp16 weights; 4 for fp32, and for QLoRA, where
                           prepare_model_for_kbit_training's fp32 embeddings and norms make the
                           residual stream fp32), and one layer is recomputed at a time
                  (in fp32 without dropout, layers reading the same input save it once, so
                  the lora term then overcounts, by up to a quarter of the activations)
    lm head       no N x V logits are built. On CUDA trl's fused log-prob head scores
                  tokens in tiles, tile = min(N, 4096) x min(V, 32768), its Triton kernel
                  in one tile in place: tile x a, plus N x h x 4 (its fp32 gradient
                  accumulator). On a CPU tunedeck's compact head
                  (:mod:`tunedeck.core.batching`) projects only the trained positions, in
                  chunks of min(N, 2^25 / V) rows with about four fp32 copies and one in
                  the training precision alive: chunk x V x (a + 16), plus N x h x (a + 4)
                  (the selected states and their gradient)
    kernels       Liger's SwiGLU (``training.kernels = "liger"``) recomputes the gated
                  product in the backward pass: the MLP saves 2 x i per token, not 3 x i
    context       500 MiB on CUDA (kernels, cuBLAS workspace), 0 on a CPU
    preference    DPO and ORPO (``training.method``) run each pair's chosen and rejected
                  answer in one batch: N = 2 x batch_size x S, for the activations and the
                  LM head, which is trl's fused head on every device (the tile formula above).
                  DPO's reference pass (the adapter off) runs without gradients and keeps
                  nothing for the backward: it adds no term

``S``, the tokens of a batch row: the trainer pads each batch only to its longest row, so
when the dataset's longest tokenized row is known (:func:`longest_row`, kept on disk per
model, data file and dataset settings), ``S = min(longest row, max_length)``; with packing,
or while the longest row is not known, ``S = max_length``. The text says which
(:meth:`MemoryEstimate.tokens_text`).

The activation term is checked against the tensors autograd actually saves
(``tests/test_memory.py``); ``bench/bench_memory_estimate.py`` compares the total with
measured peak memory on a GPU, and on a CPU with what real runs record (the trainer's peak
resident memory, which also holds the libraries: the formula has no CPU term for them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .units import format_gib

CUDA_CONTEXT = 500 * 1024**2
# trl's fused LM head (trl.kernels.chunked_logprob): tokens and vocabulary per tile
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768
# tunedeck's compact head on a CPU (tunedeck.core.batching): logits per chunk, and the live fp32 copies
# per chunk element (the upcast logits, log-softmax, their exp for the entropy, the gradient)
HEAD_CHUNK_ELEMENTS = 2**25
HEAD_CPU_CHUNK_FP32 = 4 * 4
# bitsandbytes 4-bit: 64 weights per block; double quant stores each block's absmax as
# one byte plus an fp32 scale per 256 blocks
NF4_BYTES = 0.5 + 4 / 64
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# families whose MLP is up -> activation -> down (no gate)
NON_GATED = frozenset({
    "gpt2", "gpt_neox", "gpt_neo", "gptj", "gpt_bigcode", "falcon", "phi", "opt", "bloom", "mpt",
    "starcoder2", "codegen", "stablelm",
})


@dataclass(frozen=True)
class ArchInfo:
    """The shape of a decoder-only transformer, as the memory formula needs it."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WeightSplit:
    """The base model's parameters: all of them (tied ones once), and those bitsandbytes quantizes."""

    total: int
    quantizable: int


@dataclass(frozen=True)
class LoraFootprint:
    """What the adapter adds: its trainable parameters and the layers it wraps."""

    trainable_params: int
    layers: int  # wrapped layers
    input_features: int  # sum of in_features over the wrapped layers
    r: int
    dropout: float = 0.05


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model with its adapter: exact counts from the meta-built
    model (:func:`tunedeck.core.inspect.model_shape`), or counts derived from its config
    alone (:func:`config_shape`)."""

    arch: ArchInfo
    weights: WeightSplit
    lora: LoraFootprint


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training step, in bytes, by component."""

    weights: int
    adapter: int  # trainable weights + gradients + AdamW state
    activations: int  # with the run's gradient-checkpointing setting
    activations_full: int  # without gradient checkpointing
    activations_checkpointed: int  # with gradient checkpointing
    lm_head: int
    context: int
    total: int
    device: str
    mode: str
    precision: str
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    seq_length: int = 0  # tokens per row of the estimated batch: S in the formula (0: max_length)
    longest_row: int | None = None  # the dataset's longest tokenized row, when known
    packing: bool = False
    method: str = "sft"  # training.method: dpo and orpo batch two answers per pair

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryEstimate:
        """From :meth:`as_dict` (keys it does not know are left out)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def tokens_text(self) -> str:
        """The batch estimated, and why that length: "batch 4 × 301 tokens (the longest row)"."""
        text = tokens_text(self.batch_size, self.max_length, self.longest_row, self.packing)
        if self.method != "sft":  # "batch 4 pairs × 2 answers × 301 tokens (the longest row)"
            text = text.replace(f"batch {self.batch_size} × ", f"batch {self.batch_size} pairs × 2 answers × ", 1)
        return text

    def line(self) -> str:
        """The total and what it assumes: "~6.13 GiB on cpu: LoRA fp32, batch 4 × 414 tokens
        (the longest row), without gradient checkpointing"."""
        gc = "with" if self.gradient_checkpointing else "without"
        return (f"~{format_gib(self.total)} on {self.device}: {self.kind} {self.precision}, {self.tokens_text()}, "
                f"{gc} gradient checkpointing")

    def describe(self) -> str:
        """:meth:`line`, then the biggest parts."""
        parts = [f"weights {format_gib(self.weights)}", f"adapter + optimizer {format_gib(self.adapter)}",
                 f"activations {format_gib(self.activations)}", f"lm head {format_gib(self.lm_head)}"]
        if self.context:
            parts.append(f"CUDA context {format_gib(self.context)}")
        return f"{self.line()}; " + ", ".join(parts)

    @property
    def kind(self) -> str:
        return "LoRA" if self.mode == "none" else f"QLoRA {self.mode}"


def tokens_text(batch_size: int, max_length: int, longest_row: int | None, packing: bool = False) -> str:
    """The batch an estimate is made at, and why that length: "batch 4 × 301 tokens (the
    longest row)", "batch 4 × 512 tokens (at max_length)" while the longest row is not known."""
    if packing:
        return f"batch {batch_size} × {max_length} tokens (max_length: rows are packed)"
    if longest_row is None or longest_row <= 0:
        return f"batch {batch_size} × {max_length} tokens (at max_length)"
    if longest_row < max_length:
        return f"batch {batch_size} × {longest_row} tokens (the longest row)"
    return f"batch {batch_size} × {max_length} tokens (max_length: the longest row, {longest_row} tokens, is truncated)"


def memory_line(memory: dict[str, Any] | MemoryEstimate) -> str:
    """An estimate (or its :meth:`MemoryEstimate.as_dict`) as one line (:meth:`MemoryEstimate.line`)."""
    return (memory if isinstance(memory, MemoryEstimate) else MemoryEstimate.from_dict(memory)).line()


def estimate_vs_peak(estimate: int | None, peak: int | None) -> str:
    """A run's "estimated 6.13 GiB · measured peak 4.60 GiB", as far as known ("" for neither)."""
    parts = ([f"estimated {format_gib(estimate)}"] if estimate is not None else []) + (
        [f"measured peak {format_gib(peak)}"] if peak is not None else [])
    return " · ".join(parts)


def estimate_memory(
    arch: ArchInfo,
    weights: WeightSplit,
    lora: LoraFootprint,
    *,
    mode: str = "none",
    precision: str = "bf16",
    batch_size: int = 4,
    max_length: int = 1024,
    gradient_checkpointing: bool = True,
    device: str = "cuda",
    double_quant: bool = True,
    longest_row: int | None = None,
    packing: bool = False,
    kernels: str = "none",
    method: str = "sft",
) -> MemoryEstimate:
    """Peak memory of a training step; see the module docstring for the formula.

    ``mode``: "none" | "4bit" | "8bit"; ``precision``: "bf16" | "fp16" | "fp32" (for QLoRA,
    the compute dtype); ``device``: "cuda" | "cpu". ``longest_row``: the dataset's longest
    tokenized row (None: not known); batches are estimated at it, up to ``max_length``,
    unless rows are packed.
    """
    if mode not in ("none", "4bit", "8bit"):
        raise ValueError(f"mode must be none, 4bit or 8bit, not {mode!r}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, not {precision!r}")
    a = 4 if precision == "fp32" else 2
    if mode == "none":
        weight_bytes = weights.total * a
    else:
        per_param = 1.0 if mode == "8bit" else (NF4_DQ_BYTES if double_quant else NF4_BYTES)
        weight_bytes = weights.quantizable * per_param + (weights.total - weights.quantizable) * 4
    adapter = lora.trainable_params * (4 + 4 + 8)

    if longest_row is not None and longest_row <= 0:
        longest_row = None
    seq = max_length if packing or longest_row is None else min(longest_row, max_length)
    pairs = method != "sft"
    tokens = (2 if pairs else 1) * batch_size * seq
    h, i = arch.hidden_size, arch.intermediate_size
    mask = (1 if device == "cuda" else 4) if lora.dropout > 0 else 0
    lora_per_layer = ((a + mask) * lora.input_features + a * lora.r * lora.layers) / max(arch.num_layers, 1)
    layer = (2 * (4 * h + 4)
             + a * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.num_heads
             + a * (3 if arch.gated_mlp and kernels != "liger" else 2) * i
             + lora_per_layer)
    residual = 4 if (a == 4 or mode != "none") else 2
    final_norm = 4 * h + 4
    full = tokens * (arch.num_layers * layer + final_norm)
    checkpointed = tokens * (arch.num_layers * h * residual + final_norm + layer)
    if device == "cuda" or pairs:
        tile = min(tokens, HEAD_TOKEN_TILE) * min(arch.vocab_size, HEAD_VOCAB_TILE)
        head = tile * a + tokens * h * 4
    else:
        chunk = min(tokens, max(1, HEAD_CHUNK_ELEMENTS // max(arch.vocab_size, 1))) * arch.vocab_size
        head = chunk * (a + HEAD_CPU_CHUNK_FP32) + tokens * h * (a + 4)
    context = CUDA_CONTEXT if device == "cuda" else 0
    activations = checkpointed if gradient_checkpointing else full
    parts = [int(weight_bytes), int(adapter), int(activations), int(head), context]
    return MemoryEstimate(
        weights=parts[0], adapter=parts[1], activations=parts[2], activations_full=int(full),
        activations_checkpointed=int(checkpointed), lm_head=parts[3], context=context, total=sum(parts),
        device=device, mode=mode, precision=precision, batch_size=batch_size, max_length=max_length,
        gradient_checkpointing=gradient_checkpointing, seq_length=seq, longest_row=longest_row, packing=packing,
        method=method,
    )


# -- shapes from config files (no torch) ------------------------------------------


def _pick(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def arch_from_config(config: dict[str, Any]) -> ArchInfo:
    """An :class:`ArchInfo` from a ``config.json`` dict (the text model of a multimodal one).

    Raises ValueError naming the first size the config does not give.
    """
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = str(cfg.get("model_type") or config.get("model_type") or "?")
    hidden = _pick(cfg, "hidden_size", "n_embd", "d_model")
    layers = _pick(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _pick(cfg, "num_attention_heads", "n_head", "num_heads")
    vocab = _pick(cfg, "vocab_size")
    for name, value in (("hidden_size", hidden), ("num_hidden_layers", layers),
                        ("num_attention_heads", heads), ("vocab_size", vocab)):
        if not value:
            raise ValueError(f"config.json gives no {name}")
    assert hidden and layers and heads and vocab  # for the type checker: checked just above
    inter = _pick(cfg, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim") or 4 * hidden
    kv = _pick(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is None:
        kv = 1 if cfg.get("multi_query") and not cfg.get("new_decoder_architecture") else heads
    head_dim = _pick(cfg, "head_dim") or hidden // heads
    tie = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    return ArchInfo(model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                    num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
                    tie_word_embeddings=bool(tie), gated_mlp=model_type not in NON_GATED)


def arch_from_gguf(path: Path) -> ArchInfo:
    """An :class:`ArchInfo` from a GGUF file's header (reads metadata, not tensors; a file
    read before, unchanged, is not read again: :func:`tunedeck.core.models.read_gguf_header`).

    Raises ValueError naming the first size the header does not give.
    """
    from .models import read_gguf_header

    return read_gguf_header(path).arch()


def arch_from_gguf_reader(reader: Any) -> ArchInfo:
    """:func:`arch_from_gguf` on an open ``gguf.GGUFReader``."""

    def meta(key: str) -> Any:
        fld = reader.fields.get(key)
        return fld.contents() if fld is not None and fld.data else None

    def need(key: str) -> int:
        value = meta(key)
        if not isinstance(value, int):
            raise ValueError(f"the GGUF header gives no {key}")
        return value

    arch = str(meta("general.architecture") or "?")
    hidden, heads = need(f"{arch}.embedding_length"), need(f"{arch}.attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    kv = meta(f"{arch}.attention.head_count_kv")
    return ArchInfo(
        model_type=arch, hidden_size=hidden, intermediate_size=need(f"{arch}.feed_forward_length"),
        num_layers=need(f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=kv if isinstance(kv, int) else heads,
        head_dim=meta(f"{arch}.attention.key_length") or hidden // heads,
        vocab_size=len(tokens.data) if tokens is not None else 0,
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        gated_mlp=arch not in NON_GATED,
    )


def _layer_linears(arch: ArchInfo, preset: str) -> list[tuple[int, int]]:
    """(in, out) of the linear layers of one decoder layer, for a llama-style layout."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    attention = [(h, q), (h, kv), (h, kv), (q, h)]
    if preset == "attention":
        return attention
    mlp = [(h, i), (h, i), (i, h)] if arch.gated_mlp else [(h, i), (i, h)]
    return attention + mlp


def approx_weights(arch: ArchInfo) -> WeightSplit:
    """Parameter counts from the shape alone (norms and biases left out: well under 1%)."""
    linear = arch.num_layers * sum(n_in * n_out for n_in, n_out in _layer_linears(arch, "all-linear"))
    embed = arch.vocab_size * arch.hidden_size
    return WeightSplit(total=linear + embed * (1 if arch.tie_word_embeddings else 2), quantizable=linear)


def _named_linears(arch: ArchInfo) -> dict[str, tuple[int, int]]:
    """(in, out) of the llama-style linear layers of one decoder layer, by name."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_dim, arch.kv_dim
    named = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "up_proj": (h, i),
             "down_proj": (i, h)}
    if arch.gated_mlp:
        named["gate_proj"] = (h, i)
    return named


def approx_lora(arch: ArchInfo, *, r: int, preset: str = "all-linear", dropout: float = 0.05,
                targets: str | list[str] | None = None, use_dora: bool = False) -> LoraFootprint:
    """The adapter of ``targets`` on a llama-style layout: a list of llama layer names
    (q_proj, ..., down_proj) counts exactly those; anything else counts ``preset``'s layers
    ("attention" or "all-linear"; :func:`preset_of` picks it for the project's targets)."""
    named = _named_linears(arch)
    if isinstance(targets, list) and targets and all(t in named for t in targets):
        linears = [named[t] for t in dict.fromkeys(targets)]
    else:
        linears = _layer_linears(arch, preset_of(targets) if targets is not None else preset)
    layers = arch.num_layers * len(linears)
    dora = arch.num_layers * sum(n_out for _, n_out in linears) if use_dora else 0
    return LoraFootprint(
        trainable_params=arch.num_layers * sum(r * (n_in + n_out) for n_in, n_out in linears) + dora,
        layers=layers, input_features=arch.num_layers * sum(n_in for n_in, _ in linears), r=r, dropout=dropout,
    )


ATTENTION_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                             "attn.c_proj", "dense", "Wqkv", "out_proj", "query", "key", "value"})


def preset_of(targets: str | list[str]) -> str:
    """The preset a project's ``target_modules`` is closest to, for estimates without the model:
    "attention" when every name is an attention projection, else "all-linear" (the upper bound)."""
    if isinstance(targets, list) and targets and all(t in ATTENTION_NAMES for t in targets):
        return "attention"
    return "all-linear"


def arch_for_model(path: Path) -> ArchInfo:
    """The shape of a model from its ``ModelInfo.path``: a .gguf file, a config.json or a model folder."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return arch_from_gguf(path)
    config_file = path if path.is_file() else path / "config.json"
    return arch_from_config(json.loads(config_file.read_text(encoding="utf-8")))


def config_shape(info: Any, *, r: int = 16, targets: str | list[str] = "all-linear", dropout: float = 0.05,
                 use_dora: bool = False) -> ModelShape:
    """A :class:`ModelShape` from config files only (no torch): ``info`` is a
    :class:`tunedeck.core.models.ModelInfo`; its header parameter count is used when known.
    Raises ValueError (or OSError) when the shape cannot be read."""
    arch = arch_for_model(Path(info.path))
    split = approx_weights(arch)
    if info.params:
        split = WeightSplit(total=info.params, quantizable=min(split.quantizable, info.params))
    return ModelShape(arch, split, approx_lora(arch, r=r, targets=targets, dropout=dropout, use_dora=use_dora))


# -- a project's estimate ------------------------------------------------------------------

PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def project_settings(project: Any, hardware: Any = None, *, mode: str | None = None) -> dict[str, Any]:
    """How ``project`` trains on ``hardware`` (default: this machine), as :func:`estimate_memory`
    takes it: "auto" precision and gradient checkpointing resolved as the trainer resolves
    them (:func:`tunedeck.core.resolve.resolve`). ``mode`` replaces ``quantization.mode``
    (the Models list shows LoRA and QLoRA side by side); under quantization the precision is
    the compute dtype. Raises ProjectError (a UserError) when the settings cannot resolve."""
    from .resolve import resolve

    resolved = resolve(project, hardware)
    mode = project["quantization.mode"] if mode is None else mode
    precision = PRECISION_OF_DTYPE[resolved.compute_dtype] if mode != "none" else resolved.precision
    return {"mode": mode, "precision": precision, "batch_size": project["training.batch_size"],
            "max_length": project["dataset.max_length"], "gradient_checkpointing": resolved.gradient_checkpointing,
            "device": resolved.device, "double_quant": project["quantization.double_quant"],
            "packing": project["dataset.packing"], "kernels": resolved.kernels, "method": project["training.method"]}


def project_lora(project: Any) -> dict[str, Any]:
    """The project's [lora] values :func:`config_shape` takes."""
    return {"r": project["lora.r"], "targets": project["lora.target_modules"], "dropout": project["lora.dropout"],
            "use_dora": project["lora.use_dora"]}


def estimate_project(project: Any, shape: ModelShape, *, hardware: Any = None, mode: str | None = None,
                     longest_row: int | None = None) -> MemoryEstimate:
    """THE estimate of a project's peak training memory: every screen, command and the trainer
    call this. ``shape``: the project's model and adapter; ``longest_row``: the dataset's
    longest tokenized row when known (:func:`longest_row`, :func:`known_longest_row`);
    ``hardware`` and ``mode`` as in :func:`project_settings`."""
    settings = project_settings(project, hardware, mode=mode)
    return estimate_memory(shape.arch, shape.weights, shape.lora, longest_row=longest_row, **settings)


GENERIC = {"batch_size": 4, "max_length": 1024, "r": 16, "targets": "all-linear", "device": "cuda",
           "gradient_checkpointing": True}


def estimate_for_model(
    info: Any,
    project: Any = None,
    *,
    hardware: Any = None,
    longest_row: int | None = None,
    batch_size: int = 4,
    max_length: int = 1024,
    r: int = 16,
    targets: str | list[str] = "all-linear",
    device: str = "cuda",
    gradient_checkpointing: bool = True,
) -> dict[str, MemoryEstimate]:
    """For the Models list: {"lora": LoRA, "qlora": QLoRA} of ``info`` (a
    :class:`tunedeck.core.models.ModelInfo`), from config files only.

    With ``project``: at the project's settings as resolved for ``hardware``
    (:func:`estimate_project`), "qlora" in the project's quantization mode when it has one,
    else 4-bit; ``longest_row`` as there. Without: a generic LoRA bf16 / QLoRA 4-bit at the
    keyword settings. Raises ValueError (or OSError) when the shape cannot be read, and
    ProjectError when the project's settings cannot resolve.
    """
    if project is not None:
        shape = config_shape(info, **project_lora(project))
        quantized = project["quantization.mode"] if project["quantization.mode"] != "none" else "4bit"
        return {"lora": estimate_project(project, shape, hardware=hardware, mode="none", longest_row=longest_row),
                "qlora": estimate_project(project, shape, hardware=hardware, mode=quantized,
                                          longest_row=longest_row)}
    shape = config_shape(info, r=r, targets=targets)
    common = dict(batch_size=batch_size, max_length=max_length, device=device,
                  gradient_checkpointing=gradient_checkpointing)
    return {
        "lora": estimate_memory(shape.arch, shape.weights, shape.lora, mode="none", precision="bf16", **common),
        "qlora": estimate_memory(shape.arch, shape.weights, shape.lora, mode="4bit", precision="bf16", **common),
    }


# -- the dataset's longest row --------------------------------------------------------------
#
# Known once the rows went through the model's tokenizer and chat template: by the engine
# (the Modules screen, the settings summary), ``tunedeck inspect`` / ``models --project``,
# or a run. Kept in this process and on disk, keyed by what decides the token counts, so
# that the UI process reads it without a tokenizer.

_longest: dict[str, int | None] = {}  # kept file -> the longest row (None: the rows cannot be read)


def dataset_key(project: Any) -> str | None:
    """Where the longest row of the project's rows is kept (:func:`tunedeck.core.kept.kept_file`),
    keyed by what decides the token lengths: the model's tokenizer files, the data file, the
    format, columns, system prompt and chat template, and the code and library versions
    that render them. None without a dataset or a model."""
    from .kept import kept_file, stamp
    from .models import resolve_source
    from .sources import data_stamps

    if not project["dataset.path"]:
        return None
    try:
        ref = resolve_source(project["model.source"], project.root, allow_pickle=True)
    except Exception:  # noqa: BLE001 - no model, no tokens: the estimate stays at max_length
        return None
    key = {"model": stamp(ref.path), "data": data_stamps(project),
           "dataset": {k: project[f"dataset.{k}"] for k in ("format", "columns", "system_prompt", "reasoning")},
           "template": project["model.chat_template"], "trust": project["model.trust_remote_code"],
           "method": project["training.method"]}
    return str(kept_file("longest", key, code=("render.py", "datafile.py", "preview.py", "conversation.py", "sources.py",
                                               "preference.py")))


def known_longest_row(project: Any) -> int | None:
    """The project's longest tokenized row when it is already known (no tokenizer: the UI
    process calls this), else None."""
    from .kept import read_kept

    key = dataset_key(project)
    if key is None:
        return None
    if key in _longest:
        return _longest[key]
    value = (read_kept(Path(key)) or {}).get("longest")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def remember_longest_row(project: Any, longest: int) -> None:
    """Keep the project's longest tokenized row (before truncation), in this process and on disk."""
    from .kept import write_kept

    key = dataset_key(project)
    if key is None or longest <= 0:
        return
    _longest[key] = longest
    write_kept(Path(key), {"longest": longest})


def longest_row(project: Any) -> int | None:
    """The project's longest tokenized row (before truncation): known, or found by rendering
    every row as the dataset preview does (:func:`tunedeck.core.preview.preview_stats`: the
    tokenizer, so not in the UI process). None when there is no dataset or it cannot be read
    (the estimate then stays at max_length; the refusal is the pre-flight's to give)."""
    known = known_longest_row(project)
    key = dataset_key(project)
    if known is not None or key is None or key in _longest:
        return known
    from .preview import preview_stats

    try:
        longest = int(preview_stats(project)["longest"])
    except Exception:  # noqa: BLE001 - unreadable rows or model: the estimate stays at max_length
        _longest[key] = None
        return None
    if longest <= 0:
        _longest[key] = None
        return None
    remember_longest_row(project, longest)
    return longest
