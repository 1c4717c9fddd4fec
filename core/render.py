"""Render and mask: chat messages -> ``input_ids`` and ``labels``, the one code path for
what trains and what the dataset preview shows.

:func:`render` applies the chat template, tokenizes the whole rendered string once, and
marks which tokens the loss sees:

- ``loss_on="assistant"`` trains every assistant turn: the answer's tokens and the
  end-of-turn token that closes it (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
  Llama 3, eos for the Alpaca template), so the model learns to stop. The token after it
  (ChatML's newline) and every prompt token are masked with -100.
- ``loss_on="all"`` trains every token.
- ``text`` rows (one assistant message and no user turn, see
  :func:`tunedeck.core.datafile.to_messages`) are plain documents: the text is tokenized
  without the chat template (with the tokenizer's own special tokens, e.g. BOS) and eos is
  appended; everything trains.

The first token is never trained (nothing predicts it), so its label is always -100:
the labels say exactly what the loss sees.

Assistant spans are found for any chat template, not only those with
``{% generation %}`` tags: the conversation is rendered prefix by prefix
(``messages[:i]`` with the generation prompt, ``messages[:i + 1]`` without), which gives
the character range of each answer in the full rendering, also when the template injects
a default system prompt (SmolLM2's does). Characters map to tokens through the
tokenizer's offsets, so the token ids are those of the full string, exactly as chat
inference tokenizes it. The end-of-turn marker is the first special token (or eos, or a
known marker such as ``<|im_end|>``) after the answer. The eos/end-of-turn label survives
padding even when pad == eos, because padding is added by :class:`PadCollator`, which
pads labels with -100 by position, never by token id.

Long rows are truncated to ``max_length`` (keeping the start); a row whose trained tokens
are all cut off is reported as fully masked and left out of training.

This module imports no torch at module level; :class:`PadCollator` imports it when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
#: named templates for ``model.chat_template`` (``"auto"`` is the model's own)
TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}
#: the special strings each named template relies on being single tokens
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}
# end-of-turn strings recognised even when a tokenizer does not mark them special
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def resolve_chat_template(tokenizer: Any, name: str, *, model_label: str = "the model") -> str:
    """The Jinja template for ``model.chat_template``: the model's own for "auto", else a named one."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise UserError(
                f"{model_label} has no chat template; set model.chat_template to one of "
                f"{', '.join(TEMPLATES)} (e.g. --set model.chat_template=chatml)"
            )
        return own
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"model.chat_template = {name!r}: unknown; use auto, {', '.join(TEMPLATES)}") from None


def missing_template_tokens(tokenizer: Any, name: str) -> list[str]:
    """Special strings of a named template that this tokenizer does not have as single tokens."""
    vocab = tokenizer.get_vocab()
    return [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in vocab]


@dataclass
class Rendered:
    """One row, rendered and masked.

    ``input_ids`` and ``labels`` are what the trainer gets (``labels[i] == -100`` where the
    loss ignores token ``i``). ``text`` is the rendered string and ``offsets`` the character
    range of each kept token in it, for the preview.
    """

    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]]
    full_length: int  # tokens before truncation
    stop_trained: bool = True  # every assistant turn's end-of-turn token is trained (if not cut off)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def trained(self) -> list[bool]:
        return [label != IGNORE for label in self.labels]

    @property
    def tokens(self) -> list[tuple[int, bool]]:
        """(token id, trained) per token: what the preview shows."""
        return [(tid, label != IGNORE) for tid, label in zip(self.input_ids, self.labels)]

    @property
    def n_trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)

    def example(self) -> dict[str, list[int]]:
        """The training example: input_ids and labels."""
        return {"input_ids": self.input_ids, "labels": self.labels}


def is_text_row(messages: Sequence[dict[str, str]]) -> bool:
    """A ``text``-format row: a single assistant message with no prompt."""
    return len(messages) == 1 and messages[0]["role"] == "assistant"


