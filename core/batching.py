"""How rendered rows become training batches, and the loss over them (trainer process only).

Three layouts, one collator (:class:`BatchCollator`), tunedeck's own labels kept in each:

- **padding-free** (the default where the model supports it): the rows of a batch are
  concatenated into one sequence, ``position_ids`` restarting at 0 at each row and no
  attention mask, so no compute is spent on padding. The row boundaries reach the attention
  as ``cu_seq_lens_*``: flash attention's varlen kernels take them; with sdpa,
  :func:`rows_attention` runs causal sdpa row by row (no mask, and no attention computed
  across rows, which a block mask over the whole sequence would still compute and throw
  away); elsewhere transformers builds the per-row block mask from the ``position_ids``.
  The first label of every row is -100, so no row is trained from the end of the one before
  it;
- **packed** (``dataset.packing``): :func:`pack` puts several rows into each example, up to
  max_length tokens (best fit, longest rows first), each keeping its own labels; examples
  are then batched padding-free, the rows inside them still apart;
- **padded** (models whose attention cannot take packed rows, or ``dataset.padding_free =
  false``): each batch padded to its longest row, with an attention mask; the trainer
  groups rows of similar length into batches.

:func:`add_compact_head` gives the model a loss that projects only the positions that
train through the LM head (prompts, padding and masked turns are never projected), in
chunks of bounded size, in the training precision. trl's own fused head does that with
Triton on a GPU; elsewhere it projects every position in fp32, which on a CPU costs as much
as the rest of a small model.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100
# layer kinds of a model whose state would leak from one packed row to the next
STATEFUL_KEYS = ("ssm_state_size", "mamba_d_state", "state_size", "mamba_expand", "conv_L_cache", "rwkv")
ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention", "attention")
CHUNK_ELEMENTS = 2**25  # logits per chunk of the compact head (128 MiB in fp32)


# -- which layout -------------------------------------------------------------------------------


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def padding_free_problem(config: Any) -> str | None:
    """Why a model (its config, a dict or a transformers config) cannot train on packed rows
    from its config alone, or None."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    kind = text.get("model_type") or cfg.get("model_type") or "this model"
    for key in STATEFUL_KEYS:
        if key in text:
            return f"{kind} has recurrent (state-space) layers, whose state would run from one row into the next"
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list):
        other = sorted({str(t) for t in layer_types if t not in ATTENTION_LAYERS})
        if other:
            return f"{kind} has {', '.join(other)} layers, whose state would run from one row into the next"
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        return f"{kind} uses multimodal rotary positions (3-D position_ids)"
    return None


def model_padding_free_problem(model: Any) -> str | None:
    """:func:`padding_free_problem`, and whether the model's code builds its attention mask
    from ``position_ids`` (transformers' ``create_causal_mask``)."""
    base = base_model(model)
    problem = padding_free_problem(base.config)
    if problem:
        return problem
    module = sys.modules.get(type(base).__module__)
    if module is None or not any(hasattr(module, name) for name in ("create_causal_mask",
                                                                     "create_sliding_window_causal_mask")):
        return f"{type(base).__name__}'s attention does not read row boundaries from position_ids"
    return None


# -- attention row by row ------------------------------------------------------------------------

ROWS_ATTENTION = "tunedeck_rows"
SHORT_ROW = 192  # tokens: up to here a CPU runs a row's attention faster as plain matmuls than in sdpa's kernel


def rows_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa, once per row of a padding-free batch (its ``cu_seq_lens_q``), causal
    within the row; a batch without row boundaries goes to sdpa as it is."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for extra in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(extra, None)
    if bounds is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    edges = bounds.tolist()
    cpu = query.device.type == "cpu"
    outs = []
    for a, b in itertools.pairwise(edges):
        if b <= a:
            continue
        # on a CPU, sdpa's flash kernel is slower than plain matmuls for short rows (backward included)
        with sdpa_kernel(SDPBackend.MATH) if cpu and b - a <= SHORT_ROW else contextlib.nullcontext():
            outs.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                               dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0])
    return torch.cat(outs, dim=1), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # rows_attention needs none: the rows are apart, each causal


def use_rows_attention(model: Any, max_length: int) -> bool:
    """Switch a model on sdpa to :func:`rows_attention` for padding-free batches, where that is
    the same attention: not with a sliding window shorter than a row can be, nor with soft-capped
    attention logits. Returns whether it did."""
    from transformers import AttentionInterface, AttentionMaskInterface

    base = base_model(model)
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window < max_length and getattr(text, "use_sliding_window", True) is not False:
        return False
    if getattr(text, "attn_logit_softcapping", None):
        return False
    AttentionInterface.register(ROWS_ATTENTION, rows_attention)
    AttentionMaskInterface.register(ROWS_ATTENTION, _no_mask)
    try:
        base.set_attn_implementation(ROWS_ATTENTION)
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(base.config, "_attn_implementation", None) == ROWS_ATTENTION


# -- packing ------------------------------------------------------------------------------------


