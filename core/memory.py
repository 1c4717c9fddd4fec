"""Peak training memory of a LoRA / QLoRA run, estimated from the model's shape.

Pure arithmetic on config values: no torch import, so the UI process can call it for
every row of the Models list. :mod:`tunedeck.core.inspect` feeds it exact counts from a
model built on the meta device; :func:`estimate_for_model` feeds it counts derived from
``config.json`` (or a GGUF header) alone.

The formula (bytes; ``N = batch_size x max_length`` tokens, ``L`` decoder layers, hidden
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
    lm head       trl's fused log-prob head scores tokens in tiles instead of building
                  N x V logits: tile = min(N, 4096) x min(V, 32768); on CUDA its Triton
                  kernel works in one tile in place: tile x a; on a CPU its torch fallback
                  keeps about eight fp32 copies alive: tile x 8 x 4; plus N x h x 4 (its fp32
                  gradient accumulator)
    context       500 MiB on CUDA (kernels, cuBLAS workspace), 0 on a CPU

``max_length`` is the worst case: the trainer pads each batch only to its longest row.
The activation term is checked against the tensors autograd actually saves
(``tests/test_memory.py``); ``bench/bench_memory_estimate.py`` compares the total with
measured peak memory on a GPU (and, as a sanity check, with torch's CPU allocations).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
CUDA_CONTEXT = 500 * 1024**2
# trl's fused LM head (trl.kernels.chunked_logprob): tokens and vocabulary per tile
HEAD_TOKEN_TILE = 4096
HEAD_VOCAB_TILE = 32768
HEAD_CPU_TILE_BYTES = 8 * 4  # the torch fallback's live fp32 temporaries per tile element
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: the total and its biggest parts."""
        gc = "with" if self.gradient_checkpointing else "without"
        kind = "LoRA" if self.mode == "none" else f"QLoRA {self.mode}"
        parts = [f"weights {gib(self.weights)}", f"adapter + optimizer {gib(self.adapter)}",
                 f"activations {gib(self.activations)}", f"lm head {gib(self.lm_head)}"]
        if self.context:
            parts.append(f"CUDA context {gib(self.context)}")
        return (f"~{gib(self.total)} peak on {self.device} ({kind} {self.precision}, batch {self.batch_size} x "
                f"{self.max_length} tokens, {gc} gradient checkpointing): " + ", ".join(parts))


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


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
) -> MemoryEstimate:
    """Peak memory of a training step; see the module docstring for the formula.

    ``mode``: "none" | "4bit" | "8bit"; ``precision``: "bf16" | "fp16" | "fp32" (for QLoRA,
    the compute dtype); ``device``: "cuda" | "cpu".
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

    tokens = batch_size * max_length
    h, i = arch.hidden_size, arch.intermediate_size
    mask = (1 if device == "cuda" else 4) if lora.dropout > 0 else 0
    lora_per_layer = ((a + mask) * lora.input_features + a * lora.r * lora.layers) / max(arch.num_layers, 1)
    layer = (2 * (4 * h + 4)
             + a * (2 * arch.q_dim + 2 * arch.kv_dim) + 4 * arch.num_heads
             + a * (3 if arch.gated_mlp else 2) * i
             + lora_per_layer)
    residual = 4 if (a == 4 or mode != "none") else 2
    final_norm = 4 * h + 4
    full = tokens * (arch.num_layers * layer + final_norm)
    checkpointed = tokens * (arch.num_layers * h * residual + final_norm + layer)
    tile = min(tokens, HEAD_TOKEN_TILE) * min(arch.vocab_size, HEAD_VOCAB_TILE)
    head = tile * (a if device == "cuda" else HEAD_CPU_TILE_BYTES) + tokens * h * 4
    context = CUDA_CONTEXT if device == "cuda" else 0
    activations = checkpointed if gradient_checkpointing else full
    parts = [int(weight_bytes), int(adapter), int(activations), int(head), context]
    return MemoryEstimate(
        weights=parts[0], adapter=parts[1], activations=parts[2], activations_full=int(full),
        activations_checkpointed=int(checkpointed), lm_head=parts[3], context=context, total=sum(parts),
        device=device, mode=mode, precision=precision, batch_size=batch_size, max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
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
    """An :class:`ArchInfo` from a GGUF file's header (reads metadata, not tensors).

    Raises ValueError naming the first size the header does not give.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

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


def approx_lora(arch: ArchInfo, *, r: int, preset: str = "all-linear", dropout: float = 0.05) -> LoraFootprint:
    """The adapter of ``preset`` ("attention" or "all-linear") on a llama-style layout."""
    linears = _layer_linears(arch, preset)
    layers = arch.num_layers * len(linears)
    return LoraFootprint(
        trainable_params=arch.num_layers * sum(r * (n_in + n_out) for n_in, n_out in linears),
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


def estimate_for_model(
    info: Any,
    *,
    batch_size: int = 4,
    max_length: int = 1024,
    r: int = 16,
    targets: str | list[str] = "all-linear",
    device: str = "cuda",
    gradient_checkpointing: bool = True,
) -> dict[str, MemoryEstimate]:
    """For the Models list: {"lora": LoRA in bf16, "qlora": QLoRA 4-bit} from config files only.

    ``info`` is a :class:`tunedeck.core.models.ModelInfo`; its header parameter count is used
    when known. Raises ValueError (or OSError) when the shape cannot be read.
    """
    arch = arch_for_model(Path(info.path))
    split = approx_weights(arch)
    if info.params:
        split = WeightSplit(total=info.params, quantizable=min(split.quantizable, info.params))
    lora = approx_lora(arch, r=r, preset=preset_of(targets))
    common = dict(batch_size=batch_size, max_length=max_length, device=device,
                  gradient_checkpointing=gradient_checkpointing)
    return {
        "lora": estimate_memory(arch, split, lora, mode="none", precision="bf16", **common),
        "qlora": estimate_memory(arch, split, lora, mode="4bit", precision="bf16", **common),
    }