def render(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    *,
    max_length: int,
    loss_on: str = "assistant",
    chat_template: str | None = None,
) -> Rendered:
    """Render one conversation and mask it (see the module docstring).

    ``chat_template`` overrides the tokenizer's own (see :func:`resolve_chat_template`).
    Raises ValueError when the template cannot render the conversation.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', not {loss_on!r}")
    if is_text_row(messages):
        return _render_text(tokenizer, messages[0]["content"], max_length)
    text = _apply(tokenizer, messages, chat_template, add_generation_prompt=False)
    if loss_on == "all":
        spans: list[tuple[int, int]] = [(0, len(text))]
        stop_trained = True
    else:
        spans, stop_trained = _assistant_spans(tokenizer, messages, text, chat_template)
    ids, trained, offsets = _tokenize_marked(tokenizer, text, spans)
    labels = [tid if t else IGNORE for tid, t in zip(ids, trained)]
    return _finish(ids, labels, text, offsets, max_length, stop_trained)


def _render_text(tokenizer: Any, text: str, max_length: int) -> Rendered:
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        enc = tokenizer(text, add_special_tokens=True)
        offsets = [(0, len(text))] * len(enc["input_ids"])
    ids = list(enc["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        offsets.append((len(text), len(text) + len(tokenizer.eos_token)))
        text += tokenizer.eos_token
    return _finish(ids, list(ids), text, offsets, max_length, True)  # type: ignore[arg-type]


def _finish(
    ids: list[int], labels: list[int], text: str, offsets: list[tuple[int, int]], max_length: int,
    stop_trained: bool,
) -> Rendered:
    full_length = len(ids)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    return Rendered(
        input_ids=ids[:max_length], labels=labels[:max_length], text=text,
        offsets=offsets[:max_length], full_length=full_length, stop_trained=stop_trained,
    )


def _apply(tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: str | None, *,
           add_generation_prompt: bool) -> str:
    try:
        out = tokenizer.apply_chat_template(
            list(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja raises its own errors (TemplateError, raise_exception(...))
        raise ValueError(f"the chat template cannot render this conversation ({_one_line(exc)})") from None
    if not isinstance(out, str):
        raise ValueError("the chat template did not render to text")
    return out


def _assistant_spans(
    tokenizer: Any, messages: Sequence[dict[str, str]], text: str, chat_template: str | None,
) -> tuple[list[tuple[int, int]], bool]:
    """Character spans of every assistant answer plus its end-of-turn marker in ``text``."""
    markers = _end_markers(tokenizer)
    spans: list[tuple[int, int]] = []
    stop_trained = True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("an assistant turn with no prompt before it")
        prompt = _apply(tokenizer, messages[:i], chat_template, add_generation_prompt=True)
        start = len(prompt) if text.startswith(prompt) else _common_prefix(prompt, text)
        through = _apply(tokenizer, messages[: i + 1], chat_template, add_generation_prompt=False)
        turn_end = len(through) if text.startswith(through) else len(text)
        content = message["content"].strip()
        found = text.find(content, start, turn_end) if content else -1
        if found < 0:
            # the template rewrites the answer: train the whole turn up to its trailing whitespace
            end = len(text[:turn_end].rstrip())
            spans.append((start, end))
            continue
        content_end = found + len(content)
        stop = _first_marker(text, markers, content_end, turn_end)
        if stop is None:
            stop_trained = False
            stop = content_end
        spans.append((start, stop))
    return spans, stop_trained


def _end_markers(tokenizer: Any) -> tuple[str, ...]:
    found: list[str] = []
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found.extend(t.content for t in decoder.values() if getattr(t, "special", False) and t.content)
    found.extend(END_MARKERS)
    return tuple(dict.fromkeys(found))


def _first_marker(text: str, markers: Iterable[str], start: int, end: int) -> int | None:
    """End position of the earliest marker in ``text[start:end]``, or None."""
    best: tuple[int, int] | None = None
    for m in markers:
        pos = text.find(m, start, end)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(m))
    return best[1] if best else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_marked(
    tokenizer: Any, text: str, spans: list[tuple[int, int]],
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Token ids of ``text``, whether each overlaps a trained span, and each token's offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):
        return _tokenize_segments(tokenizer, text, spans)
    ids = list(enc["input_ids"])
    trained = [any(s < e_tok and s_tok < e for s, e in spans) and e_tok > s_tok for s_tok, e_tok in offsets]
    return ids, trained, offsets  # type: ignore[return-value]


def _tokenize_segments(
    tokenizer: Any, text: str, spans: list[tuple[int, int]],
) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Fallback for tokenizers without offsets: tokenize trained and untrained pieces separately."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids: list[int] = []
    trained: list[bool] = []
    offsets: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids.extend(piece)
        trained.extend([inside] * len(piece))
        offsets.extend([(a, b)] * len(piece))
    return ids, trained, offsets


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else exc.__class__.__name__


# -- a dataset at a time ------------------------------------------------------------------


@dataclass
class RenderStats:
    """What rendering a dataset did: rows kept, dropped, truncated; token counts."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    fully_masked: list[int] = field(default_factory=list)  # row numbers
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    no_stop: int = 0  # rows whose answers have no end-of-turn token to train
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0  # tokens of the longest row before truncation

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "kept": self.kept, "truncated": self.truncated,
            "fully_masked": len(self.fully_masked), "failed": len(self.failed), "no_stop": self.no_stop,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens, "longest": self.longest,
        }