def pack(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Rows into examples of at most ``max_length`` tokens, best fit with the longest rows
    first (every row kept whole: rows are truncated to max_length when rendered). Each
    example keeps every row's labels and lists its rows' lengths in ``seq_lengths``."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (room left, bin number), sorted
    for i in order:
        length = len(examples[i]["input_ids"])
        at = bisect.bisect_left(space, (length, -1))
        if at < len(space):
            room, b = space.pop(at)
            bins[b].append(i)
            bisect.insort(space, (room - length, b))
        else:
            bins.append([i])
            bisect.insort(space, (max_length - length, len(bins) - 1))
    packed = []
    for rows in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in rows:
            ids.extend(examples[i]["input_ids"])
            labels.extend(examples[i].get("labels", examples[i]["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels,
                       "seq_lengths": [len(examples[i]["input_ids"]) for i in rows]})
    return packed


# -- the collator -------------------------------------------------------------------------------


@dataclass
class BatchCollator:
    """A batch from rendered (or packed) examples: padding-free (one sequence, position_ids
    restarting at each row) or padded to the longest row. Labels are tunedeck's own, with
    the first label of every row set to -100 (nothing predicts it)."""

    pad_token_id: int
    padding_free: bool = True
    varlen_kwargs: bool = False  # add cu_seq_lens_* / max_length_* for flash attention

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long).clone() for f in features]
        lengths = [list(f.get("seq_lengths") or [len(f["input_ids"])]) for f in features]
        for lab, rows in zip(labels, lengths, strict=True):
            start = 0
            for n in rows:
                if n:
                    lab[start] = IGNORE
                start += n
        if self.padding_free:
            rows = [n for row in lengths for n in row if n]
            batch = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                     "position_ids": torch.cat([torch.arange(n) for n in rows])[None]}
            if self.varlen_kwargs:
                cu = torch.tensor([0] + rows).cumsum(0).to(torch.int32)
                batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
                batch["max_length_q"] = batch["max_length_k"] = max(rows)
            return batch
        if any(len(row) > 1 for row in lengths):
            raise ValueError("packed examples need padding-free batches")
        longest = max(len(t) for t in ids)
        n = len(ids)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((n, longest), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, (t, lab) in enumerate(zip(ids, labels, strict=True)):
            input_ids[i, : len(t)] = t
            out_labels[i, : len(t)] = lab
            attention_mask[i, : len(t)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": out_labels}


# -- the compact LM head ------------------------------------------------------------------------


@dataclass
class CompactOutput:
    """What the compact head returns: the loss, and sums for the token metrics."""

    loss: Any
    tokens: Any  # positions that trained
    entropy_sum: Any
    correct: Any  # positions whose top-1 prediction was the label


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) the model applies to its logits after the LM head (Gemma's soft-capping,
    Cohere's and Granite's scales), read from its config as the models' own code does."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), (float(softcap) if softcap else None)


def add_compact_head(model: Any) -> None:
    """Give ``model`` (the PreTrainedModel under the adapter, when there is one) a
    ``compact_head=True`` forward: the backbone, then the LM head and the cross-entropy only at
    the positions whose next label trains. Without the flag the forward is the one it had
    (trl's, generation's). Patched on the instance's forward, so DDP and peft reach it through
    their own forwards."""
    model = base_model(model)
    original = model.forward
    scale, softcap = logit_transform(model.config)

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, compact_head: bool = False, labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not compact_head:
            if labels is not None:
                kwargs["labels"] = labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        shifted = labels[:, 1:].to(head.weight.device)
        mask = shifted != IGNORE
        states = hidden[:, :-1].to(head.weight.device)[mask]
        nll, entropy, correct = compact_cross_entropy(states, head.weight, head.bias, shifted[mask], scale, softcap)
        if states.shape[0] == 0:
            nll = hidden.sum() * 0.0  # still part of the graph: a batch with nothing to train backpropagates zero
        count = mask.sum()
        loss = nll / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return CompactOutput(loss=loss, tokens=count, entropy_sum=entropy, correct=correct)

    model.forward = types.MethodType(forward, model)


def compact_cross_entropy(states: Any, weight: Any, bias: Any, targets: Any, scale: float = 1.0,
                          softcap: float | None = None) -> tuple[Any, Any, Any]:
    """Summed cross-entropy of ``targets`` under ``states @ weight.T`` (+ bias), and the summed
    entropy and count of top-1 hits (no gradient). In chunks of rows whose logits are
    recomputed in the backward pass when there is more than one, so at most one chunk of
    logits is alive at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    n = states.shape[0]
    if n <= rows:
        return _chunk_loss(states, weight, bias, targets, scale, softcap)
    chunk = functools.partial(checkpoint, _chunk_loss, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss
    parts = [chunk(states[start:start + rows], weight, bias, targets[start:start + rows], scale, softcap)
             for start in range(0, n, rows)]
    nll, entropy, correct = (sum(sums) for sums in zip(*parts, strict=True))
    return nll, entropy, correct


def _chunk_loss(states: Any, weight: Any, bias: Any, targets: Any, scale: float,
                softcap: float | None) -> tuple[Any, Any, Any]:
    import torch

    logits = torch.nn.functional.linear(states, weight, bias).float()  # the matmul in the autocast precision
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, targets[:, None]).sum()
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum()
        correct = (logp.argmax(-1) == targets).sum()
    return nll, entropy, correct