def render_rows(
    tokenizer: Any,
    rows: Iterable[tuple[int, Sequence[dict[str, str]]]],
    *,
    max_length: int,
    loss_on: str = "assistant",
    chat_template: str | None = None,
    until_one_trains: bool = False,
) -> tuple[list[dict[str, list[int]]], RenderStats]:
    """Render (row number, messages) pairs into training examples; rows left with no trained
    token (or that the template cannot render) are counted in the stats, not returned.
    ``until_one_trains``: stop at the first row that trains (enough to know the set is not
    refused; a set that is gets the same stats as a full pass)."""
    examples: list[dict[str, list[int]]] = []
    stats = RenderStats()
    for number, messages in rows:
        if until_one_trains and stats.kept:
            break
        stats.rows += 1
        try:
            r = render(tokenizer, messages, max_length=max_length, loss_on=loss_on, chat_template=chat_template)
        except ValueError as exc:
            stats.failed.append((number, str(exc)))
            continue
        stats.longest = max(stats.longest, r.full_length)
        stats.truncated += r.truncated
        stats.no_stop += not r.stop_trained
        if r.n_trained == 0:
            stats.fully_masked.append(number)
            continue
        stats.kept += 1
        stats.tokens += len(r.input_ids)
        stats.trained_tokens += r.n_trained
        examples.append(r.example())
    return examples, stats


@dataclass
class RenderedSplits:
    """A project's training and eval rows rendered as the trainer trains them."""

    template: str | None  # the chat template (None: text rows only)
    train: list[dict[str, list[int]]]
    train_stats: RenderStats
    eval: list[dict[str, list[int]]]
    eval_stats: RenderStats | None


def render_splits(project: Any, tokenizer: Any, splits: Any, *, model_label: str,
                  until_one_trains: bool = False) -> RenderedSplits:
    """The rows of a project's splits (:func:`tunedeck.core.datafile.load_splits`) rendered
    through the chat template the trainer uses; raises UserError (one line) for what cannot
    train: a model without a chat template for chat rows, a set with no row that trains.
    The trainer and the pre-flight both call it (the pre-flight with ``until_one_trains``)."""
    template_name = project["model.chat_template"]
    needs_template = any(not is_text_row(m) for _, m in splits.train + splits.eval)
    template = resolve_chat_template(tokenizer, template_name, model_label=model_label) if needs_template else None
    max_length = project["dataset.max_length"]
    opts = dict(max_length=max_length, loss_on=project["dataset.loss_on"], chat_template=template,
                until_one_trains=until_one_trains)
    train, stats = render_rows(tokenizer, splits.train, **opts)
    refusal = dataset_refusal(stats, max_length=max_length)
    if refusal:
        raise UserError(refusal)
    evaluated: list[dict[str, list[int]]] = []
    eval_stats = None
    if splits.eval:
        evaluated, eval_stats = render_rows(tokenizer, splits.eval, **opts)
        refusal = dataset_refusal(eval_stats, max_length=max_length, key="dataset.eval_split")
        if refusal:
            raise UserError(refusal)
    return RenderedSplits(template, train, stats, evaluated, eval_stats)


def dataset_refusal(stats: RenderStats, *, max_length: int, key: str = "dataset.path") -> str | None:
    """One line saying why a rendered dataset cannot train, or None."""
    if stats.rows == 0:
        return f"{key}: the dataset has no usable rows"
    if stats.kept:
        return None
    if stats.failed and not stats.fully_masked:
        number, reason = stats.failed[0]
        return f"{key}: no row can be rendered (row {number}: {reason}); check model.chat_template"
    return (
        f"{key}: every row is fully masked after truncation to dataset.max_length = {max_length} tokens "
        f"(longest row: {stats.longest} tokens), so nothing would train; raise dataset.max_length"
    )


# -- batches --------------------------------------------------------------------------------


@dataclass
class PadCollator:
    """Pads a batch to its longest row (not to max_length): ``input_ids`` with the pad id,
    ``labels`` with -100 and ``attention_mask`` with 0, by position, so an eos that is also
    the pad token keeps its label."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            attention_mask[i, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
